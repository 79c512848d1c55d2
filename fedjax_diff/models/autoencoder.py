"""The KL-regularised autoencoder of latent diffusion (its first stage).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (arXiv 2112.10752), Sec. 3.1 and Appendix G: an encoder E maps an
image x ∈ R^{H×W×3} to the moments of a diagonal Gaussian posterior over a
latent z ∈ R^{h×w×c}, h = H/f, w = W/f, a decoder D maps z back to pixels,
and a diffusion model is then trained on z. The KL variant regularises the
posterior towards N(0, I) with a small weight (1e-6 in the paper's KL-f*
models). This is the architecture of LDM's `AutoencoderKL`
(ldm/models/autoencoder.py with the `Encoder`/`Decoder` of
ldm/modules/diffusionmodules/model.py, `attn_resolutions=[]`), which is
diffusers' `AutoencoderKL`; submodules are named as in diffusers so that
weights convert by name (`models/autoencoder_weights.py`).

With L = len(widths) levels, f = 2^(L−1):

* Encoder: conv_in (3×3) → for level i: `num_res_blocks` ResnetBlocks of
  width w_i, then (except at the last level) a 3×3 stride-2 conv after zero
  padding of one row/column at the bottom/right → mid block (ResnetBlock,
  single-head self-attention, ResnetBlock) → GroupNorm → SiLU → conv_out to
  2c channels → quant_conv (1×1): the moments (μ, log σ²), split on channels.
* Posterior q(z | x) = N(μ, diag σ²) with log σ² clamped to [−30, 20];
  KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) over the latent's elements.
* Decoder: post_quant_conv (1×1) → conv_in → mid block → for level i from
  the deepest: `num_res_blocks + 1` ResnetBlocks of width w_i, then (except
  at the shallowest) nearest-neighbour ×2 upsampling and a 3×3 conv →
  GroupNorm → SiLU → conv_out.
* ResnetBlock: GroupNorm → SiLU → conv 3×3 → GroupNorm → SiLU → conv 3×3,
  plus the input (through a 1×1 conv_shortcut when the width changes).
  Every GroupNorm has ε = 1e-6.

The latent scale factor s (the diffusion model sees s·z, so that its data
have about unit variance) belongs to the latent space, not to the network:
see `fedjax_diff/latent.py`.
"""

from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array
PyTree = Any

# log σ² is clamped to this range, as in LDM's and diffusers'
# DiagonalGaussianDistribution.
LOGVAR_RANGE = (-30.0, 20.0)


def _conv(features: int, kernel: int, *, stride: int = 1, padding='SAME',
          name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, name=name)


def _norm(num_groups: int, name: str) -> nn.GroupNorm:
  # Two-pass variance: E[(x − μ)²], not E[x²] − μ², as torch computes it.
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6,
                      use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm → SiLU → conv → GroupNorm → SiLU → conv, plus the input."""
  features: int
  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.silu(_norm(self.num_groups, 'norm1')(x))
    h = _conv(self.features, 3, name='conv1')(h)
    h = nn.silu(_norm(self.num_groups, 'norm2')(h))
    h = _conv(self.features, 3, name='conv2')(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, name='conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over the H·W positions, with a residual:
  x + W_o softmax(q kᵀ / √C) v, with q, k, v = W_{q,k,v} GroupNorm(x)."""
  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    h = _norm(self.num_groups, 'group_norm')(x).reshape(b, hgt * wid, c)
    q = nn.Dense(c, name='to_q')(h)
    k = nn.Dense(c, name='to_k')(h)
    v = nn.Dense(c, name='to_v')(h)
    logits = jnp.einsum('bqc,bkc->bqk', q, k) * (c ** -0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    h = jnp.einsum('bqk,bkc->bqc', weights.astype(v.dtype), v)
    h = nn.Dense(c, name='to_out_0')(h)
    return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """ResnetBlock, self-attention (unless `attention=False`), ResnetBlock."""
  num_groups: int
  attention: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.num_groups, name='resnets_0')(x)
    if self.attention:
      x = Attention(self.num_groups, name='attentions_0')(x)
    return ResnetBlock(c, self.num_groups, name='resnets_1')(x)


class Downsample(nn.Module):
  """3×3 stride-2 conv after zero padding of one row/column at the bottom
  and right (LDM's and diffusers' `padding=0` downsampler)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)),
                 name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour ×2, then a 3×3 conv."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, name='conv')(x)


class DownBlock(nn.Module):
  features: int
  num_res_blocks: int
  num_groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_res_blocks):
      x = ResnetBlock(self.features, self.num_groups, name=f'resnets_{j}')(x)
    if self.downsample:
      x = Downsample(name='downsamplers_0')(x)
    return x


class UpBlock(nn.Module):
  features: int
  num_res_blocks: int
  num_groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_res_blocks):
      x = ResnetBlock(self.features, self.num_groups, name=f'resnets_{j}')(x)
    if self.upsample:
      x = Upsample(name='upsamplers_0')(x)
    return x


class Encoder(nn.Module):
  widths: Sequence[int]
  num_res_blocks: int
  out_channels: int
  num_groups: int
  mid_attention: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv(self.widths[0], 3, name='conv_in')(x)
    last = len(self.widths) - 1
    for i, w in enumerate(self.widths):
      h = DownBlock(w, self.num_res_blocks, self.num_groups, i != last,
                    name=f'down_blocks_{i}')(h)
    h = MidBlock(self.num_groups, self.mid_attention, name='mid_block')(h)
    h = nn.silu(_norm(self.num_groups, 'conv_norm_out')(h))
    return _conv(self.out_channels, 3, name='conv_out')(h)


class Decoder(nn.Module):
  widths: Sequence[int]
  num_res_blocks: int
  out_channels: int
  num_groups: int
  mid_attention: bool = True

  @nn.compact
  def __call__(self, z: Array) -> Array:
    h = _conv(self.widths[-1], 3, name='conv_in')(z)
    h = MidBlock(self.num_groups, self.mid_attention, name='mid_block')(h)
    last = len(self.widths) - 1
    for i, w in enumerate(reversed(self.widths)):
      h = UpBlock(w, self.num_res_blocks + 1, self.num_groups, i != last,
                  name=f'up_blocks_{i}')(h)
    h = nn.silu(_norm(self.num_groups, 'conv_norm_out')(h))
    return _conv(self.out_channels, 3, name='conv_out')(h)


class AutoencoderKL(nn.Module):
  """LDM's KL autoencoder (see the module docstring).

  Attributes:
    widths: channels of each resolution level (diffusers'
      `block_out_channels`, LDM's `ch · ch_mult`); the downsampling factor
      is f = 2^(len(widths) − 1).
    num_res_blocks: ResnetBlocks per encoder level (the decoder has one
      more), diffusers' `layers_per_block`.
    latent_channels: c, channels of z (LDM's `z_channels` = `embed_dim`).
    in_channels: image channels.
    out_channels: decoded channels; None: `in_channels`.
    num_groups: GroupNorm groups; must divide every width.
    mid_attention: the self-attention of the mid blocks (diffusers'
      `mid_block_add_attention`).
    use_quant_conv: the 1×1 conv after the encoder (diffusers'
      `use_quant_conv`); likewise `use_post_quant_conv` before the decoder.
  """
  widths: Sequence[int] = (128, 256, 512, 512)
  num_res_blocks: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: Optional[int] = None
  num_groups: int = 32
  mid_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def setup(self):
    widths = tuple(self.widths)
    if not widths or min(widths) < 1:
      raise ValueError(f'AutoencoderKL.widths must be positive, got {widths}.')
    bad = [w for w in widths if w % self.num_groups]
    if bad:
      raise ValueError(f'AutoencoderKL.num_groups={self.num_groups} must '
                       f'divide every width; {bad} of {widths} it does not.')
    if self.num_res_blocks < 1 or self.latent_channels < 1:
      raise ValueError('AutoencoderKL needs num_res_blocks >= 1 and '
                       f'latent_channels >= 1, got {self.num_res_blocks} and '
                       f'{self.latent_channels}.')
    c = self.latent_channels
    self.encoder = Encoder(widths, self.num_res_blocks, 2 * c,
                           self.num_groups, self.mid_attention)
    self.decoder = Decoder(widths, self.num_res_blocks,
                           self.out_channels or self.in_channels,
                           self.num_groups, self.mid_attention)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * c, 1)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(c, 1)

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.widths) - 1)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Images [B, H, W, C_in] in [−1, 1] → posterior (μ, log σ²), each
    [B, H/f, W/f, c]."""
    f = self.downsampling_factor
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'AutoencoderKL.encode takes NHWC images with H and W '
                       f'divisible by f = {f}; got shape {x.shape}.')
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: Array) -> Array:
    """Latents [B, h, w, c] → images [B, h·f, w·f, C_out] (not clipped)."""
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: Array, rng: Optional[Array] = None):
    """Reconstruction through a posterior sample z = μ + σ·n, n ~ N(0, I)
    (the mode μ when `rng` is None). Returns (x̂, μ, log σ²)."""
    mean, logvar = self.encode(x)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape,
                                                           mean.dtype)
    return self.decode(z), mean, logvar


def kl_divergence(mean: Array, logvar: Array) -> Array:
  """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) per example [B]."""
  axes = tuple(range(1, mean.ndim))
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar,
                       axis=axes)


def latent_shape(model: AutoencoderKL, image_shape: Sequence[int]
                 ) -> tuple[int, int, int]:
  """(h, w, c) of the latents of images of shape (H, W, C)."""
  h, w, _ = image_shape
  f = model.downsampling_factor
  if h % f or w % f:
    raise ValueError(f'Images of {h}×{w} do not divide by the autoencoder\'s '
                     f'downsampling factor f = {f}: pad or resize them to a '
                     f'multiple of {f}, or use fewer levels (widths).')
  return (h // f, w // f, int(model.latent_channels))


def init_params(model: AutoencoderKL, rng: Array,
                image_shape: Sequence[int]) -> PyTree:
  """The model's parameters, initialised on one image of `image_shape`."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return flax.core.unfreeze(model.init(rng, x)['params'])


def from_config(cfg: ml_collections.ConfigDict,
                in_channels: Optional[int] = None) -> AutoencoderKL:
  """An `AutoencoderKL` from a config block in LDM's `ddconfig` terms.

  Fields: `ch`, `ch_mult` (widths ch·m; f = 2^(len(ch_mult) − 1)),
  `num_res_blocks`, `z_channels` (c), and optionally `num_groups` (32),
  `mid_attention` (True), `in_channels` (default: the argument, else 3).
  """
  ch_mult = tuple(int(m) for m in cfg.ch_mult)
  channels = cfg.get('in_channels') or in_channels or 3
  return AutoencoderKL(
      widths=tuple(int(cfg.ch) * m for m in ch_mult),
      num_res_blocks=int(cfg.num_res_blocks),
      latent_channels=int(cfg.z_channels), in_channels=int(channels),
      num_groups=int(cfg.get('num_groups', 32)),
      mid_attention=bool(cfg.get('mid_attention', True)))


def architecture(model: AutoencoderKL) -> dict:
  """The fields that rebuild `model` (`AutoencoderKL(**architecture(m))`)."""
  return dict(widths=[int(w) for w in model.widths],
              num_res_blocks=int(model.num_res_blocks),
              latent_channels=int(model.latent_channels),
              in_channels=int(model.in_channels),
              out_channels=(None if model.out_channels is None else
                            int(model.out_channels)),
              num_groups=int(model.num_groups),
              mid_attention=bool(model.mid_attention),
              use_quant_conv=bool(model.use_quant_conv),
              use_post_quant_conv=bool(model.use_post_quant_conv))

