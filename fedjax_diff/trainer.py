"""`train_and_evaluate(config, workdir)`: a federated diffusion run end to end.

The config (see configs/mnist_fedavg.py for every field) names the data and
its partition, the UNet, the diffusion schedule, the client and server
optimizers, the strategies (FedDM-prox's `prox_mu`, FedDM-quant's `upload`),
the federation's shape and the evaluators. The workdir follows the contract
of `fedjax_diff.workdir`; running again resumes. At the end the run's exact
communication is printed and written to summary.json.
"""

import dataclasses
import inspect
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff import comm
from fedjax_diff import data as data_lib
from fedjax_diff import evaluators as evaluators_lib
from fedjax_diff import fedddpm as fedddpm_lib
from fedjax_diff import federation
from fedjax_diff import hierarchy as hierarchy_lib
from fedjax_diff import models
from fedjax_diff import optimizers
from fedjax_diff import progress as progress_lib
from fedjax_diff import rounds
from fedjax_diff import state as state_lib
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.state import init_server_state
from fedjax_diff.state import ServerState
from fedjax_diff.strategies import build as strategies_build
from fedjax_diff.strategies import hierarchical
from fedjax_diff.strategies import pruning_schedule


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def load_data(cfg: ml_collections.ConfigDict):
  """Train and test splits named by `config.data`."""
  kwargs = {}
  if cfg.get('image_size'):
    kwargs['image_size'] = int(cfg.image_size)
  train = data_lib.load_dataset(cfg.name, 'train', cfg.get('data_dir'),
                                **kwargs)
  test = data_lib.load_dataset(cfg.name, cfg.get('test_split', 'test'),
                               cfg.get('data_dir'), **kwargs)
  if cfg.get('attribute_labels'):
    names = tuple(cfg.attribute_labels)
    train = attribute_labels(train, names)
    test = attribute_labels(test, names)
  return train, test


def attribute_labels(dataset: data_lib.Dataset,
                     names: tuple[str, ...]) -> data_lib.Dataset:
  """Relabels examples by binary attributes: label = Σ_i 2^i·attr_i.

  FedPhD (arXiv 2507.06449) splits CelebA into 4 pseudo-classes by Male and
  Young; ('Male', 'Young') gives 0 = female old, 1 = male old,
  2 = female young, 3 = male young.
  """
  if not dataset.attributes:
    raise ValueError(f'config.data.attribute_labels={names} but '
                     f'{dataset.name} has no attributes.')
  missing = [n for n in names if n not in dataset.attributes]
  if missing:
    raise ValueError(f'{dataset.name} has no attributes {missing}; it has '
                     f'{sorted(dataset.attributes)}.')
  labels = sum((np.asarray(dataset.attributes[n]).astype(np.int32) << i)
               for i, n in enumerate(names))
  return dataclasses.replace(dataset, labels=labels.astype(np.int32),
                             num_classes=2 ** len(names))


def partition(labels: np.ndarray, cfg: ml_collections.ConfigDict,
              num_clients: int, seed: int):
  """Splits examples over clients; `config.partition` holds the method and
  any of its arguments (fields a method does not take are ignored, so
  `--config.partition.method=dirichlet --config.partition.alpha=0.1`
  works from any config)."""
  fn = data_lib.PARTITIONERS.get(cfg.method)
  if fn is None:
    raise ValueError(f'config.partition.method={cfg.method!r}; use one of '
                     f'{sorted(data_lib.PARTITIONERS)}.')
  accepted = inspect.signature(fn).parameters
  kwargs = {k: v for k, v in cfg.items()
            if k in accepted and k not in ('labels', 'num_clients', 'seed')}
  return data_lib.make_partition(labels, cfg.method, num_clients, seed,
                                 **kwargs)


def report_partition(train: data_lib.Dataset, parts, workdir: str) -> None:
  """Prints and saves the per-client label histogram (text and PNG)."""
  hist = data_lib.label_histogram(train.labels, parts, train.num_classes)
  text = data_lib.format_histogram(hist)
  log(f'Examples per client and label:\n{text}')
  if workdir_lib.is_writer():
    with open(os.path.join(workdir, 'label_histogram.txt'), 'w') as f:
      f.write(text + '\n')
    data_lib.plot_histogram(hist, os.path.join(workdir, 'label_histogram.png'),
                            title=f'{train.name}: examples per client')


def make_loss_fn(eps_fn, schedule, config: ml_collections.ConfigDict):
  """The local training loss `(params, x, labels, rng) -> scalar`."""
  num_classes = config.model.get('num_classes')
  drop = float(config.diffusion.get('cond_drop_prob', 0.0))

  def loss_fn(params, x, labels, rng):
    return diffusion_loss(
        eps_fn, params, schedule, x, rng,
        labels=labels if num_classes is not None else None,
        null_label=num_classes, cond_drop_prob=drop, train=True)

  return loss_fn


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> ServerState:
  """Trains a federation and evaluates it; resumes from `workdir` if it holds
  a checkpoint of the same config. Returns the final server state."""
  workdir_lib.check_and_write_config(workdir, config)
  fed = config.federation
  seed = int(config.seed)
  mesh = federation.client_mesh()
  log(f'Devices: {mesh.size} x {jax.devices()[0].platform}; execution mode '
      f'{rounds.resolve_mode(fed.mode)!r} (config: {fed.mode!r}).')

  # Data, partition, per-client arrays on the mesh.
  train, test = load_data(config.data)
  parts = partition(train.labels, config.partition, fed.num_clients, seed)
  report_partition(train, parts, workdir)
  client_data = federation.shard_client_data(
      federation.stack_clients(train.images, train.labels, parts), mesh)
  image_shape = tuple(train.images.shape[1:])

  # Model, diffusion, optimizers.
  model = models.unet_from_config(config.model)
  eps_fn = models.make_eps_fn(model)
  schedule = make_schedule(config.diffusion.schedule,
                           int(config.diffusion.num_timesteps))
  # Initialised under jit with an 'rbg' key: XLA compiles the threefry hash
  # of every parameter's initializer slowly on CPU (minutes for a CIFAR
  # UNet). Only initialisation uses it; training keys stay threefry, whose
  # streams do not depend on sharding.
  params = jax.jit(lambda k: models.init_params(model, k, image_shape))(
      jax.random.key(seed, impl='rbg'))
  log(f'UNet: {models.count_params(params):,} parameters.')
  # FedPhD's structured pruning (config.pruning; None = none): from here on
  # the run trains, sends and samples the compact UNet.
  model, params, pruning_info = pruning_schedule.prepare(
      config, workdir, model, params, image_shape=image_shape,
      loss_fn_for=lambda m: make_loss_fn(models.make_eps_fn(m), schedule,
                                         config),
      images=train.images, labels=train.labels, seed=seed,
      train_stage=train_and_evaluate, log=log)
  eps_fn = models.make_eps_fn(model)
  # Shapes and dtypes only: what communication accounting needs (the arrays
  # themselves may be donated to the first round).
  param_shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  server_opt = optimizers.server_optimizer(config.server_optimizer)
  client_opt = optimizers.client_optimizer(
      config.client_optimizer,
      extra=strategies_build.client_transforms(config))
  upload = strategies_build.upload_from_config(
      config, eps_fn=eps_fn, schedule=schedule, image_shape=image_shape,
      num_classes=config.model.get('num_classes'))
  # Clients that keep their optimizer state across rounds (DiLoCo-style);
  # False: a fresh client optimizer every round, as in FedAvg.
  keep_opt = bool(config.client_optimizer.get('keep_state', False))
  client_states = state_lib.init_client_states(
      upload, params, client_data.num_clients, mesh,
      client_optimizer=client_opt if keep_opt else None)
  # FedPhD's edge servers (config.hierarchy; None = flat FedAvg).
  hier = hierarchical.config_from(config)
  state = init_server_state(params, server_opt, jax.random.PRNGKey(seed + 1),
                            client_states, edges=hierarchy_lib.init_edges(
                                hier, params, train.num_classes))
  state = state_lib.place_state(state, mesh)

  # Resume (the checkpoint is restored onto the placement of `state`).
  manager = workdir_lib.checkpoint_manager(workdir)
  state, step = workdir_lib.restore_checkpoint(manager, state)
  start = int(state.round)
  if step is not None:
    log(f'Resumed from {workdir}/checkpoints at round {start}.')
    workdir_lib.truncate_metrics(workdir, start)
  state = state_lib.place_state(state, mesh)

  hier_kwargs = {} if hier is None else dict(
      hierarchy=hier, num_classes=train.num_classes,
      num_rounds=int(config.num_rounds))
  round_fn = (hierarchy_lib if hier else rounds).make_round_fn(
      **hier_kwargs, loss_fn=make_loss_fn(eps_fn, schedule, config),
      client_optimizer=client_opt, server_optimizer=server_opt, mesh=mesh,
      local_steps=int(fed.local_steps), batch_size=int(fed.batch_size),
      upload=upload, mode=fed.mode, chunk_size=fed.get('chunk_size') or None,
      ema_decay=float(config.ema_decay),
      random_flip=bool(config.data.get('random_flip', False)),
      keep_client_optimizer_state=keep_opt)

  metrics_log = workdir_lib.MetricsLog(workdir)
  ctx = evaluators_lib.EvalContext(
      eps_fn=eps_fn, schedule=schedule, test_data=test,
      image_shape=image_shape, num_classes=config.model.get('num_classes'),
      workdir=workdir, seed=seed, write_images=metrics_log.write_images)
  evaluators = evaluators_lib.build_evaluators(config.get('evaluators'), ctx)

  num_rounds = int(config.num_rounds)
  per_round = int(fed.clients_per_round)
  traffic = comm.round_bytes(param_shapes, per_round, upload)
  examples_per_round = per_round * int(fed.local_steps) * int(fed.batch_size)
  mu = float(config.get('prox_mu', 0.0) or 0.0)
  log(f'Rounds {start}..{num_rounds}: {per_round} of {fed.num_clients} '
      f'clients per round, {fed.local_steps} local steps of batch '
      f'{fed.batch_size}{f", FedProx mu={mu:g}" if mu > 0 else ""}'
      f'{", client optimizer state kept across rounds" if keep_opt else ""}'
      f'; upload '
      f'{upload.name if upload else "fp32"}: '
      f'{traffic["uplink_bytes"] / 2**20:.2f} MiB up and '
      f'{traffic["downlink_bytes"] / 2**20:.2f} MiB down per round.')

  def slots(round_idx):
    ids = federation.sample_clients(fed.num_clients, per_round, seed,
                                    round_idx)
    return federation.round_slots(ids, mesh.size)

  # FedDDPM / FedDDPM+ (arXiv 2503.06426): phase 1 and the auxiliary set
  # (cached in the workdir), then a server step after each aggregation.
  aux = None
  if fedddpm_lib.enabled(config):
    aux = fedddpm_lib.FedDDPM(
        config, workdir, mesh=mesh, client_data=client_data,
        num_real_clients=len(parts), eps_fn=eps_fn, schedule=schedule,
        loss_fn=make_loss_fn(eps_fn, schedule, config),
        image_shape=image_shape, param_shapes=param_shapes)
    aux.prepare(params)
    aux.resume(workdir_lib.read_metrics(workdir))

  if start < num_rounds:
    t = time.perf_counter()
    round_fn = round_fn.lower(state, client_data, *slots(start)).compile()
    log(f'Compiled the round in {time.perf_counter() - t:.1f}s.')

  progress = progress_lib.Progress(num_rounds, start)
  log_every = max(1, int(config.log_every))
  ckpt_every = int(config.checkpoint_every)
  t_last, r_last = time.perf_counter(), start
  for r in range(start, num_rounds):
    state, metrics = round_fn(state, client_data, *slots(r))
    done = r + 1
    row = {}
    if aux is not None:
      state, aux_row = aux.after_round(state, done)
      row.update(aux_row)
    if done % log_every == 0 or done == num_rounds:
      loss = float(metrics['loss'])
      if not np.isfinite(loss):
        raise FloatingPointError(
            f'Training loss is {loss} at round {done}; the last good state '
            f'is the latest checkpoint in {workdir}/checkpoints. Lower '
            'config.client_optimizer.learning_rate or enable grad_clip.')
      now = time.perf_counter()
      seconds = (now - t_last) / (done - r_last)
      t_last, r_last = now, done
      row.update({'loss': loss, **traffic, 'seconds': seconds,
                  'client_examples_per_second': examples_per_round / seconds})
      row.update(client_figures(metrics))
      if hier is not None:
        row.update(hierarchy_lib.round_figures(metrics, param_shapes, hier))
      progress.update(done, f'loss {loss:.4f}')
    figures = {}
    for name, evaluator in evaluators.items():
      if evaluators_lib.is_due(evaluator, done, num_rounds):
        t = time.perf_counter()
        figures.update(evaluator(state, done))
        figures[f'{name}_seconds'] = time.perf_counter() - t
    row.update(figures)
    if row:
      metrics_log.write(done, row)
    if figures:
      log(f'  eval at round {done}: ' + ', '.join(
          f'{k} {v:.4g}' for k, v in figures.items()))
      t_last = time.perf_counter()  # evaluation time is not training time.
    if done == num_rounds or (ckpt_every > 0 and done % ckpt_every == 0):
      workdir_lib.save_checkpoint(manager, done, state)
  metrics_log.close()
  manager.close()
  summary = comm.run_summary(param_shapes, num_rounds, per_round, upload)
  if aux is not None:
    summary = aux.summary_update(summary, num_rounds)
  if hier is not None:
    summary = hierarchy_lib.summary_update(summary, param_shapes, hier,
                                           num_rounds)
  log(comm.format_summary(summary))
  if hier is not None:
    log(comm.format_edge_cloud(summary))
  if pruning_info is not None:
    summary['pruning'] = pruning_info
  workdir_lib.write_summary(workdir, summary)
  return state


def client_figures(metrics) -> dict[str, float]:
  """Example-weighted means over a round's real clients of their drift
  ‖Δ_k‖ and, with an upload transform, of the relative upload error
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
