"""FedDDPM and FedDDPM+: server-side auxiliary data from the clients' models.

FedDDPM (arXiv 2503.06426) is FedAvg (`algorithms.fedavg`) with three
additions, all driven by `config.fedddpm` (documented in
configs/mnist_fedddpm.py):

1. Phase 1 (`prepare`, before the first round): every client k trains its
   own model on its data alone from the common θ_0,

       θ_k = argmin_θ E_{x0 ∈ D_k, t, ε} ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, y)‖²

   (Ho et al. 2020, arXiv 2006.11239, eq. 14), approximated by
   `pretrain_steps` optimizer steps (a fixed budget keeps every client in one
   compiled program on the engine: `make_phase1`), and uploads it once. The
   server samples the auxiliary set D_aux from these models
   (`auxiliary_data`, class-balanced with classifier-free guidance) and keeps
   a held-out slice of it. D_aux is cached in `<workdir>/fedddpm/aux.npz`, so
   a resumed run does not redo phase 1.
2. FedDDPM (`after_round`): after each aggregation, S = `server_steps` steps
   of the server's optimizer on D_aux (`strategies.server_aux`).
3. FedDDPM+ (`plus=True`): no per-round steps; the global model's loss on
   the held-out slice feeds a plateau trigger (`strategies.plateau`), and
   when it fires, one correction of `correction_steps` steps.

Its server-side state (`ServerState.algorithm`, checkpointed) holds the
server steps run so far and FedDDPM+'s trigger. Keys: client k's phase-1
training uses `fold_in(fold_in(PRNGKey(seed + 1), PHASE1_KEY_TAG), k)`, the
auxiliary draws `fold_in(PRNGKey(seed + 1), SAMPLE_KEY_TAG)`.
"""

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff import auxiliary_data as aux_lib
from fedjax_diff import client as client_lib
from fedjax_diff import comm
from fedjax_diff import engine
from fedjax_diff import federation
from fedjax_diff import optimizers
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.algorithms import fedavg
from fedjax_diff.strategies import plateau
from fedjax_diff.strategies import server_aux

PyTree = Any
PHASE1_KEY_TAG = 0xFDD1
SAMPLE_KEY_TAG = 0xFDD2


@dataclasses.dataclass(frozen=True)
class Settings:
  """`config.fedddpm`, parsed and checked (every field documented in
  configs/mnist_fedddpm.py)."""
  plus: bool = False
  pretrain_steps: int = 80
  pretrain_batch_size: int = 0
  aux_per_class: int = 20
  aux_size: int = 0
  aux_sample_steps: int = 20
  aux_eta: float = 0.0
  aux_sample_batch: int = 10
  guidance_scale: float = 2.0
  heldout_fraction: float = 0.1
  server_steps: int = 10
  server_batch_size: int = 16
  server_optimizer: Any = None
  plus_window: int = 2
  plus_threshold: float = 0.05
  correction_steps: int = 40
  plus_max_corrections: int = 1

  @classmethod
  def from_config(cls, config) -> 'Settings':
    cfg = config.get('fedddpm')
    if cfg is None:
      raise ValueError("config.algorithm='fedddpm' needs a config.fedddpm "
                       'block (see configs/mnist_fedddpm.py).')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.keys()) - set(fields))
    if unknown:
      raise ValueError(f'config.fedddpm has unknown fields {unknown}; the '
                       f'fields are {sorted(fields)}.')
    kwargs = {}
    for name, value in cfg.items():
      default = fields[name].default
      kwargs[name] = (type(default)(value)
                      if isinstance(default, (bool, int, float)) else value)
    out = cls(**kwargs)
    for name in ('pretrain_steps', 'aux_sample_steps', 'server_batch_size',
                 'aux_sample_batch', 'plus_window', 'correction_steps'):
      if getattr(out, name) < 1:
        raise ValueError(f'config.fedddpm.{name} must be >= 1; got '
                         f'{getattr(out, name)}.')
    for name in ('pretrain_batch_size', 'aux_per_class', 'aux_size',
                 'server_steps', 'plus_max_corrections', 'aux_eta',
                 'plus_threshold', 'guidance_scale'):
      if not getattr(out, name) >= 0:
        raise ValueError(f'config.fedddpm.{name} must be >= 0; got '
                         f'{getattr(out, name)}.')
    if not 0.0 <= out.heldout_fraction < 1.0:
      raise ValueError('config.fedddpm.heldout_fraction must be in [0, 1); '
                       f'got {out.heldout_fraction}.')
    return out


def make_phase1(*, loss_fn, client_optimizer, mesh, steps: int,
                batch_size: int, mode: str = 'auto',
                random_flip: bool = False):
  """Builds the jitted phase-1 program: every client trains its own model.

  Args:
    loss_fn: `(params, x, labels, rng) -> scalar`, as for a round.
    client_optimizer: the optax chain each client trains with (fresh state
      per client; called with `global_params=θ_0` and `global_step=s`).
    mesh: the client mesh.
    steps: local optimizer steps per client (the phase-1 budget).
    batch_size: local batch size.
    mode: the engine's execution mode ('chunked' runs as 'map').
    random_flip: random horizontal flips of local batches.

  Returns:
    `pretrain(init_params, data, rng) -> (client_params, losses)`: `data` a
    `federation.ClientData` sharded over the mesh, `client_params` the
    stacked `[num_clients, ...]` trained models (sharded; padding clients
    train on nothing useful and are to be ignored), `losses` each client's
    mean training loss. Client k trains with `fold_in(rng, k)` from round 0
    (so the learning-rate warmup starts at its first step).
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f'Phase 1 needs steps >= 1 and batch_size >= 1; got '
                     f'steps={steps}, batch_size={batch_size}.')
  mode = engine.resolve_mode(mode, mesh.devices.flat[0].platform)
  mode = 'map' if mode == 'chunked' else mode
  train = client_lib.make_local_training(loss_fn, client_optimizer, steps,
                                         batch_size, random_flip)

  def one_client(init_params, key, data_row, rows):
    params, loss, _ = train(init_params, data_row.images, data_row.labels,
                            data_row.counts, key, jnp.zeros((), jnp.int32))
    return engine.ClientResult(None, rows, (params, loss))

  run = engine.for_each_client(one_client, mesh=mesh, mode=mode)

  def pretrain(init_params, data: federation.ClientData, rng: jax.Array):
    n = data.num_clients
    if n % mesh.size:
      raise ValueError(f'{n} clients do not split over {mesh.size} devices; '
                       'pad them with federation.shard_client_data.')
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
    local_ids = jnp.arange(n, dtype=jnp.int32) % (n // mesh.size)
    _, (params, losses), _, _ = run(init_params, keys, data, {}, local_ids,
                                    jnp.ones((n,), jnp.float32), rng)
    return params, losses

  return jax.jit(pretrain)


class Algorithm(fedavg.Algorithm):
  """FedDDPM (`plus=False`) or FedDDPM+ (`plus=True`) on FedAvg's round."""

  name = 'fedddpm'
  dp_unsound = (
      'phase 1 uploads every client\'s whole locally trained model, and the '
      'server samples its auxiliary set from them and trains on it after '
      'every round: none of that is clipped or noised, so no client-level '
      'guarantee covers the global model.')

  def __init__(self, run):
    super().__init__(run)
    self.settings = Settings.from_config(run.config)
    if self.settings.plus:
      self.name = 'fedddpm_plus'
    self.num_classes = run.config.model.get('num_classes')
    self.conditional = self.num_classes is not None
    self.phase1: dict[str, Any] = {}
    self.cache_dir = os.path.join(run.workdir, 'fedddpm')

  @classmethod
  def check_config(cls, config, num_devices=None):
    super().check_config(config, num_devices)
    settings = Settings.from_config(config)
    server_aux.server_aux_optimizer(settings.server_optimizer)

  def init(self, params):
    del params
    out = {'server_steps': jnp.zeros((), jnp.int32)}
    if self.settings.plus:
      out['trigger'] = plateau.init(self.settings.plus_window)
    return out

  # -- Phase 1 and the auxiliary set. ---------------------------------------

  def prepare(self, state, init_params):
    """Loads the cached auxiliary set, or runs phase 1 from `init_params`
    and samples it; then builds the server steps on it."""
    s = self.settings
    aux_path = os.path.join(self.cache_dir, 'aux.npz')
    info_path = os.path.join(self.cache_dir, 'phase1.json')
    if os.path.exists(aux_path) and os.path.exists(info_path):
      aux = aux_lib.AuxiliaryData.load(aux_path)
      with open(info_path) as f:
        self.phase1 = json.load(f)
      self.run.log(f'FedDDPM: loaded the auxiliary set ({len(aux)} images) '
                   f'from {aux_path}; phase 1 is not run again.')
    else:
      aux = self._phase1(init_params)
      if workdir_lib.is_writer():
        os.makedirs(self.cache_dir, exist_ok=True)
        aux.save(aux_path)
        tmp = info_path + '.tmp'
        with open(tmp, 'w') as f:
          json.dump(self.phase1, f, indent=2)
        os.replace(tmp, info_path)
    self.aux = aux
    train, held = aux_lib.split_heldout(aux, s.heldout_fraction, self.seed)
    self.aux_train, self.aux_heldout = train, held
    rep = federation.replicated(self.run.mesh)
    self._train_images = jax.device_put(train.images, rep)
    self._train_labels = jax.device_put(
        np.maximum(train.labels, 0).astype(np.int32), rep)
    self._heldout_loss = (server_aux.make_aux_loss(
        eps_fn=self.run.eps_fn, schedule=self.run.schedule,
        images=held.images, labels=np.maximum(held.labels, 0),
        conditional=self.conditional, seed=self.seed + 4099)
                          if len(held) else None)
    opt = server_aux.server_aux_optimizer(s.server_optimizer)
    make = lambda steps: server_aux.make_server_update(
        loss_fn=self.run.loss_fn, optimizer=opt, num_steps=steps,
        batch_size=s.server_batch_size, ema_decay=self.ema_decay)
    self._every_round = self._correction = None
    if s.plus:
      if self._heldout_loss is None:
        raise ValueError('FedDDPM+ watches the loss on a held-out slice of '
                         'the auxiliary set, which is empty: raise '
                         'config.fedddpm.heldout_fraction.')
      self._correction = make(s.correction_steps)
    elif s.server_steps > 0:
      self._every_round = make(s.server_steps)
    hist = np.bincount(np.maximum(train.labels, 0),
                       minlength=self.num_classes or 1)
    self.run.log(
        f'FedDDPM{"+" if s.plus else ""}: auxiliary set of {len(aux)} images '
        f'({len(train)} train, {len(held)} held out); train images per class '
        f'{hist.tolist() if self.conditional else "n/a"}.')
    return state

  def _phase1(self, init_params) -> aux_lib.AuxiliaryData:
    s, run = self.settings, self.run
    fed = run.config.federation
    batch = s.pretrain_batch_size or int(fed.batch_size)
    t0 = time.perf_counter()
    pretrain = make_phase1(
        loss_fn=run.loss_fn,
        client_optimizer=optimizers.client_optimizer(
            run.config.client_optimizer),
        mesh=run.mesh, steps=s.pretrain_steps, batch_size=batch,
        mode=fed.mode, random_flip=bool(run.config.data.get('random_flip',
                                                             False)))
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed + 1),
                             PHASE1_KEY_TAG)
    client_params, losses = pretrain(init_params, run.data, rng)
    losses = np.asarray(losses)[:run.num_clients]
    t1 = time.perf_counter()
    run.log(f'FedDDPM phase 1: {run.num_clients} clients × '
            f'{s.pretrain_steps} local steps in {t1 - t0:.1f}s; mean '
            f'training loss per client {np.round(losses, 4).tolist()}.')
    label_counts = aux_lib.client_label_counts(
        np.asarray(run.data.labels), np.asarray(run.data.counts),
        self.num_classes or 1)
    allocation = aux_lib.allocate(label_counts, conditional=self.conditional,
                                  per_class=s.aux_per_class,
                                  total=s.aux_size)
    missing = ([c for c in range(self.num_classes)
                if not label_counts[:, c].sum()] if self.conditional else [])
    if missing:
      run.log(f'FedDDPM: no client holds classes {missing}; the auxiliary '
              'set has none of them.')
    draw = aux_lib.make_sampler(
        eps_fn=run.eps_fn, schedule=run.schedule, mesh=run.mesh,
        image_shape=run.image_shape, batch_size=s.aux_sample_batch,
        num_steps=s.aux_sample_steps, eta=s.aux_eta,
        num_classes=self.num_classes, guidance_scale=s.guidance_scale,
        mode=fed.mode)
    aux = aux_lib.sample_auxiliary(
        draw, client_params, allocation, s.aux_sample_batch,
        jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), SAMPLE_KEY_TAG))
    t2 = time.perf_counter()
    labels, _ = aux_lib.plan(allocation, s.aux_sample_batch)
    guided = self.conditional and s.guidance_scale != 1.0
    self.phase1 = {
        'clients': run.num_clients,
        'pretrain_steps': s.pretrain_steps,
        'pretrain_batch_size': batch,
        'pretrain_seconds': t1 - t0,
        'pretrain_losses': losses.tolist(),
        'aux_images': len(aux),
        'sampling_seconds': t2 - t1,
        # UNet forward passes of one image spent drawing (padding included).
        'sampling_unet_evals': int(labels.size * s.aux_sample_steps
                                   * (2 if guided else 1)),
    }
    run.log(f'FedDDPM: sampled {len(aux)} auxiliary images in '
            f'{t2 - t1:.1f}s.')
    return aux

  # -- After each round. -----------------------------------------------------

  def after_round(self, state, round_idx):
    """The server step after round `round_idx` (1-based)."""
    s = self.settings
    alg = jax.device_get(state.algorithm)
    steps = int(alg['server_steps'])
    row = {}
    if self._every_round is not None:
      state, loss = self._every_round(state, self._train_images,
                                      self._train_labels)
      steps += s.server_steps
      row['server_aux_loss'] = float(loss)
    if self._heldout_loss is not None:
      signal = float(self._heldout_loss(state.params))
      row['aux_heldout_loss'] = signal
      if s.plus:
        alg['trigger'], fired = plateau.observe(
            plateau.TriggerState(*alg['trigger']), signal, s.plus_threshold,
            s.plus_max_corrections)
        row['aux_correction'] = int(fired)
        if fired:
          state, loss = self._correction(state, self._train_images,
                                         self._train_labels)
          steps += s.correction_steps
          row['server_aux_loss'] = float(loss)
          row['aux_heldout_loss_after'] = float(
              self._heldout_loss(state.params))
          self.run.log(
              f'  FedDDPM+: learning slowed at round {round_idx}; corrected '
              f'with {s.correction_steps} server steps (held-out aux loss '
              f'{signal:.4f} → {row["aux_heldout_loss_after"]:.4f}).')
    alg['server_steps'] = np.int32(steps)
    row['server_aux_steps'] = steps
    alg = federation.replicate(jax.tree.map(jnp.asarray, alg), self.run.mesh)
    return state.replace(algorithm=alg), row

  # -- Accounting. -------------------------------------------------------------

  def summary(self, num_rounds, state=None):
    """Adds the one-time model upload and the compute spent."""
    s, run = self.settings, self.run
    upload = comm.model_upload_bytes(run.param_shapes, run.num_clients)
    out = comm.with_one_time_upload(super().summary(num_rounds, state),
                                   upload)
    alg = jax.device_get(state.algorithm) if state is not None else {}
    server_steps = int(alg.get('server_steps', 0))
    fed = run.config.federation
    p1 = self.phase1
    pre = (p1.get('clients', 0) * p1.get('pretrain_steps', 0)
           * p1.get('pretrain_batch_size', 0))
    heldout_evals = (len(self.aux_heldout) * num_rounds
                     if self._heldout_loss is not None else 0)
    rounds_examples = (num_rounds * int(fed.clients_per_round)
                       * int(fed.local_steps) * int(fed.batch_size))
    server = server_steps * s.server_batch_size
    # One training example (forward + backward) ≈ 3 forward passes.
    forward = p1.get('sampling_unet_evals', 0) + heldout_evals
    out.update({
        'method': self.name,
        'aux_images': len(self.aux),
        'pretrain_train_examples': int(pre),
        'round_train_examples': int(rounds_examples),
        'server_aux_steps': server_steps,
        'server_aux_train_examples': int(server),
        'aux_sampling_unet_evals': int(p1.get('sampling_unet_evals', 0)),
        'aux_heldout_unet_evals': int(heldout_evals),
        'compute_train_example_equivalents': float(
            pre + rounds_examples + server + forward / 3.0),
    })
    if s.plus:
      out['fedddpm_plus_corrections'] = int(alg['trigger'][2])
    return out

  def describe(self):
    s = self.settings
    what = (f'plateau trigger (window {s.plus_window}, threshold '
            f'{s.plus_threshold:g}), {s.correction_steps}-step correction'
            if s.plus else f'{s.server_steps} server steps a round')
    return (super().describe() + f' Phase 1: {s.pretrain_steps} local steps '
            f'per client; {what}.')
