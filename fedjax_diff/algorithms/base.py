"""The algorithm protocol: pure state and round functions, plus hooks.

A federated algorithm, in the spirit of fedjax's `init`/`apply` pairs, is

* `init(params) -> algorithm state`: its server-side state (a pytree in
  `ServerState.algorithm`, checkpointed with the rest; `{}` for FedAvg);
* `client_rows(params) -> rows`: what ONE client keeps across rounds (a
  dict of pytrees, stacked into `ServerState.client_states`);
* `make_round() -> round_fn(state, data, client_ids, client_mask) ->
  (state, metrics)`: one jitted round on top of `fedjax_diff.engine`;

and optional hooks, each with a neutral default here:

* `prepare(state, init_params)`: before the first round of a run, and
  again on resume (FedDDPM's phase 1 and auxiliary set, cached in the
  workdir);
* `after_round(state, round) -> (state, figures)`: host-driven work after a
  round (FedDDPM's server step);
* `round_bytes(round)`: that round's exact traffic per link;
* `round_figures(metrics, round)`: what a logged round adds to
  metrics.jsonl;
* `summary(num_rounds, state)`: the run's totals for summary.json;
* `describe()`: one line for the log;
* `client_order(client_ids, client_mask, slot_inputs)`: the order in which a
  sequential implementation would train the round's clients (see below).

Client optimizer state. By default every client starts a fresh optimizer
every round (FedAvg); with `config.client_optimizer.keep_state` each client
keeps its own across rounds (`ServerState.client_states`); with
`config.client_optimizer.shared_state` the round's clients share one state,
as FedPhD's code (arXiv 2507.06449), whose clients train one after another
with ONE Adam and one warmup schedule, carried from client to client and
round to round. Clients train in parallel here, so a carry from client to
client within a round cannot be; the closest faithful scheme is:

* the server keeps the shared state x in `ServerState.client_opt_state`;
  every client of round r starts from x_r;
* client k's learning-rate schedule counts the steps of every client before
  it in the sequential order (`client_order`: FedAvg by client id, FedPhD by
  edge, then id, as its code's loops): step s of the client at position
  p_k uses global step (r·K + p_k)·S + s, K clients of S steps a round;
* after the round x_{r+1} is the state ONE optimizer would hold after the
  clients' gradients in that order (`optimizers.compose_sequential`: exact
  for Adam's moments, momentum and step counts, given each client's
  gradients).

The departure from the sequential code: within a round, client k's
trajectory starts from x_r instead of from the state the clients before it
left (its Adam moments miss their gradients, its bias correction counts
p_k·S steps fewer). With one client per round the two are the same.

`Run` is what every algorithm is built from: the trainer makes it once from
the config (data on the mesh, model, loss, optimizers with their transforms,
the upload path). An algorithm is one module of `fedjax_diff.algorithms`
that defines `Algorithm`, named by `config.algorithm.name`.
"""

import abc
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from fedjax_diff import client as client_lib
from fedjax_diff import comm
from fedjax_diff import engine
from fedjax_diff import federation
from fedjax_diff import optimizers
from fedjax_diff import state as state_lib
from fedjax_diff.strategies.aggregator import Aggregator
from fedjax_diff.strategies.upload import UploadTransform

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Run:
  """What an algorithm is built from (made once by the trainer).

  Attributes:
    config: the run's config.
    workdir: the run's workdir.
    mesh: the client mesh (`federation.client_mesh`).
    data: every client's data, sharded over the mesh
      (`federation.shard_client_data`; rows past `num_clients` are padding).
    num_clients: the federation's real clients.
    num_classes: classes of the dataset's labels.
    image_shape: (H, W, C).
    eps_fn: the model's noise predictor `(params, x_t, t, labels, *, train,
      rng)`.
    schedule: the diffusion noise schedule.
    loss_fn: the local training loss `(params, x, labels, rng) -> scalar`.
    client_optimizer: the clients' optax chain, with the client transforms
      (FedDM-prox, group lasso) first.
    server_optimizer: applied to the pseudo-gradient −Δ̄.
    upload: the upload path of client updates, or None (float32 Δ).
    param_shapes: shapes and dtypes of the model's parameters.
    model: the (possibly pruned) model module, for tools that count its
      FLOPs or rebuild it; None where an algorithm is built without one.
    log: where progress lines go (process 0 prints).
  """
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  data: federation.ClientData
  num_clients: int
  num_classes: int
  image_shape: tuple[int, ...]
  eps_fn: Callable[..., Any]
  schedule: Any
  loss_fn: client_lib.LossFn
  client_optimizer: optax.GradientTransformationExtraArgs
  server_optimizer: optax.GradientTransformation
  upload: Optional[UploadTransform]
  param_shapes: PyTree
  model: Any = None
  log: Callable[[str], None] = print


def client_figures(metrics) -> dict[str, float]:
  """Weighted means over a round's real clients of their drift ‖Δ_k‖ and,
  when the upload path changes Δ, of the relative upload error
  ‖Δ̂_k − Δ_k‖ / ‖Δ_k‖."""
  w = np.asarray(metrics['client_weights'], np.float64)
  total = max(w.sum(), 1.0)
  norms = np.asarray(metrics['client_update_norms'], np.float64)
  out = {'client_drift': float(np.sum(np.where(w > 0, norms, 0) * w) / total)}
  if 'client_upload_errors' in metrics:
    errs = np.asarray(metrics['client_upload_errors'], np.float64)
    rel = np.where(w > 0, errs / np.maximum(norms, 1e-30), 0)
    out['upload_rel_error'] = float(np.sum(rel * w) / total)
  return out


class Algorithm(abc.ABC):
  """A federated algorithm; see the module docstring for the protocol.

  The base class reads the federation's settings from `run.config`, builds
  one client's local training and upload (`client.make_client_update`), and
  gives subclasses `client_fn` and `client_round` to run it on the engine.
  """

  name = 'algorithm'

  def __init__(self, run: Run):
    self.run = run
    config = run.config
    fed = config.federation
    self.local_steps = int(fed.local_steps)
    self.batch_size = int(fed.batch_size)
    self.clients_per_round = int(fed.clients_per_round)
    self.num_rounds = int(config.num_rounds)
    self.mode = engine.resolve_mode(fed.mode,
                                    run.mesh.devices.flat[0].platform)
    self.chunk_size = fed.get('chunk_size') or None
    self.ema_decay = float(config.ema_decay)
    self.seed = int(config.seed)
    # Clients that keep their optimizer state across rounds (DiLoCo-style,
    # arXiv 2311.08105); False: a fresh client optimizer every round, as in
    # FedAvg.
    self.keep_optimizer_state = bool(
        config.client_optimizer.get('keep_state', False))
    # One optimizer state shared by the clients (FedPhD's code; see the
    # module docstring).
    self.shared_optimizer_state = bool(
        config.client_optimizer.get('shared_state', False))
    if self.keep_optimizer_state and self.shared_optimizer_state:
      raise ValueError(
          'config.client_optimizer: keep_state (each client its own optimizer '
          'state) and shared_state (one state shared by the clients) exclude '
          'each other; set at most one.')
    self.client_optimizer = self.make_client_optimizer()
    self.train = client_lib.make_local_training(
        run.loss_fn, self.client_optimizer, self.local_steps, self.batch_size,
        bool(config.data.get('random_flip', False)))
    self.local_update = client_lib.make_client_update(self.train, run.upload)

  def make_client_optimizer(self) -> optax.GradientTransformationExtraArgs:
    """The chain the clients train with: the run's, by default. An
    algorithm that changes the local gradient (SCAFFOLD's correction) puts
    its transform in front here."""
    return self.run.client_optimizer

  # -- The pure parts. -------------------------------------------------------

  def init(self, params: PyTree) -> PyTree:
    """The algorithm's server-side state (`ServerState.algorithm`)."""
    del params
    return {}

  def client_opt_state(self, params: PyTree) -> PyTree:
    """The shared client optimizer state before the first round
    (`ServerState.client_opt_state`); `{}` unless `shared_state`."""
    if not self.shared_optimizer_state:
      return {}
    return self.client_optimizer.init(params)

  def client_rows(self, params: PyTree) -> dict:
    """What one client keeps across rounds (`client.initial_rows`)."""
    return client_lib.initial_rows(
        params, upload=self.run.upload,
        client_optimizer=(self.client_optimizer
                          if self.keep_optimizer_state else None))

  @abc.abstractmethod
  def make_round(self, donate: bool = True) -> Callable:
    """The jitted `round_fn(state, data, client_ids, client_mask) -> (state,
    metrics)`, metrics holding at least `engine.client_metrics`' keys; with
    `donate`, the input state's buffers are donated to the output."""

  # -- Hooks. ----------------------------------------------------------------

  def prepare(self, state: state_lib.ServerState,
              init_params: PyTree) -> state_lib.ServerState:
    """Before the first round of the run (and again on resume);
    `init_params` are the run's initial global parameters."""
    del init_params
    return state

  def after_round(self, state: state_lib.ServerState, round_idx: int
                  ) -> tuple[state_lib.ServerState, dict]:
    """After round `round_idx` (1-based): new state and figures to log."""
    del round_idx
    return state, {}

  def round_bytes(self, round_idx: int) -> dict[str, int]:
    """Round `round_idx`'s (0-based) exact traffic, all clients: θ down,
    the upload path's message up (`comm.round_bytes`)."""
    del round_idx
    return comm.round_bytes(self.run.param_shapes, self.clients_per_round,
                            self.run.upload)

  def round_figures(self, metrics, round_idx: int) -> dict:
    """What a logged round (0-based) adds to metrics.jsonl besides `loss`."""
    out = dict(self.round_bytes(round_idx))
    out.update(client_figures(metrics))
    if self.run.upload is None:
      out.pop('upload_rel_error', None)
    return out

  def summary(self, num_rounds: int,
              state: Optional[state_lib.ServerState] = None) -> dict:
    """The run's totals for summary.json (`comm.run_summary`); `state` is
    the final server state."""
    del state
    return comm.run_summary(self.run.param_shapes, num_rounds,
                            self.clients_per_round, self.run.upload,
                            per_round=self.round_bytes(0))

  def format_summary(self, summary: dict) -> str:
    return comm.format_summary(summary)

  def _optimizer_state_note(self) -> str:
    if self.keep_optimizer_state:
      return ', client optimizer state kept across rounds'
    if self.shared_optimizer_state:
      return ', one client optimizer state shared by the clients'
    return ''

  def describe(self) -> str:
    """One line: the algorithm and its client-side settings."""
    fed = self.run.config.federation
    traffic = self.round_bytes(0)
    mu = float(self.run.config.get('prox_mu', 0.0) or 0.0)
    upload = self.run.upload.name if self.run.upload else 'fp32'
    return (f'{self.name}: {fed.clients_per_round} of {fed.num_clients} '
            f'clients per round, {fed.local_steps} local steps of batch '
            f'{fed.batch_size}{f", FedProx mu={mu:g}" if mu > 0 else ""}'
            f'{self._optimizer_state_note()}'
            f'; upload {upload}: {traffic["uplink_bytes"] / 2**20:.2f} MiB '
            f'up and {traffic["downlink_bytes"] / 2**20:.2f} MiB down per '
            'round.')

  # -- Sampling and the run's state. -----------------------------------------

  def sample_clients(self, round_idx: int) -> np.ndarray:
    """The clients of round `round_idx`: `clients_per_round` of them, without
    replacement, deterministic from (seed, round)."""
    return federation.sample_clients(self.run.num_clients,
                                     self.clients_per_round, self.seed,
                                     round_idx)

  @functools.cached_property
  def slots_per_device(self) -> int:
    """The most clients any device holds in any round of the run: every
    round gets this many slots per device (one compilation, the least
    padding)."""
    return federation.max_slots_per_device(
        [self.sample_clients(r) for r in range(self.num_rounds)],
        self.run.data.num_clients, self.run.mesh.size)

  def slots(self, round_idx: int):
    """(client_ids, client_mask) of round `round_idx`, laid out on the mesh
    (`federation.round_slots`)."""
    return federation.round_slots(self.sample_clients(round_idx),
                                  self.run.mesh.size,
                                  self.run.data.num_clients,
                                  self.slots_per_device)

  def initial_state(self, params: PyTree,
                    rng: jax.Array) -> state_lib.ServerState:
    """The round-0 server state, placed on the mesh. It holds copies of
    `params`: the round donates its state, and the caller's arrays must
    survive that."""
    mesh = self.run.mesh
    params = jax.tree.map(jnp.copy, params)
    state = state_lib.init_server_state(
        params, self.run.server_optimizer, rng,
        state_lib.init_client_states(self.client_rows, params,
                                     self.run.data.num_clients, mesh),
        algorithm=self.init(params),
        client_opt_state=self.client_opt_state(params))
    return state_lib.place_state(state, mesh)

  # -- The order of a sequential implementation. ----------------------------

  def client_order(self, client_ids: jax.Array, client_mask: jax.Array,
                   slot_inputs: Any) -> jax.Array:
    """Each slot's position among the round's real clients in the order a
    sequential implementation trains them (padding slots: after them).
    Default: by client id. Used by `shared_state`."""
    del slot_inputs
    return order_positions(client_ids, client_mask)

  # -- For subclasses: one client on the engine. -----------------------------

  def client_fn(self, start: Callable[[PyTree, PyTree], PyTree],
                contribution: Optional[Callable] = None,
                extra_args: Optional[Callable] = None) -> engine.ClientFn:
    """The engine's function of one client: local training from
    `start(shared, slot_input)`, then the upload path.

    Args:
      start: `(shared, slot_input) -> params` the client starts from;
        `shared` is `(whatever the round broadcasts, round index)`.
      contribution: `(update: client.ClientUpdate, shared, slot_input,
        rows) -> (contribution, rows)` for the aggregator; default: Δ̂_k.
      extra_args: `(shared, slot_input, rows) -> dict` of extra arguments
        for the client optimizer (e.g. SCAFFOLD's control variates).
    """
    shared_state = self.shared_optimizer_state
    steps, per_round = self.local_steps, self.clients_per_round

    def client_fn(shared, slot, data_row, rows):
      key, slot_input = slot
      opt_state = step_offset = None
      if shared_state:
        # `client_round` adds the shared state and the client's position.
        shared, opt_state = shared
        slot_input, position = slot_input
      _, round_idx = shared
      if shared_state:
        step_offset = (round_idx * per_round + position) * steps
      local = client_lib.LocalData(data_row.images, data_row.labels,
                                   data_row.counts)
      extra = extra_args(shared, slot_input, rows) if extra_args else None
      u = self.local_update(start(shared, slot_input), local, key, rows,
                            round_idx, extra, opt_state, step_offset)
      contrib, rows = ((u.update, u.rows) if contribution is None else
                       contribution(u, shared, slot_input, u.rows))
      outputs = {'loss': u.loss, 'norm': u.norm,
                 'upload_error': u.upload_error}
      if shared_state:
        outputs['opt_state'] = u.opt_state
      return engine.ClientResult(contribution=contrib, rows=rows,
                                 outputs=outputs, count=data_row.counts)

    return client_fn

  def client_round(self, client_fn: engine.ClientFn, aggregator: Aggregator):
    """`engine.make_client_round` with this run's mesh, mode and rows.

    With `shared_state`, the returned `run` also hands every client the
    shared optimizer state and its position (`client_order`), and its
    outputs hold `'client_opt_state'`, the next round's shared state
    (`optimizers.compose_sequential`): pass `**self.shared_state_update(
    outputs)` to `state.advance`.
    """
    params = self.run.param_shapes
    run = engine.make_client_round(
        client_fn, mesh=self.run.mesh, mode=self.mode,
        chunk_size=self.chunk_size, aggregator=aggregator,
        row_shapes=jax.eval_shape(self.client_rows, params))
    if not self.shared_optimizer_state:
      return run
    cfg = self.run.config.client_optimizer

    def run_shared(state, data, client_ids, client_mask, shared,
                   slot_inputs=None, key=None):
      positions = self.client_order(client_ids, client_mask, slot_inputs)
      start = state.client_opt_state
      aggregate, outputs, rows = run(
          state, data, client_ids, client_mask,
          shared=(shared, start), slot_inputs=(slot_inputs, positions),
          key=key)
      outputs = dict(outputs)
      finals = outputs.pop('opt_state')
      outputs['client_opt_state'] = optimizers.compose_sequential(
          start, finals, positions, client_mask, self.local_steps,
          optimizers.state_decays(cfg, start))
      return aggregate, outputs, rows

    return run_shared

  def shared_state_update(self, outputs: dict) -> dict:
    """`state.advance`'s keyword for the next round's shared client
    optimizer state (`{}` without `shared_state`)."""
    if not self.shared_optimizer_state:
      return {}
    return {'client_opt_state': outputs['client_opt_state']}


def order_positions(client_ids: jax.Array, client_mask: jax.Array,
                    groups: Optional[jax.Array] = None) -> jax.Array:
  """Each slot's rank among the real slots by (group, client id); padding
  slots rank after every real one. FedPhD's loops train the clients of edge
  0 (by id), then those of edge 1, ...: groups = the slots' edges."""
  ids = jnp.asarray(client_ids).astype(jnp.int32)
  real = jnp.asarray(client_mask) > 0
  big = jnp.iinfo(jnp.int32).max // 2
  span = jnp.max(ids) + 1
  keys = ids if groups is None else jnp.asarray(groups) * span + ids
  keys = jnp.where(real, keys, big)
  slot = jnp.arange(keys.shape[0])
  # Rank by key, ties (padding) by slot.
  before = (keys[None, :] < keys[:, None]) | (
      (keys[None, :] == keys[:, None]) & (slot[None, :] < slot[:, None]))
  return jnp.sum(before, axis=1).astype(jnp.int32)
