r"""Federation throughput against what users would pick instead, in one run.

  python launch/bench.py --config=configs/mnist_fedavg.py --peer=torch
  python launch/bench.py --config=configs/test.py --modes=vmap,map,loop \
      --repeats=2 --output=/tmp/bench.json
  python launch/bench.py --config=configs/cifar10_fedavg.py --random_data \
      --image_shape=32,32,3 --dtypes=float32,bfloat16   # no dataset needed

Measures client examples per second, `clients_per_round × local_steps ×
batch_size / seconds per round`, of

* the algorithm's jitted round (`config.algorithm`, on the client engine) in
  each execution mode: 'vmap', 'map', and 'chunked' with each of
  `--chunk_sizes` that divides the client slots per device (others are
  skipped, saying so), on a mesh of the first `--devices` devices, in each
  of `--dtypes`;
* 'loop': the same local training and upload (the algorithm's
  `local_update`, jitted once for one client) called client after client
  from Python, each update folded into a running weighted sum by a small
  jitted function, then the server step: a JAX simulator written the
  PyTorch way;
* 'central': the centralized limit, one model trained `local_steps` steps
  on batches of clients_per_round × batch_size (the same examples a round
  trains on) with the client optimizer: what federating costs;
* `--peer=torch`: the PyTorch + diffusers sequential client loop of the
  papers' public code (launch/torch_peer.py), same widths, data, optimizer.

Every contender is compiled and runs its `--rounds_warmup` untimed rounds
first; then their `--repeats` timed rounds are interleaved (round r of each,
then round r + 1 of each), so that the load of a shared machine drifting
over minutes falls on all of them alike. For each it reports compile seconds
and the compilations of the jitted function over the timed rounds (1 means
no recompilation), the median seconds per timed round,
achieved TFLOP/s (training ≈ 3 forward passes × 2 FLOPs per MAC of
`models.macs`) and MFU against the device's peak (`peak_flops`: a table of
GPU/TPU datasheet figures, on CPU a measured matmul peak), the XLA
compiler's peak memory per device, and with `--memory` the memory one more
client per device costs (the round compiled with one more slot, plus the
client's resident data and rows) and how many clients per device would fit.
Ratios are to the loop, the torch peer and the centralized limit measured in
the same run: absolute times on a shared machine are noisy, ratios less so.
"""

import dataclasses
import json
import math
import os
import platform as platform_lib
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

# Make `configs` and `fedjax_diff` (and launch/torch_peer.py) importable when
# run from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from fedjax_diff import algorithms
from fedjax_diff import client as client_lib
from fedjax_diff import experiment
from fedjax_diff import federation
from fedjax_diff import host_devices
from fedjax_diff import models
from fedjax_diff import state as state_lib

ALL_MODES = ('vmap', 'map', 'chunked', 'loop', 'central')
PEERS = ('none', 'torch')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True)
_MODES = flags.DEFINE_list(
    'modes', list(ALL_MODES),
    f'Modes to measure, a comma-separated subset of {ALL_MODES}.')
_CHUNK_SIZES = flags.DEFINE_list(
    'chunk_sizes', ['2', '4'],
    "Clients per chunk for mode 'chunked'; sizes that do not divide the "
    'client slots per device are skipped.')
_PEER = flags.DEFINE_enum('peer', 'none', PEERS,
                          'Also time the PyTorch sequential client loop.')
_DTYPES = flags.DEFINE_list(
    'dtypes', None, 'Compute dtypes of the jitted modes (config.model.dtype '
    'values); default: the config\'s.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds per mode.',
                                lower_bound=1)
_ROUNDS_WARMUP = flags.DEFINE_integer(
    'rounds_warmup', 1, 'Untimed rounds per mode after compilation.',
    lower_bound=0)
_DEVICES = flags.DEFINE_list(
    'devices', None, 'Client mesh sizes: the jitted modes run on a mesh of '
    'the first N devices for each N listed, e.g. 1,2 (default: all devices). '
    "'loop', 'central' and the peer run on the first device. A CPU host "
    'has --cpu_devices devices.')
_CPU_DEVICES = flags.DEFINE_string('cpu_devices', 'auto',
                                   host_devices.FLAG_HELP)
_MEMORY = flags.DEFINE_bool(
    'memory', False, 'Also compile each jitted mode with one more client '
    'slot per device: memory per client and clients per device that fit.')
_RANDOM_DATA = flags.DEFINE_bool(
    'random_data', False, 'Random uint8 client data of --image_shape instead '
    'of the config\'s dataset (nothing to load or download).')
_IMAGE_SHAPE = flags.DEFINE_list(
    'image_shape', None, 'H,W,C of --random_data (default: '
    'config.data.image_size, square, 3 channels).')
_EXAMPLES_PER_CLIENT = flags.DEFINE_integer(
    'examples_per_client', 256, 'Examples per client of --random_data.',
    lower_bound=1)
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Optional path of a JSON file for the results.')

_MIB = 2.0**20

# Dense peak FLOP/s per chip from the vendors' datasheets (no sparsity), by
# compute dtype. GPUs: NVIDIA H100/H200 SXM, A100 SXM; TPUs: Google Cloud
# TPU system architecture pages (per chip).
PEAK_FLOPS = {
    'H200': {'bfloat16': 989e12, 'float32': 67e12},
    'H100': {'bfloat16': 989e12, 'float32': 67e12},
    'A100': {'bfloat16': 312e12, 'float32': 19.5e12},
    'L4': {'bfloat16': 121e12, 'float32': 30.3e12},
    'T4': {'bfloat16': 65e12, 'float32': 8.1e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12 / 4},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12 / 4},
    'TPU v5e': {'bfloat16': 197e12, 'float32': 197e12 / 4},
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12 / 4},
    'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12 / 4},
}


def log(msg: str) -> None:
  print(f'[bench] {msg}', flush=True)


def random_client_data(config, image_shape, examples_per_client: int,
                       seed: int) -> tuple[federation.ClientData, int]:
  """Random uint8 images of every client and labels over 10 classes."""
  rng = np.random.default_rng(seed)
  n = int(config.federation.num_clients)
  images = rng.integers(0, 256, (n, examples_per_client) + tuple(image_shape),
                        dtype=np.uint8)
  labels = rng.integers(0, 10, (n, examples_per_client)).astype(np.int32)
  counts = np.full((n,), examples_per_client, np.int32)
  return federation.ClientData(images=images, labels=labels,
                               counts=counts), 10


class Setup:
  """What every mode shares: model, loss, optimizers, data, sampled clients."""

  def __init__(self, config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device], num_rounds: int,
               random_data: Optional[tuple[tuple[int, ...], int]] = None):
    fed = config.federation
    self.config = config
    self.seed = int(config.seed)
    self.devices = list(devices)
    self.mesh = federation.client_mesh(self.devices)
    self.num_clients = int(fed.num_clients)
    self.clients_per_round = int(fed.clients_per_round)
    self.local_steps = int(fed.local_steps)
    self.batch_size = int(fed.batch_size)
    self.ema_decay = float(config.ema_decay)
    if random_data is None:
      # Data, model, loss and optimizers as the trainer builds them.
      from fedjax_diff import trainer  # pylint: disable=g-import-not-at-top
      with tempfile.TemporaryDirectory() as workdir:
        self.run, params, _, _ = trainer.setup(config, workdir, self.mesh)
    else:
      image_shape, per_client = random_data
      data, num_classes = random_client_data(config, image_shape, per_client,
                                             self.seed)
      model, params = experiment.init_model(config, image_shape)
      self.run = experiment.make_run(
          config, model=model, params=params,
          data=federation.shard_client_data(data, self.mesh),
          num_clients=self.num_clients, num_classes=num_classes,
          image_shape=image_shape, mesh=self.mesh, log=log)
    # Kept on the host: every mode places (and may donate) its own copy.
    self.params = jax.device_get(params)
    self.num_params = models.count_params(self.params)
    self.flops_per_example = experiment.model_flops_per_example(self.run)
    self.round_ids = [
        federation.sample_clients(self.num_clients, self.clients_per_round,
                                  self.seed, r) for r in range(num_rounds)]

  def algorithm(self, mode: str, chunk_size: Optional[int] = None,
                dtype: Optional[str] = None):
    """The run's algorithm with the clients of a device run in `mode` and
    the model computing in `dtype`."""
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.federation.mode = mode
    config.federation.chunk_size = chunk_size or 0
    run = dataclasses.replace(self.run, config=config)
    if dtype is not None and dtype != config.model.get('dtype', 'float32'):
      config.model.dtype = dtype
      model = self.run.model.clone(dtype=models.unet.compute_dtype(dtype))
      run = experiment.make_run(
          config, model=model, params=self.params, data=run.data,
          num_clients=run.num_clients, num_classes=run.num_classes,
          image_shape=run.image_shape, mesh=run.mesh, log=log)
    return algorithms.build(config.get('algorithm', 'fedavg'), run)

  def initial_state(self, algorithm):
    return algorithm.initial_state(self.params,
                                   jax.random.PRNGKey(self.seed + 1))

  @property
  def examples_per_round(self) -> int:
    return self.clients_per_round * self.local_steps * self.batch_size

  @property
  def slots_per_device(self) -> int:
    return federation.max_slots_per_device(
        self.round_ids, self.run.data.num_clients, self.mesh.size)


def peak_flops(device: jax.Device, dtype: str) -> tuple[Optional[float], str]:
  """(peak FLOP/s of one device for `dtype`, where the figure comes from).

  GPUs and TPUs: `PEAK_FLOPS` by device kind. CPU: measured, the best of a
  few float32 matmuls of 2048² (so MFU on CPU is against what XLA's matmul
  reaches on this machine, not a datasheet).
  """
  kind = device.device_kind
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peaks.get(dtype), f'datasheet ({name}, {dtype})'
  if device.platform != 'cpu':
    return None, f'unknown device kind {kind!r}'
  n = 2048
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  best = min(_seconds(lambda: jax.block_until_ready(matmul(a)))
             for _ in range(5))
  return 2.0 * n ** 3 / best, 'measured float32 matmul'


def _seconds(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


class MemoryProbe:
  """The measured peak memory of the process while a mode runs."""

  def __init__(self, device: jax.Device):
    self.device = device
    stats = device.memory_stats()
    self.device_peak = (stats or {}).get('peak_bytes_in_use')
    self.max_rss = _max_rss_bytes()

  def result(self) -> dict[str, Optional[int]]:
    if self.device_peak is not None:
      stats = self.device.memory_stats() or {}
      return {'device_peak_bytes': stats.get('peak_bytes_in_use'),
              'max_rss_growth_bytes': None}
    return {'device_peak_bytes': None,
            'max_rss_growth_bytes': _max_rss_bytes() - self.max_rss}


def _max_rss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == 'darwin' else rss * 1024  # Linux: KiB.


def device_memory_bytes(device: jax.Device) -> Optional[int]:
  """What one device can hold: its allocator's limit, or on CPU the host's
  available memory."""
  stats = device.memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _xla_peak_bytes(compiled) -> Optional[int]:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  peak = getattr(analysis, 'peak_memory_in_bytes', 0)
  if peak:
    return int(peak)
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
             analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


@dataclasses.dataclass
class Contender:
  """One thing timed: a jitted mode, the loop, the centralized limit or the
  peer, compiled and warmed up. `run_round(r) -> (outputs, loss)` runs its
  round r on its own state; `result` holds what was measured while
  preparing it; `compilations()` counts its jitted function's compilations
  (None for the peer)."""
  name: str
  run_round: Callable[[int], tuple[Any, Any]]
  result: dict[str, Any]
  compilations: Callable[[], Optional[int]] = lambda: None


def _warm_up(name: str, run_round, warmup: int) -> Optional[float]:
  """Runs the untimed rounds 0..warmup-1; returns round 0's loss."""
  first_loss = None
  for r in range(warmup):
    t = time.perf_counter()
    outputs, loss = run_round(r)
    jax.block_until_ready(outputs)
    if r == 0:
      first_loss = float(loss)
    log(f'{name}: round {r + 1} (warm-up) {time.perf_counter() - t:.3f}s')
  return first_loss


def time_interleaved(contenders: Sequence[Contender], warmup: int,
                     repeats: int) -> None:
  """Times rounds warmup..warmup+repeats-1 of every contender, interleaved:
  round r of each, then round r + 1 of each, ... so that a change in the
  machine's load during the run falls on all of them alike (a shared
  machine's load drifts over minutes; ratios of phases timed one after the
  other would carry that drift). Fills each result's `seconds`,
  `compilations` and, without warm-up, `first_round_loss`."""
  for c in contenders:
    c.result['seconds'] = []
  for r in range(warmup, warmup + repeats):
    for c in contenders:
      t = time.perf_counter()
      outputs, loss = c.run_round(r)
      jax.block_until_ready(outputs)
      dt = time.perf_counter() - t
      if r == 0:
        c.result['first_round_loss'] = float(loss)
      log(f'{c.name}: round {r + 1} (timed) {dt:.3f}s')
      c.result['seconds'].append(dt)
  for c in contenders:
    c.result['compilations'] = c.compilations()


def per_client_memory(setup: Setup, algorithm, state,
                      peak_bytes: Optional[int]) -> dict[str, Any]:
  """What one more client per device costs, and how many fit.

  The round compiled with one more slot per device gives the compiler's
  peak for one more client (its activations and, under vmap, its model
  copy); a client's resident data row and rows add to it.
  """
  mesh, data = setup.mesh, setup.run.data
  per = setup.slots_per_device
  slots = federation.round_slots(setup.round_ids[0], mesh.size,
                                 data.num_clients, per + 1)
  bigger = _xla_peak_bytes(
      algorithm.make_round(donate=False).lower(state, data, *slots).compile())
  rows = sum(x.nbytes // x.shape[0] for x in jax.tree.leaves(
      (data, state.client_states)))
  if bigger is None or peak_bytes is None:
    return {'bytes_per_client': None, 'max_clients_per_device': None}
  per_client = max(bigger - peak_bytes, 0) + rows
  limit = device_memory_bytes(setup.devices[0])
  fit = (None if limit is None or per_client <= 0 else
         per + max(limit - peak_bytes, 0) // per_client)
  return {'bytes_per_client': per_client, 'max_clients_per_device': fit}


def prepare_jitted(setup: Setup, mode: str, chunk_size: Optional[int],
                   warmup: int, dtype: Optional[str] = None,
                   memory: bool = False) -> Contender:
  """The algorithm's jitted round in one mode and dtype."""
  name = mode if chunk_size is None else f'{mode}[{chunk_size}]'
  dtype = dtype or setup.config.model.get('dtype', 'float32')
  name += f' {dtype}'
  mesh = setup.mesh
  probe = MemoryProbe(setup.devices[0])
  algorithm = setup.algorithm(mode, chunk_size, dtype)
  round_fn = algorithm.make_round()
  data = setup.run.data
  state = setup.initial_state(algorithm)
  slots = [federation.round_slots(ids, mesh.size, data.num_clients,
                                  setup.slots_per_device)
           for ids in setup.round_ids]

  log(f'{name}: compiling on {mesh.size} device(s)...')
  t = time.perf_counter()
  compiled = round_fn.lower(state, data, *slots[0]).compile()
  compile_s = time.perf_counter() - t
  log(f'{name}: compiled in {compile_s:.1f}s.')
  peak = _xla_peak_bytes(compiled)
  mem = (per_client_memory(setup, algorithm, state, peak) if memory else
         {'bytes_per_client': None, 'max_clients_per_device': None})

  def run_round(r):
    nonlocal state
    # Through the jitted function: its cache counts the compilations.
    state, metrics = round_fn(state, data, *slots[r])
    return (state, metrics), metrics['loss']

  first_loss = _warm_up(name, run_round, warmup)
  return Contender(
      name, run_round,
      dict(mode=mode, chunk_size=chunk_size, dtype=dtype, devices=mesh.size,
           compile_s=compile_s, first_round_loss=first_loss,
           xla_peak_bytes=peak, **mem, **probe.result()),
      round_fn._cache_size)  # pylint: disable=protected-access


def prepare_loop(setup: Setup, warmup: int) -> Contender:
  """A Python loop over clients on one device (the baseline)."""
  device = setup.devices[0]
  probe = MemoryProbe(device)

  def put(x):
    return jax.device_put(x, device)

  algorithm = setup.algorithm('map')
  server_opt = setup.run.server_optimizer

  def one_client(params, images, labels, count, key, round_idx):
    u = algorithm.local_update(
        params, client_lib.LocalData(images, labels, count), key, {},
        round_idx)
    return u.update, u.loss

  client_update = jax.jit(one_client)

  def accumulate(acc, delta, weight):
    total, weight_sum = acc
    return (jax.tree.map(lambda a, d: a + weight * d, total, delta),
            weight_sum + weight)

  def server_step(state, acc):
    total, weight_sum = acc
    mean = jax.tree.map(lambda t: t / weight_sum, total)
    updates, opt_state = server_opt.update(
        jax.tree.map(jnp.negative, mean), state.opt_state, state.params)
    return state_lib.advance(state, optax.apply_updates(state.params, updates),
                             opt_state, setup.ema_decay)

  # Every client's data on the device once, as a simulator would hold it.
  data = jax.device_get(setup.run.data)
  images = [put(data.images[k]) for k in range(setup.num_clients)]
  labels = [put(data.labels[k]) for k in range(setup.num_clients)]
  counts = [put(np.int32(c)) for c in data.counts]
  weights = [put(np.float32(c)) for c in data.counts]
  state = put(jax.device_get(setup.initial_state(algorithm)))

  def zeros():
    return (jax.tree.map(jnp.zeros_like, state.params),
            jnp.zeros((), jnp.float32))

  log('loop: compiling the one-client update and the server step...')
  t = time.perf_counter()
  key = jax.random.fold_in(state.rng, 0)
  compiled_update = client_update.lower(state.params, images[0], labels[0],
                                        counts[0], key, state.round).compile()
  acc = zeros()
  delta_shapes = jax.eval_shape(lambda p: p, state.params)
  accumulate = jax.jit(accumulate, donate_argnums=(0,)).lower(
      acc, delta_shapes, weights[0]).compile()
  server_step = jax.jit(server_step, donate_argnums=(0,)).lower(
      state, acc).compile()
  compile_s = time.perf_counter() - t
  log(f'loop: compiled in {compile_s:.1f}s.')

  def run_round(r):
    nonlocal state
    round_key = jax.random.fold_in(state.rng, state.round)
    acc = zeros()
    losses = []
    for k in setup.round_ids[r]:
      delta, loss = client_update(state.params, images[k], labels[k],
                                  counts[k], jax.random.fold_in(round_key, k),
                                  state.round)
      acc = accumulate(acc, delta, weights[k])
      losses.append(loss)
    state = server_step(state, acc)
    w = np.asarray(data.counts[setup.round_ids[r]], np.float64)
    loss = jnp.dot(jnp.stack(losses), jnp.asarray(w / w.sum(), jnp.float32))
    return (state, loss), loss

  first_loss = _warm_up('loop', run_round, warmup)
  return Contender(
      'loop', run_round,
      dict(mode='loop', chunk_size=None, devices=1, compile_s=compile_s,
           first_round_loss=first_loss,
           xla_peak_bytes=_xla_peak_bytes(compiled_update), **probe.result()),
      client_update._cache_size)  # pylint: disable=protected-access


def prepare_central(setup: Setup, warmup: int) -> Contender:
  """The centralized limit: one model, `local_steps` steps of batch
  clients_per_round × batch_size drawn from all the clients' data (a round's
  examples), with the client optimizer, on one device."""
  device = setup.devices[0]
  probe = MemoryProbe(device)
  data = jax.device_get(setup.run.data)
  real = np.asarray(data.counts) > 0
  images = np.concatenate([x[:n] for x, n in zip(data.images[real],
                                                 data.counts[real])])
  labels = np.concatenate([y[:n] for y, n in zip(data.labels[real],
                                                  data.counts[real])])
  images, labels = jax.device_put((images, labels), device)
  batch = setup.clients_per_round * setup.batch_size
  train = client_lib.make_local_training(
      setup.run.loss_fn, setup.run.client_optimizer, setup.local_steps,
      batch, bool(setup.config.data.get('random_flip', False)))

  def step(params, key, round_idx):
    params, loss, _ = train(params, images, labels,
                            jnp.int32(images.shape[0]), key, round_idx)
    return params, loss

  fn = jax.jit(step, donate_argnums=(0,))
  params = jax.device_put(jax.tree.map(jnp.copy, setup.params), device)
  key = jax.random.PRNGKey(setup.seed)
  log('central: compiling...')
  t = time.perf_counter()
  compiled = fn.lower(params, key, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t

  def run_round(r):
    nonlocal params
    params, loss = fn(params, jax.random.fold_in(key, r), jnp.int32(r))
    return params, loss

  first_loss = _warm_up('central', run_round, warmup)
  return Contender(
      'central', run_round,
      dict(mode='central', chunk_size=None, devices=1, compile_s=compile_s,
           first_round_loss=first_loss,
           xla_peak_bytes=_xla_peak_bytes(compiled), **probe.result()),
      fn._cache_size)  # pylint: disable=protected-access


def prepare_torch(setup: Setup, warmup: int) -> Contender:
  """The PyTorch peer (launch/torch_peer.py) on the same data and rounds."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_peer  # pylint: disable=g-import-not-at-top
  data = jax.device_get(setup.run.data)
  loop = torch_peer.TorchLoop(
      setup.config, data, setup.run.image_shape,
      np.asarray(setup.run.schedule.alphas_cumprod), setup.seed)

  def run_round(r):
    loss = loop.round(setup.round_ids[r])
    return None, loss

  first_loss = _warm_up('torch', run_round, warmup)
  return Contender(
      'torch', run_round,
      dict(mode='torch', chunk_size=None, devices=1, compile_s=0.0,
           first_round_loss=first_loss, xla_peak_bytes=None,
           torch_params=loop.num_params, torch_threads=torch.get_num_threads(),
           torch_version=torch.__version__))


def run_benchmark(config: ml_collections.ConfigDict, *,
                  modes: Sequence[str] = ALL_MODES,
                  chunk_sizes: Sequence[int] = (2, 4), repeats: int = 3,
                  rounds_warmup: int = 1,
                  num_devices: Optional[Sequence[int]] = None,
                  peer: str = 'none', dtypes: Optional[Sequence[str]] = None,
                  memory: bool = False,
                  random_data: Optional[tuple[tuple[int, ...], int]] = None,
                  config_name: str = '') -> dict[str, Any]:
  """Measures every requested mode; returns {'header', 'results', 'skipped'}.

  Each result has the median `seconds_per_round`, `client_examples_per_second`,
  `tflops`, `mfu` and the ratios `speedup_vs_loop`, `vs_torch`, `vs_central`
  (None without that baseline), besides the raw per-round `seconds`,
  `compile_s`, `compilations`, `first_round_loss` and memory figures.
  """
  unknown = [m for m in modes if m not in ALL_MODES]
  if unknown or not modes:
    raise ValueError(f'--modes={",".join(modes)}: use a non-empty subset of '
                     f'{ALL_MODES}.')
  if peer not in PEERS:
    raise ValueError(f'--peer={peer}: use one of {PEERS}.')
  all_devices = jax.devices()
  sizes = [len(all_devices)] if not num_devices else [
      int(n) for n in num_devices]
  for n in sizes:
    if not 1 <= n <= len(all_devices):
      raise ValueError(
          f'--devices={",".join(map(str, sizes))}: {n} is not in 1..'
          f'{len(all_devices)}, the {all_devices[0].platform} devices this '
          'process has (on CPU, --cpu_devices=K gives K).')
  dtypes = list(dtypes or [config.model.get('dtype', 'float32')])
  for d in dtypes:
    models.unet.compute_dtype(d)  # Refuses an unknown name now.
  # One setup (data sharded on its mesh) per mesh size; the first also
  # serves the loop, the centralized limit and the peer.
  setups = {n: Setup(config, all_devices[:n], rounds_warmup + repeats,
                     random_data) for n in dict.fromkeys(sizes)}
  setup = setups[sizes[0]]
  header = {
      'platform': all_devices[0].platform,
      'device_kind': all_devices[0].device_kind,
      'devices': sizes,
      'devices_available': len(all_devices),
      'jax_version': jax.__version__,
      'python_version': platform_lib.python_version(),
      'config': config_name,
      'random_data': random_data is not None,
      'param_count': setup.num_params,
      'image_shape': list(setup.run.image_shape),
      'train_flops_per_example': setup.flops_per_example,
      'num_clients': setup.num_clients,
      'clients_per_round': setup.clients_per_round,
      'slots_per_device': {n: s.slots_per_device for n, s in setups.items()},
      'local_steps': setup.local_steps,
      'batch_size': setup.batch_size,
      'examples_per_round': setup.examples_per_round,
      'repeats': repeats,
      'rounds_warmup': rounds_warmup,
  }
  header['peak_flops'] = {}
  for d in dtypes:
    value, source = peak_flops(all_devices[0], d)
    header['peak_flops'][d] = {'flops': value, 'source': source}
  log(header_line(header))

  contenders, skipped = [], []
  for mode in modes:
    if mode == 'loop':
      contenders.append(prepare_loop(setup, rounds_warmup))
    elif mode == 'central':
      contenders.append(prepare_central(setup, rounds_warmup))
    else:
      for s in setups.values():
        for c in (chunk_sizes if mode == 'chunked' else [None]):
          if c is not None and (c < 1 or s.slots_per_device % c):
            msg = (f'chunked: skipping chunk_size={c} on {s.mesh.size} '
                   f'device(s), which does not divide the '
                   f'{s.slots_per_device} client slot(s) per device.')
            log(msg)
            skipped.append(msg)
            continue
          for d in dtypes:
            contenders.append(prepare_jitted(s, mode, c, rounds_warmup, d,
                                             memory))
  if peer == 'torch':
    import torch_peer  # pylint: disable=g-import-not-at-top
    why = torch_peer.available()
    if why:
      msg = f'--peer=torch skipped: {why}.'
      log(msg)
      skipped.append(msg)
    else:
      contenders.append(prepare_torch(setup, rounds_warmup))
  time_interleaved(contenders, rounds_warmup, repeats)
  results = [c.result for c in contenders]

  baseline = {m: next((statistics.median(r['seconds']) for r in results
                       if r['mode'] == m), None)
              for m in ('loop', 'torch', 'central')}
  for r in results:
    median = statistics.median(r['seconds'])
    r.setdefault('dtype', config.model.get('dtype', 'float32'))
    r['clients_per_round'] = setup.clients_per_round
    r['seconds_per_round'] = median
    r['client_examples_per_second'] = setup.examples_per_round / median
    flops = (None if setup.flops_per_example is None else
             setup.flops_per_example * r['client_examples_per_second'])
    peak = header['peak_flops'].get(r['dtype'], {}).get('flops')
    # A CPU host's fake devices share its cores: its peak is the host's.
    devices = 1 if header['platform'] == 'cpu' else r['devices']
    r['tflops'] = None if flops is None else flops / 1e12
    r['mfu'] = (None if flops is None or not peak else
                flops / (peak * devices))
    r['speedup_vs_loop'] = (None if baseline['loop'] is None else
                            baseline['loop'] / median)
    r['vs_torch'] = (None if baseline['torch'] is None else
                     baseline['torch'] / median)
    r['vs_central'] = (None if baseline['central'] is None else
                       baseline['central'] / median)
  return {'header': header, 'results': results, 'skipped': skipped}


def header_line(header: dict[str, Any]) -> str:
  flops = header.get('train_flops_per_example')
  peaks = ', '.join(
      f"{d}: {_fmt(None if p['flops'] is None else p['flops'] / 1e12, '.2f')} "
      f"TFLOP/s ({p['source']})"
      for d, p in header.get('peak_flops', {}).items())
  slots = ', '.join(f'{k} on a mesh of {n}'
                    for n, k in header['slots_per_device'].items())
  return (f"{header['platform']} ({header['device_kind']}), "
          f"client meshes of {', '.join(map(str, header['devices']))} of "
          f"{header['devices_available']} device(s), "
          f"jax {header['jax_version']}, config {header['config'] or '?'}"
          f"{' on random data' if header.get('random_data') else ''}, "
          f"{header['param_count']:,} model parameters, "
          f"{_fmt(None if flops is None else flops / 1e9, '.3f')} GFLOP per "
          f"training example; "
          f"{header['clients_per_round']} of {header['num_clients']} clients "
          f"per round (slots per device: {slots}), "
          f"{header['local_steps']} local steps of batch "
          f"{header['batch_size']}. Peak: {peaks or '—'}.")


def _fmt(x: Optional[float], spec: str) -> str:
  return '—' if x is None or not math.isfinite(x) else format(x, spec)


def markdown_table(report: dict[str, Any]) -> str:
  """The results as a markdown table, preceded by the header line."""
  lines = [
      header_line(report['header']), '',
      '| mode | chunk | dtype | devices | compile s | compilations | s/round | '
      'client examples/s | vs loop | vs torch | vs central | TFLOP/s | MFU | '
      'XLA peak MiB | MiB/client | clients/device fit | first-round loss |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in report['results']:
    peak = r['xla_peak_bytes']
    per_client = r.get('bytes_per_client')
    lines.append(
        f"| {r['mode']} | {r['chunk_size'] or '—'} | "
        f"{r['dtype'] if r['mode'] != 'torch' else 'float32'} | "
        f"{r['devices']} | {r['compile_s']:.2f} | "
        f"{r['compilations'] if r['compilations'] is not None else '—'} | "
        f"{r['seconds_per_round']:.4f} | "
        f"{r['client_examples_per_second']:,.1f} | "
        f"{_fmt(r['speedup_vs_loop'], '.2f')} | "
        f"{_fmt(r['vs_torch'], '.2f')} | {_fmt(r['vs_central'], '.2f')} | "
        f"{_fmt(r['tflops'], '.4f')} | {_fmt(r['mfu'], '.3f')} | "
        f"{_fmt(None if peak is None else peak / _MIB, '.1f')} | "
        f"{_fmt(None if per_client is None else per_client / _MIB, '.2f')} | "
        f"{r.get('max_clients_per_device') or '—'} | "
        f"{_fmt(r['first_round_loss'], '.5f')} |")
  for msg in report['skipped']:
    lines.append(f'\n{msg}')
  return '\n'.join(lines)


def _image_shape(config) -> tuple[int, int, int]:
  if _IMAGE_SHAPE.value:
    return tuple(int(x) for x in _IMAGE_SHAPE.value)
  size = config.data.get('image_size')
  if not size:
    raise app.UsageError('--random_data needs --image_shape=H,W,C (the '
                         'config has no data.image_size).')
  return (int(size), int(size), 3)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required.')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  try:
    host_devices.configure(_CPU_DEVICES.value,
                           host_devices.clients_per_round(config))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  random_data = None
  if _RANDOM_DATA.value:
    random_data = (_image_shape(config), _EXAMPLES_PER_CLIENT.value)
  else:
    try:
      # TF reads the data only: keep it off accelerators.
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], 'GPU')
    except ImportError:
      pass
  try:
    config_name = config_flags.get_config_filename(flags.FLAGS['config'])
  except Exception:  # pylint: disable=broad-except
    config_name = ''
  report = run_benchmark(
      config, modes=[m.strip() for m in _MODES.value],
      chunk_sizes=[int(c) for c in _CHUNK_SIZES.value],
      repeats=_REPEATS.value, rounds_warmup=_ROUNDS_WARMUP.value,
      num_devices=_DEVICES.value, peer=_PEER.value, dtypes=_DTYPES.value,
      memory=_MEMORY.value, random_data=random_data, config_name=config_name)
  print('\n' + markdown_table(report), flush=True)
  print('\nclient examples/s = clients/round × local steps × batch / median '
        's/round; vs X = X\'s s/round / this one\'s (higher is faster); MFU = '
        'achieved FLOP/s / (devices × peak); XLA peak MiB: compiler estimate '
        'per device (loop: the one-client program). The first-round loss '
        'agrees across the JAX modes of a dtype (same state, clients, keys).',
        flush=True)
  if _OUTPUT.value:
    out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
    os.makedirs(out_dir, exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump(report, f, indent=2)
    log(f'Wrote {_OUTPUT.value}.')


if __name__ == '__main__':
  app.run(main)
