"""`federation.mode='auto'`: the execution mode that measures fastest.

How the clients of one device run ('vmap' all at once, 'map' one after
another, 'chunked' in groups; see `fedjax_diff.engine`) decides a round's
speed, and no rule of thumb holds across backends: a vmapped convolution
over per-client weights is a grouped convolution, fast on some backends and
very slow on others (jax issues 13800 and 26568). So on the first run the
trainer measures: for each candidate it builds the run's algorithm with that
mode and a few local steps, compiles its round on the real shapes (model,
data, slots), times `repeats` rounds of every candidate interleaved after a
warm-up one, and keeps the fastest per local step. The choice is cached in
`<cache_dir>/autotune.json` under a key of everything it depends on
(backend, device kind and count, jax version, algorithm, model parameter
shapes, data shape, slots per device, batch size, compute dtype), so later
runs and resumes on the same machine reuse it without measuring, unless
the machine was busy with other work while it measured.
"""

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from fedjax_diff import algorithms
from fedjax_diff import engine
from fedjax_diff import federation


def cache_dir() -> str:
  """$FEDJAX_DIFF_CACHE, else ~/.cache/fedjax_diff (as the evaluators')."""
  return os.environ.get('FEDJAX_DIFF_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'fedjax_diff')


def candidates(slots_per_device: int) -> list[tuple[str, Optional[int]]]:
  """'vmap', 'map', and 'chunked' at the largest proper divisor of the
  slots, if any (one chunked candidate: each costs a compilation)."""
  if slots_per_device == 1:
    return [('map', None)]  # One client per device: all modes are one.
  out = [('vmap', None), ('map', None)]
  divisors = [c for c in range(2, slots_per_device)
              if slots_per_device % c == 0]
  if divisors:
    out.append(('chunked', divisors[-1]))
  return out


def cache_key(run: algorithms.Run, algorithm: str,
              slots_per_device: int) -> str:
  """A hash of everything the choice depends on."""
  device = run.mesh.devices.flat[0]
  shapes = sorted((jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype))
                  for path, x in jax.tree_util.tree_leaves_with_path(
                      run.param_shapes))
  what = dict(
      platform=device.platform, device_kind=device.device_kind,
      devices=run.mesh.size, jax=jax.__version__, algorithm=algorithm,
      params=shapes, data=list(run.data.images.shape),
      slots_per_device=slots_per_device,
      batch_size=int(run.config.federation.batch_size),
      dtype=str(run.config.model.get('dtype', 'float32')))
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest(
      )[:16]


def _with_mode(run: algorithms.Run, mode: str, chunk_size: Optional[int],
               local_steps: int) -> algorithms.Run:
  config = ml_collections.ConfigDict(run.config.to_dict())
  config.federation.mode = mode
  config.federation.chunk_size = chunk_size or 0
  config.federation.local_steps = local_steps
  return dataclasses.replace(run, config=config)


def measure(run: algorithms.Run, algorithm: str, params, client_ids,
            modes: list[tuple[str, Optional[int]]], *, local_steps: int = 2,
            repeats: int = 2) -> list[dict]:
  """Compiles the round of `algorithm` in each (mode, chunk_size) of
  `modes`, then times them interleaved: a warm-up round of each, then round
  r of each for r < `repeats`, so that a change in the machine's load falls
  on all of them alike. Returns one {'mode', 'chunk_size', 'compile_s',
  'seconds_per_step'} per mode (the median round over local steps)."""
  prepared = []
  for mode, chunk_size in modes:
    alg = algorithms.build(algorithm, _with_mode(run, mode, chunk_size,
                                                 local_steps))
    state = alg.initial_state(params, jax.random.PRNGKey(0))
    slots = federation.round_slots(client_ids, run.mesh.size,
                                   run.data.num_clients,
                                   alg.slots_per_device)
    t = time.perf_counter()
    round_fn = alg.make_round().lower(state, run.data, *slots).compile()
    prepared.append(dict(mode=mode, chunk_size=chunk_size,
                         compile_s=time.perf_counter() - t, fn=round_fn,
                         state=state, slots=slots, seconds=[]))
  for r in range(repeats + 1):
    for p in prepared:
      t = time.perf_counter()
      p['state'], metrics = p['fn'](p['state'], run.data, *p['slots'])
      jax.block_until_ready((p['state'], metrics))
      if r:  # Round 0 warms up.
        p['seconds'].append(time.perf_counter() - t)
  return [dict(mode=p['mode'], chunk_size=p['chunk_size'],
               compile_s=p['compile_s'],
               seconds_per_step=float(np.median(p['seconds'])) / local_steps)
          for p in prepared]


def machine_busy() -> Optional[str]:
  """Why timings taken now would not hold later (other work on the machine:
  a 1-minute load average above the cores), or None."""
  try:
    load = os.getloadavg()[0]
  except OSError:
    return None
  cores = os.cpu_count() or 1
  if load > cores:
    return f'load average {load:.1f} on {cores} core(s)'
  return None


def choose(run: algorithms.Run, algorithm: str, params, client_ids,
           slots_per_device: int, *, cache: Optional[str] = None,
           log: Callable[[str], None] = print,
           **measure_kwargs) -> tuple[str, Optional[int]]:
  """The fastest (mode, chunk_size) for `run`, measured once and cached.

  A choice measured while the machine was busy with other work
  (`machine_busy`) is used for this run but not cached: under load a
  vectorized mode can time faster or slower than it runs alone.

  Args:
    run: the run (its config's mode is ignored).
    algorithm: the algorithm's name.
    params: initial parameters (copied by every measurement; not donated).
    client_ids: a round's clients, e.g. round 0's.
    slots_per_device: the run's slots per device.
    cache: the cache directory (default `cache_dir()`); '' disables it.
    log: where the table goes.
    **measure_kwargs: `local_steps`, `repeats` of `measure`.
  """
  cache = cache_dir() if cache is None else cache
  key = cache_key(run, algorithm, slots_per_device)
  path = os.path.join(cache, 'autotune.json') if cache else ''
  table = {}
  if path and os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  if key in table:
    hit = table[key]
    log(f"Execution mode 'auto': {_name(hit)} (measured before, cached in "
        f'{path}).')
    return hit['mode'], hit['chunk_size']
  if len(candidates(slots_per_device)) == 1:
    return candidates(slots_per_device)[0]
  log(f"Execution mode 'auto': measuring the candidates on the real shapes "
      f'({slots_per_device} client slot(s) per device)...')
  busy = machine_busy()
  results = measure(run, algorithm, jax.device_get(params), client_ids,
                    candidates(slots_per_device), **measure_kwargs)
  busy = busy or machine_busy()
  best = min(results, key=lambda r: r['seconds_per_step'])
  lines = ['| mode | chunk | compile s | ms per local step |',
           '|---|---|---|---|']
  lines += [f"| {r['mode']} | {r['chunk_size'] or '—'} | "
            f"{r['compile_s']:.1f} | {1e3 * r['seconds_per_step']:.1f} |"
            for r in results]
  log('\n'.join(lines))
  log(f"Execution mode 'auto': {_name(best)} is the fastest.")
  if busy:
    log(f"Execution mode 'auto': not cached, measured under other work "
        f'({busy}); the next run measures again.')
  elif path:
    os.makedirs(cache, exist_ok=True)
    table[key] = dict(best, measured=results)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(table, f, indent=2)
    os.replace(tmp, path)
  return best['mode'], best['chunk_size']


def _name(result: dict) -> str:
  chunk = result['chunk_size']
  return result['mode'] + (f'[{chunk}]' if chunk else '')


def resolve(run: algorithms.Run, algorithm: str, params, client_ids,
            slots_per_device: int, **kwargs) -> algorithms.Run:
  """`run` with its config's federation.mode resolved: unchanged unless it
  is 'auto', then the measured choice of `choose`."""
  if run.config.federation.mode != 'auto':
    engine.resolve_mode(run.config.federation.mode)  # Validates the name.
    return run
  mode, chunk = choose(run, algorithm, params, client_ids, slots_per_device,
                       **kwargs)
  return _with_mode(run, mode, chunk,
                    int(run.config.federation.local_steps))
