r"""Round throughput: the jitted round's execution modes against a Python loop.

  python launch/bench.py --config=configs/mnist_fedavg.py
  python launch/bench.py --config=configs/test.py --modes=vmap,map,loop \
      --repeats=2 --output=/tmp/bench.json
  python launch/bench.py --config=configs/mnist_fedavg.py \
      --config.federation.clients_per_round=8 --chunk_sizes=2,4 --devices=1

Measures client examples per second, `clients_per_round × local_steps ×
batch_size / seconds per round`, of

* the algorithm's jitted round (`config.algorithm`, on the client engine)
  in each execution mode: 'vmap',
  'map', and 'chunked' with each of `--chunk_sizes` that divides the client
  slots per device (others are skipped, saying so), on a mesh of the first
  `--devices` devices;
* 'loop': the baseline of a PyTorch-style simulator on one device, the same
  local training and upload (the algorithm's `local_update`, jitted once for
  one client)
  called client after client from Python, each update folded into a running
  weighted sum by a small jitted function, then the weighted mean, server
  optimizer and EMA in one jitted step.

Every mode uses the same model, client data (built as the trainer builds it),
sampled clients, batch size and local steps, and starts from the same state,
so the first round's training loss should agree between modes (it is
reported as a check). Each mode is compiled ahead of time (`compile s`), runs
`--rounds_warmup` untimed rounds, then `--repeats` rounds each timed to
`jax.block_until_ready`; the table gives the median. `XLA peak MiB` is the
compiler's estimate of the program's peak memory on one device
(`Compiled.memory_analysis()`; for 'loop', the one-client program). The JSON
output also holds the measured process-wide peak: the device's
`peak_bytes_in_use` where the backend reports it, else the growth of the
process's maximum resident set size while the mode ran.
"""

import dataclasses
import importlib.util
import json
import math
import os
import platform as platform_lib
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

# Make `configs` and `fedjax_diff` importable when run from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
from fedjax_diff import federation
from fedjax_diff import models
from fedjax_diff import state as state_lib
from fedjax_diff import trainer

ALL_MODES = ('vmap', 'map', 'chunked', 'loop')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True)
_MODES = flags.DEFINE_list(
    'modes', list(ALL_MODES),
    f'Modes to measure, a comma-separated subset of {ALL_MODES}.')
_CHUNK_SIZES = flags.DEFINE_list(
    'chunk_sizes', ['2', '4'],
    "Clients per chunk for mode 'chunked'; sizes that do not divide the "
    'client slots per device are skipped.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed rounds per mode.',
                                lower_bound=1)
_ROUNDS_WARMUP = flags.DEFINE_integer(
    'rounds_warmup', 1, 'Untimed rounds per mode after compilation.',
    lower_bound=0)
_DEVICES = flags.DEFINE_integer(
    'devices', None, 'Use the first N devices for the client mesh (default: '
    "all). The 'loop' baseline always runs on the first device.",
    lower_bound=1)
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Optional path of a JSON file for the results.')

_MIB = 2.0**20


def log(msg: str) -> None:
  print(f'[bench] {msg}', flush=True)


class Setup:
  """What every mode shares: model, loss, optimizers, data, sampled clients."""

  def __init__(self, config: ml_collections.ConfigDict,
               devices: Sequence[jax.Device], num_rounds: int):
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
    # Data, model, loss and optimizers as the trainer builds them.
    with tempfile.TemporaryDirectory() as workdir:
      self.run, params, _, _ = trainer.setup(config, workdir, self.mesh)
    # Kept on the host: every mode places (and may donate) its own copy.
    self.params = jax.device_get(params)
    self.num_params = models.count_params(self.params)
    self.round_ids = [
        federation.sample_clients(self.num_clients, self.clients_per_round,
                                  self.seed, r) for r in range(num_rounds)]

  def algorithm(self, mode: str, chunk_size: Optional[int] = None):
    """The run's algorithm with the clients of a device run in `mode`."""
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.federation.mode = mode
    config.federation.chunk_size = chunk_size or 0
    return algorithms.build(config.get('algorithm', 'fedavg'),
                            dataclasses.replace(self.run, config=config))

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


def _timed_rounds(name: str, run_round, num_rounds: int,
                  warmup: int) -> tuple[list[float], float]:
  """Runs `run_round(r) -> (outputs, loss)` for r < num_rounds.

  Returns the seconds of the rounds after `warmup` and the first round's loss.
  """
  seconds, first_loss = [], None
  for r in range(num_rounds):
    t = time.perf_counter()
    outputs, loss = run_round(r)
    jax.block_until_ready(outputs)
    dt = time.perf_counter() - t
    if r == 0:
      first_loss = float(loss)
    tag = 'warm-up' if r < warmup else 'timed'
    log(f'{name}: round {r + 1}/{num_rounds} ({tag}) {dt:.3f}s')
    if r >= warmup:
      seconds.append(dt)
  return seconds, first_loss


def bench_jitted(setup: Setup, mode: str, chunk_size: Optional[int],
                 warmup: int, repeats: int) -> dict[str, Any]:
  """Times the algorithm's jitted round in one mode."""
  name = mode if chunk_size is None else f'{mode}[{chunk_size}]'
  mesh = setup.mesh
  probe = MemoryProbe(setup.devices[0])
  algorithm = setup.algorithm(mode, chunk_size)
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

  def run_round(r):
    nonlocal state
    state, metrics = compiled(state, data, *slots[r])
    return (state, metrics), metrics['loss']

  seconds, first_loss = _timed_rounds(name, run_round, warmup + repeats,
                                      warmup)
  return dict(mode=mode, chunk_size=chunk_size, devices=mesh.size,
              compile_s=compile_s, seconds=seconds, first_round_loss=first_loss,
              xla_peak_bytes=_xla_peak_bytes(compiled), **probe.result())


def bench_loop(setup: Setup, warmup: int, repeats: int) -> dict[str, Any]:
  """Times a Python loop over clients on one device (the baseline)."""
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
  client_update = client_update.lower(state.params, images[0], labels[0],
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

  seconds, first_loss = _timed_rounds('loop', run_round, warmup + repeats,
                                      warmup)
  return dict(mode='loop', chunk_size=None, devices=1, compile_s=compile_s,
              seconds=seconds, first_round_loss=first_loss,
              xla_peak_bytes=_xla_peak_bytes(client_update), **probe.result())


def run_benchmark(config: ml_collections.ConfigDict, *,
                  modes: Sequence[str] = ALL_MODES,
                  chunk_sizes: Sequence[int] = (2, 4), repeats: int = 3,
                  rounds_warmup: int = 1, num_devices: Optional[int] = None,
                  config_name: str = '') -> dict[str, Any]:
  """Measures every requested mode; returns {'header', 'results', 'skipped'}.

  Each result has the median `seconds_per_round`, `client_examples_per_second`
  and `speedup_vs_loop` (None without a 'loop' result), besides the raw
  per-round `seconds`, `compile_s`, `first_round_loss` and memory figures.
  """
  unknown = [m for m in modes if m not in ALL_MODES]
  if unknown or not modes:
    raise ValueError(f'--modes={",".join(modes)}: use a non-empty subset of '
                     f'{ALL_MODES}.')
  all_devices = jax.devices()
  n = len(all_devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(all_devices):
    raise ValueError(f'--devices={n}, but there are {len(all_devices)} '
                     f'{all_devices[0].platform} devices.')
  setup = Setup(config, all_devices[:n], rounds_warmup + repeats)
  header = {
      'platform': all_devices[0].platform,
      'device_kind': all_devices[0].device_kind,
      'devices': n,
      'devices_available': len(all_devices),
      'jax_version': jax.__version__,
      'python_version': platform_lib.python_version(),
      'config': config_name,
      'param_count': setup.num_params,
      'num_clients': setup.num_clients,
      'clients_per_round': setup.clients_per_round,
      'slots_per_device': setup.slots_per_device,
      'local_steps': setup.local_steps,
      'batch_size': setup.batch_size,
      'examples_per_round': setup.examples_per_round,
      'repeats': repeats,
      'rounds_warmup': rounds_warmup,
  }
  log(header_line(header))

  results, skipped = [], []
  for mode in modes:
    if mode == 'loop':
      results.append(bench_loop(setup, rounds_warmup, repeats))
    elif mode == 'chunked':
      for c in chunk_sizes:
        c = int(c)
        if c < 1 or setup.slots_per_device % c:
          msg = (f'chunked: skipping chunk_size={c}, which does not divide '
                 f'the {setup.slots_per_device} client slot(s) per device.')
          log(msg)
          skipped.append(msg)
          continue
        results.append(bench_jitted(setup, mode, c, rounds_warmup, repeats))
    else:
      results.append(bench_jitted(setup, mode, None, rounds_warmup, repeats))

  loop_s = next((statistics.median(r['seconds']) for r in results
                 if r['mode'] == 'loop'), None)
  for r in results:
    median = statistics.median(r['seconds'])
    r['clients_per_round'] = setup.clients_per_round
    r['seconds_per_round'] = median
    r['client_examples_per_second'] = setup.examples_per_round / median
    r['speedup_vs_loop'] = None if loop_s is None else loop_s / median
  return {'header': header, 'results': results, 'skipped': skipped}


def header_line(header: dict[str, Any]) -> str:
  return (f"{header['platform']} ({header['device_kind']}), "
          f"{header['devices']} of {header['devices_available']} device(s), "
          f"jax {header['jax_version']}, config {header['config'] or '?'}, "
          f"{header['param_count']:,} model parameters; "
          f"{header['clients_per_round']} of {header['num_clients']} clients "
          f"per round ({header['slots_per_device']} slot(s) per device), "
          f"{header['local_steps']} local steps of batch "
          f"{header['batch_size']}.")


def _fmt(x: Optional[float], spec: str) -> str:
  return '—' if x is None or not math.isfinite(x) else format(x, spec)


def markdown_table(report: dict[str, Any]) -> str:
  """The results as a markdown table, preceded by the header line."""
  lines = [
      header_line(report['header']), '',
      '| mode | chunk | devices | clients/round | compile s | s/round | '
      'client examples/s | speedup vs loop | XLA peak MiB | first-round loss |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for r in report['results']:
    peak = r['xla_peak_bytes']
    lines.append(
        f"| {r['mode']} | {r['chunk_size'] or '—'} | {r['devices']} | "
        f"{r['clients_per_round']} | {r['compile_s']:.2f} | "
        f"{r['seconds_per_round']:.4f} | "
        f"{r['client_examples_per_second']:,.1f} | "
        f"{_fmt(r['speedup_vs_loop'], '.2f')} | "
        f"{_fmt(None if peak is None else peak / _MIB, '.1f')} | "
        f"{_fmt(r['first_round_loss'], '.5f')} |")
  for msg in report['skipped']:
    lines.append(f'\n{msg}')
  return '\n'.join(lines)


def _tfds_dataset(name: str) -> bool:
  """Whether `name` is read from TFDS (not an embedded fedjax_diff dataset)."""
  return (not name.isidentifier() or
          importlib.util.find_spec(f'fedjax_diff.data.{name}') is None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required.')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  if _tfds_dataset(config.data.name):
    # TF reads the data only: keep it off accelerators.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  try:
    config_name = config_flags.get_config_filename(flags.FLAGS['config'])
  except Exception:  # pylint: disable=broad-except
    config_name = ''
  report = run_benchmark(
      config, modes=[m.strip() for m in _MODES.value],
      chunk_sizes=[int(c) for c in _CHUNK_SIZES.value],
      repeats=_REPEATS.value, rounds_warmup=_ROUNDS_WARMUP.value,
      num_devices=_DEVICES.value, config_name=config_name)
  print('\n' + markdown_table(report), flush=True)
  print('\nclient examples/s = clients/round × local steps × batch / median '
        's/round; XLA peak MiB: compiler estimate per device (loop: the '
        'one-client program). The first-round loss should agree across '
        'modes: all start from the same state and clients.', flush=True)
  if _OUTPUT.value:
    out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
    os.makedirs(out_dir, exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump(report, f, indent=2)
    log(f'Wrote {_OUTPUT.value}.')


if __name__ == '__main__':
  app.run(main)
