"""`train_and_evaluate(config, workdir)`: a federated diffusion run end to end.

The config (see configs/mnist_fedavg.py for every field) names the data and
its partition, the UNet, the diffusion schedule, the client and server
optimizers, the strategies (FedDM-prox's `prox_mu`, FedDM-quant's `upload`),
the algorithm (`config.algorithm`, a module of `fedjax_diff.algorithms`),
the federation's shape and the evaluators. `setup` builds what the run
trains with; the loop knows no algorithm: what differs between them lives in
the algorithm's round and hooks. The workdir follows the contract of
`fedjax_diff.workdir`; running again resumes. At the end the run's exact
communication is printed and written to summary.json.
"""

import dataclasses
import os
import time
from typing import Optional

from etils import epath
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fedjax_diff import algorithms
from fedjax_diff import autotune
from fedjax_diff import data as data_lib
from fedjax_diff import errors
from fedjax_diff import evaluators as evaluators_lib
from fedjax_diff import experiment
from fedjax_diff import federation
from fedjax_diff import latent as latent_lib
from fedjax_diff import models
from fedjax_diff import progress as progress_lib
from fedjax_diff import runtime
from fedjax_diff import state as state_lib
from fedjax_diff import validation
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.state import ServerState
from fedjax_diff.strategies import faults as faults_lib
from fedjax_diff.strategies import pruning_schedule


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def load_data(cfg: ml_collections.ConfigDict):
  """Train and test splits named by `config.data` (`data.config_from`)."""
  dcfg = data_lib.config_from(cfg)
  train = data_lib.load_dataset(dcfg.name, 'train', dcfg.data_dir,
                                **dcfg.load_kwargs)
  test = data_lib.load_dataset(dcfg.name, dcfg.test_split, dcfg.data_dir,
                               **dcfg.load_kwargs)
  if dcfg.attribute_labels:
    train = attribute_labels(train, dcfg.attribute_labels)
    test = attribute_labels(test, dcfg.attribute_labels)
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
  any of its arguments (`data.partition_from_config`)."""
  method, kwargs = data_lib.partition_from_config(cfg)
  return data_lib.make_partition(labels, method, num_clients, seed, **kwargs)


def load_federation(config: ml_collections.ConfigDict):
  """(train, test, parts): the data and its partition over the clients,
  checked against the config (`validation.check_data`) before anything is
  written.

  Raises:
    ConfigError: the data cannot be loaded as configured (unknown or
      unprepared dataset, a partition that cannot be made, a batch larger
      than every client's data, ...).
  """
  with validation.user_errors('config.data'):
    try:
      train, test = load_data(config.data)
    except (data_lib.DatasetNotPreparedError,
            data_lib.UnknownDatasetError) as e:
      raise errors.ConfigError(f'config.data.name={config.data.name!r}: '
                               f'{e}') from None
  with validation.user_errors('config.partition'):
    parts = partition(train.labels, config.partition,
                      int(config.federation.num_clients), int(config.seed))
  validation.check_data(config, np.array([len(p) for p in parts]),
                        tuple(train.images.shape[1:]))
  return train, test, parts


def report_partition(train: data_lib.Dataset, parts, workdir: str) -> None:
  """Prints and saves the per-client label histogram (text and PNG)."""
  hist = data_lib.label_histogram(train.labels, parts, train.num_classes)
  text = data_lib.format_histogram(hist)
  log(f'Examples per client and label:\n{text}')
  if workdir_lib.is_writer():
    (epath.Path(workdir) / 'label_histogram.txt').write_text(text + '\n')
    data_lib.plot_histogram(hist, os.path.join(workdir, 'label_histogram.png'),
                            title=f'{train.name}: examples per client')


def setup(config: ml_collections.ConfigDict, workdir: str,
          mesh: Optional[Mesh] = None, federation_data=None):
  """Everything a run trains with, built from the config, on `mesh` (default:
  every device).

  `federation_data`: `load_federation(config)`'s (train, test, parts), if
  already loaded.

  Returns (run, init_params, test split, pruning figures or None):
  `run` (`algorithms.Run`) holds the data on the mesh, the (possibly
  pruned) model's noise predictor and loss, the optimizers with their
  client transforms and the upload path.

  Latent diffusion (`config.latent`, `fedjax_diff.latent`): every client's
  images are encoded once, here, before any round (the encoder is
  deterministic, so encoding the train split and then partitioning it is
  each client encoding its own images); the clients hold float32 latents
  on their devices and the model is built for the latent shape.
  """
  seed = int(config.seed)
  mesh = mesh or federation.client_mesh()
  train, test, parts = federation_data or load_federation(config)
  report_partition(train, parts, workdir)
  space, latents = latent_lib.from_config(config, train.images, log)
  examples = train.images if space is None else latents
  client_data = federation.place_clients(examples, train.labels, parts, mesh)
  image_shape = tuple(examples.shape[1:])
  model, params = experiment.init_model(config, image_shape)
  log(f'UNet: {models.count_params(params):,} parameters.')
  # FedPhD's structured pruning (config.pruning; None = none): from here on
  # the run trains, sends and samples the compact UNet. 'after_sparse'
  # first trains the full UNet as a run of its own in <workdir>/sparse.
  stage = pruning_schedule.sparse_stage(config)
  if stage is not None:
    stage_dir = os.path.join(workdir, 'sparse')
    log(f'Sparse training before pruning, in {stage_dir}.')
    params = jax.device_get(train_and_evaluate(stage, stage_dir).params)
  schedule = experiment.schedule_of(config)
  model, params, pruning_info = pruning_schedule.prepare(
      config, workdir, model, params, image_shape=image_shape,
      loss_fn_for=lambda m: experiment.make_loss_fn(models.make_eps_fn(m),
                                                    schedule, config),
      images=examples, labels=train.labels, seed=seed, log=log)
  run = experiment.make_run(
      config, model=model, params=params, data=client_data,
      num_clients=len(parts), num_classes=train.num_classes,
      image_shape=image_shape, mesh=mesh, workdir=workdir, log=log,
      latent=space)
  return run, params, test, pruning_info


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> ServerState:
  """Trains a federation and evaluates it; resumes from `workdir` if it holds
  a checkpoint of the same config. Returns the final server state.

  The whole config, then the data it names, are checked before anything is
  written (`fedjax_diff.validation`). Each round is checked: a round in which
  every client's update is non-finite (training diverged), or a server state
  that is not finite, stops the run before it is saved.

  Raises:
    errors.ConfigError: the config cannot be run (nothing was written).
    errors.TrainingDiverged: training diverged; the workdir keeps its last
      finite checkpoint, which the message names.
  """
  mesh = federation.client_mesh()
  validation.check_config(config, mesh.size)
  settings = validation.run_settings(config)
  eval_params = evaluators_lib.check_params(config.get('eval_params', 'ema'))
  federation_data = load_federation(config)
  workdir_lib.check_and_write_config(workdir, config)
  run, params, test, pruning_info = setup(config, workdir, mesh,
                                          federation_data)
  algorithm = build_algorithm(run, params)
  state = algorithm.initial_state(params, jax.random.PRNGKey(
      int(config.seed) + 1))
  manager, state, step = workdir_lib.resume(workdir, state, log)
  start, num_rounds = int(state.round), int(config.num_rounds)
  if step is not None:
    log(f'Resumed from {workdir}/checkpoints at round {start}.')
  workdir_lib.truncate_metrics(workdir, start, log)
  state = algorithm.prepare(state_lib.place_state(state, run.mesh), params)
  log(algorithm.describe())
  metrics_log = workdir_lib.MetricsLog(workdir)
  evaluators = evaluators_lib.build_evaluators(
      config.get('evaluators'), evaluators_lib.EvalContext(
          eps_fn=run.eps_fn, schedule=run.schedule, test_data=test,
          image_shape=tuple(test.images.shape[1:]), latent=run.latent,
          num_classes=config.model.get('num_classes'), workdir=workdir,
          seed=int(config.seed), write_images=metrics_log.write_images,
          params=eval_params))
  round_fn = algorithm.make_round()
  if start < num_rounds:
    t = time.perf_counter()
    round_fn = round_fn.lower(state, run.data,
                              *algorithm.slots(start)).compile()
    log(f'Compiled the round in {time.perf_counter() - t:.1f}s.')
    runtime.barrier('compiled')  # every process compiled it (see barrier).
  progress = progress_lib.Progress(num_rounds, start)
  log_every, ckpt_every = settings.log_every, settings.checkpoint_every
  examples = (algorithm.clients_per_round * algorithm.local_steps *
              algorithm.batch_size)
  t_last, r_last = time.perf_counter(), start
  try:
    for r in range(start, num_rounds):
      slots = algorithm.slots(r)
      state, metrics = round_fn(state, run.data, *slots)
      done = r + 1
      clients = federation.to_host(metrics)  # all processes' clients.
      if faults_lib.diverged(clients):
        raise diverged(config, workdir, manager, done, clients_message(
            clients, slots[0]))
      counts = faults_lib.round_counts(clients)
      kept = int(np.sum(np.asarray(clients['client_mask']) > 0)) - counts[
          'clients_dropped']
      # A round without any client kept changes nothing (faults.py): no
      # server step after it either.
      state, row = (algorithm.after_round(state, done) if kept else
                    (state, {}))
      if not bool(_server_finite(state)):
        raise diverged(config, workdir, manager, done, state_message(state))
      if done % log_every == 0 or done == num_rounds:
        loss = float(clients['loss'])
        now = time.perf_counter()
        seconds = (now - t_last) / (done - r_last)
        t_last, r_last = now, done
        row.update({'loss': loss, 'seconds': seconds,
                    'client_examples_per_second': examples / seconds,
                    **algorithm.round_figures(clients, r)})
        dropped = counts['clients_dropped']
        dropped = (f' | {dropped} of {kept + dropped} clients dropped'
                   if dropped else '')
        progress.update(done, f'loss {loss:.4f}{dropped}')
      figures = evaluate(evaluators, state, done, num_rounds)
      row.update(figures)
      if row:
        metrics_log.write(done, row)
      if figures:
        t_last = time.perf_counter()  # evaluation time is not training time.
      if done == num_rounds or (ckpt_every > 0 and done % ckpt_every == 0):
        workdir_lib.save_checkpoint(manager, done, state)
  finally:
    metrics_log.close()
    manager.close()
  summary = algorithm.summary(num_rounds, state)
  log(algorithm.format_summary(summary))
  if pruning_info is not None:
    summary['pruning'] = pruning_info
  workdir_lib.write_summary(workdir, summary)
  return state


@jax.jit
def _server_finite(state: ServerState) -> jax.Array:
  """Whether the server's part of the state is finite (the clients' rows
  are checked per client by fault isolation, and whole before a save)."""
  return faults_lib.state_finite((state.params, state.ema_params,
                                  state.opt_state, state.algorithm,
                                  state.client_opt_state))


def clients_message(clients, client_ids) -> str:
  real = np.asarray(clients['client_mask']) > 0
  ids = np.asarray(client_ids)[real & (np.asarray(
      clients['client_nonfinite']) > 0)]
  return (f'the updates of all {int(real.sum())} sampled clients were '
          f'non-finite (clients {sorted(ids.tolist())})')


def state_message(state) -> str:
  bad = faults_lib.non_finite_leaves(
      (state.params, state.ema_params, state.opt_state, state.algorithm,
       state.client_opt_state))
  return (f'the server state holds non-finite values in {len(bad)} arrays '
          f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}; '
          '[0] params, [1] EMA, [2] server optimizer, [3] algorithm state, '
          '[4] shared client optimizer state)')


def diverged(config, workdir: str, manager, round_idx: int,
             what: str) -> errors.TrainingDiverged:
  """The error that stops a diverged run, naming its last finite
  checkpoint (every checkpoint is finite: `save_checkpoint` refuses
  others)."""
  last = manager.latest_step()
  where = (f'the last finite checkpoint is {workdir_lib.absolute(workdir)}/'
           f'checkpoints/{last} (round {last})' if last is not None else
           'no checkpoint was written before it')
  copt, sopt = config.client_optimizer, config.server_optimizer
  return errors.TrainingDiverged(
      f'Training diverged at round {round_idx}: {what}. Nothing of that '
      f'round was saved; {where}. Start a new --workdir with a lower '
      f'config.client_optimizer.learning_rate (now {copt.learning_rate:g}) '
      f'or server_optimizer.learning_rate (now '
      f'{sopt.get("learning_rate", 1.0):g}), or a gradient clip '
      '(config.client_optimizer.grad_clip).')


def build_algorithm(run: algorithms.Run, params) -> algorithms.Algorithm:
  """The algorithm of `config.algorithm` for `run`, its execution mode
  measured if the config says 'auto' (`autotune`, cached per machine)."""
  name = run.config.get('algorithm', 'fedavg')
  algorithm = algorithms.build(name, run)
  if run.config.federation.mode == 'auto':
    run = autotune.resolve(run, name, params, algorithm.sample_clients(0),
                           algorithm.slots_per_device, log=log)
    algorithm = algorithms.build(name, run)
  log(f'Devices: {run.mesh.size} x {jax.devices()[0].platform}; execution '
      f'mode {algorithm.mode!r}'
      f'{f"[{algorithm.chunk_size}]" if algorithm.mode == "chunked" else ""}'
      f' (config: {run.config.federation.mode!r}).')
  return algorithm



def evaluate(evaluators, state, round_idx: int, num_rounds: int) -> dict:
  """The figures of the evaluators due at `round_idx`, with their seconds;
  printed on one line."""
  figures = {}
  for name, evaluator in evaluators.items():
    if evaluators_lib.is_due(evaluator, round_idx, num_rounds):
      t = time.perf_counter()
      figures.update(evaluator(state, round_idx))
      figures[f'{name}_seconds'] = time.perf_counter() - t
  if figures:
    log(f'  eval at round {round_idx}: ' + ', '.join(
        f'{k} {v:.4g}' for k, v in figures.items()))
  return figures
