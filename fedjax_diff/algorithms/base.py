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

A client left out of the round (`strategies.faults`: a non-finite upload,
an injected dropout) is left out of x_{r+1} too, as if not sampled; a
straggler's part counts the steps it ran. Its position still counts in the
others' schedule steps p_k·S: that it failed is known only after the
round's clients trained.

Client-level DP (`config.dp`, `strategies.privacy`) is the base class's:
it builds the run's aggregator once (`self.aggregator`: the example-weighted
mean, or DP-FedAvg's noised sum of clipped updates), samples the clients
(Poisson under DP), broadcasts the round's clip norm with the round
(`client_round`), turns each client's contribution into a DP one
(`client_fn`) and the aggregate back into Δ̄ (`finish_aggregate`), and logs
ε after every round. An algorithm whose other releases are not covered by
the noise sets `dp_unsound` to say why, and refuses `config.dp`.

`Run` is what every algorithm is built from: the trainer makes it once from
the config (data on the mesh, model, loss, optimizers with their transforms,
the upload path). An algorithm is one module of `fedjax_diff.algorithms`
that defines `Algorithm`, named by `config.algorithm.name`.
"""

import abc
import dataclasses
import functools
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
from fedjax_diff import optimizers
from fedjax_diff import state as state_lib
from fedjax_diff.strategies import aggregator as aggregator_lib
from fedjax_diff.strategies import faults as faults_lib
from fedjax_diff.strategies import privacy as privacy_lib
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
    image_shape: (H, W, C) of what the model trains on and samples: the
      images, or the latents of a latent diffusion run.
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
    latent: the first stage (`fedjax_diff.latent.LatentSpace`) when `data`
      holds latents (latent diffusion), else None. Never trained or sent.
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
  latent: Any = None


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
    shared_optimizer_state: the round's clients share one optimizer state.
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
  shared_optimizer_state: bool
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
    shared = _bool(config.get('client_optimizer', {}), 'shared_state',
                   'config.client_optimizer', False)
    if keep and shared:
      raise ValueError(
          'config.client_optimizer: keep_state (each client its own optimizer '
          'state) and shared_state (one state shared by the clients) exclude '
          'each other; set at most one.')
    flip = _bool(config.get('data', {}), 'random_flip', 'config.data', False)
    return cls(num_rounds=num_rounds, seed=seed, ema_decay=float(decay),
               num_clients=num_clients, clients_per_round=per_round,
               local_steps=local_steps, batch_size=batch_size, mode=mode,
               chunk_size=chunk_size or None, keep_optimizer_state=keep,
               shared_optimizer_state=shared, random_flip=flip,
               faults=faults_lib.config_from(config))


def round_clients(config: ml_collections.ConfigDict, num_clients: int,
                  round_idx: int) -> np.ndarray:
  """The clients of round `round_idx` of a run of `config` (the default
  `Algorithm.sample_clients`, also read by launch/audit.py): with m =
  `federation.clients_per_round`, m of the `num_clients` without
  replacement, or under `config.dp` a Poisson sample with rate
  q = m / num_clients (the sampling the privacy accountant models);
  deterministic from (seed, round) either way."""
  m, seed = int(config.federation.clients_per_round), int(config.seed)
  if privacy_lib.enabled(config):
    if not 0 < m <= num_clients:
      raise ValueError(
          f'config.dp: federation.clients_per_round={m} is the expected '
          f'cohort of Poisson sampling; it must be in [1, {num_clients}].')
    return federation.poisson_sample_clients(num_clients, m / num_clients,
                                             seed, round_idx)
  return federation.sample_clients(num_clients, m, seed, round_idx)


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
  # Why client-level DP would not be sound for this algorithm (None: it is,
  # when its aggregate is the only release that depends on client data).
  dp_unsound: Optional[str] = None

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
    # One optimizer state shared by the clients (FedPhD's code; see the
    # module docstring).
    self.shared_optimizer_state = settings.shared_optimizer_state
    # Injected client faults (strategies.faults); None: none.
    self.faults = settings.faults
    self.client_optimizer = self.make_client_optimizer()
    self.train = client_lib.make_local_training(
        run.loss_fn, self.client_optimizer, self.local_steps, self.batch_size,
        settings.random_flip)
    self.local_update = client_lib.make_client_update(self.train, run.upload)
    # Client-level DP (None without config.dp); σ is calibrated here.
    self.privacy = None
    dp = self._dp_settings(run.config, settings)
    if dp is not None:
      self.privacy = privacy_lib.Mechanism(
          dp, num_clients=run.num_clients,
          clients_per_round=self.clients_per_round,
          num_rounds=self.num_rounds)
    self.aggregator = self.make_aggregator()

  def make_aggregator(self) -> Aggregator:
    """The run's aggregator, built once: DP-FedAvg's noised sum of clipped
    updates (`privacy.gaussian_sum`) under `config.dp`, else FedAvg's
    example-weighted mean."""
    if self.privacy is not None:
      return self.privacy.aggregator()
    return aggregator_lib.weighted_mean()

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict,
                   num_devices: Optional[int] = None) -> None:
    """Raises a ValueError (what, where, how to fix) if this algorithm
    cannot run `config`; parses what the constructor parses. An algorithm
    with a block of its own extends it."""
    cls._dp_settings(config, Settings.from_config(config, num_devices))

  @classmethod
  def _dp_settings(cls, config: ml_collections.ConfigDict,
                   settings: Settings) -> Optional[privacy_lib.Settings]:
    """`config.dp` parsed (None: off), refused where DP would not hold."""
    dp = privacy_lib.Settings.from_config(config)
    if dp is None:
      return None
    if settings.shared_optimizer_state:
      raise ValueError(
          'config.dp with config.client_optimizer.shared_state=True: the '
          "shared optimizer state is built from every client's gradients "
          'and released without noise, which DP does not cover. Set '
          'shared_state=False (each client starts a fresh optimizer, or '
          'keeps its own with keep_state=True).')
    if cls.dp_unsound:
      raise ValueError(
          f"config.dp is not supported with config.algorithm='{cls.name}'"
          f': {cls.dp_unsound} Use fedavg or scaffold (with FedDM-prox or '
          'FedDM-quant if wanted), or set config.dp.enabled=False.')
    return dp

  def make_client_optimizer(self) -> optax.GradientTransformationExtraArgs:
    """The chain the clients train with: the run's, by default. An
    algorithm that changes the local gradient (SCAFFOLD's correction) puts
    its transform in front here."""
    return self.run.client_optimizer

  # -- The pure parts. -------------------------------------------------------

  def init(self, params: PyTree) -> PyTree:
    """The algorithm's server-side state (`ServerState.algorithm`): the DP
    state under `config.dp` (`{'dp': ...}`), else `{}`."""
    del params
    if self.privacy is not None:
      return {privacy_lib.STATE_KEY: self.privacy.init()}
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
    `init_params` are the run's initial global parameters. Under DP, a
    resumed state must have been trained with this run's σ."""
    del init_params
    if self.privacy is not None:
      self.privacy.check_resumed(state.algorithm[privacy_lib.STATE_KEY])
    return state

  def after_round(self, state: state_lib.ServerState, round_idx: int
                  ) -> tuple[state_lib.ServerState, dict]:
    """After round `round_idx` (1-based): new state and figures to log."""
    del round_idx
    return state, {}

  def cohort_size(self, round_idx: int) -> int:
    """Clients of round `round_idx`: `clients_per_round`, or the Poisson
    cohort's size under DP."""
    if self.privacy is not None:
      return len(self.sample_clients(round_idx))
    return self.clients_per_round

  def round_bytes(self, round_idx: int) -> dict[str, int]:
    """Round `round_idx`'s (0-based) exact traffic, all clients: θ down,
    the upload path's message up (`comm.round_bytes`)."""
    return comm.round_bytes(self.run.param_shapes,
                            self.cohort_size(round_idx), self.run.upload)

  def round_figures(self, metrics, round_idx: int) -> dict:
    """What a logged round (0-based) adds to metrics.jsonl besides `loss`;
    under DP also `dp_epsilon` (ε at `dp_delta` after this round),
    `dp_noise_multiplier`, `dp_clip_norm` (the round's C_r),
    `dp_clients` (the round's cohort), `dp_clipped_fraction` (of the
    cohort; a diagnostic of the simulation, not a private release) and,
    with adaptive clipping, `dp_unclipped_fraction` (the noised b̄)."""
    out = dict(self.round_bytes(round_idx))
    out.update(client_figures(metrics))
    out.update(faults_lib.round_counts(metrics))
    if self.run.upload is None:
      out.pop('upload_rel_error', None)
    if self.privacy is not None:
      w = np.asarray(metrics['client_weights']) > 0
      c = float(metrics['dp_clip_norm'])
      norms = np.asarray(metrics['client_update_norms'])
      out.update({
          'dp_epsilon': self.privacy.epsilon(round_idx + 1),
          'dp_delta': self.privacy.settings.delta,
          'dp_noise_multiplier': self.privacy.noise_multiplier,
          'dp_clip_norm': c,
          'dp_clients': int(w.sum()),
          'dp_clipped_fraction': float(np.mean(norms[w] > c)) if w.any()
                                 else 0.0,
      })
      if 'dp_unclipped_fraction' in metrics:
        out['dp_unclipped_fraction'] = float(metrics['dp_unclipped_fraction'])
    return out

  def summary(self, num_rounds: int,
              state: Optional[state_lib.ServerState] = None) -> dict:
    """The run's totals for summary.json (`comm.run_summary`); `state` is
    the final server state. Under DP the totals are the exact sums over the
    Poisson cohorts (FedAvg's float32 baseline for the same clients; the
    per-round figures are for the expected cohort), and `dp_epsilon` /
    `dp_delta` the run's guarantee."""
    del state
    if self.privacy is None:
      return comm.run_summary(self.run.param_shapes, num_rounds,
                              self.clients_per_round, self.run.upload,
                              per_round=self.round_bytes(0))
    rounds = [self.round_bytes(r) for r in range(num_rounds)]
    clients = sum(self.cohort_size(r) for r in range(num_rounds))
    # Every client sends and receives the same bytes: one expected cohort's.
    per_round = {k: sum(r[k] for r in rounds) // max(clients, 1)
                 * self.clients_per_round
                 for k in ('uplink_bytes', 'downlink_bytes')}
    out = comm.with_exact_totals(
        comm.run_summary(self.run.param_shapes, num_rounds,
                         self.clients_per_round, self.run.upload,
                         per_round=per_round), rounds, clients)
    out.update({'dp_epsilon': self.privacy.epsilon(num_rounds),
                'dp_delta': self.privacy.settings.delta,
                'dp_noise_multiplier': self.privacy.noise_multiplier,
                'dp_sampled_clients': int(clients)})
    return out

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
            'round.' +
            (f' {self.privacy.describe()}' if self.privacy else ''))

  # -- Sampling and the run's state. -----------------------------------------

  def sample_clients(self, round_idx: int) -> np.ndarray:
    """The clients of round `round_idx`, deterministic from (seed, round):
    `clients_per_round` of them without replacement, or under DP a Poisson
    sample with rate clients_per_round / num_clients (the sampling the
    accountant models)."""
    return round_clients(self.run.config, self.run.num_clients, round_idx)

  @functools.cached_property
  def slots_per_device(self) -> int:
    """The most clients any device holds in any round of the run: every
    round gets this many slots per device (one compilation, the least
    padding). The cohorts are fixed by (seed, round), so under DP's Poisson
    sampling too this bound is known before the first round: no cohort of
    the run exceeds it, none is truncated (a round past `num_rounds` whose
    cohort does not fit is refused by `federation.round_slots`)."""
    return federation.max_slots_per_device(
        [self.sample_clients(r) for r in range(self.num_rounds)],
        self.run.data.num_clients, self.run.mesh.size)

  def slots(self, round_idx: int):
    """(client_ids, client_mask) of round `round_idx`, laid out on the mesh
    (`federation.round_slots`) with `slots_per_device` slots per device."""
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
    `start(shared, slot_input)`, then the upload path, with the run's
    injected faults and fault isolation (`strategies.faults`): a client
    whose contribution (its upload) or loss is not finite is kept out
    (`keep = 0`), and its rows stay as they were.

    Under DP the engine's `shared` is `(shared, {'clip_norm': C_r})`
    (`client_round` adds the broadcast): C_r goes to the upload path, and
    the contribution, which must then be the client's model update, becomes
    `privacy.contribution(Δ̂_k, ‖Δ_k‖, C_r)`.

    Args:
      start: `(shared, slot_input) -> params` the client starts from;
        `shared` is `(whatever the round broadcasts, round index)`.
      contribution: `(update: client.ClientUpdate, shared, slot_input,
        rows) -> (contribution, rows)` for the aggregator; default: Δ̂_k.
        `update.steps` is a straggler's step count (None: all).
      extra_args: `(shared, slot_input, rows) -> dict` of extra arguments
        for the client optimizer (e.g. SCAFFOLD's control variates).
    """
    shared_state = self.shared_optimizer_state
    steps, per_round = self.local_steps, self.clients_per_round
    privacy = self.privacy
    faults = self.faults

    def client_fn(shared, slot, data_row, rows):
      shared, server = shared
      # `client_round` adds each slot's injected fault.
      key, (fault, slot_input) = slot
      opt_state = step_offset = None
      if shared_state:
        # `client_round` adds the shared state and the client's position.
        shared, opt_state = shared
        slot_input, position = slot_input
      _, round_idx = shared
      if shared_state:
        step_offset = (round_idx * per_round + position) * steps
      clip_norm = None if server is None else server['clip_norm']
      local = client_lib.LocalData(data_row.images, data_row.labels,
                                   data_row.counts)
      extra = extra_args(shared, slot_input, rows) if extra_args else None
      kind, run_steps = fault if faults is not None else (None, None)
      u = self.local_update(start(shared, slot_input), local, key, rows,
                            round_idx, extra, opt_state, step_offset,
                            clip_norm=clip_norm, num_steps=run_steps)
      keep = jnp.ones((), jnp.float32)
      if faults is not None:
        # What reaches the server: NaN/Inf uploads, nothing on dropout.
        u = u._replace(update=faults_lib.corrupt(u.update, kind))
        keep = jnp.where(kind == faults_lib.DROPOUT, 0.0, keep)
        if faults.weight_by_steps:
          keep = keep * run_steps.astype(jnp.float32) / steps
      contrib, rows = ((u.update, u.rows) if contribution is None else
                       contribution(u, shared, slot_input, u.rows))
      if privacy is not None:
        contrib = privacy_lib.contribution(contrib, u.norm, clip_norm)
      isolated = faults_lib.isolate(keep, contrib, u.loss)
      outputs = {'loss': u.loss, 'norm': u.norm,
                 'upload_error': u.upload_error,
                 'nonfinite': jnp.where((isolated == 0) & (keep > 0), 1.0,
                                        0.0)}
      if faults is not None:
        outputs['fault'] = kind
      if shared_state:
        outputs['opt_state'] = u.opt_state
      return engine.ClientResult(contribution=contrib, rows=rows,
                                 outputs=outputs, count=data_row.counts,
                                 keep=isolated)

    return client_fn

  def client_round(self, client_fn: engine.ClientFn,
                   aggregator: Optional[Aggregator] = None):
    """`engine.make_client_round` with this run's mesh, mode, rows and
    aggregator (default: `self.aggregator`), for a `client_fn` from
    `self.client_fn`. The returned `run(state, data, client_ids,
    client_mask, shared, slot_inputs=None, key=None)` hands the clients
    `(shared, server)`, `server` being the DP broadcast
    (`{'clip_norm': C_r}` from `state.algorithm['dp']`) or None, and each
    slot its injected fault (`faults.plan`) with its slot input.

    With `shared_state`, `run` also hands every client the shared optimizer
    state and its position (`client_order`), and its outputs hold
    `'client_opt_state'`, the next round's shared state
    (`optimizers.compose_sequential` over the clients kept, each with the
    steps it ran): pass `**self.shared_state_update(outputs)` to
    `state.advance`.
    """
    params = self.run.param_shapes
    runner = engine.make_client_round(
        client_fn, mesh=self.run.mesh, mode=self.mode,
        chunk_size=self.chunk_size,
        aggregator=self.aggregator if aggregator is None else aggregator,
        row_shapes=jax.eval_shape(self.client_rows, params))
    faults, local_steps = self.faults, self.local_steps
    shared_state = self.shared_optimizer_state
    cfg = self.run.config.client_optimizer

    def run(state, data, client_ids, client_mask, shared, slot_inputs=None,
            key=None):
      server = None
      if self.privacy is not None:
        dp = state.algorithm[privacy_lib.STATE_KEY]
        server = {'clip_norm': dp['clip_norm']}
      plan = (faults_lib.plan(faults, state.rng, state.round, client_ids,
                              client_mask, local_steps)
              if faults is not None else None)
      if shared_state:
        positions = self.client_order(client_ids, client_mask, slot_inputs)
        start = state.client_opt_state
        shared, slot_inputs = (shared, start), (slot_inputs, positions)
      aggregate, outputs, rows = runner(
          state, data, client_ids, client_mask, (shared, server),
          (plan, slot_inputs), key)
      if shared_state:
        outputs = dict(outputs)
        finals = outputs.pop('opt_state')
        # Dropped clients are as if not sampled; stragglers count the steps
        # they ran.
        outputs['client_opt_state'] = optimizers.compose_sequential(
            start, finals, positions, outputs['weight'] > 0,
            local_steps if plan is None else plan[1],
            optimizers.state_decays(cfg, start))
      return aggregate, outputs, rows

    return run

  def shared_state_update(self, outputs: dict) -> dict:
    """`state.advance`'s keyword for the next round's shared client
    optimizer state (`{}` without `shared_state`)."""
    if not self.shared_optimizer_state:
      return {}
    return {'client_opt_state': outputs['client_opt_state']}

  def finish_aggregate(self, state: state_lib.ServerState, aggregate
                       ) -> tuple[PyTree, dict, dict]:
    """(Δ̄, changes to `state.algorithm`, figures for the round's metrics)
    from `self.aggregator`'s output: FedAvg's (Δ̄, Σ_k w_k) gives (Δ̄, {},
    {}); DP's noised mean in units of C_r gives C_r·ū, the next DP state
    (adaptive clip norm) and `dp_clip_norm` (and `dp_unclipped_fraction`)."""
    if self.privacy is None:
      delta, _ = aggregate
      return delta, {}, {}
    delta, dp, figures = self.privacy.finish(
        state.algorithm[privacy_lib.STATE_KEY], aggregate)
    return delta, {privacy_lib.STATE_KEY: dp}, figures


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
