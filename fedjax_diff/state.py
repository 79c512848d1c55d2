"""Server state of a federation: plain pytrees, jittable and checkpointable."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class ServerState:
  """Everything the server carries from one round to the next.

  Attributes:
    params: the global model parameters θ.
    ema_params: exponential moving average of `params`, used for sampling
      (DDPM, Ho et al. 2020, samples from an EMA of the weights).
    opt_state: state of the server optimizer (`sgd(1.0)` is FedAvg, `adam` is
      FedAdam, Reddi et al. 2021, arXiv 2003.00295).
    round: number of rounds completed (int32 scalar).
    rng: the run's base PRNG key (raw uint32[2]); round r uses
      `fold_in(rng, r)`, so a resumed run draws the same numbers.
  """
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  round: jax.Array
  rng: jax.Array


def init_server_state(params: PyTree, server_optimizer: optax.GradientTransformation,
                      rng: jax.Array) -> ServerState:
  """Builds the round-0 state from initial parameters."""
  return ServerState(
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=server_optimizer.init(params),
      round=jnp.zeros((), jnp.int32),
      rng=rng,
  )
