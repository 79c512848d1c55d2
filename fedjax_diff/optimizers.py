"""Client and server optimizers built from a config.

Client optimizers are optax chains called once per local step as

    opt.update(grads, state, params, global_params=θ_global, global_step=s)

where `global_step` counts local steps since the start of training
(`round * local_steps + step`), so learning-rate warmup spans rounds even
though each client starts a fresh optimizer state every round (as in FedAvg;
with `keep_state` clients carry it over instead, see `client.py`; with
`shared_state` the round's clients share one state and the steps count all
clients', see `algorithms/base.py` and `compose_sequential`). Transforms
that need neither extra argument ignore them (`optax.chain`).
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

CLIENT_OPTIMIZERS = ('adam', 'sgd')
SERVER_OPTIMIZERS = ('sgd', 'adam')


def number_field(cfg, name: str, where: str, default, *, low: float,
                 high: Optional[float] = None, low_open: bool = False,
                 high_open: bool = True, hint: str = '') -> float:
  """`cfg.name` (`default` when absent or None) as a finite float in
  [low, high) (open or closed ends as asked), or a ValueError naming
  `where.name`, the range and `hint`."""
  value = cfg.get(name, default)
  if value is None:
    value = default
  ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and
        math.isfinite(value) and (value > low if low_open else value >= low)
        and (high is None or (value < high if high_open else value <= high)))
  if not ok:
    lo = f'{"(" if low_open else "["}{low:g}'
    hi = f'{high:g}{")" if high_open else "]"}' if high is not None else 'inf)'
    raise ValueError(f'{where}.{name} must be a finite number in {lo}, {hi}'
                     f', got {value!r}.{" " + hint if hint else ""}')
  return float(value)


def steps_field(cfg, name: str, where: str) -> int:
  """`cfg.name` as an int >= 0 (0 when absent), or a ValueError."""
  value = cfg.get(name, 0)
  if value is None:
    value = 0
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{where}.{name} must be an int >= 0, got {value!r}.')
  return value


def scale_by_global_step_schedule(
    schedule: Callable[[jax.Array], jax.Array]
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by `-schedule(global_step)` (a learning rate).

  Unlike `optax.scale_by_schedule`, the step comes from the caller, not from a
  count in the state, so it survives the per-round reset of client state.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, global_step, **extra_args):
    del params, extra_args
    lr = jnp.asarray(schedule(global_step))
    return jax.tree.map(lambda u: -lr.astype(u.dtype) * u, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def warmup_schedule(learning_rate: float, warmup_steps: int,
                    decay_steps: int = 0, where: str = ''):
  """Linear warmup from 0 to `learning_rate` over `warmup_steps` (DDPM uses
  5000 steps), then constant, or with `decay_steps` > `warmup_steps` a
  cosine decay to 0 at step `decay_steps` (Loshchilov & Hutter 2017, SGDR,
  arXiv 1608.03983, without restarts):

    lr(s) = lr · min(1, (s + 1)/W) · ½(1 + cos(π · clip((s − W)/(D − W),
            0, 1)))

  with W = `warmup_steps` and D = `decay_steps`; 0 after step D.

  Raises:
    ValueError: 0 < D <= W; the message names the fields under `where`
      (e.g. 'config.client_optimizer') when given.
  """
  if decay_steps and decay_steps <= warmup_steps:
    prefix = f'{where}.' if where else ''
    raise ValueError(f'{prefix}decay_steps ({decay_steps}) must exceed '
                     f'{prefix}warmup_steps ({warmup_steps}), or be 0 (no '
                     f'decay, the learning rate stays constant after '
                     f'warmup).')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(learning_rate, jnp.float32)
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
    if decay_steps:
      frac = jnp.clip((step - warmup_steps) / (decay_steps - warmup_steps),
                      0.0, 1.0)
      lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return lr
  return schedule


def client_optimizer(cfg: ml_collections.ConfigDict,
                     extra: Optional[list] = None
                     ) -> optax.GradientTransformationExtraArgs:
  """The client optimizer: [extra transforms] → clip → adam|sgd → lr schedule.

  Args:
    cfg: fields `name` ('adam' or 'sgd'), `learning_rate` (> 0),
      `warmup_steps` (>= 0), `decay_steps` (0: none; else a cosine decay
      to 0 at that step, see `warmup_schedule`), `grad_clip` (global norm;
      0 disables),
      optional `b1`, `b2` (in [0, 1)), `eps` (> 0), `momentum` (in [0, 1)).
      (`keep_state` and `shared_state` are read by the algorithms, not
      here.)
    extra: transforms applied first to the raw gradients (e.g. the FedProx
      term, which must see the gradient before clipping and Adam scaling).

  Raises:
    ValueError: an unknown name or a field out of range (the message names
      the field of `config.client_optimizer`).
  """
  where = 'config.client_optimizer'
  name = cfg.get('name', 'adam')
  if name not in CLIENT_OPTIMIZERS:
    raise ValueError(f'Unknown client optimizer {name!r} in {where}.name; '
                     f'use one of {CLIENT_OPTIMIZERS}.')
  lr = number_field(cfg, 'learning_rate', where, None, low=0.0,
                    low_open=True,
                    hint='(Adam on a DDPM UNet: 1e-4 to 2e-3.)')
  warmup = steps_field(cfg, 'warmup_steps', where)
  schedule = warmup_schedule(lr, warmup,
                             steps_field(cfg, 'decay_steps', where), where)
  clip = number_field(cfg, 'grad_clip', where, 0.0, low=0.0,
                      hint='(0 disables clipping.)')
  chain = list(extra or [])
  if clip:
    chain.append(optax.clip_by_global_norm(clip))
  if name == 'adam':
    chain.append(optax.scale_by_adam(
        b1=number_field(cfg, 'b1', where, 0.9, low=0.0, high=1.0),
        b2=number_field(cfg, 'b2', where, 0.999, low=0.0, high=1.0),
        eps=number_field(cfg, 'eps', where, 1e-8, low=0.0, low_open=True)))
  else:
    momentum = number_field(cfg, 'momentum', where, 0.0, low=0.0, high=1.0)
    if momentum:
      chain.append(optax.trace(decay=momentum))
  chain.append(scale_by_global_step_schedule(schedule))
  return optax.chain(*chain)


def server_optimizer(cfg: ml_collections.ConfigDict
                     ) -> optax.GradientTransformation:
  """The server optimizer, applied to the pseudo-gradient −Δ̄.

  `sgd` with learning_rate 1.0 is FedAvg; `adam` is FedAdam and `momentum`
  FedAvgM (Reddi et al. 2021, "Adaptive Federated Optimization",
  arXiv 2003.00295).
  """
  where = 'config.server_optimizer'
  name = cfg.get('name', 'sgd')
  if name not in SERVER_OPTIMIZERS:
    raise ValueError(f'Unknown server optimizer {name!r} in {where}.name; '
                     f'use one of {SERVER_OPTIMIZERS}.')
  lr = number_field(cfg, 'learning_rate', where, 1.0, low=0.0,
                    low_open=True, hint='(FedAvg: sgd with 1.0.)')
  if name == 'sgd':
    momentum = number_field(cfg, 'momentum', where, 0.0, low=0.0, high=1.0)
    return optax.sgd(lr, momentum=momentum or None)
  return optax.adam(
      lr, b1=number_field(cfg, 'b1', where, 0.9, low=0.0, high=1.0),
      b2=number_field(cfg, 'b2', where, 0.99, low=0.0, high=1.0),
      eps=number_field(cfg, 'eps', where, 1e-3, low=0.0, low_open=True))


# -- One client optimizer state shared by the clients (FedPhD's carry). -------


def state_decays(cfg: ml_collections.ConfigDict, state) -> Any:
  """Per leaf of a client optimizer's state, its decay per step β.

  The chains of `client_optimizer` keep linear recurrences: Adam's moments
  μ ← β₁μ + (1 − β₁)g and ν ← β₂ν + (1 − β₂)g² (β = b1, b2), SGD momentum's
  trace t ← g + βt (β = momentum), and counters c ← c + 1, for which β = 1
  (like every leaf a local step leaves unchanged, e.g. a pruning mask).

  Args:
    cfg: the `config.client_optimizer` the chain was built from.
    state: the chain's state (or its shapes).

  Raises:
    ValueError: the state holds Adam's or momentum's state but `cfg` names
      another optimizer (the decays would be wrong).
  """
  name = cfg.get('name', 'adam')
  nodes = (optax.ScaleByAdamState, optax.TraceState)

  def node(x):
    if isinstance(x, optax.ScaleByAdamState):
      if name != 'adam':
        raise ValueError(f"state_decays: the state holds Adam's moments but "
                         f'config.client_optimizer.name is {name!r}.')
      return optax.ScaleByAdamState(
          count=1.0, mu=jax.tree.map(lambda _: float(cfg.get('b1', 0.9)),
                                     x.mu),
          nu=jax.tree.map(lambda _: float(cfg.get('b2', 0.999)), x.nu))
    if isinstance(x, optax.TraceState):
      if name != 'sgd':
        raise ValueError(f'state_decays: the state holds a momentum trace '
                         f'but config.client_optimizer.name is {name!r}.')
      return optax.TraceState(trace=jax.tree.map(
          lambda _: float(cfg.get('momentum', 0.0)), x.trace))
    return 1.0

  return jax.tree.map(node, state, is_leaf=lambda x: isinstance(x, nodes))


def compose_sequential(start, finals, positions, mask, steps, decays):
  """The state one optimizer would hold after the round's clients in order.

  FedPhD's code (arXiv 2507.06449) trains the round's clients one after
  another with ONE optimizer, each client continuing from the state the
  previous one left. Here the clients train in parallel, each from the
  round's shared state x₀; client k (position p_k in the order, S_k local
  steps) ends with x_k. For a leaf whose step is linear, x ← βx + f(g), the
  state a sequential pass over the same gradients in the order p would
  leave is

      x = β^{Σ_j S_j}·x₀ + Σ_k β^{A_k}·(x_k − β^{S_k}·x₀),
      A_k = Σ_{j: p_j > p_k} S_j,

  exactly (each client's own contribution x_k − β^{S_k}·x₀, decayed by the
  steps of the clients after it; with S_k = S, A_k = (K−1−p_k)·S); for
  counters (β = 1) x₀ + Σ_k (x_k − x₀), i.e. Σ_k S_k steps more. Positions
  need not be contiguous: a client left out by `mask` (a dropped one,
  `strategies.faults`) is as if it had not been in the order.

  Args:
    start: x₀, the shared state of the round.
    finals: the clients' final states, stacked on a leading slot axis.
    positions: int [slots], each slot's position p_k in the order.
    mask: [slots], 1 for the clients that count, 0 for padding slots and
      dropped clients.
    steps: S, the local steps of every client (an int), or per slot S_k
      (an int array [slots]: stragglers).
    decays: per leaf of `start`, β (`state_decays`).
  """
  real = (jnp.asarray(mask) > 0)
  positions = jnp.asarray(positions)
  per_slot = jnp.where(real, jnp.broadcast_to(
      jnp.asarray(steps, jnp.float32), real.shape), 0.0)
  later = positions[None, :] > positions[:, None]
  after = jnp.sum(jnp.where(later, per_slot[None, :], 0.0), axis=1)
  total_steps = jnp.sum(per_slot)

  def leaf(x0, xs, beta):
    weights = jnp.where(real, jnp.power(jnp.float32(beta), after), 0.0)
    if jnp.issubdtype(x0.dtype, jnp.integer):
      if beta != 1.0:
        raise ValueError('compose_sequential: an integer leaf must be a '
                         f'counter (decay 1), got decay {beta}.')
      own = jnp.where(real.reshape((-1,) + (1,) * x0.ndim), xs - x0[None], 0)
      return x0 + jnp.sum(own, axis=0).astype(x0.dtype)
    x0f = x0.astype(jnp.float32)
    own_decay = jnp.power(jnp.float32(beta), per_slot)
    own = (xs.astype(jnp.float32) -
           own_decay.reshape((-1,) + (1,) * x0.ndim) * x0f[None])
    # Zero the left-out slots before the sum (a dropped client's state may
    # be non-finite, and 0·NaN is NaN).
    own = jnp.where(real.reshape((-1,) + (1,) * x0.ndim), own, 0.0)
    total = jnp.tensordot(weights, own, axes=1)
    kept = jnp.power(jnp.float32(beta), total_steps)
    return (kept * x0f + total).astype(x0.dtype)

  return jax.tree.map(leaf, start, finals, decays)
