"""Held-out denoising loss: the DDPM ε-loss of the global model on test data.

    L = E_{x0 ∈ test, t, ε} ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²

(Ho et al. 2020, eq. 14), estimated with a fixed key so that values are
comparable across rounds and runs. In latent diffusion x0 is the test
image's latent (`EvalContext.latent`, encoded once here), the space the
model is trained in. `heldout_loss` is the loss of the model
the evaluators judge (`config.eval_params`: the EMA by default, or the raw
global model); the other one is reported too, as `heldout_loss_raw` or
`heldout_loss_ema`.

For a class-conditional model, `heldout_loss_null_label` is the judged
model's loss with every label replaced by the null class (the
unconditional ε of classifier-free guidance), on the same (x0, t, ε).
`heldout_loss_null_label − heldout_loss` is what the labels buy: about 0
when the model ignores them, negative when they mislead it (README,
"Tries towards a better quickstart").
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff import client
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.evaluators.base import evaluated_params


class Evaluator:
  """Config: every_rounds, num_examples (0 = all), batch_size."""

  FIELDS = {'every_rounds': base.EVERY_ROUNDS,
            'num_examples': base.Field(0, 'int', low=0),
            'batch_size': base.Field(128, 'int', low=1)}

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    cfg = base.parse(cfg, self.FIELDS, 'config.evaluators.denoising_loss')
    self.every_rounds = int(cfg.every_rounds)
    batch = int(cfg.batch_size)
    n = len(ctx.test_data)
    want = int(cfg.num_examples) or n
    num_batches = max(1, min(want, n) // batch)
    if min(want, n) < batch:
      batch = min(want, n)
    used = num_batches * batch
    images = ctx.test_data.images[:used]
    if ctx.latent is not None:
      images = ctx.latent.encode_images(images)
    images = images.reshape((num_batches, batch) + images.shape[1:])
    labels = ctx.test_data.labels[:used].reshape(num_batches, batch)
    self._images = jnp.asarray(images)
    self._labels = jnp.asarray(labels)
    self.num_examples = used
    conditional = ctx.num_classes is not None
    key = jax.random.PRNGKey(ctx.seed + 7919)

    def batch_loss(params, i, null):
      x = client.to_float_images(self._images[i])
      labels = None
      if conditional:
        labels = (jnp.full_like(self._labels[i], ctx.num_classes) if null
                  else self._labels[i])
      return diffusion_loss(
          ctx.eps_fn, params, ctx.schedule, x, jax.random.fold_in(key, i),
          labels=labels, train=False)

    def mean_loss(params, null=False):
      return jax.lax.map(lambda i: batch_loss(params, i, null),
                         jnp.arange(num_batches)).mean()

    self._mean_loss = jax.jit(mean_loss, static_argnames='null')
    self._conditional = conditional
    self._ctx = ctx

  def __call__(self, state, round_idx):
    del round_idx
    other = 'raw' if self._ctx.params == 'ema' else 'ema'
    judged = evaluated_params(state, self._ctx)
    out = {
        'heldout_loss': float(self._mean_loss(judged)),
        f'heldout_loss_{other}': float(self._mean_loss(
            state.params if other == 'raw' else state.ema_params)),
    }
    if self._conditional:
      out['heldout_loss_null_label'] = float(self._mean_loss(judged,
                                                             null=True))
    return out
