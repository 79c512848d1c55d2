"""The upload path: what each client sends the server, and its exact size.

After local training, client k holds its update Δ_k = θ_k − θ_global. An
*upload transform* maps it to the update the server actually receives,

    (Δ̂_k, z_k') = apply(Δ_k, z_k, key_k, ctx_k),

where z_k is state the client keeps from one round to the next (an
error-feedback residual; empty for stateless transforms), and the server
aggregates the Δ̂_k. FedAvg's upload is the identity, Δ̂_k = Δ_k.

Contract (`UploadTransform`):

* `init_client_state(params) -> z`: the state of ONE client before its first
  round (a pytree; `()` when stateless). The federation stacks it over all
  clients (`client.initial_rows`, `state.init_client_states`).
* `apply(delta, z, key, ctx) -> (delta_hat, z')`: pure JAX, traced once and
  `vmap`ped over the clients of a chunk inside the round's `shard_map`.
  `delta_hat` has the tree, shapes and dtypes of `delta`; `z'` those of `z`.
  `ctx` (`UploadContext`) carries θ_global as an unmapped argument (one copy
  per device, never one per client), the client's trained parameters, its
  labels and the round.
* `wire_bytes(shapes, rest) -> int`: the exact bytes of the message this
  stage puts on the wire for an input tree of leaf `shapes`
  (`jax.ShapeDtypeStruct`s), given `rest(shapes')`, the bytes the stages
  after it send for a tree `shapes'` (after the last stage: the raw
  serialization, `comm.tree_bytes`). A stage that only changes values and
  hands them on (error feedback) returns `rest(shapes)`; a sparsifier sends
  its mask and then `rest(...)` of the entries it keeps; an *encoder* (the
  quantizer: `encodes=True`) serializes its output itself and returns the
  size of that, ignoring `rest`. `comm.message_bytes(t, params)` starts the
  recursion. The sizes are static: they depend only on shapes and configs.
* `encodes`: whether the stage's output is its own serialization. An encoder
  can only be the last stage of a chain (what a later stage did to its
  output would have no defined wire format).
* `carries`: whether the stage keeps what it could not send in its state
  and adds it to the next round's input (the quantizer's clipped mass).
  `error_feedback` refuses such a stage: its residual carries all of it
  already, so the mass would be sent twice.

`chain(t1, ..., tn)` applies the stages in order (e.g. a pruning mask, then
quantization) and `error_feedback(t)` wraps a compressor with EF-SGD's
residual.

Keys: the round gives client k the upload key
`fold_in(client_key_k, UPLOAD_KEY_TAG)`, where `client_key_k =
fold_in(fold_in(state.rng, round), k)` is the key its local training splits
(`client.upload_key`). `chain` passes stage i the key `fold_in(key, i)` (a
chain of one stage is that stage, with the key unchanged); `quantizer` splits
its key as `round_key, calib_key = split(key)` and rounds stochastically with
`round_key`; `error_feedback` passes its key on unchanged.
"""

from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp

from fedjax_diff.strategies import quantize as quantize_lib
from fedjax_diff.strategies.calibration import Calibration

PyTree = Any
Rest = Callable[[PyTree], int]

# Mixed into a client's key to derive its upload key ('upld' in ASCII).
UPLOAD_KEY_TAG = 0x75706C64


@flax.struct.dataclass
class UploadContext:
  """What an upload transform may read besides Δ (one client's view).

  Attributes:
    global_params: θ_global of the round (unmapped: shared by the clients of
      a device).
    params: the client's parameters after local training, θ_k.
    labels: int32 [max_n], the client's labels (zero beyond `count`).
    count: int32 scalar, the client's example count (0 for padding slots).
    round: int32 scalar, the round index.
    clip_norm: the round's clip norm C_r when the server broadcasts one
      (client-level DP, `strategies.privacy`; read by `clipping.clip()`),
      else None.
  """
  global_params: PyTree
  params: PyTree
  labels: jax.Array
  count: jax.Array
  round: jax.Array
  clip_norm: Optional[jax.Array] = None


class UploadTransform(NamedTuple):
  """A stage of the upload path; see the module docstring for the contract.

  Attributes:
    init_client_state: `params -> z`, one client's initial state.
    apply: `(delta, z, key, ctx) -> (delta_hat, z')`.
    wire_bytes: `(shapes, rest) -> int`, exact message bytes.
    name: a short description for logs and the run summary.
    encodes: the stage serializes its output itself (it must come last).
    carries: the stage carries unsent mass to the next round (see the
      module docstring).
  """
  init_client_state: Callable[[PyTree], PyTree]
  apply: Callable[[PyTree, PyTree, jax.Array, UploadContext],
                  tuple[PyTree, PyTree]]
  wire_bytes: Callable[[PyTree, Rest], int]
  name: str
  encodes: bool = False
  carries: bool = False


def identity() -> UploadTransform:
  """Sends Δ as it is: Δ̂ = Δ (FedAvg, McMahan et al. 2017, 1602.05629)."""

  def apply(delta, z, key, ctx):
    del key, ctx
    return delta, z

  return UploadTransform(init_client_state=lambda params: (), apply=apply,
                         wire_bytes=lambda shapes, rest: rest(shapes),
                         name='fp32')


def chain(*transforms: UploadTransform) -> UploadTransform:
  """Applies the stages in order: Δ̂ = t_n(… t_1(Δ)).

  The state is the tuple of the stages' states; stage i gets the key
  `fold_in(key, i)`; the message is `t_1.wire_bytes(shapes, rest=t_2…)`, so
  each stage accounts for what it sends on. One stage is returned as is; no
  stage is the identity.

  Raises:
    TypeError: a stage is not an UploadTransform.
    ValueError: an encoder (e.g. a quantizer) is not the last stage.
  """
  if not transforms:
    return identity()
  for i, t in enumerate(transforms):
    if not isinstance(t, UploadTransform):
      raise TypeError(f'chain: stage {i} is {type(t).__name__}, not an '
                      'UploadTransform.')
    if t.encodes and i < len(transforms) - 1:
      raise ValueError(
          f'chain: stage {i} ({t.name}) encodes the message, so it must be '
          'the last stage, e.g. chain(mask, quantizer); the stages after it '
          'would change values it has already serialized.')
  if len(transforms) == 1:
    return transforms[0]

  def init_client_state(params):
    return tuple(t.init_client_state(params) for t in transforms)

  def apply(delta, z, key, ctx):
    new_z = []
    for i, (t, zi) in enumerate(zip(transforms, z)):
      delta, zi = t.apply(delta, zi, jax.random.fold_in(key, i), ctx)
      new_z.append(zi)
    return delta, tuple(new_z)

  def wire_bytes(shapes, rest):
    def from_stage(i):
      if i == len(transforms):
        return rest
      return lambda s: transforms[i].wire_bytes(s, from_stage(i + 1))
    return from_stage(0)(shapes)

  return UploadTransform(init_client_state, apply, wire_bytes,
                         ' -> '.join(t.name for t in transforms),
                         transforms[-1].encodes,
                         any(t.carries for t in transforms))


def error_feedback(inner: UploadTransform) -> UploadTransform:
  """Error feedback around a compressor C (EF-SGD).

  The client sends Δ̂ = C(Δ + e) and keeps e' = Δ + e − Δ̂ for its next
  round (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error
  Feedback Fixes SignSGD and other Gradient Compression Schemes",
  arXiv:1901.09847), so over rounds Σ_t Δ̂_t = Σ_t Δ_t − e_T: what the
  compressor dropped is sent later instead of lost. e starts at zero. With
  C = `quantizer(config)` this is `quantize.error_feedback_quantize`.

  The residual is float32 per client and per parameter: it lives in
  `ServerState.client_states['upload']` (one row per client, sharded over
  the mesh).
  The message is the inner compressor's.

  Raises:
    ValueError: `inner` carries unsent mass itself (a quantizer with
      `carry_clipped`): build it with `carry_clipped=False`, the residual
      carries the clipped mass with the rounding error.
  """
  if inner.carries:
    raise ValueError(
        f'error_feedback: {inner.name} already carries what it does not '
        'send to the next round, and the residual carries it too: it would '
        'be sent twice. Build the quantizer with carry_clipped=False inside '
        'error_feedback.')

  def init_client_state(params):
    return {'residual': jax.tree.map(
                lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            'inner': inner.init_client_state(params)}

  def apply(delta, z, key, ctx):
    corrected = jax.tree.map(lambda d, e: d.astype(jnp.float32) + e, delta,
                             z['residual'])
    sent, inner_z = inner.apply(corrected, z['inner'], key, ctx)
    # What is sent is Δ̂ in Δ's dtype: the residual keeps whatever that cast
    # rounds off too, so Σ_t Δ̂_t = Σ_t Δ_t − e_T holds for bfloat16 Δ.
    delta_hat = jax.tree.map(lambda d, s: s.astype(d.dtype), delta, sent)
    residual = jax.tree.map(lambda c, s: c - s.astype(jnp.float32), corrected,
                            delta_hat)
    return delta_hat, {'residual': residual, 'inner': inner_z}

  return UploadTransform(init_client_state, apply, inner.wire_bytes,
                         f'error_feedback({inner.name})', inner.encodes,
                         carries=True)


def quantizer(config: quantize_lib.QuantizationConfig,
              calibration: Optional[Calibration] = None, *,
              carry_clipped: Optional[bool] = None) -> UploadTransform:
  """FedDM-quant: the client uploads its update quantized (arXiv 2407.14730).

      s = r·max|Δ|/q_max,  q = clip(round(Δ/s), −q_max, q_max),  Δ̂ = q·s,

  per tensor or per output channel, with nearest or stochastic rounding
  (see `quantize`). The scales come from `config.scale_method`:
  'minmax' (r = 1), 'mse' (r minimising ‖Δ − Δ̂‖² per tensor/channel), or
  'calibrated': after local training the client draws calibration inputs by
  running its own new model θ_k through the reverse process to t ≈ 0.4·T
  (`Calibration.inputs`), then picks per-leaf r minimising the error of the
  ε the network computes on them (`quantize.calibrate_scales`), PTQ4DM's
  calibration (Shang et al. 2023, arXiv 2211.15736) as FedDM adapts it.

  The message is `pack`'s serialization, exactly `quantize.wire_bytes`:
  ⌈bits·numel/8⌉ bytes of codes plus 4 bytes per scale, per leaf.

  Unbiased with clipping: stochastic rounding is unbiased inside the
  clipping range only, and 'mse' and 'calibrated' clip (r < 1). With
  `carry_clipped` the client keeps the clipped mass m as state and adds it
  to its next update (`quantize.carry_clipped_quantize`): E[Δ̂_t] = Δ_t +
  m_{t−1} − m_t, nothing lost in expectation (a float32 row per client,
  like error feedback's residual; no extra bytes on the wire).

  Args:
    config: the quantization config.
    calibration: required for scale_method='calibrated', unused otherwise.
    carry_clipped: carry the clipped mass; None (default): exactly when the
      rounding is stochastic and the scales can clip (`quantize.clips`).
      False makes stochastic rounding with clipping scales biased in each
      round: meant for use inside `error_feedback`, whose residual carries
      the clipped mass.
  """
  if not isinstance(config, quantize_lib.QuantizationConfig):
    raise TypeError('quantizer: config must be a QuantizationConfig, got '
                    f'{type(config).__name__}.')
  calibrated = config.scale_method == 'calibrated'
  if calibrated and calibration is None:
    raise ValueError(
        "quantizer: scale_method='calibrated' needs a `calibration` "
        '(strategies.calibration.Calibration) to draw its inputs.')

  if carry_clipped is None:
    carry_clipped = (config.rounding == 'stochastic' and
                     quantize_lib.clips(config))
  carry_clipped = bool(carry_clipped)

  def init_client_state(params):
    if not carry_clipped:
      return ()
    return {'clipped': jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)}

  def apply(delta, z, key, ctx):
    round_key, calib_key = jax.random.split(key)
    original = delta
    if carry_clipped:
      delta = jax.tree.map(lambda d, m: d.astype(jnp.float32) + m, delta,
                           z['clipped'])
    scales = None
    if calibrated:
      inputs = calibration.inputs(ctx.params, calib_key, ctx.labels,
                                  ctx.count)
      scales = quantize_lib.calibrate_scales(
          delta, ctx.global_params, calibration.apply_fn, inputs, config)
    rng = round_key if config.rounding == 'stochastic' else None
    if not carry_clipped:
      return quantize_lib.quantize_dequantize(delta, config, rng,
                                              scales=scales), z
    sent, mass = quantize_lib.clip_quantize(delta, config, rng,
                                            scales=scales)
    sent = jax.tree.map(lambda d, h: h.astype(d.dtype), original, sent)
    return sent, {'clipped': mass}

  def wire_bytes(shapes, rest):
    del rest  # The codes and scales are the whole message.
    return quantize_lib.wire_bytes(shapes, config)

  name = (f'int{config.bits} {config.granularity} {config.rounding} '
          f'{config.scale_method}'
          f'{" (clipped mass carried)" if carry_clipped else ""}')
  return UploadTransform(init_client_state, apply, wire_bytes, name,
                         encodes=True, carries=carry_clipped)
