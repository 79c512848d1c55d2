"""The DDPM noise-prediction UNet in flax.linen.

A re-implementation of the UNet of "Denoising Diffusion Probabilistic Models"
(Ho, Jain & Abbeel, 2020, arXiv:2006.11239, Appendix B), itself a PixelCNN++
style Wide-ResNet UNet with self-attention at chosen resolutions, GroupNorm,
and a sinusoidal timestep embedding (as in the Transformer positional
encoding) that is added to every residual block.

With the paper's CIFAR-10 settings (ch=128, ch_mult=(1, 2, 2, 2),
num_res_blocks=2, attn_resolutions=(16,), 32x32x3 input) the model has
35,746,307 parameters, the paper's "35.7M".

Optional class conditioning adds a learned label embedding to the timestep
embedding. The table has `num_classes + 1` rows; row `num_classes` is the
"null" class used for classifier-free guidance (Ho & Salimans, 2022,
arXiv:2207.12598): the caller drops labels to the null class during training,
and `labels=None` means the null class.

The network is used through `make_eps_fn`, whose
`eps_fn(params, x_t, t, labels, *, train, rng)` contract is shared by the
diffusion losses, the samplers and the federated rounds.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array
Dtype = Any
PyTree = Any


def _default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """DDPM's initialiser: fan-avg uniform variance scaling.

  The reference implementation initialises every conv / dense layer with
  `variance_scaling(scale, 'fan_avg', 'uniform')` and uses `scale=0` (clamped
  to 1e-10) for the last conv of each residual block, the attention output
  projection and the output conv, so that every residual branch starts as
  (almost) the identity.

  Args:
    scale: variance scale; values <= 0 mean "near zero" (1e-10).

  Returns:
    A flax initializer.
  """
  return nn.initializers.variance_scaling(
      max(scale, 1e-10), 'fan_avg', 'uniform')


def timestep_embedding(t: Array, dim: int) -> Array:
  """Sinusoidal timestep embedding (DDPM Appendix B; Vaswani et al. 2017).

  Args:
    t: [B] timesteps (integer or float).
    dim: embedding size, even and >= 4.

  Returns:
    [B, dim] float32 array `[sin(t * f), cos(t * f)]` with frequencies
    `f_k = 10000 ** (-k / (dim // 2 - 1))`.
  """
  if dim % 2 or dim < 4:
    raise ValueError(f'Timestep embedding size must be even and >= 4, got '
                     f'{dim}.')
  t = jnp.asarray(t, jnp.float32)
  if t.ndim != 1:
    raise ValueError(f'Expected timesteps of shape [B], got {t.shape}.')
  half = dim // 2
  freqs = jnp.exp(
      -math.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  args = t[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


CONV_IMPLS = ('xla', 'im2col')


def im2col_conv_general_dilated(lhs, rhs, window_strides, padding,
                                lhs_dilation=None, rhs_dilation=None,
                                dimension_numbers=None, feature_group_count=1,
                                precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` as image patches times a matrix (im2col).

  Same result as the convolution (up to float rounding), computed as
  `patches(x) @ W` with W the kernel reshaped to [kh·kw·C_in, C_out]. XLA's
  CPU backend runs convolutions inside while loops on a slow path (jax issue
  12868: measured here ~14× slower for the kernel gradient inside
  `lax.scan`), and a client's local steps are such a loop; a matmul is not
  affected. Only plain convolutions (no dilation, one feature group) take
  this path; anything else falls back to `lax.conv_general_dilated`.
  """
  plain = (feature_group_count == 1 and not any(
      d not in (None, 1) for dil in (lhs_dilation, rhs_dilation)
      for d in (dil or ())))
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  # Flax's Conv passes NHWC inputs and HWIO kernels.
  kh, kw, cin, cout = rhs.shape
  patches = _image_patches(lhs, kh, kw, tuple(window_strides), padding)
  kernel = rhs.reshape(kh * kw * cin, cout).astype(patches.dtype)
  return jnp.dot(patches, kernel, precision=precision,
                 preferred_element_type=preferred_element_type)


def _image_patches(x: Array, kh: int, kw: int, strides: tuple[int, int],
                   padding) -> Array:
  """[B, H', W', kh·kw·C] patches of NHWC `x`, features ordered (kh, kw, C).

  Built from kh·kw strided slices of the padded input: data movement only,
  so neither it nor its transpose is a convolution.
  """
  sh, sw = strides
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides,
                                      padding)
  (pt, pb), (pl, pr) = padding
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  cols = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
          for i in range(kh) for j in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def resolve_conv_impl(conv_impl: str, platform: Optional[str] = None) -> str:
  """'auto' → 'im2col' on CPU (see `im2col_conv_general_dilated`), else
  'xla' (cuDNN / TPU convolutions)."""
  if conv_impl == 'auto':
    platform = platform or jax.devices()[0].platform
    return 'im2col' if platform == 'cpu' else 'xla'
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; use one of '
                     f"{CONV_IMPLS + ('auto',)}.")
  return conv_impl


def _conv(features: int, kernel: int, dtype: Dtype, *, stride: int = 1,
          init_scale: float = 1.0, name: Optional[str] = None,
          conv_impl: str = 'xla') -> nn.Conv:
  conv_fn = (im2col_conv_general_dilated if conv_impl == 'im2col' else
             jax.lax.conv_general_dilated)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding='SAME',
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=_default_init(init_scale),
      bias_init=nn.initializers.zeros,
      conv_general_dilated=conv_fn,
      name=name)


def _dense(features: int, dtype: Dtype, *, init_scale: float = 1.0,
           name: Optional[str] = None) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=_default_init(init_scale),
      bias_init=nn.initializers.zeros,
      name=name)


def _norm(num_groups: int, dtype: Dtype, name: Optional[str] = None,
          channel_masks: bool = False) -> nn.Module:
  if channel_masks:
    return LiveGroupNorm(num_groups=num_groups, dtype=dtype, name=name)
  return nn.GroupNorm(
      num_groups=num_groups, dtype=dtype, param_dtype=jnp.float32, name=name)


# The variable collection that holds channel masks (see `LiveGroupNorm`).
CHANNEL_MASKS = 'channel_masks'


def _live_mask(module: nn.Module, channels: int) -> Array:
  if not module.has_variable(CHANNEL_MASKS, 'live'):
    raise ValueError(
        f'{module.name}: the UNet was built with channel_masks=True, so '
        f"apply needs the {CHANNEL_MASKS!r} collection (built by "
        'fedjax_diff.models.compact.live_masks from pruning masks).')
  live = module.get_variable(CHANNEL_MASKS, 'live')
  if live.shape != (channels,):
    raise ValueError(f'{module.name}: live mask of shape {live.shape} for '
                     f'{channels} channels.')
  return live


class LiveGroupNorm(nn.Module):
  """GroupNorm over the live channels of a channel-masked tensor.

  A masked UNet (structured pruning, `fedjax_diff.strategies.pruning`)
  keeps all C channels with the pruned ones at zero. To behave exactly like
  the physically smaller UNet that `models.compact` builds, a GroupNorm must
  see only the K live channels: with m ∈ {0,1}^C (`live`, from the
  'channel_masks' collection) and r_c = Σ_{c'≤c} m_c' − 1 the rank of a live
  channel, live channel c belongs to group ⌊r_c·G/K⌋ (K a multiple of G, so
  each group has K/G channels in their original order, as in the compact
  model), and

      y_c = m_c · ((x_c − μ_g) / sqrt(σ²_g + ε) · γ_c + β_c),

  with μ_g, σ²_g the mean and variance over the live channels of group g
  (GroupNorm: Wu & He 2018, arXiv 1803.08494). Parameters are named and
  shaped as in `nn.GroupNorm` ('scale', 'bias').
  """
  num_groups: int
  dtype: Dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    live = _live_mask(self, c).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(live), 1.0)
    rank = jnp.cumsum(live) - 1.0
    group = jnp.floor(rank * self.num_groups / count)
    assign = live[:, None] * (group[:, None] == jnp.arange(
        self.num_groups, dtype=jnp.float32)[None, :])  # [C, G]
    x32 = x.astype(jnp.float32)
    n = count / self.num_groups * x.shape[1] * x.shape[2]
    hi = jax.lax.Precision.HIGHEST
    mean = jnp.einsum('bhwc,cg->bg', x32, assign, precision=hi) / n
    sq = jnp.einsum('bhwc,cg->bg', x32 * x32, assign, precision=hi) / n
    var = jnp.maximum(sq - mean * mean, 0.0)
    mean_c = jnp.einsum('bg,cg->bc', mean, assign, precision=hi)
    inv_c = jnp.einsum('bg,cg->bc', jax.lax.rsqrt(var + self.epsilon),
                       assign, precision=hi)
    y = ((x32 - mean_c[:, None, None, :]) * inv_c[:, None, None, :] * scale
         + bias) * live
    return y.astype(self.dtype)


class ResBlock(nn.Module):
  """DDPM residual block with timestep-embedding injection.

  GroupNorm -> swish -> conv3x3 -> + Dense(swish(temb)) -> GroupNorm ->
  swish -> dropout -> conv3x3 (near-zero init), plus a 1x1 projection of the
  input when the number of channels changes. The inner width (conv1's
  output, the second GroupNorm) is `inner_ch`, `out_ch` by default; a
  pruned block may keep fewer inner than output channels.
  """
  out_ch: int
  dropout: float
  num_groups: int
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'
  # None: a 1x1 skip conv iff the width changes. A pruned (compact) UNet
  # passes the unpruned architecture's answer.
  skip: Optional[bool] = None
  channel_masks: bool = False
  inner_ch: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array, temb: Array, *, train: bool) -> Array:
    norm = functools.partial(_norm, self.num_groups, self.dtype,
                             channel_masks=self.channel_masks)
    inner = self.out_ch if self.inner_ch is None else self.inner_ch
    h = nn.swish(norm(name='norm1')(x))
    h = _conv(inner, 3, self.dtype, name='conv1',
              conv_impl=self.conv_impl)(h)
    h = h + _dense(inner, self.dtype, name='temb_proj')(
        nn.swish(temb))[:, None, None, :]
    h = nn.swish(norm(name='norm2')(h))
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, 3, self.dtype, init_scale=0.0, name='conv2',
              conv_impl=self.conv_impl)(h)
    skip = x.shape[-1] != self.out_ch if self.skip is None else self.skip
    if not skip and x.shape[-1] != self.out_ch:
      raise ValueError(
          f'{self.name}: no skip conv but the width changes from '
          f'{x.shape[-1]} to {self.out_ch}; a pruned UNet must keep one '
          'width along a residual stream (see UNet.level_widths).')
    if skip:
      x = _conv(self.out_ch, 1, self.dtype, name='skip',
                conv_impl=self.conv_impl)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual connection."""
  num_groups: int
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'
  channel_masks: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    h = _norm(self.num_groups, self.dtype, name='norm',
              channel_masks=self.channel_masks)(x)
    # The logit scale is 1/sqrt(width); a masked block uses its live width,
    # which is the width of the compact model's block.
    width = jnp.sum(_live_mask(self, c)) if self.channel_masks else c
    q = _conv(c, 1, self.dtype, name='q',
              conv_impl=self.conv_impl)(h).reshape(b, hgt * wid, c)
    k = _conv(c, 1, self.dtype, name='k',
              conv_impl=self.conv_impl)(h).reshape(b, hgt * wid, c)
    v = _conv(c, 1, self.dtype, name='v',
              conv_impl=self.conv_impl)(h).reshape(b, hgt * wid, c)
    logits = jnp.einsum('bqc,bkc->bqk', q, k,
                        preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (width ** -0.5), axis=-1)
    h = jnp.einsum('bqk,bkc->bqc', weights.astype(self.dtype), v)
    h = h.reshape(b, hgt, wid, c)
    h = _conv(c, 1, self.dtype, init_scale=0.0, name='proj_out',
              conv_impl=self.conv_impl)(h)
    return x + h


class Downsample(nn.Module):
  """3x3 conv with stride 2 ('SAME' padding: pads 0 before, 1 after)."""
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _conv(x.shape[-1], 3, self.dtype, stride=2, name='conv',
                 conv_impl=self.conv_impl)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 conv to `features`
  channels (None: as many as the input)."""
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'
  features: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    features = x.shape[-1] if self.features is None else self.features
    return _conv(features, 3, self.dtype, name='conv',
                 conv_impl=self.conv_impl)(x)


class UNet(nn.Module):
  """The DDPM epsilon-prediction UNet (Ho et al. 2020, arXiv:2006.11239).

  Attributes:
    ch: base channel count; level i has `ch * ch_mult[i]` channels.
    ch_mult: channel multipliers, one per resolution level. The input is
      downsampled `len(ch_mult) - 1` times, so H and W must be divisible by
      `2 ** (len(ch_mult) - 1)`.
    num_res_blocks: residual blocks per level on the down path (the up path
      has one more per level).
    attn_resolutions: spatial sizes (height of the feature map) at which a
      self-attention block follows each residual block.
    dropout: dropout rate inside residual blocks (rng collection 'dropout';
      only active when `train=True`).
    num_classes: if set, class-conditional with an `Embed(num_classes + 1)`
      label table; index `num_classes` is the null class (classifier-free
      guidance).
    label_embed_std: the label table's initial standard deviation; None
      for flax's `Embed` default (variance scaling over the width: rows of
      norm ≈ 1). 1.0 is PyTorch's `nn.Embedding` default, the init of ADM's
      class embedding (guided-diffusion, arXiv 2105.05233), which is summed
      with the time embedding as here: rows of norm √width. Measured on the
      quickstart in the README's "Tries towards a better quickstart".
    out_ch: output channels; defaults to the input's channel count.
    num_groups: GroupNorm groups; must divide `ch * m` for every `m` in
      `ch_mult` (and `ch`).
    dtype: compute dtype; parameters are always float32 and the output is
      returned as float32.
    conv_impl: 'xla' (lax.conv_general_dilated) or 'im2col' (patches times
      a matrix; fast inside loops on CPU, see `im2col_conv_general_dilated`).
      Both take the same parameters.
    level_widths: actual channel width of each level's residual blocks
      (their streams and inner channels); None means `ch * ch_mult[i]`. Set
      by structured pruning (`models.compact`): `ch`, `ch_mult` keep
      describing the unpruned architecture (which blocks have a 1x1 skip
      conv), these fields the widths that remain.
    stem_width: width of `conv_in`'s output; None means `ch`.
    temb_width: width of the time-embedding MLP; None means `4 * ch`.
    upsample_in_widths: per level, the width of the stream that enters the
      level's upsampling conv (the output of the level's last up-path
      residual block, and of its attention block if any); None means
      `level_widths`. Structured pruning sets it: torch-pruning's DepGraph
      (the pruner of FedPhD, arXiv 2507.06449) prunes an upsampling conv's
      input and output channels as separate groups, and without attention
      no GroupNorm reads the input, so it keeps a different count (see
      `models.channel_groups`). Level 0 has no upsampling: its entry is
      unused.
    channel_masks: GroupNorms and attention read live-channel masks from
      the 'channel_masks' collection, so that a masked (pruned but not
      compacted) UNet computes exactly what its compact model does (see
      `LiveGroupNorm`).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_classes: Optional[int] = None
  label_embed_std: Optional[float] = None
  out_ch: Optional[int] = None
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'
  level_widths: Optional[Sequence[int]] = None
  stem_width: Optional[int] = None
  temb_width: Optional[int] = None
  channel_masks: bool = False
  upsample_in_widths: Optional[Sequence[int]] = None

  def _upsample_in_widths(self) -> tuple[int, ...]:
    """`upsample_in_widths` in use (the level widths by default)."""
    _, levels, _ = self._widths()
    if self.upsample_in_widths is None:
      return levels
    widths = tuple(self.upsample_in_widths)
    if len(widths) != len(levels) or min(widths) < 1:
      raise ValueError(
          f'UNet.upsample_in_widths={widths} must have one width >= 1 per '
          f'level (ch_mult={tuple(self.ch_mult)}).')
    return widths

  def _widths(self) -> tuple[int, tuple[int, ...], int]:
    """(stem width, per-level widths, time-embedding width) in use."""
    levels = (tuple(self.level_widths) if self.level_widths is not None else
              tuple(self.ch * m for m in self.ch_mult))
    if len(levels) != len(self.ch_mult):
      raise ValueError(
          f'UNet.level_widths={levels} must have one width per level '
          f'(ch_mult={tuple(self.ch_mult)}).')
    stem = self.stem_width if self.stem_width is not None else self.ch
    temb = self.temb_width if self.temb_width is not None else 4 * self.ch
    if min(levels + (stem, temb)) < 1:
      raise ValueError(f'UNet widths must be >= 1, got stem={stem}, '
                       f'levels={levels}, temb={temb}.')
    return stem, levels, temb

  def check_config(self):
    """Raises a ValueError for widths, groups or depths the UNet cannot
    have (also checked when it is called)."""
    if not self.ch_mult:
      raise ValueError('UNet.ch_mult must have at least one level.')
    if self.ch % 2 or self.ch < 4:
      raise ValueError(
          f'UNet.ch must be even and >= 4 (it is also the sinusoidal timestep '
          f'embedding size), got ch={self.ch}.')
    stem, levels, _ = self._widths()
    widths = sorted({self.ch, stem} | {self.ch * m for m in self.ch_mult}
                    | set(levels))
    bad = [w for w in widths if w % self.num_groups]
    if bad:
      raise ValueError(
          f'UNet.num_groups={self.num_groups} must divide every channel '
          f'width, but the widths ch * ch_mult = {widths} (ch={self.ch}, '
          f'ch_mult={tuple(self.ch_mult)}) include {bad} which it does not '
          f'divide. Choose num_groups dividing {math.gcd(*widths)}, or change '
          f'ch.')
    if self.num_res_blocks < 1:
      raise ValueError(
          f'UNet.num_res_blocks must be >= 1, got {self.num_res_blocks}.')

  def check_input_shape(self, shape: tuple[int, ...]):
    """Raises a ValueError unless `shape` is NHWC with H and W halvable at
    every level."""
    if len(shape) != 4:
      raise ValueError(f'UNet expects NHWC input, got shape {shape}.')
    _, hgt, wid, _ = shape
    factor = 2 ** (len(self.ch_mult) - 1)
    if hgt % factor or wid % factor:
      # Deepest UNet that this input size supports.
      max_down = 0
      while hgt % 2 ** (max_down + 1) == 0 and wid % 2 ** (max_down + 1) == 0:
        max_down += 1
      raise ValueError(
          f'UNet input spatial size {hgt}x{wid} is not divisible by '
          f'2**(len(ch_mult)-1) = {factor} (ch_mult={tuple(self.ch_mult)} has '
          f'{len(self.ch_mult)} levels, i.e. {len(self.ch_mult) - 1} '
          f'downsamplings). Either resize/pad the images to a multiple of '
          f'{factor}, or use a ch_mult with at most {max_down + 1} entries '
          f'for {hgt}x{wid} inputs.')

  @nn.compact
  def __call__(self, x: Array, t: Array, labels: Optional[Array] = None, *,
               train: bool) -> Array:
    """Predicts the noise eps added to `x`.

    Args:
      x: [B, H, W, C] noisy images.
      t: [B] integer timesteps (a scalar is broadcast to the batch).
      labels: [B] integer class labels in [0, num_classes] (num_classes being
        the null class), or None (all null class). Must be None for an
        unconditional model.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      [B, H, W, out_ch] float32 noise prediction.
    """
    self.check_config()
    self.check_input_shape(x.shape)
    batch = x.shape[0]
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
      raise ValueError(
          f'Expected timesteps of shape ({batch},), got {t.shape}.')
    out_ch = self.out_ch if self.out_ch is not None else x.shape[-1]
    num_levels = len(self.ch_mult)
    stem_width, level_widths, temb_width = self._widths()
    res_block = functools.partial(
        ResBlock, dropout=self.dropout, num_groups=self.num_groups,
        dtype=self.dtype, conv_impl=self.conv_impl,
        channel_masks=self.channel_masks)
    attn_block = functools.partial(
        AttnBlock, num_groups=self.num_groups, dtype=self.dtype,
        conv_impl=self.conv_impl, channel_masks=self.channel_masks)
    # Widths of the unpruned architecture: they decide which residual
    # blocks have a 1x1 skip conv (the width changes).
    orig = [self.ch * m for m in self.ch_mult]

    # Timestep (and label) embedding.
    temb = timestep_embedding(t, self.ch)
    temb = _dense(temb_width, self.dtype, name='temb_dense0')(temb)
    temb = _dense(temb_width, self.dtype, name='temb_dense1')(nn.swish(temb))
    if self.num_classes is not None:
      if labels is None:
        labels = jnp.full((batch,), self.num_classes, jnp.int32)
      labels = jnp.asarray(labels)
      if labels.shape != (batch,):
        raise ValueError(
            f'Expected labels of shape ({batch},), got {labels.shape}.')
      init = ({} if self.label_embed_std is None else
              dict(embedding_init=nn.initializers.normal(
                  float(self.label_embed_std))))
      temb = temb + nn.Embed(
          self.num_classes + 1,
          temb_width,
          dtype=self.dtype,
          param_dtype=jnp.float32,
          name='label_embed', **init)(labels)
    elif labels is not None:
      raise ValueError(
          'UNet got labels but num_classes is None (unconditional model); '
          'pass labels=None or set num_classes.')

    # Down path.
    hs = [_conv(stem_width, 3, self.dtype, name='conv_in',
                conv_impl=self.conv_impl)(
        x.astype(self.dtype))]
    hs_orig = [self.ch]
    for i in range(num_levels):
      for j in range(self.num_res_blocks):
        h = res_block(level_widths[i], skip=hs_orig[-1] != orig[i],
                      name=f'down_{i}_res_{j}')(hs[-1], temb, train=train)
        hs_orig.append(orig[i])
        if h.shape[1] in self.attn_resolutions:
          h = attn_block(name=f'down_{i}_attn_{j}')(h)
        hs.append(h)
      if i != num_levels - 1:
        hs.append(Downsample(self.dtype, self.conv_impl,
                             name=f'down_{i}_downsample')(hs[-1]))
        hs_orig.append(hs_orig[-1])

    # Middle.
    h = hs[-1]
    h = res_block(h.shape[-1], skip=False, name='mid_res_0')(
        h, temb, train=train)
    h = attn_block(name='mid_attn')(h)
    h = res_block(h.shape[-1], skip=False, name='mid_res_1')(
        h, temb, train=train)
    h_orig = hs_orig[-1]

    # Up path. The last block of a level with an upsampling conv may have
    # its own output width (`upsample_in_widths`); the upsampling conv maps
    # it back to the level's width.
    upsample_in = self._upsample_in_widths()
    for i in reversed(range(num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h_orig += hs_orig.pop()
        last = j == self.num_res_blocks and i != 0
        width = upsample_in[i] if last else level_widths[i]
        h = res_block(width, skip=h_orig != orig[i], inner_ch=level_widths[i],
                      name=f'up_{i}_res_{j}')(h, temb, train=train)
        h_orig = orig[i]
        if h.shape[1] in self.attn_resolutions:
          if width % self.num_groups:
            raise ValueError(
                f'UNet.upsample_in_widths[{i}]={width} is read by the '
                f'GroupNorm of up_{i}_attn_{j}, so it must be a multiple of '
                f'num_groups={self.num_groups}.')
          h = attn_block(name=f'up_{i}_attn_{j}')(h)
      if i != 0:
        h = Upsample(self.dtype, self.conv_impl, features=level_widths[i],
                     name=f'up_{i}_upsample')(h)
    assert not hs, len(hs)

    # Output.
    h = nn.swish(_norm(self.num_groups, self.dtype, name='norm_out',
                       channel_masks=self.channel_masks)(h))
    h = _conv(out_ch, 3, self.dtype, init_scale=0.0, name='conv_out',
              conv_impl=self.conv_impl)(h)
    return h.astype(jnp.float32)


def unet_from_config(cfg: ml_collections.ConfigDict) -> UNet:
  """Builds a `UNet` from a config.

  Args:
    cfg: with fields `ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`,
      `dropout`, and optionally `num_classes` (default None),
      `label_embed_std` (default None: flax's init), `num_groups`
      (default 32), `out_ch` (default: input channels), `dtype` ('float32'
      or 'bfloat16', `compute_dtype`), `conv_impl` and the pruned
      widths `level_widths`, `stem_width`, `temb_width`,
      `upsample_in_widths` (default None: the unpruned widths; see `UNet`).

  Returns:
    The (unbound) UNet module; `check_config()` checks the widths and
    groups together.

  Raises:
    ValueError: a field of the wrong type or out of range.
  """
  num_classes = cfg.get('num_classes', None)
  out_ch = cfg.get('out_ch', None)
  for name in ('ch', 'num_res_blocks'):
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'config.model.{name} must be an int >= 1, got '
                       f'{value!r}.')
  mult = cfg.get('ch_mult')
  if (not isinstance(mult, (tuple, list)) or not mult or
      not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
              for m in mult)):
    raise ValueError('config.model.ch_mult must be a non-empty tuple of ints '
                     f'>= 1 (one per resolution level), got {mult!r}.')
  dropout = cfg.get('dropout', 0.0)
  if (isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or
      not 0.0 <= dropout < 1.0):
    raise ValueError(f'config.model.dropout must be in [0, 1), got '
                     f'{dropout!r}.')
  if num_classes is not None and (isinstance(num_classes, bool) or
                                  not isinstance(num_classes, int) or
                                  num_classes < 1):
    raise ValueError('config.model.num_classes must be None '
                     f'(unconditional) or an int >= 1, got {num_classes!r}.')
  std = cfg.get('label_embed_std', None)
  if std is not None and (isinstance(std, bool) or
                          not isinstance(std, (int, float)) or not std > 0):
    raise ValueError('config.model.label_embed_std must be None (flax\'s '
                     'init) or a number > 0 (ADM\'s: 1.0), got '
                     f'{std!r}.')
  if std is not None and num_classes is None:
    raise ValueError(f'config.model.label_embed_std={std} initialises the '
                     'label table, but the model is unconditional '
                     '(config.model.num_classes is None).')
  return UNet(
      ch=int(cfg.ch),
      ch_mult=tuple(int(m) for m in cfg.ch_mult),
      num_res_blocks=int(cfg.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in cfg.attn_resolutions),
      dropout=float(cfg.dropout),
      num_classes=None if num_classes is None else int(num_classes),
      label_embed_std=None if std is None else float(std),
      out_ch=None if out_ch is None else int(out_ch),
      num_groups=int(cfg.get('num_groups', 32)),
      dtype=compute_dtype(cfg.get('dtype', 'float32')),
      conv_impl=resolve_conv_impl(cfg.get('conv_impl', 'xla')),
      level_widths=_optional_ints(cfg.get('level_widths', None)),
      stem_width=_optional_int(cfg.get('stem_width', None)),
      temb_width=_optional_int(cfg.get('temb_width', None)),
      upsample_in_widths=_optional_ints(cfg.get('upsample_in_widths', None)))


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  """`config.model.dtype` → the UNet's compute dtype.

  'bfloat16' is mixed precision: activations and matmuls in bfloat16, with
  float32 parameters (so gradients, the optimizer state, client updates and
  their aggregation stay float32) and a float32 output ε̂, hence a float32
  loss. 'float32' computes everything in float32.
  """
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.model.dtype={name!r}; use one of '
                     f'{sorted(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]


def _optional_int(v):
  return None if v is None else int(v)


def _optional_ints(v):
  return None if v is None else tuple(int(w) for w in v)


def count_params(params: PyTree) -> int:
  """Total number of scalars in a parameter pytree (arrays or shape structs)."""
  return int(sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)))


def init_params(model: UNet, rng: Array, image_shape: Sequence[int],
                num_classes: Optional[int] = None) -> PyTree:
  """Initialises `model` on a batch of one image.

  Args:
    model: the UNet.
    rng: PRNG key for the 'params' collection.
    image_shape: (H, W, C).
    num_classes: optional consistency check against `model.num_classes`; the
      label table is created whenever `model.num_classes` is set.

  Returns:
    The 'params' collection as a plain (nested dict) pytree.
  """
  if len(image_shape) != 3:
    raise ValueError(f'image_shape must be (H, W, C), got {image_shape}.')
  if num_classes is not None and num_classes != model.num_classes:
    raise ValueError(
        f'init_params got num_classes={num_classes} but the model has '
        f'num_classes={model.num_classes}.')
  x = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  labels = (None if model.num_classes is None else
            jnp.zeros((1,), jnp.int32))
  variables = model.init({'params': rng}, x, t, labels, train=False)
  return flax.core.unfreeze(variables['params'])


def make_eps_fn(model: UNet) -> Callable[..., Array]:
  """Wraps `model` into the `eps_fn` contract used across fedjax_diff.

  Args:
    model: the UNet.

  Returns:
    `eps_fn(params, x_t, t, labels, *, train, rng) -> eps`, where `rng` seeds
    dropout when `train=True` and is ignored otherwise.
  """

  def eps_fn(params: PyTree, x_t: Array, t: Array, labels: Optional[Array],
             *, train: bool, rng: Optional[Array] = None) -> Array:
    return model.apply({'params': params}, x_t, t, labels, train=train,
                       rngs={'dropout': rng} if train else {})

  return eps_fn
