"""Client and server optimizers built from a config.

Client optimizers are optax chains called once per local step as

    opt.update(grads, state, params, global_params=θ_global, global_step=s)

where `global_step` counts local steps since the start of training
(`round * local_steps + step`), so learning-rate warmup spans rounds even
though each client starts a fresh optimizer state every round (as in FedAvg;
with `keep_state` clients carry it over instead, see `client.py`).
Transforms that need neither extra argument ignore them (`optax.chain`).
"""

from typing import Callable, Optional

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
      `momentum`. (`keep_state` is read by the trainer, not here.)
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
