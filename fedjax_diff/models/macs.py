"""Multiply-accumulate (MAC) counts of a flax model's forward pass.

Counted without running anything: the model is traced under
`jax.eval_shape` with every `nn.Conv` / `nn.Dense` call intercepted, and
per image

    conv:   H_out · W_out · k_h · k_w · (C_in / groups) · C_out
    dense:  (leading elements of the output) · C_in · C_out
    attention (optional): 2 · (H·W)² · C   (q·kᵀ and weights·v)

The first two are what torch-pruning's `count_ops_and_params` (the counter
of FedPhD, arXiv 2507.06449, and Diff-Pruning, arXiv 2305.10924) counts for
convolutions and linear layers: for the DDPM CIFAR-10 UNet they give 6.06
GMACs, FedPhD's figure. Norms, activations and additions are not counted.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff.models import unet as unet_lib


def unet_macs(model: unet_lib.UNet, image_shape: Sequence[int],
              params: Optional[Any] = None,
              include_attention: bool = False) -> int:
  """MACs of one forward pass of `model` on one image of `image_shape`.

  Args:
    model: the UNet (any widths).
    image_shape: (H, W, C).
    params: its parameters (arrays or ShapeDtypeStructs); by default the
      shapes of its initialisation.
    include_attention: also count the attention products q·kᵀ and
      softmax·v (not counted by torch-pruning's counter).

  Returns:
    The MAC count (an int).
  """
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  labels = (None if model.num_classes is None else
            jax.ShapeDtypeStruct((1,), jnp.int32))
  if params is None:
    params = jax.eval_shape(
        lambda: unet_lib.init_params(model, jax.random.key(0), image_shape))
  total = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    mod = context.module
    if isinstance(mod, nn.Conv):
      kernel = mod.variables['params']['kernel'].shape  # kh, kw, cin/g, cout
      total.append(int(np.prod(out.shape[:-1])) * int(np.prod(kernel)))
    elif isinstance(mod, nn.Dense):
      kernel = mod.variables['params']['kernel'].shape
      total.append(int(np.prod(out.shape[:-1])) * int(np.prod(kernel)))
    elif include_attention and isinstance(mod, unet_lib.AttnBlock):
      _, h, w, c = args[0].shape
      total.append(2 * (h * w) ** 2 * c)
    return out

  def fwd(p, x, t, labels):
    with nn.intercept_methods(interceptor):
      return model.apply({'params': p}, x, t, labels, train=False)

  jax.eval_shape(fwd, params, x, t, labels)
  return int(sum(total))
