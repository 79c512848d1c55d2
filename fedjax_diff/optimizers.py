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

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax


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


def warmup_schedule(learning_rate: float, warmup_steps: int):
  """Linear warmup from 0 to `learning_rate` over `warmup_steps` (DDPM uses
  5000 steps), then constant."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps <= 0:
      return jnp.asarray(learning_rate, jnp.float32)
    return learning_rate * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
  return schedule


def client_optimizer(cfg: ml_collections.ConfigDict,
                     extra: Optional[list] = None
                     ) -> optax.GradientTransformationExtraArgs:
  """The client optimizer: [extra transforms] → clip → adam|sgd → lr schedule.

  Args:
    cfg: fields `name` ('adam' or 'sgd'), `learning_rate`, `warmup_steps`,
      `grad_clip` (global norm; 0 disables), optional `b1`, `b2`, `eps`,
      `momentum`. (`keep_state` and `shared_state` are read by the
      algorithms, not here.)
    extra: transforms applied first to the raw gradients (e.g. the FedProx
      term, which must see the gradient before clipping and Adam scaling).
  """
  chain = list(extra or [])
  if cfg.get('grad_clip', 0.0):
    chain.append(optax.clip_by_global_norm(cfg.grad_clip))
  name = cfg.get('name', 'adam')
  if name == 'adam':
    chain.append(optax.scale_by_adam(b1=cfg.get('b1', 0.9),
                                     b2=cfg.get('b2', 0.999),
                                     eps=cfg.get('eps', 1e-8)))
  elif name == 'sgd':
    if cfg.get('momentum', 0.0):
      chain.append(optax.trace(decay=cfg.momentum))
  else:
    raise ValueError(f"Unknown client optimizer {name!r}; use 'adam' or 'sgd'.")
  chain.append(scale_by_global_step_schedule(
      warmup_schedule(cfg.learning_rate, cfg.get('warmup_steps', 0))))
  return optax.chain(*chain)


def server_optimizer(cfg: ml_collections.ConfigDict
                     ) -> optax.GradientTransformation:
  """The server optimizer, applied to the pseudo-gradient −Δ̄.

  `sgd` with learning_rate 1.0 is FedAvg; `adam` is FedAdam and `momentum`
  FedAvgM (Reddi et al. 2021, "Adaptive Federated Optimization",
  arXiv 2003.00295).
  """
  name = cfg.get('name', 'sgd')
  lr = cfg.get('learning_rate', 1.0)
  if name == 'sgd':
    return optax.sgd(lr, momentum=cfg.get('momentum', None) or None)
  if name == 'adam':
    return optax.adam(lr, b1=cfg.get('b1', 0.9), b2=cfg.get('b2', 0.99),
                      eps=cfg.get('eps', 1e-3))
  raise ValueError(f"Unknown server optimizer {name!r}; use 'sgd' or 'adam'.")


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


def compose_sequential(start, finals, positions, mask, steps: int, decays):
  """The state one optimizer would hold after the round's clients in order.

  FedPhD's code (arXiv 2507.06449) trains the round's clients one after
  another with ONE optimizer, each client continuing from the state the
  previous one left. Here the clients train in parallel, each from the
  round's shared state x₀; client k (position p_k among the K real
  clients, S local steps) ends with x_k. For a leaf whose step is linear,
  x ← βx + f(g), the state a sequential pass over the same gradients in the
  order p would leave is

      x = β^{K·S}·x₀ + Σ_k β^{(K−1−p_k)·S}·(x_k − β^S·x₀),

  exactly (each client's own contribution x_k − β^S·x₀, decayed by the
  steps of the clients after it); for counters (β = 1) x₀ + Σ_k (x_k − x₀),
  i.e. K·S steps more.

  Args:
    start: x₀, the shared state of the round.
    finals: the clients' final states, stacked on a leading slot axis.
    positions: int [slots], each slot's position p_k in the order.
    mask: [slots], 1 for real clients, 0 for padding slots.
    steps: S, the local steps of every client.
    decays: per leaf of `start`, β (`state_decays`).
  """
  real = (jnp.asarray(mask) > 0)
  k_total = jnp.sum(real.astype(jnp.int32))
  after = (k_total - 1 - positions).astype(jnp.float32) * steps

  def leaf(x0, xs, beta):
    weights = jnp.where(real, jnp.power(jnp.float32(beta), after), 0.0)
    if jnp.issubdtype(x0.dtype, jnp.integer):
      if beta != 1.0:
        raise ValueError('compose_sequential: an integer leaf must be a '
                         f'counter (decay 1), got decay {beta}.')
      own = jnp.where(real.reshape((-1,) + (1,) * x0.ndim), xs - x0[None], 0)
      return x0 + jnp.sum(own, axis=0).astype(x0.dtype)
    x0f = x0.astype(jnp.float32)
    own = xs.astype(jnp.float32) - jnp.float32(beta) ** steps * x0f[None]
    total = jnp.tensordot(weights, own, axes=1)
    kept = jnp.power(jnp.float32(beta), k_total.astype(jnp.float32) * steps)
    return (kept * x0f + total).astype(x0.dtype)

  return jax.tree.map(leaf, start, finals, decays)
