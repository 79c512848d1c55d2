"""FedDM-quant: quantizing the client-to-server model update.

FedDM (Vora et al., 2024, arXiv:2407.14730) cuts upload traffic by sending a
quantized client update ``Δ = θ_client − θ_global`` instead of float32 weights.
This module holds the pure pieces: the quantizer, its serialization (with an
exact count of the bits on the wire), error feedback, and scales calibrated on
what the network computes.

Quantizer
---------
Uniform symmetric quantization with ``b`` bits, ``q_max = 2^{b−1} − 1``:

  s = r · max|Δ| / q_max,
  q = clip(round(Δ / s), −q_max, q_max),
  Δ̂ = q · s,

where the max runs over a whole tensor (``'per_tensor'``) or over one output
channel, the last axis of a leaf (``'per_channel'``; leaves with fewer than two
dimensions fall back to one scale), and ``s`` is computed as one float32
multiply, ``max|Δ| · fl32(r / q_max)``. ``r ∈ (0, 1]`` is a clipping ratio:
``'minmax'`` takes ``r = 1``; ``'mse'`` grid-searches ``r`` over
``config.ratios`` (1.0, 0.95, …, 0.5 by default) for each tensor or channel and
keeps the scale with the least ``‖Δ − Δ̂‖²`` (for stochastic rounding, the
least *expected* squared error); ``'calibrated'`` takes the scales from
:func:`calibrate_scales`. The grid is uniform with no zero point and only
``2·q_max + 1`` of the ``2^b`` codes are used (with 2 bits: −1, 0, 1).

``round`` is either round-to-nearest (half to even; ``|Δ − Δ̂| ≤ s/2`` inside
the clipping range) or stochastic rounding ``q = floor(Δ/s + u)``,
``u ~ U[0, 1)``, which is unbiased, ``E[Δ̂] = Δ``, inside the clipping range.

Clipping and bias
-----------------
Outside the clipping range no bounded code is unbiased: ``E[Δ̂] =
clip(Δ/s, ±q_max)·s``, so with ``r < 1`` (``'mse'``, ``'calibrated'``) the
clipped entries lose ``m = Δ − clip(Δ/s, ±q_max)·s`` in expectation (at 2
bits the ``'mse'`` search clips much of a heavy-tailed tensor).
:func:`carry_clipped_quantize` keeps that mass instead: the client adds it to
its next update, exactly as error feedback adds its residual, so
``E[Δ̂_t] = Δ_t + m_{t−1} − m_t`` with
``m_t`` deterministic given the input, and ``Σ_t E[Δ̂_t] = Σ_t Δ_t − m_T``:
nothing is lost in expectation, only delayed. The upload path
(`strategies.upload.quantizer`) does this by default for stochastic rounding
with a scale method that can clip.

Zero stays exactly zero under every setting: ``0/s = 0`` rounds to ``0`` (for
stochastic rounding, ``floor(0 + u) = 0`` as ``u < 1``), and a tensor or
channel whose entries are all zero gets ``s = 0`` and decodes to zeros. So
weights pruned to zero, or whole pruned channels, stay pruned after a round
trip.

Everything on the device side is pure ``jax.numpy`` with no Python branching
on values, so it runs under ``jax.jit`` and under ``jax.vmap`` over a leading
client axis (the config is static: close over it or mark it static; it is a
frozen, hashable dataclass).

Wire format
-----------
See :func:`pack`. The bit count is :func:`wire_bits`, the byte count of the
real serialization :func:`wire_bytes`.
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'QuantizationConfig',
    'DEFAULT_RATIOS',
    'compute_scales',
    'quantize',
    'dequantize',
    'quantize_dequantize',
    'init_residual',
    'error_feedback_quantize',
    'clip_quantize',
    'clips',
    'carry_clipped_quantize',
    'calibrate_scales',
    'num_scales',
    'wire_bits',
    'wire_bytes',
    'pack',
    'unpack',
]

PyTree = Any

GRANULARITIES = ('per_tensor', 'per_channel')
ROUNDINGS = ('nearest', 'stochastic')
SCALE_METHODS = ('minmax', 'mse', 'calibrated')
# Clipping ratios r = 1.0, 0.95, ..., 0.5 for the scale searches.
DEFAULT_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
  """How a client update is quantized.

  Attributes:
    bits: Bits per code, 2 to 16. Codes are held as int8 for ``bits <= 8`` and
      as int32 above; on the wire they take exactly ``bits`` bits each.
    granularity: ``'per_tensor'`` (one scale per leaf) or ``'per_channel'``
      (one scale per entry of the last axis of leaves with ``ndim >= 2``;
      scalars and 1-D leaves get one scale).
    rounding: ``'nearest'`` or ``'stochastic'`` (needs an ``rng``).
    scale_method: ``'minmax'``, ``'mse'`` or ``'calibrated'`` (scales from
      :func:`calibrate_scales`, passed as ``scales=``).
    ratios: Clipping ratios ``r`` tried by ``'mse'`` and by
      :func:`calibrate_scales`, each in ``(0, 1]``. With 1.0 among them (the
      default), the searched scales are never worse than ``'minmax'`` on their
      criterion.
  """

  bits: int = 8
  granularity: str = 'per_tensor'
  rounding: str = 'nearest'
  scale_method: str = 'minmax'
  ratios: tuple[float, ...] = DEFAULT_RATIOS

  def __post_init__(self):
    if (isinstance(self.bits, bool) or not isinstance(self.bits, int)
        or not 2 <= self.bits <= 16):
      raise ValueError(
          f'QuantizationConfig: bits must be an int in [2, 16], got '
          f'{self.bits!r}.')
    if self.granularity not in GRANULARITIES:
      raise ValueError(
          f'QuantizationConfig: granularity must be one of {GRANULARITIES}, '
          f'got {self.granularity!r}.')
    if self.rounding not in ROUNDINGS:
      raise ValueError(
          f'QuantizationConfig: rounding must be one of {ROUNDINGS}, got '
          f'{self.rounding!r}.')
    if self.scale_method not in SCALE_METHODS:
      raise ValueError(
          f'QuantizationConfig: scale_method must be one of {SCALE_METHODS}, '
          f'got {self.scale_method!r}.')
    object.__setattr__(self, 'ratios', _check_ratios(self.ratios))

  @property
  def qmax(self) -> int:
    """The largest code magnitude, ``2^{bits−1} − 1``."""
    return 2 ** (self.bits - 1) - 1

  @property
  def code_dtype(self) -> np.dtype:
    """The integer dtype the codes are held in on device."""
    return np.dtype(np.int8 if self.bits <= 8 else np.int32)


def _check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
  ratios = tuple(float(r) for r in ratios)
  if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
    raise ValueError(
        f'Clipping ratios must be a non-empty sequence in (0, 1], got '
        f'{ratios!r}.')
  return ratios


# ------------------------------------------------------------------------------
# Per-leaf building blocks.
# ------------------------------------------------------------------------------


def _per_channel(shape: Sequence[int], granularity: str) -> bool:
  return granularity == 'per_channel' and len(shape) >= 2


def _scale_shape(shape: Sequence[int], granularity: str) -> tuple[int, ...]:
  return (int(shape[-1]),) if _per_channel(shape, granularity) else ()


def _amax(x: jax.Array, per_channel: bool) -> jax.Array:
  """max|x| over the tensor, or over all axes but the last one."""
  axis = tuple(range(x.ndim - 1)) if per_channel else None
  return jnp.max(jnp.abs(x), axis=axis, initial=0.0)


def _group_sum(x: jax.Array, per_channel: bool) -> jax.Array:
  axis = tuple(range(x.ndim - 1)) if per_channel else None
  return jnp.sum(x, axis=axis)


def _factors(ratios: Sequence[float], qmax: int) -> np.ndarray:
  """The float32 factors ``r / q_max``, rounded once on the host."""
  return (np.asarray(ratios, np.float64) / qmax).astype(np.float32)


def _scale(amax: jax.Array, factor) -> jax.Array:
  """``s = amax · (r / q_max)``: the one place a scale is formed.

  A single float32 multiply by a factor rounded on the host gives bit-identical
  scales eagerly and under ``jit`` (XLA may turn a division by a constant into
  a multiply by its reciprocal), so minmax and the ``r = 1`` candidate of the
  searches agree exactly.
  """
  return jnp.asarray(amax, jnp.float32) * factor


def _varying_like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Gives ``x`` the varying manual axes of ``ref`` (a no-op outside shard_map).

  Inside ``jax.shard_map`` a loop carry must keep its type: an initial value
  built from constants (invariant over the mesh axes) that the loop replaces
  by a value computed from per-device data (varying) is a type error. Loop
  inits here are cast to the axes of the data they are compared with.
  """
  want = jax.typeof(ref).manual_axis_type.varying
  missing = tuple(sorted(want - jax.typeof(x).manual_axis_type.varying))
  return lax.pcast(x, missing, to='varying') if missing else x


def _safe(s: jax.Array) -> jax.Array:
  # A zero scale only comes from an all-zero group; dividing by 1 keeps it 0.
  return jnp.where(s > 0, s, jnp.ones_like(s))


def _codes(x: jax.Array, s: jax.Array, qmax: int, rounding: str,
           noise: Optional[jax.Array]) -> jax.Array:
  """Float codes clip(round(x / s), ±q_max); ``x`` is float32.

  For stochastic rounding ``noise`` is ``u ~ U[0, 1)`` of the shape of ``x``.
  """
  y = x / _safe(s)
  if rounding == 'nearest':
    q = jnp.round(y)
  else:
    q = jnp.floor(y + noise)
  return jnp.clip(q, -qmax, qmax)


def _search_scale(x: jax.Array, per_channel: bool,
                  config: QuantizationConfig) -> jax.Array:
  """Grid search of the clipping ratio minimising the (expected) SSE."""
  qmax = config.qmax
  amax = _amax(x, per_channel)

  def sse(s):
    if config.rounding == 'nearest':
      err = x - _codes(x, s, qmax, 'nearest', None) * s
      return _group_sum(jnp.square(err), per_channel)
    # Stochastic rounding of y inside [−q_max, q_max] has variance
    # f·(1 − f)·s², f = frac(y); outside it the clip is deterministic.
    s_safe = _safe(s)
    yc = jnp.clip(x / s_safe, -qmax, qmax)
    frac = yc - jnp.floor(yc)
    err = jnp.square(x - yc * s) + jnp.square(s) * frac * (1.0 - frac)
    return _group_sum(err, per_channel)

  def body(carry, factor):
    best_err, best_s = carry
    s = _scale(amax, factor)
    err = sse(s)
    better = err < best_err
    new = (jnp.where(better, err, best_err), jnp.where(better, s, best_s))
    return new, None

  init = (_varying_like(jnp.full(amax.shape, jnp.inf, jnp.float32), x),
          _varying_like(_scale(amax, _factors((1.0,), qmax)[0]), x))
  (_, best_s), _ = lax.scan(body, init, _factors(config.ratios, qmax))
  return best_s


# ------------------------------------------------------------------------------
# Quantizer.
# ------------------------------------------------------------------------------


def compute_scales(tree: PyTree, config: QuantizationConfig) -> PyTree:
  """Scales for ``'minmax'`` or ``'mse'``; float32, shape () or (C,) per leaf.

  Args:
    tree: The update Δ, a pytree of float arrays.
    config: The quantization config.

  Returns:
    A pytree like ``tree`` whose leaves are the scales ``s``.

  Raises:
    ValueError: For ``scale_method='calibrated'``, whose scales come from
      :func:`calibrate_scales`.
  """
  if config.scale_method == 'calibrated':
    raise ValueError(
        "scale_method='calibrated' needs scales from calibrate_scales(); pass "
        'them as `scales=`.')

  def leaf_scale(x):
    x = jnp.asarray(x, jnp.float32)
    per_channel = _per_channel(x.shape, config.granularity)
    if config.scale_method == 'minmax':
      return _scale(_amax(x, per_channel), _factors((1.0,), config.qmax)[0])
    return _search_scale(x, per_channel, config)

  return jax.tree.map(leaf_scale, tree)


def quantize(tree: PyTree, config: QuantizationConfig,
             rng: Optional[jax.Array] = None, *,
             scales: Optional[PyTree] = None) -> tuple[PyTree, PyTree]:
  """Quantizes every leaf: ``q = clip(round(Δ/s), −q_max, q_max)``.

  Args:
    tree: The update Δ, a pytree of float arrays.
    config: The quantization config.
    rng: A PRNG key; required for ``rounding='stochastic'`` (one uniform draw
      of the tree's total size, cut into the leaves), ignored otherwise.
    scales: Optional scales (as returned here or by :func:`calibrate_scales`);
      when given they are used whatever ``config.scale_method`` says. Required
      for ``'calibrated'``.

  Returns:
    ``(codes, scales)``: codes as ``config.code_dtype`` (int8 for
    ``bits <= 8``, else int32) with each leaf's shape, and float32 scales of
    shape () or (C,) per leaf.
  """
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
  if scales is None:
    scales = compute_scales(treedef.unflatten(leaves), config)
  try:
    scale_leaves = treedef.flatten_up_to(scales)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'quantize: `scales` must have the structure of the tree; {e}') from e
  scale_leaves = [jnp.asarray(s, jnp.float32) for s in scale_leaves]
  for x, s in zip(leaves, scale_leaves):
    want = _scale_shape(x.shape, config.granularity)
    if s.shape != want:
      raise ValueError(
          f'quantize: a leaf of shape {x.shape} with granularity '
          f'{config.granularity!r} needs scales of shape {want}, got '
          f'{s.shape}.')
  if config.rounding == 'stochastic':
    if rng is None:
      raise ValueError("quantize: rounding='stochastic' needs an `rng` key.")
    # One draw of U[0, 1) for the whole tree, cut into the leaves.
    sizes = [x.size for x in leaves]
    u = jax.random.uniform(rng, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    noise = [u[a:b].reshape(x.shape)
             for a, b, x in zip(offsets[:-1], offsets[1:], leaves)]
  else:
    noise = [None] * len(leaves)
  codes = [
      _codes(x, s, config.qmax, config.rounding, n).astype(config.code_dtype)
      for x, s, n in zip(leaves, scale_leaves, noise)
  ]
  return treedef.unflatten(codes), treedef.unflatten(scale_leaves)


def dequantize(codes: PyTree, scales: PyTree) -> PyTree:
  """``Δ̂ = q · s`` per leaf, as float32."""
  return jax.tree.map(
      lambda q, s: q.astype(jnp.float32) * jnp.asarray(s, jnp.float32),
      codes, scales)


def quantize_dequantize(tree: PyTree, config: QuantizationConfig,
                        rng: Optional[jax.Array] = None, *,
                        scales: Optional[PyTree] = None) -> PyTree:
  """``Δ̂ = dequantize(quantize(Δ))``, each leaf cast back to its dtype."""
  codes, scales = quantize(tree, config, rng, scales=scales)
  return jax.tree.map(lambda x, y: y.astype(jnp.result_type(x)), tree,
                      dequantize(codes, scales))


# ------------------------------------------------------------------------------
# Error feedback.
# ------------------------------------------------------------------------------


def init_residual(tree: PyTree) -> PyTree:
  """The error-feedback residual before the first round: zeros like ``tree``."""
  return jax.tree.map(jnp.zeros_like, tree)


def error_feedback_quantize(
    delta: PyTree, residual: PyTree, config: QuantizationConfig,
    rng: Optional[jax.Array] = None, *,
    scales: Optional[PyTree] = None) -> tuple[PyTree, PyTree]:
  """Quantization with error feedback (EF-SGD).

  The client sends ``Δ̂ = Q(Δ + e)`` and keeps ``e' = Δ + e − Q(Δ + e)``
  (Seide et al., 2014, "1-bit SGD"; Karimireddy et al., 2019, "Error Feedback
  Fixes SignSGD and other Gradient Compression Schemes", arXiv:1901.09847).
  Over rounds the sum telescopes, ``Σ_t Δ̂_t = Σ_t Δ_t − e_T`` (with
  ``e_0 = 0``), so the server's accumulated update is off by only the last
  residual, ``|e_T| ≤ s/2`` per entry with nearest rounding and minmax scales
  (``< s`` with stochastic rounding), instead of drifting.

  The residual is per-client state that persists across rounds; it is an
  explicit input and output so the federation can keep it stacked on the
  client axis.

  Args:
    delta: This round's update Δ.
    residual: The client's residual ``e`` (start with :func:`init_residual`).
    config: The quantization config.
    rng: A PRNG key for stochastic rounding.
    scales: Optional explicit scales; they must then be for ``Δ + e``.

  Returns:
    ``(delta_hat, new_residual)``.
  """
  corrected = jax.tree.map(lambda d, e: d + e, delta, residual)
  delta_hat = quantize_dequantize(corrected, config, rng, scales=scales)
  new_residual = jax.tree.map(lambda c, h: c - h, corrected, delta_hat)
  return delta_hat, new_residual


def clips(config: QuantizationConfig) -> bool:
  """Whether ``config``'s scales can clip (``r < 1``): ``'mse'`` and
  ``'calibrated'`` search ratios below 1; ``'minmax'`` has ``r = 1``."""
  return config.scale_method != 'minmax' and (
      config.scale_method == 'calibrated' or min(config.ratios) < 1.0)


def clip_quantize(tree: PyTree, config: QuantizationConfig,
                  rng: Optional[jax.Array] = None, *,
                  scales: Optional[PyTree] = None) -> tuple[PyTree, PyTree]:
  """``(Δ̂, m)``: ``quantize_dequantize`` and the clipped mass.

  ``m = Δ − clip(Δ/s, −q_max, q_max)·s`` per entry (float32), zero inside the
  clipping range. With stochastic rounding ``E[Δ̂] = Δ − m`` (exactly, up to
  float rounding of ``q·s``); with ``'minmax'`` scales ``m = 0`` up to the
  rounding of ``s``. Each leaf of ``Δ̂`` is cast back to its dtype.
  """
  leaves, treedef = jax.tree.flatten(tree)
  x32 = [jnp.asarray(x, jnp.float32) for x in leaves]
  codes, scales = quantize(treedef.unflatten(x32), config, rng,
                           scales=scales)
  deq = jax.tree.leaves(dequantize(codes, scales))
  masses = []
  for x, s in zip(x32, jax.tree.leaves(scales)):
    s = jnp.asarray(s, jnp.float32)
    y = jnp.clip(x / _safe(s), -config.qmax, config.qmax)
    masses.append(x - y * s)
  delta_hat = [d.astype(jnp.result_type(x)) for x, d in zip(leaves, deq)]
  return treedef.unflatten(delta_hat), treedef.unflatten(masses)


def carry_clipped_quantize(
    delta: PyTree, carry: PyTree, config: QuantizationConfig,
    rng: Optional[jax.Array] = None, *,
    scales: Optional[PyTree] = None) -> tuple[PyTree, PyTree]:
  """Quantization that carries the clipped mass to the next round.

  The client quantizes ``c = Δ + m`` (``m`` the mass it carried, zeros at
  first: :func:`init_residual`), sends ``Δ̂ = Q(c)`` and keeps
  ``m' = c − clip(c/s, ±q_max)·s`` (:func:`clip_quantize`). With stochastic
  rounding ``E[Δ̂] = Δ + m − m'`` exactly: what clipping removes is sent in a
  later round rather than lost, so the accumulated update is unbiased up to
  the last carry, ``Σ_t E[Δ̂_t] = Σ_t Δ_t − m_T``, as with error feedback
  (:func:`error_feedback_quantize`, which also carries the rounding error).
  The carry stays bounded: the scales are computed on ``c``, so with
  ``r ≥ r_min`` every entry keeps at least ``r_min`` of the largest one.

  Args:
    delta: This round's update Δ.
    carry: The client's carried mass ``m`` (float32, like ``delta``).
    config: The quantization config.
    rng: A PRNG key for stochastic rounding.
    scales: Optional explicit scales; they must then be for ``Δ + m``.

  Returns:
    ``(delta_hat, new_carry)``.
  """
  corrected = jax.tree.map(lambda d, m: d.astype(jnp.float32) + m, delta,
                           carry)
  sent, new_carry = clip_quantize(corrected, config, rng, scales=scales)
  delta_hat = jax.tree.map(lambda d, h: h.astype(d.dtype), delta, sent)
  return delta_hat, new_carry


# ------------------------------------------------------------------------------
# Calibrated scales.
# ------------------------------------------------------------------------------


def _sq_error(out: PyTree, ref: PyTree) -> jax.Array:
  outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
  total = sum(
      jnp.sum(jnp.square(o.astype(jnp.float32) - r.astype(jnp.float32)))
      for o, r in zip(outs, refs))
  count = sum(r.size for r in refs)
  return total / max(count, 1)


def calibrate_scales(delta: PyTree, global_params: PyTree,
                     apply_fn: Callable[[PyTree, Any], Any],
                     calib_inputs: Any, config: QuantizationConfig,
                     ratios: Optional[Sequence[float]] = None, *,
                     sweeps: int = 1) -> PyTree:
  """Scales whose clipping ratios minimise the error of the network's output.

  In the spirit of PTQ4DM (Shang et al., 2023, "Post-training Quantization on
  Diffusion Models", arXiv:2211.15736), as FedDM (arXiv:2407.14730) adapts it
  to the uploaded update: a per-leaf clipping ratio ``r_ℓ`` (scales
  ``s_ℓ = r_ℓ · max|Δ_ℓ| / q_max``, per tensor, or the per-channel max vector
  times one ratio per leaf for ``'per_channel'``) is chosen to minimise

    L(r) = mean((f(θ_g + Δ, x) − f(θ_g + Δ̂(r), x))²)

  over the calibration inputs ``x``, where ``f = apply_fn``: the error of what
  the network computes rather than of the weights.

  The search is coordinate descent: start from minmax (all ``r_ℓ = 1``), then
  for each leaf in ``jax.tree`` flatten order try every ratio with all other
  leaves at their current (quantized) choice and keep the best, repeating
  ``sweeps`` times. A ratio replaces the current one only if it lowers ``L``
  strictly, so ``L`` never increases and the result is never worse than
  minmax on the calibration inputs. The search uses nearest rounding whatever
  ``config.rounding`` says.

  Cost: ``2 + sweeps · #leaves · #ratios`` calls of ``apply_fn`` (the
  reference, the minmax start, then one per trial), run inside
  ``lax.fori_loop``/``lax.scan`` so ``apply_fn`` is traced once. It is
  jittable and vmappable over a client axis.

  Args:
    delta: The client's update Δ.
    global_params: θ_g, the tree structure of ``delta``.
    apply_fn: ``apply_fn(params, inputs) -> array`` (or a pytree of arrays),
      e.g. a UNet's ε prediction on x_t.
    calib_inputs: The inputs passed to ``apply_fn``.
    config: Its ``bits``, ``granularity`` (and ``ratios`` by default) are used.
    ratios: Clipping ratios to try; defaults to ``config.ratios``.
    sweeps: Passes over the leaves.

  Returns:
    Scales, a pytree like ``delta`` with float32 leaves of shape () or (C,),
    to pass as ``quantize(..., scales=...)``.
  """
  ratios = _check_ratios(config.ratios if ratios is None else ratios)
  if not isinstance(sweeps, int) or sweeps < 1:
    raise ValueError(f'calibrate_scales: sweeps must be >= 1, got {sweeps!r}.')
  qmax = config.qmax
  d_leaves, treedef = jax.tree.flatten(delta)
  try:
    g_leaves = treedef.flatten_up_to(global_params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        'calibrate_scales: `global_params` must have the structure of '
        f'`delta`; {e}') from e
  g_leaves = [jnp.asarray(g) for g in g_leaves]
  xs = [jnp.asarray(d, jnp.float32) for d in d_leaves]
  per_channel = [_per_channel(x.shape, config.granularity) for x in xs]
  amaxes = [_amax(x, pc) for x, pc in zip(xs, per_channel)]
  num_leaves = len(xs)

  def params_with(deltas):
    return treedef.unflatten([
        (g + d.astype(jnp.float32)).astype(g.dtype)
        for g, d in zip(g_leaves, deltas)
    ])

  def scales_for(c):  # c holds each leaf's factor r_ℓ / q_max.
    return [_scale(a, c[i]) for i, a in enumerate(amaxes)]

  if num_leaves == 0:
    return treedef.unflatten([])

  reference = apply_fn(params_with(xs), calib_inputs)

  def loss(c):
    deltas = [_codes(x, s, qmax, 'nearest', None) * s
              for x, s in zip(xs, scales_for(c))]
    return _sq_error(apply_fn(params_with(deltas), calib_inputs), reference)

  def leaf_step(k, carry):
    c, best = carry
    j = k % num_leaves

    def try_factor(acc, factor):
      best_factor, best_loss = acc
      value = loss(c.at[j].set(factor))
      better = value < best_loss
      return (jnp.where(better, factor, best_factor),
              jnp.where(better, value, best_loss)), None

    (c_j, best), _ = lax.scan(try_factor, (c[j], best),
                              _factors(ratios, qmax))
    return c.at[j].set(c_j), best

  c0 = jnp.full((num_leaves,), _factors((1.0,), qmax)[0])
  loss0 = loss(c0)
  # The factors become data-dependent in the loop: match the loss's axes.
  c0 = _varying_like(c0, loss0)
  c, _ = lax.fori_loop(0, sweeps * num_leaves, leaf_step, (c0, loss0))
  return treedef.unflatten(scales_for(c))


# ------------------------------------------------------------------------------
# Wire size and serialization (host side, numpy).
# ------------------------------------------------------------------------------


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(
      isinstance(d, (int, np.integer)) for d in x)


def _shapes(tree_shapes: PyTree) -> tuple[list[tuple[int, ...]], Any]:
  """Leaf shapes of a tree of shape tuples, arrays or ShapeDtypeStructs."""
  leaves, treedef = jax.tree.flatten(tree_shapes, is_leaf=_is_shape)
  shapes = []
  for leaf in leaves:
    shape = leaf if _is_shape(leaf) else getattr(leaf, 'shape', None)
    if shape is None:
      shape = np.shape(leaf)
    shapes.append(tuple(int(d) for d in shape))
  return shapes, treedef


def num_scales(shape: Sequence[int], config: QuantizationConfig) -> int:
  """How many float32 scales a leaf of this shape sends."""
  return int(np.prod(_scale_shape(shape, config.granularity), dtype=np.int64))


def wire_bits(tree_shapes: PyTree, config: QuantizationConfig) -> int:
  """Exact information bits of a quantized update.

  ``Σ_leaves (bits · numel + 32 · #scales)``, with one scale per leaf
  (``'per_tensor'``) or one per output channel (``'per_channel'``).

  Args:
    tree_shapes: A pytree whose leaves are shape tuples, arrays or
      ``jax.ShapeDtypeStruct`` (e.g. the params, or ``jax.eval_shape`` of them).
    config: The quantization config.

  Returns:
    The number of bits, a Python int.
  """
  shapes, _ = _shapes(tree_shapes)
  return sum(config.bits * math.prod(s) + 32 * num_scales(s, config)
             for s in shapes)


def wire_bytes(tree_shapes: PyTree, config: QuantizationConfig) -> int:
  """Exactly ``len(pack(...))``: ``Σ_leaves (⌈bits·numel/8⌉ + 4·#scales)``."""
  shapes, _ = _shapes(tree_shapes)
  return sum(-(-config.bits * math.prod(s) // 8) + 4 * num_scales(s, config)
             for s in shapes)


_CHUNK = 1 << 16  # Elements per bit-packing chunk; a multiple of 8.


def _pack_bits(u: np.ndarray, bits: int) -> bytes:
  """Packs unsigned ints < 2^bits into a little-endian bit stream."""
  if bits == 8:
    return u.astype(np.uint8).tobytes()
  if bits == 16:
    return u.astype('<u2').tobytes()
  shifts = np.arange(bits, dtype=np.uint32)
  out = []
  for start in range(0, u.size, _CHUNK):
    chunk = u[start:start + _CHUNK].astype(np.uint32)
    bit_matrix = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
    out.append(np.packbits(bit_matrix.reshape(-1), bitorder='little'))
  return b''.join(a.tobytes() for a in out)


def _unpack_bits(buf: np.ndarray, n: int, bits: int) -> np.ndarray:
  """Inverse of :func:`_pack_bits` for ``n`` values, as int64."""
  if bits == 8:
    return buf.astype(np.int64)
  if bits == 16:
    return buf.view('<u2').astype(np.int64)
  weights = (1 << np.arange(bits, dtype=np.int64))
  values = np.empty((n,), np.int64)
  chunk_bytes = _CHUNK * bits // 8
  for i, start in enumerate(range(0, n, _CHUNK)):
    count = min(_CHUNK, n - start)
    piece = buf[i * chunk_bytes:i * chunk_bytes + -(-count * bits // 8)]
    bit_matrix = np.unpackbits(piece, bitorder='little', count=count * bits)
    values[start:start + count] = bit_matrix.reshape(count, bits) @ weights
  return values


def pack(codes: PyTree, scales: PyTree, config: QuantizationConfig) -> bytes:
  """Serializes a quantized update into exactly :func:`wire_bytes` bytes.

  Format (headerless: the receiver knows the shapes and the config). For each
  leaf in ``jax.tree`` flatten order:

  1. its codes, row-major, each stored as ``u = q + q_max`` (in
     ``[0, 2^bits − 2]``) in ``bits`` bits, packed into a little-endian bit
     stream (bit ``i`` of the stream is bit ``i mod 8`` of byte ``i // 8``;
     value ``k`` occupies stream bits ``k·bits … k·bits + bits − 1``, least
     significant first), zero-padded to ``⌈bits·numel/8⌉`` bytes; then
  2. its scales as little-endian float32 (one, or one per output channel).

  So with 8 bits each code is one byte ``q + 127``; with 4 bits byte ``k``
  holds ``u_{2k} | u_{2k+1} << 4``.

  Args:
    codes: Integer codes from :func:`quantize`.
    scales: Scales from :func:`quantize`.
    config: The quantization config they were made with.

  Returns:
    The bytes.
  """
  code_leaves, treedef = jax.tree.flatten(codes)
  scale_leaves = treedef.flatten_up_to(scales)
  qmax = config.qmax
  chunks = []
  for q, s in zip(code_leaves, scale_leaves):
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
      raise ValueError(f'pack: codes must be integers, got {q.dtype}.')
    s = np.asarray(s, np.float32).reshape(-1)
    if s.size != num_scales(q.shape, config):
      raise ValueError(
          f'pack: codes of shape {q.shape} need '
          f'{num_scales(q.shape, config)} scales for granularity '
          f'{config.granularity!r}, got {s.size}.')
    q = q.astype(np.int64).reshape(-1)
    if q.size and np.abs(q).max() > qmax:
      raise ValueError(f'pack: a code is outside [-{qmax}, {qmax}].')
    chunks.append(_pack_bits(q + qmax, config.bits))
    chunks.append(s.astype('<f4').tobytes())
  return b''.join(chunks)


def unpack(data: bytes, tree_shapes: PyTree,
           config: QuantizationConfig) -> tuple[PyTree, PyTree]:
  """Inverse of :func:`pack`.

  Args:
    data: Bytes from :func:`pack`.
    tree_shapes: The leaf shapes (see :func:`wire_bits`).
    config: The quantization config.

  Returns:
    ``(codes, scales)`` as numpy arrays: codes of ``config.code_dtype`` with
    the leaf shapes, float32 scales of shape () or (C,).

  Raises:
    ValueError: If ``data`` is not exactly ``wire_bytes(tree_shapes, config)``
      long.
  """
  shapes, treedef = _shapes(tree_shapes)
  expected = wire_bytes(tree_shapes, config)
  if len(data) != expected:
    raise ValueError(
        f'unpack: expected {expected} bytes for these shapes and config, got '
        f'{len(data)}.')
  buf = np.frombuffer(data, np.uint8)
  offset = 0
  codes, scales = [], []
  for shape in shapes:
    n = math.prod(shape)
    nbytes = -(-config.bits * n // 8)
    u = _unpack_bits(buf[offset:offset + nbytes], n, config.bits)
    offset += nbytes
    codes.append((u - config.qmax).astype(config.code_dtype).reshape(shape))
    k = num_scales(shape, config)
    s = buf[offset:offset + 4 * k].view('<f4').astype(np.float32)
    offset += 4 * k
    scales.append(s.reshape(_scale_shape(shape, config.granularity)))
  return treedef.unflatten(codes), treedef.unflatten(scales)
