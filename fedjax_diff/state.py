"""Server state of a federation: plain pytrees, jittable and checkpointable."""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_diff import federation

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
    client_states: state that each client keeps across rounds, keyed by the
      component that owns it: `'upload'` for the upload path (e.g.
      error-feedback residuals), `'optimizer'` for the client optimizer's
      state when clients keep it across rounds; later client-side
      strategies add their own key. Every leaf has one row per client of the
      federation on axis 0 (padding clients included, as in
      `federation.ClientData`) and is
      sharded over the mesh axis `clients`. `{}` when no component keeps
      client state, so FedAvg carries nothing. In a real deployment each
      client holds its own rows; the simulation keeps them with the server
      state so that they are checkpointed with it and a resumed run is bit
      for bit.
    edges: the edge servers of a hierarchy
      (`strategies.hierarchical.EdgeState`: E edge models, their label
      statistics), replicated like `params`; None for a flat federation.
  """
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  round: jax.Array
  rng: jax.Array
  client_states: dict[str, PyTree] = flax.struct.field(default_factory=dict)
  edges: Optional[PyTree] = None

# The key of `ServerState.client_states` owned by the upload path.
UPLOAD = 'upload'
# The key of the client optimizer's state, when clients keep it across rounds
# (`config.client_optimizer.keep_state`).
CLIENT_OPTIMIZER = 'optimizer'


def init_server_state(params: PyTree,
                      server_optimizer: optax.GradientTransformation,
                      rng: jax.Array,
                      client_states: Optional[dict[str, PyTree]] = None,
                      edges: Optional[PyTree] = None) -> ServerState:
  """Builds the round-0 state from initial parameters.

  Args:
    params: the initial global parameters.
    server_optimizer: the server optimizer (its state is initialised here).
    rng: the run's base PRNG key.
    client_states: from `init_client_states`; None or `{}` when none are
      kept.
    edges: from `strategies.hierarchical.init_edge_state` for a hierarchy;
      None for a flat federation.
  """
  return ServerState(
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=server_optimizer.init(params),
      round=jnp.zeros((), jnp.int32),
      rng=rng,
      client_states=dict(client_states or {}),
      edges=edges,
  )


def _client_state(upload, params: PyTree, client_optimizer) -> PyTree:
  """One client's initial state: `{'upload': ..., 'optimizer': ...}`, each
  key present only when its component keeps state."""
  one = {}
  if upload is not None:
    z = upload.init_client_state(params)
    if jax.tree.leaves(z):
      one[UPLOAD] = z
  if client_optimizer is not None:
    one[CLIENT_OPTIMIZER] = client_optimizer.init(params)
  return one


def client_state_shapes(upload, params: PyTree,
                        client_optimizer=None) -> PyTree:
  """Shapes of one client's state (no leading client axis); `{}` if none."""
  return jax.eval_shape(lambda p: _client_state(upload, p, client_optimizer),
                        params)


def init_client_states(upload, params: PyTree, num_clients: int,
                       mesh: Optional[Mesh] = None,
                       client_optimizer=None) -> PyTree:
  """Every client's initial state, stacked on a leading axis of `num_clients`.

  Args:
    upload: a `strategies.upload.UploadTransform` or None (no state).
    params: the initial parameters (for shapes).
    num_clients: rows, i.e. `ClientData.num_clients` of the data the round
      reads (padding clients included).
    mesh: if given, the rows are created directly sharded over `clients`
      (no device ever holds all of them); `num_clients` must then split
      evenly over the mesh, as `federation.shard_client_data` ensures.
    client_optimizer: the client optimizer when clients keep its state across
      rounds (`rounds.make_round_fn(keep_client_optimizer_state=True)`);
      None when each round starts it afresh (FedAvg).

  Returns:
    `{'upload': rows, 'optimizer': rows}`, each key present only when its
    component keeps state: `{}` for FedAvg.
  """
  if not jax.tree.leaves(client_state_shapes(upload, params,
                                             client_optimizer)):
    return {}
  if mesh is not None and num_clients % mesh.size:
    raise ValueError(f'{num_clients} client rows do not split over '
                     f'{mesh.size} devices; use ClientData.num_clients of '
                     'data padded by federation.shard_client_data.')

  def build(p):
    return jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape),
        _client_state(upload, p, client_optimizer))

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
