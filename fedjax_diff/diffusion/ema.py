"""Exponential moving average of parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema_params: Any, params: Any,
               decay: float | jax.Array) -> Any:
  """One step of the exponential moving average of a parameter pytree.

    ema <- decay * ema + (1 - decay) * params,

  applied leaf by leaf; each result keeps the dtype of its `ema_params` leaf.
  Averaging the iterates of a stochastic optimizer goes back to Polyak &
  Juditsky (1992), "Acceleration of Stochastic Approximation by Averaging";
  DDPM (Ho et al., 2020, Appendix B) samples from an EMA of the weights with
  decay 0.9999.

  Args:
    ema_params: the running average, a pytree.
    params: the current parameters, a pytree of the same structure.
    decay: the decay in [0, 1] (a number or scalar array).

  Returns:
    The updated average, a pytree of the same structure as `ema_params`.
  """
  def update(ema, p):
    ema = jnp.asarray(ema)
    new = decay * ema + (1.0 - decay) * jnp.asarray(p)
    return new.astype(ema.dtype)
  return jax.tree.map(update, ema_params, params)


def ema_decay_at(decay: float, round_idx: jax.Array) -> jax.Array:
  """EMA decay with warmup: min(decay, (1 + r) / (10 + r)) at update r.

  The EMA is updated once per round, and federated runs have few rounds: a
  fixed 0.999 would keep the EMA at the initial weights for a short run.
  The warmup is that of tf.train.ExponentialMovingAverage(num_updates=r).
  """
  r = jnp.asarray(round_idx, jnp.float32)
  return jnp.minimum(decay, (1.0 + r) / (10.0 + r))
