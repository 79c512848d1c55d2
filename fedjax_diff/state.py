"""Server state of a federation: plain pytrees, jittable and checkpointable."""

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_diff import federation
from fedjax_diff.diffusion import ema as ema_lib

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
    client_states: what each client keeps from one round it takes part in to
      the next, keyed by the component that owns it (`client.OPTIMIZER`,
      `client.UPLOAD`, an algorithm's own key such as SCAFFOLD's control
      variates). Every leaf has one row per client of the federation on
      axis 0 (padding clients included, as in `federation.ClientData`) and is
      sharded over the mesh axis `clients`. `{}` when nothing is kept, so
      FedAvg carries nothing. In a real deployment each client holds its own
      rows; the simulation keeps them with the server state so that they are
      checkpointed with it and a resumed run is bit for bit.
    algorithm: the algorithm's own server-side state (FedPhD's edge servers,
      SCAFFOLD's server control variate, FedDDPM+'s trigger), replicated;
      `{}` for FedAvg.
    client_opt_state: the client optimizer state shared by the round's
      clients (`config.client_optimizer.shared_state`, FedPhD's one
      optimizer; see `algorithms.base`), replicated; `{}` otherwise.
  """
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  round: jax.Array
  rng: jax.Array
  client_states: dict[str, PyTree] = flax.struct.field(default_factory=dict)
  algorithm: PyTree = flax.struct.field(default_factory=dict)
  client_opt_state: PyTree = flax.struct.field(default_factory=dict)


def init_server_state(params: PyTree,
                      server_optimizer: optax.GradientTransformation,
                      rng: jax.Array,
                      client_states: Optional[dict[str, PyTree]] = None,
                      algorithm: Optional[PyTree] = None,
                      client_opt_state: Optional[PyTree] = None
                      ) -> ServerState:
  """Builds the round-0 state from initial parameters.

  Args:
    params: the initial global parameters.
    server_optimizer: the server optimizer (its state is initialised here).
    rng: the run's base PRNG key.
    client_states: from `init_client_states`; None or `{}` when none are
      kept.
    algorithm: the algorithm's server-side state; None or `{}` for none.
    client_opt_state: the shared client optimizer state; None or `{}` for
      none.
  """
  return ServerState(
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=server_optimizer.init(params),
      round=jnp.zeros((), jnp.int32),
      rng=rng,
      client_states=dict(client_states or {}),
      algorithm={} if algorithm is None else algorithm,
      client_opt_state={} if client_opt_state is None else client_opt_state,
  )


def advance(state: ServerState, params: PyTree, opt_state: optax.OptState,
            ema_decay: float, **changes) -> ServerState:
  """The state after a round: new params and server optimizer state, the
  EMA moved towards them with `ema_decay_at(ema_decay, round)`, the round
  counted, and any other field replaced by `changes`."""
  return state.replace(
      params=params,
      ema_params=ema_lib.ema_update(state.ema_params, params,
                                    ema_lib.ema_decay_at(ema_decay,
                                                         state.round)),
      opt_state=opt_state, round=state.round + 1, **changes)


def init_client_states(client_rows: Callable[[PyTree], dict], params: PyTree,
                       num_clients: int,
                       mesh: Optional[Mesh] = None) -> dict[str, PyTree]:
  """Every client's initial rows, stacked on a leading axis of `num_clients`.

  Args:
    client_rows: `params -> rows` of ONE client (an algorithm's
      `client_rows`; see `client.initial_rows`).
    params: the initial parameters (for shapes).
    num_clients: rows, i.e. `ClientData.num_clients` of the data the round
      reads (padding clients included).
    mesh: if given, the rows are created directly sharded over `clients`
      (no device ever holds all of them); `num_clients` must then split
      evenly over the mesh, as `federation.shard_client_data` ensures.

  Returns:
    `{key: rows}`; `{}` when no component keeps client state (FedAvg).
  """
  if not jax.tree.leaves(jax.eval_shape(client_rows, params)):
    return {}
  if mesh is not None and num_clients % mesh.size:
    raise ValueError(f'{num_clients} client rows do not split over '
                     f'{mesh.size} devices; use ClientData.num_clients of '
                     'data padded by federation.shard_client_data.')

  def build(p):
    return jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)),
        client_rows(p))

  shardings = client_rows_sharding(mesh) if mesh is not None else None
  return jax.jit(build, out_shardings=shardings)(params)


def place_state(state: ServerState, mesh: Mesh) -> ServerState:
  """Puts the state on `mesh`: replicated, but client_states over `clients`.

  Do this once before the first round (the round returns its state placed
  the same way, so it is not compiled for again).
  """
  client_states = state.client_states
  state = federation.replicate(state.replace(client_states={}), mesh)
  client_states = jax.device_put(client_states, client_rows_sharding(mesh))
  return state.replace(client_states=client_states)


def client_rows_sharding(mesh: Mesh) -> NamedSharding:
  """Where per-client rows live: split over `clients`.

  On a one-device mesh this is written P(), the form in which the round
  returns them there, so that the round's input and output placements are
  equal and it compiles once.
  """
  return NamedSharding(mesh, P(federation.CLIENTS) if mesh.size > 1 else P())
