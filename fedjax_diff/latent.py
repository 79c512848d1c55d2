"""The latent space of latent diffusion: where the UNet's data live.

Rombach et al. 2022 (arXiv 2112.10752): a diffusion model is trained on
z' = s·(z − b) with z = E(x) the first stage's encoding of an image x, and
images are D(z'/s + b). s is the latent scale factor ("scale_by_std": s =
1/std of the training latents, so that the diffusion model's data have
about unit variance, as it assumes for x_T ~ N(0, I)); b is diffusers'
`shift_factor` (0 for LDM's and Stable Diffusion 1/2's autoencoders).

`LatentSpace` holds the autoencoder, its parameters, s and b:

* `encode_images(uint8 images)`: float32 latents z', computed once, in
  batches, before training (`trainer.setup` encodes the train split and
  the clients receive latent-shaped data: the encoder never runs inside a
  round). z is the posterior mean μ(x): LDM draws z ~ q(z | x) afresh each
  time it sees x; with latents computed once a single draw would freeze
  one noise sample into the data, and the mean is the deterministic choice
  (σ is tiny with LDM's 1e-6 KL weight).
* `decode(z')`: images in [−1, 1] (clipped), used by every evaluator after
  sampling (`evaluators.base.make_drawer`).

Config block `config.latent` (parsed by `from_config`, only here):

    autoencoder: a workdir of launch/train_autoencoder.py, a diffusers
      AutoencoderKL directory, or a weight file (.safetensors / .bin /
      .ckpt; diffusers' or LDM's names, see models/autoencoder_weights.py).
    scale_factor: s; None: the checkpoint's (diffusers' scaling_factor, an
      LDM checkpoint's scale_factor), else 1/std of the training latents.
    encode_batch_size: images per encoder call (default 256).
    trust_pickle: let torch unpickle more than tensors (default False).
"""

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff.models import autoencoder as ae_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """A first stage and its latent normalisation (see the module docstring).

  Attributes:
    model: the `AutoencoderKL`.
    params: its parameters (never trained here, never communicated).
    scale: s.
    shift: b.
    image_shape: (H, W, C) of the images.
    source: where the autoencoder came from, for logs.
    encode_batch_size: images per encoder call.
  """
  model: ae_lib.AutoencoderKL
  params: PyTree
  scale: float
  shift: float
  image_shape: tuple[int, int, int]
  source: str = ''
  encode_batch_size: int = 256

  @property
  def shape(self) -> tuple[int, int, int]:
    """(h, w, c) of a latent: what the UNet trains on and samples."""
    return ae_lib.latent_shape(self.model, self.image_shape)

  def encode(self, x: jax.Array) -> jax.Array:
    """Images in [−1, 1] → s·(μ(x) − b)."""
    mean, _ = self.model.apply({'params': self.params}, x,
                               method=ae_lib.AutoencoderKL.encode)
    return (mean - self.shift) * self.scale

  def decode(self, z: jax.Array, params: Optional[PyTree] = None
             ) -> jax.Array:
    """s·(z − b) → images D(z/s + b), clipped to [−1, 1]; `params`: the
    autoencoder's (default `self.params`; pass them to a jitted caller as
    an argument)."""
    params = self.params if params is None else params
    x = self.model.apply({'params': params}, z / self.scale + self.shift,
                         method=ae_lib.AutoencoderKL.decode)
    return jnp.clip(x, -1.0, 1.0)

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, C] → float32 latents [N, h, w, c] (numpy)."""
    return _encode_batches(self.model, self.params, images,
                           self.encode_batch_size,
                           lambda m: (m - self.shift) * self.scale)

  def with_scale(self, scale: float) -> 'LatentSpace':
    return dataclasses.replace(self, scale=float(scale))


def _encode_batches(model, params, images: np.ndarray, batch: int,
                    normalise: Callable) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'encode_images takes uint8 images; got {images.dtype}.')
  encode = jax.jit(lambda p, x: model.apply(
      {'params': p}, x.astype(jnp.float32) / 127.5 - 1.0,
      method=ae_lib.AutoencoderKL.encode)[0])
  out = []
  for s in range(0, len(images), batch):
    chunk = images[s:s + batch]
    n = len(chunk)
    if n < batch and len(images) > batch:   # one compiled shape.
      chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:],
                                              chunk.dtype)])
    out.append(np.asarray(normalise(encode(params, jnp.asarray(chunk))))[:n])
  return np.concatenate(out).astype(np.float32)


def is_autoencoder_workdir(path: str) -> bool:
  """Whether `path` is a workdir of launch/train_autoencoder.py."""
  cfg = os.path.join(path, 'config.json')
  if not (os.path.isdir(os.path.join(path, 'checkpoints')) and
          os.path.exists(cfg)):
    return False
  with open(cfg) as f:
    keys = set(json.load(f))
  # A latent diffusion run's workdir has the block too, and much more.
  return 'autoencoder' in keys and 'federation' not in keys


def load_autoencoder(path: str, *, trust_pickle: bool = False):
  """(model, params, scale or None, shift or None, source) of `path`: a
  train_autoencoder workdir (its latest checkpoint), a diffusers directory
  or a weight file."""
  from fedjax_diff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from fedjax_diff.models import autoencoder_weights  # pylint: disable=g-import-not-at-top
  if not path:
    raise ValueError(
        'config.latent.autoencoder is empty: a latent diffusion config needs '
        'a first stage. Train one with `python launch/train_autoencoder.py '
        '--config=<this config> --workdir=DIR` and pass '
        '--config.latent.autoencoder=DIR, or give a diffusers AutoencoderKL '
        'directory or an LDM first-stage checkpoint.')
  if is_autoencoder_workdir(path):
    with open(os.path.join(path, 'config.json')) as f:
      stage = ml_collections.ConfigDict(json.load(f))
    manager = workdir_lib.checkpoint_manager(path)
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(
          f'{path} is an autoencoder workdir with no checkpoint yet: run '
          f'launch/train_autoencoder.py on it to the end.')
    raw = manager.restore(step, args=workdir_lib.ocp.args.StandardRestore())
    manager.close()
    params = jax.tree.map(np.asarray, raw['params'])
    model = ae_lib.from_config(
        stage.autoencoder,
        in_channels=params['encoder']['conv_in']['kernel'].shape[2])
    return model, params, None, None, f'{path} (step {step})'
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'config.latent.autoencoder={path!r} does not exist. Make it with '
        '`python launch/train_autoencoder.py --config=<this config> '
        f'--workdir={path}`, or point it at a diffusers AutoencoderKL '
        'directory or an LDM first-stage checkpoint (.ckpt/.safetensors).')
  loaded = autoencoder_weights.load(path, trust_pickle=trust_pickle)
  return (loaded.model, loaded.params, loaded.scaling_factor,
          loaded.shift_factor, loaded.source)


def from_config(config: ml_collections.ConfigDict,
                train_images: np.ndarray,
                log: Callable[[str], None] = print
                ) -> tuple[Optional[LatentSpace], Optional[np.ndarray]]:
  """(LatentSpace, encoded train latents) of `config.latent`, or (None,
  None) for a pixel-space config (no `latent` block)."""
  cfg = config.get('latent')
  if cfg is None:
    return None, None
  image_shape = tuple(int(d) for d in np.shape(train_images)[1:])
  model, params, scale, shift, source = load_autoencoder(
      str(cfg.get('autoencoder') or ''),
      trust_pickle=bool(cfg.get('trust_pickle', False)))
  if model.in_channels != image_shape[-1]:
    raise ValueError(
        f'The autoencoder {source} takes {model.in_channels}-channel images; '
        f'{config.data.name} has {image_shape[-1]} channels.')
  space = LatentSpace(
      model=model, params=jax.device_put(params), scale=1.0,
      shift=float(shift or 0.0), image_shape=image_shape, source=source,
      encode_batch_size=int(cfg.get('encode_batch_size', 256)))
  space.shape  # pylint: disable=pointless-statement  (H, W divisible by f)
  given = cfg.get('scale_factor')
  if given is not None:
    scale, how = float(given), 'config.latent.scale_factor'
  elif scale is not None:
    how = 'the checkpoint'
  else:
    how = '1/std of the training latents (LDM scale_by_std)'
  latents = space.encode_images(train_images)
  if given is None and scale is None:
    scale = 1.0 / float(np.std(latents))
  space = space.with_scale(scale)
  latents = latents * np.float32(scale)
  log(f'Latent space: {source}, f = {model.downsampling_factor}, latents '
      f'{space.shape} of images {image_shape}; scale s = {scale:.5g} '
      f'({how}); {len(latents):,} training images encoded once, latent std '
      f'{float(np.std(latents)):.3f}.')
  return space, latents
