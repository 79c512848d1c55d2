"""Multi-host: two processes on localhost (jax.distributed over gloo, 2 CPU
devices each) train configs/test.py for 3 rounds, are killed after round 1's
checkpoint and resumed; their final parameters equal a one-process, 4-device
run's.

Both runs have the same 4-device mesh, clients, slots and keys, and run the
same per-device program; what differs is the transport of the cross-device
sums (the aggregate's psum): gloo between processes, XLA's in-process
all-reduce otherwise. They add the 4 devices' terms in different orders,
which changes float32 sums in the last bit, and Adam carries that on, so the
parameters are compared at atol 1e-5 / rtol 1e-5 (measured: at most about
1e-7 apart after 3 rounds). One Adam step of the config's learning rate
(2e-3) moves a parameter 200 times further, so a wrong client, key or
resumed state would fail it.

It takes minutes (five process starts and three compilations on 2 cores:
325 s on jax 0.10.2 and 365 s on jax 0.12 with the machine shared with other
work, load about 5). CI must run it, so it stays in the fast tier
(tests/slow_tier.py's KEEP); under `-n 2` one worker runs it while the other
goes on with the rest.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from fedjax_diff import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-5, 1e-5
ROUNDS = 3
TIMEOUT = 900


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  for k in ('JAX_COMPILATION_CACHE_DIR',
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'):
    env.pop(k, None)
  return env


def _command(workdir, cache, *extra):
  # configs/test.py:tiny (a 4-channel UNet without attention, one local
  # step, no evaluators, a checkpoint every round) with one resolution
  # level: three compilations of two processes fit CI's budget.
  return [sys.executable, os.path.join(ROOT, 'launch', 'train.py'),
          '--config=' + os.path.join(ROOT, 'configs', 'test.py') + ':tiny',
          f'--config.num_rounds={ROUNDS}', '--config.model.ch_mult=(1,)',
          f'--workdir={workdir}', f'--jax_cache_dir={cache}', *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start_pair(workdir, cache, logs):
  port = _free_port()
  procs = []
  for i in range(2):
    log = open(logs / f'p{i}.log', 'ab')  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(
        _command(workdir, cache, f'--coordinator_address=localhost:{port}',
                 '--num_processes=2', f'--process_id={i}'),
        env=_env(2), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
  return procs


def _wait(procs, logs):
  deadline = time.time() + TIMEOUT
  for p in procs:
    try:
      rc = p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      rc = 'timeout'
    if rc != 0:
      raise AssertionError(f'a process ended with {rc}:\n' + '\n'.join(
          (logs / f'p{i}.log').read_text(errors='replace')[-3000:]
          for i in range(2) if (logs / f'p{i}.log').exists()))


def _params(workdir):
  _, state = workdir_lib.load_run(str(workdir))
  assert state.round == ROUNDS
  return state


def test_two_processes_with_a_kill_equal_one_process(tmp_path):
  cache = tmp_path / 'jax_cache'
  logs = tmp_path
  # One process, 4 devices, uninterrupted.
  single = tmp_path / 'single'
  out = subprocess.run(_command(single, cache), env=_env(4), cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT,
                       check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert 'backend cpu, 4 devices (cpu), 4 on this host; process 0 of 1' in (
      out.stdout)

  # Two processes of 2 devices; killed once round 1's checkpoint is written.
  multi = tmp_path / 'multi'
  procs = _start_pair(multi, cache, logs)
  ckpt = multi / 'checkpoints' / '1'
  deadline = time.time() + TIMEOUT
  while not ckpt.is_dir() and all(p.poll() is None for p in procs):
    assert time.time() < deadline, 'no checkpoint of round 1 in time'
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert ckpt.is_dir(), (logs / 'p0.log').read_text()[-3000:]
  steps = sorted(int(d.name) for d in (multi / 'checkpoints').iterdir()
                 if d.name.isdigit())
  assert steps and steps[-1] < ROUNDS, f'killed too late: {steps}'

  procs = _start_pair(multi, cache, logs)
  _wait(procs, logs)
  log0 = (logs / 'p0.log').read_text()
  log1 = (logs / 'p1.log').read_text()
  assert 'Resumed from' in log0
  assert 'process 0 of 2' in log0 and '4 devices (cpu), 2 on this host' in log0
  # Only process 0 prints progress.
  assert f'[round {ROUNDS}/{ROUNDS}]' in log0
  assert '[round' not in log1 and 'Resumed from' not in log1

  want, got = _params(single), _params(multi)
  worst = 0.0
  for name in ('params', 'ema_params'):
    a, b = getattr(want, name), getattr(got, name)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      x, y = np.asarray(x), np.asarray(y)
      np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL)
      worst = max(worst, float(np.max(np.abs(y - x), initial=0.0)))
  print(f'largest parameter difference, 2 processes vs 1: {worst:.3g}')
  # Per-client figures were gathered from both processes (the drift is a
  # mean over all sampled clients); process 0 alone wrote one row a round.
  rows_single = workdir_lib.read_metrics(str(single))
  rows_multi = workdir_lib.read_metrics(str(multi))
  assert [r['round'] for r in rows_multi] == list(range(1, ROUNDS + 1))
  np.testing.assert_allclose(rows_multi[-1]['client_drift'],
                             rows_single[-1]['client_drift'], rtol=1e-4)
