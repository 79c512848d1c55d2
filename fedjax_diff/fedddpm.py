"""FedDDPM and FedDDPM+ in a training run (arXiv 2503.06426).

What the trainer calls, in order (`config.fedddpm`, documented in
configs/mnist_fedddpm.py):

1. `FedDDPM.prepare(init_params)`, before the first round: phase 1 — every
   client trains its own model from θ_0 (`local_training`, one vectorized
   program) and uploads it once (`comm.model_upload_bytes`); the server
   samples the auxiliary dataset from these models (`auxiliary_data`) and
   splits off a held-out slice. The auxiliary set is cached in
   `<workdir>/fedddpm/aux.npz` (with `phase1.json`), so a resumed run does
   not redo phase 1;
2. `FedDDPM.after_round(state, round)`, after each aggregation:
   * FedDDPM: `server_steps` steps of the server's optimizer on the
     auxiliary training set (`strategies.server_aux`);
   * FedDDPM+ (`plus=True`): no per-round steps; the global model's loss on
     the held-out auxiliary slice feeds `strategies.plateau.PlateauTrigger`,
     and when it fires, one correction of `correction_steps` steps;
   and returns the figures for metrics.jsonl (`aux_heldout_loss`,
   `server_aux_steps` so far, ...);
3. `FedDDPM.resume(rows)` rebuilds the trigger and step count from
   metrics.jsonl on resume; `FedDDPM.summary_update(summary)` adds the
   one-time upload and the compute spent to summary.json.
"""

import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff import auxiliary_data as aux_lib
from fedjax_diff import comm
from fedjax_diff import federation
from fedjax_diff import local_training
from fedjax_diff import optimizers
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.strategies import plateau as plateau_lib
from fedjax_diff.strategies import server_aux

PyTree = Any
PHASE1_KEY_TAG = 0xFDD1
SAMPLE_KEY_TAG = 0xFDD2


def enabled(config: ml_collections.ConfigDict) -> bool:
  cfg = config.get('fedddpm')
  return bool(cfg is not None and cfg.get('enabled', False))


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class FedDDPM:
  """FedDDPM / FedDDPM+ for one run: phase 1, the auxiliary set, server
  steps and the trigger."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               mesh, client_data: federation.ClientData, num_real_clients: int,
               eps_fn, schedule, loss_fn, image_shape, param_shapes):
    self.cfg = cfg = config.fedddpm
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    self.client_data = client_data
    self.num_real_clients = int(num_real_clients)
    self.eps_fn, self.schedule, self.loss_fn = eps_fn, schedule, loss_fn
    self.image_shape = tuple(image_shape)
    self.param_shapes = param_shapes
    self.num_classes = config.model.get('num_classes')
    self.conditional = self.num_classes is not None
    self.plus = bool(cfg.get('plus', False))
    self.seed = int(config.seed)
    self.server_steps_done = 0
    self.trigger = None
    if self.plus:
      self.trigger = plateau_lib.PlateauTrigger(
          int(cfg.plus_window), float(cfg.plus_threshold),
          int(cfg.get('plus_max_corrections', 1)))
    for f in ('pretrain_steps', 'aux_sample_steps', 'server_batch_size'):
      if int(cfg.get(f, 0)) < 1:
        raise ValueError(f'config.fedddpm.{f} must be >= 1; got '
                         f'{cfg.get(f)}.')
    self.phase1: dict[str, Any] = {}

  # -- phase 1 and the auxiliary set ---------------------------------------

  @property
  def cache_dir(self) -> str:
    return os.path.join(self.workdir, 'fedddpm')

  def prepare(self, init_params: PyTree) -> None:
    """Loads the cached auxiliary set, or runs phase 1 and samples it."""
    aux_path = os.path.join(self.cache_dir, 'aux.npz')
    info_path = os.path.join(self.cache_dir, 'phase1.json')
    if os.path.exists(aux_path) and os.path.exists(info_path):
      aux = aux_lib.AuxiliaryData.load(aux_path)
      with open(info_path) as f:
        self.phase1 = json.load(f)
      _log(f'FedDDPM: loaded the auxiliary set ({len(aux)} images) from '
           f'{aux_path}; phase 1 is not run again.')
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
    train, held = aux_lib.split_heldout(
        aux, float(self.cfg.get('heldout_fraction', 0.1)), self.seed)
    self.aux_train, self.aux_heldout = train, held
    rep = federation.replicated(self.mesh)
    self._train_images = jax.device_put(train.images, rep)
    self._train_labels = jax.device_put(
        np.maximum(train.labels, 0).astype(np.int32), rep)
    self._heldout_loss = (server_aux.make_aux_loss(
        eps_fn=self.eps_fn, schedule=self.schedule, images=held.images,
        labels=np.maximum(held.labels, 0), conditional=self.conditional,
        seed=self.seed + 4099) if len(held) else None)
    opt = server_aux.server_aux_optimizer(self.cfg.server_optimizer)
    make = lambda steps: server_aux.make_server_update(
        loss_fn=self.loss_fn, optimizer=opt, num_steps=steps,
        batch_size=int(self.cfg.server_batch_size),
        ema_decay=float(self.config.ema_decay))
    self._every_round = None
    self._correction = None
    if self.plus:
      if self._heldout_loss is None:
        raise ValueError('FedDDPM+ watches the loss on a held-out slice of '
                         'the auxiliary set, which is empty: raise '
                         'config.fedddpm.heldout_fraction.')
      self._correction = make(int(self.cfg.correction_steps))
    elif int(self.cfg.server_steps) > 0:
      self._every_round = make(int(self.cfg.server_steps))
    hist = np.bincount(np.maximum(train.labels, 0),
                       minlength=self.num_classes or 1)
    _log(f'FedDDPM{"+" if self.plus else ""}: auxiliary set of {len(aux)} '
         f'images ({len(train)} train, {len(held)} held out); train images '
         f'per class {hist.tolist() if self.conditional else "n/a"}.')

  def _phase1(self, init_params: PyTree) -> aux_lib.AuxiliaryData:
    cfg = self.cfg
    fed = self.config.federation
    t0 = time.perf_counter()
    pretrain = local_training.make_pretrain_fn(
        loss_fn=self.loss_fn,
        client_optimizer=optimizers.client_optimizer(
            self.config.client_optimizer),
        mesh=self.mesh, steps=int(cfg.pretrain_steps),
        batch_size=int(cfg.get('pretrain_batch_size', 0) or fed.batch_size),
        mode=fed.mode,
        random_flip=bool(self.config.data.get('random_flip', False)))
    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed + 1),
                             PHASE1_KEY_TAG)
    client_params, losses = pretrain(init_params, self.client_data, rng)
    losses = np.asarray(losses)[:self.num_real_clients]
    t1 = time.perf_counter()
    _log(f'FedDDPM phase 1: {self.num_real_clients} clients × '
         f'{cfg.pretrain_steps} local steps in {t1 - t0:.1f}s; mean training '
         f'loss per client {np.round(losses, 4).tolist()}.')
    label_counts = aux_lib.client_label_counts(
        np.asarray(self.client_data.labels), np.asarray(self.client_data.counts),
        self.num_classes or 1)
    allocation = aux_lib.allocate(
        label_counts, conditional=self.conditional,
        per_class=int(cfg.get('aux_per_class', 0)),
        total=int(cfg.get('aux_size', 0)))
    missing = ([c for c in range(self.num_classes)
                if not label_counts[:, c].sum()] if self.conditional else [])
    if missing:
      _log(f'FedDDPM: no client holds classes {missing}; the auxiliary set '
           'has none of them.')
    batch = int(cfg.aux_sample_batch)
    draw = aux_lib.make_sampler(
        eps_fn=self.eps_fn, schedule=self.schedule, mesh=self.mesh,
        image_shape=self.image_shape, batch_size=batch,
        num_steps=int(cfg.aux_sample_steps), eta=float(cfg.get('aux_eta', 0.0)),
        num_classes=self.num_classes,
        guidance_scale=float(cfg.get('guidance_scale', 1.0)), mode=fed.mode)
    aux = aux_lib.sample_auxiliary(
        draw, client_params, allocation, batch,
        jax.random.fold_in(jax.random.PRNGKey(self.seed + 1), SAMPLE_KEY_TAG))
    t2 = time.perf_counter()
    labels, _ = aux_lib.plan(allocation, batch)
    guided = self.conditional and float(cfg.get('guidance_scale', 1.0)) != 1.0
    self.phase1 = {
        'clients': self.num_real_clients,
        'pretrain_steps': int(cfg.pretrain_steps),
        'pretrain_batch_size': int(cfg.get('pretrain_batch_size', 0)
                                   or fed.batch_size),
        'pretrain_seconds': t1 - t0,
        'pretrain_losses': losses.tolist(),
        'aux_images': len(aux),
        'sampling_seconds': t2 - t1,
        # UNet forward passes of one image spent drawing (padding included).
        'sampling_unet_evals': int(labels.size * int(cfg.aux_sample_steps)
                                   * (2 if guided else 1)),
    }
    _log(f'FedDDPM: sampled {len(aux)} auxiliary images in {t2 - t1:.1f}s.')
    return aux

  # -- rounds ----------------------------------------------------------------

  def resume(self, rows: list[dict]) -> None:
    """Restores the step count and the trigger from metrics.jsonl rows."""
    steps = [r['server_aux_steps'] for r in rows if 'server_aux_steps' in r]
    self.server_steps_done = int(steps[-1]) if steps else 0
    if self.trigger is not None:
      self.trigger.replay(
          {'signal': r['aux_heldout_loss'], 'fired': r.get('aux_correction')}
          for r in rows if 'aux_heldout_loss' in r)

  def after_round(self, state, round_idx: int):
    """The server step after round `round_idx` (1-based): returns the new
    state and the figures to log."""
    row = {}
    if self._every_round is not None:
      state, loss = self._every_round(state, self._train_images,
                                      self._train_labels)
      self.server_steps_done += int(self.cfg.server_steps)
      row['server_aux_loss'] = float(loss)
    if self._heldout_loss is not None:
      signal = float(self._heldout_loss(state.params))
      row['aux_heldout_loss'] = signal
      if self.trigger is not None:
        fired = self.trigger.observe(signal)
        row['aux_correction'] = int(fired)
        if fired:
          state, loss = self._correction(state, self._train_images,
                                         self._train_labels)
          self.server_steps_done += int(self.cfg.correction_steps)
          row['server_aux_loss'] = float(loss)
          row['aux_heldout_loss_after'] = float(
              self._heldout_loss(state.params))
          _log(f'  FedDDPM+: learning slowed at round {round_idx}; '
               f'corrected with {self.cfg.correction_steps} server steps '
               f'(held-out aux loss {signal:.4f} → '
               f'{row["aux_heldout_loss_after"]:.4f}).')
    row['server_aux_steps'] = self.server_steps_done
    return state, row

  # -- accounting ------------------------------------------------------------

  def summary_update(self, summary: dict, num_rounds: int) -> dict:
    """Adds the one-time model upload and the compute spent to `summary`."""
    upload = comm.model_upload_bytes(self.param_shapes, self.num_real_clients)
    out = comm.with_one_time_upload(summary, upload)
    fed = self.config.federation
    batch = int(self.cfg.server_batch_size)
    p1 = self.phase1
    pre = (p1.get('clients', 0) * p1.get('pretrain_steps', 0)
           * p1.get('pretrain_batch_size', 0))
    heldout_evals = len(self.aux_heldout) * num_rounds if (
        self._heldout_loss is not None) else 0
    rounds_examples = (num_rounds * int(fed.clients_per_round)
                       * int(fed.local_steps) * int(fed.batch_size))
    server = self.server_steps_done * batch
    # One training example (forward + backward) ≈ 3 forward passes.
    forward = p1.get('sampling_unet_evals', 0) + heldout_evals
    out.update({
        'method': 'fedddpm_plus' if self.plus else 'fedddpm',
        'aux_images': len(self.aux),
        'pretrain_train_examples': int(pre),
        'round_train_examples': int(rounds_examples),
        'server_aux_steps': int(self.server_steps_done),
        'server_aux_train_examples': int(server),
        'aux_sampling_unet_evals': int(p1.get('sampling_unet_evals', 0)),
        'aux_heldout_unet_evals': int(heldout_evals),
        'compute_train_example_equivalents': float(
            pre + rounds_examples + server + forward / 3.0),
    })
    if self.trigger is not None:
      out['fedddpm_plus_corrections'] = self.trigger.corrections
    return out
