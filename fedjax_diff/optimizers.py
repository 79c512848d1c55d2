"""Client and server optimizers built from a config.

Client optimizers are optax chains called once per local step as

    opt.update(grads, state, params, global_params=θ_global, global_step=s)

where `global_step` counts local steps since the start of training
(`round * local_steps + step`), so learning-rate warmup spans rounds even
though each client starts a fresh optimizer state every round (as in FedAvg;
with `keep_state` clients carry it over instead, see `client.py`).
Transforms that need neither extra argument ignore them (`optax.chain`).
"""

import math
from typing import Callable, Optional

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
    cfg: fields `name` ('adam' or 'sgd'), `learning_rate` (> 0),
      `warmup_steps` (>= 0), `grad_clip` (global norm; 0 disables),
      optional `b1`, `b2` (in [0, 1)), `eps` (> 0), `momentum` (in [0, 1)).
      (`keep_state` is read by the algorithm, not here.)
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
  chain.append(scale_by_global_step_schedule(warmup_schedule(lr, warmup)))
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
