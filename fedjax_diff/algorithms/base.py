"""The algorithm protocol: pure state and round functions, plus hooks.

A federated algorithm, in the spirit of fedjax's `init`/`apply` pairs, is

* `init(params) -> algorithm state`: its server-side state (a pytree in
  `ServerState.algorithm`, checkpointed with the rest; `{}` for FedAvg);
* `client_rows(params) -> rows`: what ONE client keeps across rounds (a
  dict of pytrees, stacked into `ServerState.client_states`);
* `round_step() -> round_fn(state, data, client_ids, client_mask) ->
  (state, metrics)`: one round on top of `fedjax_diff.engine`, which
  `make_round` jits with fault isolation's rule that a round in which no
  client is kept changes nothing but the round counter
  (`strategies.faults`);
* `check_config(config)` (a classmethod): raises a ValueError for a config
  it cannot run, before anything is built (`fedjax_diff.validation`); it
  calls the same parsers the constructor does;

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
* `describe()`: one line for the log.

`Run` is what every algorithm is built from: the trainer makes it once from
the config (data on the mesh, model, loss, optimizers with their transforms,
the upload path). An algorithm is one module of `fedjax_diff.algorithms`
that defines `Algorithm`, named by `config.algorithm.name`.
"""

import abc
import dataclasses
import math
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
from fedjax_diff import state as state_lib
from fedjax_diff.strategies import faults as faults_lib
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
  log: Callable[[str], None] = print


def _int(cfg, name: str, where: str, low: int, default=None) -> int:
  value = cfg.get(name, default)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f'{where}.{name} must be an int >= {low}, got '
                     f'{value!r}.')
  return value


def _bool(cfg, name: str, where: str, default: bool) -> bool:
  value = cfg.get(name, default)
  if not isinstance(value, bool):
    raise ValueError(f'{where}.{name} must be True or False, got {value!r}.')
  return value


@dataclasses.dataclass(frozen=True)
class Settings:
  """The round settings every algorithm reads, parsed and checked.

  Attributes:
    num_rounds: rounds of the run (>= 1).
    seed: the run's seed (>= 0).
    ema_decay: d of the EMA of θ, in [0, 1).
    num_clients: clients of the federation (>= 1).
    clients_per_round: K in [1, num_clients].
    local_steps: S >= 1.
    batch_size: B >= 1.
    mode: the engine's execution mode ('auto', 'vmap', 'map', 'chunked').
    chunk_size: clients per chunk ('chunked'); None otherwise.
    keep_optimizer_state: clients keep their optimizer state across rounds.
    random_flip: random horizontal flips of local batches.
    faults: the faults to inject (`strategies.faults`), or None.
  """
  num_rounds: int
  seed: int
  ema_decay: float
  num_clients: int
  clients_per_round: int
  local_steps: int
  batch_size: int
  mode: str
  chunk_size: Optional[int]
  keep_optimizer_state: bool
  random_flip: bool
  faults: Optional[faults_lib.FaultConfig]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  num_devices: Optional[int] = None) -> 'Settings':
    """Parses `config`; with `num_devices`, also checks that a 'chunked'
    chunk_size divides the client slots per device.

    Raises:
      ValueError: a field is missing, of the wrong type or out of range;
        the message names it and what is allowed.
    """
    fed = config.get('federation')
    if fed is None:
      raise ValueError('config.federation is missing (num_clients, '
                       'clients_per_round, local_steps, batch_size, mode; '
                       'see configs/mnist_fedavg.py).')
    num_rounds = _int(config, 'num_rounds', 'config', 1)
    seed = _int(config, 'seed', 'config', 0, 0)
    decay = config.get('ema_decay', 0.0)
    if (isinstance(decay, bool) or not isinstance(decay, (int, float)) or
        not 0.0 <= decay < 1.0):
      raise ValueError(f'config.ema_decay must be in [0, 1) (DDPM: 0.9999; '
                       f'0 keeps no average), got {decay!r}.')
    where = 'config.federation'
    num_clients = _int(fed, 'num_clients', where, 1)
    per_round = fed.get('clients_per_round')
    if (isinstance(per_round, bool) or not isinstance(per_round, int) or
        not 1 <= per_round <= num_clients):
      raise ValueError(
          f'config.federation.clients_per_round={per_round!r} must be an int '
          f'in [1, num_clients={num_clients}]: a round samples that many '
          'distinct clients.')
    local_steps = _int(fed, 'local_steps', where, 1)
    batch_size = _int(fed, 'batch_size', where, 1)
    mode = fed.get('mode', 'auto')
    if mode not in engine.MODES + ('auto',):
      raise ValueError(f'Unknown execution mode {mode!r} in '
                       'config.federation.mode; use one of '
                       f"{engine.MODES + ('auto',)}.")
    chunk_size = fed.get('chunk_size', 0) or 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
      raise ValueError('config.federation.chunk_size must be an int, got '
                       f'{chunk_size!r}.')
    if mode == 'chunked':
      if chunk_size < 1:
        raise ValueError("config.federation.mode='chunked' needs "
                         f'chunk_size >= 1, got {chunk_size}.')
      if num_devices:
        # The trainer's slots (`federation.round_slots`): min(K, R) per
        # device, R = ceil(num_clients / devices) client rows each.
        per_device = min(per_round, math.ceil(num_clients / num_devices))
        engine.chunk_size_for(mode, per_device, chunk_size)
    keep = _bool(config.get('client_optimizer', {}), 'keep_state',
                 'config.client_optimizer', False)
    flip = _bool(config.get('data', {}), 'random_flip', 'config.data', False)
    return cls(num_rounds=num_rounds, seed=seed, ema_decay=float(decay),
               num_clients=num_clients, clients_per_round=per_round,
               local_steps=local_steps, batch_size=batch_size, mode=mode,
               chunk_size=chunk_size or None, keep_optimizer_state=keep,
               random_flip=flip, faults=faults_lib.config_from(config))


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
    settings = Settings.from_config(run.config)
    self.settings = settings
    self.local_steps = settings.local_steps
    self.batch_size = settings.batch_size
    self.clients_per_round = settings.clients_per_round
    self.num_rounds = settings.num_rounds
    self.mode = engine.resolve_mode(settings.mode,
                                    run.mesh.devices.flat[0].platform)
    self.chunk_size = settings.chunk_size
    self.ema_decay = settings.ema_decay
    self.seed = settings.seed
    # Clients that keep their optimizer state across rounds (DiLoCo-style,
    # arXiv 2311.08105); False: a fresh client optimizer every round, as in
    # FedAvg.
    self.keep_optimizer_state = settings.keep_optimizer_state
    # Injected client faults (strategies.faults); None: none.
    self.faults = settings.faults
    self.client_optimizer = self.make_client_optimizer()
    self.train = client_lib.make_local_training(
        run.loss_fn, self.client_optimizer, self.local_steps, self.batch_size,
        settings.random_flip)
    self.local_update = client_lib.make_client_update(self.train, run.upload)

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict,
                   num_devices: Optional[int] = None) -> None:
    """Raises a ValueError (what, where, how to fix) if this algorithm
    cannot run `config`; parses what the constructor parses. An algorithm
    with a block of its own extends it."""
    Settings.from_config(config, num_devices)

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

  def client_rows(self, params: PyTree) -> dict:
    """What one client keeps across rounds (`client.initial_rows`)."""
    return client_lib.initial_rows(
        params, upload=self.run.upload,
        client_optimizer=(self.client_optimizer
                          if self.keep_optimizer_state else None))

  @abc.abstractmethod
  def round_step(self) -> Callable:
    """`round_fn(state, data, client_ids, client_mask) -> (state,
    metrics)`, one round (traceable, not jitted), metrics holding at least
    `engine.client_metrics`' keys."""

  def make_round(self, donate: bool = True) -> Callable:
    """The jitted round (`round_step`); a round in which no client was kept
    (`metrics['client_weights']` all 0) leaves the state as it was but for
    the round counter (`faults.skip_if_none_kept`). With `donate`, the
    input state's buffers are donated to the output."""
    step = self.round_step()

    def round_fn(state, data, client_ids, client_mask):
      new, metrics = step(state, data, client_ids, client_mask)
      return (faults_lib.skip_if_none_kept(state, new,
                                           metrics['client_weights']),
              metrics)

    return jax.jit(round_fn, donate_argnums=(0,) if donate else ())

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
    out.update(faults_lib.round_counts(metrics))
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

  def describe(self) -> str:
    """One line: the algorithm and its client-side settings."""
    fed = self.run.config.federation
    traffic = self.round_bytes(0)
    mu = float(self.run.config.get('prox_mu', 0.0) or 0.0)
    upload = self.run.upload.name if self.run.upload else 'fp32'
    return (f'{self.name}: {fed.clients_per_round} of {fed.num_clients} '
            f'clients per round, {fed.local_steps} local steps of batch '
            f'{fed.batch_size}{f", FedProx mu={mu:g}" if mu > 0 else ""}'
            f'{", client optimizer state kept across rounds" if self.keep_optimizer_state else ""}'
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

  def slots(self, round_idx: int, slots_per_device: Optional[int] = None):
    """(client_ids, client_mask) of round `round_idx`, laid out on the mesh
    (`federation.round_slots`)."""
    return federation.round_slots(self.sample_clients(round_idx),
                                  self.run.mesh.size,
                                  self.run.data.num_clients, slots_per_device)

  def initial_state(self, params: PyTree,
                    rng: jax.Array) -> state_lib.ServerState:
    """The round-0 server state, placed on the mesh."""
    mesh = self.run.mesh
    state = state_lib.init_server_state(
        params, self.run.server_optimizer, rng,
        state_lib.init_client_states(self.client_rows, params,
                                     self.run.data.num_clients, mesh),
        algorithm=self.init(params))
    return state_lib.place_state(state, mesh)

  # -- For subclasses: one client on the engine. -----------------------------

  def client_fn(self, start: Callable[[PyTree, PyTree], PyTree],
                contribution: Optional[Callable] = None,
                extra_args: Optional[Callable] = None) -> engine.ClientFn:
    """The engine's function of one client: local training from
    `start(shared, slot_input)`, then the upload path, with the run's
    injected faults and fault isolation (`strategies.faults`): a client
    whose contribution (its upload) or loss is not finite is kept out
    (`keep = 0`), and its rows stay as they were.

    Args:
      start: `(shared, slot_input) -> params` the client starts from;
        `shared` is `(whatever the round broadcasts, round index)`.
      contribution: `(update: client.ClientUpdate, shared, slot_input,
        rows) -> (contribution, rows)` for the aggregator; default: Δ̂_k.
        `update.steps` is a straggler's step count (None: all).
      extra_args: `(shared, slot_input, rows) -> dict` of extra arguments
        for the client optimizer (e.g. SCAFFOLD's control variates).
    """
    faults = self.faults

    def client_fn(shared, slot, data_row, rows):
      key, (fault, slot_input) = slot
      _, round_idx = shared
      local = client_lib.LocalData(data_row.images, data_row.labels,
                                   data_row.counts)
      extra = extra_args(shared, slot_input, rows) if extra_args else None
      kind, steps = fault if faults is not None else (None, None)
      u = self.local_update(start(shared, slot_input), local, key, rows,
                            round_idx, extra, steps)
      keep = jnp.ones((), jnp.float32)
      if faults is not None:
        # What reaches the server: NaN/Inf uploads, nothing on dropout.
        u = u._replace(update=faults_lib.corrupt(u.update, kind))
        keep = jnp.where(kind == faults_lib.DROPOUT, 0.0, keep)
        if faults.weight_by_steps:
          keep = keep * steps.astype(jnp.float32) / self.local_steps
      contrib, rows = ((u.update, u.rows) if contribution is None else
                       contribution(u, shared, slot_input, u.rows))
      isolated = faults_lib.isolate(keep, contrib, u.loss)
      outputs = {'loss': u.loss, 'norm': u.norm,
                 'upload_error': u.upload_error,
                 'nonfinite': jnp.where((isolated == 0) & (keep > 0), 1.0,
                                        0.0)}
      if faults is not None:
        outputs['fault'] = kind
      return engine.ClientResult(contribution=contrib, rows=rows,
                                 outputs=outputs, count=data_row.counts,
                                 keep=isolated)

    return client_fn

  def client_round(self, client_fn: engine.ClientFn, aggregator: Aggregator):
    """`engine.make_client_round` with this run's mesh, mode and rows, for
    a function from `client_fn`: it hands each slot its injected fault
    (`faults.plan`) with its slot input."""
    params = self.run.param_shapes
    run = engine.make_client_round(
        client_fn, mesh=self.run.mesh, mode=self.mode,
        chunk_size=self.chunk_size, aggregator=aggregator,
        row_shapes=jax.eval_shape(self.client_rows, params))
    faults, local_steps = self.faults, self.local_steps

    def run_with_faults(state, data, client_ids, client_mask, shared,
                        slot_inputs=None, key=None):
      plan = (faults_lib.plan(faults, state.rng, state.round, client_ids,
                              client_mask, local_steps)
              if faults is not None else None)
      return run(state, data, client_ids, client_mask, shared,
                 slot_inputs=(plan, slot_inputs), key=key)

    return run_with_faults
