"""Runs that survive faults, end to end on `configs/test.py:tiny`.

Injected client faults finish with a finite model and are counted in
metrics.jsonl; a diverging run stops without saving a non-finite state and
names its last finite checkpoint; a resume survives a torn metrics line,
truncated array files and a truncated _METADATA; a run killed with SIGKILL
at random moments and resumed ends bit for bit where an uninterrupted run
does.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import launch_scripts
from configs import test as test_config
from fedjax_diff import errors
from fedjax_diff import trainer
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.strategies import faults

ROUNDS = 3


def tiny(num_rounds=ROUNDS, **overrides):
  config = test_config.get_config('tiny')
  config.num_rounds = num_rounds
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def checkpoint_steps(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def saved_state(workdir, step):
  """A checkpoint's arrays, as Orbax restores them without a target."""
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step),
                      'default')
  return jax.tree.leaves(ocp.PyTreeCheckpointer().restore(path))


def assert_same_leaves(a, b):
  assert len(a) == len(b) and a
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rounds_logged(workdir):
  return [r['round'] for r in workdir_lib.read_metrics(workdir)]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted run: its workdir and final state."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  state = trainer.train_and_evaluate(tiny(), workdir)
  return workdir, state


def test_injected_faults_finish_and_are_counted(tmp_path):
  """A third of the clients drop out and a third upload NaN every round:
  the run ends with a finite model that moved, and metrics.jsonl counts
  them."""
  workdir = str(tmp_path)
  config = tiny(**{'faults.dropout': 0.33, 'faults.nan': 0.34})
  state = trainer.train_and_evaluate(config, workdir)
  assert not faults.non_finite_leaves(state)  # On the host: no new programs.
  init = tiny()
  rows = workdir_lib.read_metrics(workdir)
  assert [r['round'] for r in rows] == [1, 2, 3]
  for row in rows:
    assert (row['faults_dropout'], row['faults_nan'], row['clients_dropped'],
            row['clients_nonfinite']) == (1, 1, 2, 1), row
    assert np.isfinite(row['loss'])
  assert init.federation.clients_per_round == 3
  assert [s for s in checkpoint_steps(workdir)] == [1, 2, 3]


@pytest.mark.parametrize('overrides,at_round,last', [
    ({'client_optimizer.learning_rate': 1e39}, 1, None),
    ({'server_optimizer.learning_rate': 1e30}, 2, 1),
])
def test_diverging_run_stops_without_saving_poison(tmp_path, overrides,
                                                   at_round, last):
  """A learning rate of 1e39 (every client's update is NaN at round 1) or a
  server step of 1e30 (huge but finite weights after round 1, NaN clients
  at round 2): the run stops with a message naming the real last finite
  checkpoint, and every checkpoint left holds finite values only."""
  workdir = str(tmp_path)
  with pytest.raises(errors.TrainingDiverged) as info:
    trainer.train_and_evaluate(tiny(**overrides), workdir)
  msg = str(info.value)
  assert f'Training diverged at round {at_round}' in msg
  assert 'non-finite' in msg and 'learning_rate' in msg
  if last is None:
    assert 'no checkpoint was written' in msg
  else:
    assert f'checkpoints/{last} (round {last})' in msg
  steps = checkpoint_steps(workdir)
  assert steps == ([] if last is None else list(range(1, last + 1)))
  for step in steps:
    assert all(np.all(np.isfinite(x)) for x in saved_state(workdir, step)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def test_save_refuses_a_non_finite_state(tmp_path, straight):
  _, state = straight
  poisoned = state.replace(ema_params=jax.tree.map(
      lambda x: x * np.nan, state.ema_params))
  manager = workdir_lib.checkpoint_manager(str(tmp_path))
  with pytest.raises(errors.TrainingDiverged, match='ema_params'):
    workdir_lib.save_checkpoint(manager, 1, poisoned)
  assert manager.all_steps() == []


def _first_run(tmp_path, num_rounds=ROUNDS):
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(tiny(num_rounds), workdir)
  return workdir


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, straight, capsys):
  workdir = _first_run(tmp_path, 2)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"round": 3, "loss": 0.9')       # killed while writing.
  assert rounds_logged(workdir) == [1, 2]
  state = trainer.train_and_evaluate(tiny(), workdir)
  assert 'dropped a torn last line' in capsys.readouterr().out
  assert rounds_logged(workdir) == [1, 2, 3]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert all(json.loads(line) for line in f)
  assert_same_leaves(jax.tree.leaves(straight[1]), jax.tree.leaves(state))


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(max(1, os.path.getsize(path) // 2))


def _train_subprocess(workdir, num_rounds, **kwargs):
  return subprocess.Popen(
      [sys.executable, 'launch/train.py', '--config=configs/test.py:tiny',
       f'--workdir={workdir}', f'--config.num_rounds={num_rounds}',
       '--jax_cache_dir='],
      cwd=launch_scripts.ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, **kwargs)


def test_corrupt_checkpoints_fall_back(tmp_path, straight):
  """The newest checkpoint has truncated array files, the one before a
  truncated _METADATA: a new process warns naming each, moves them aside,
  resumes from the newest intact one and ends where the uninterrupted run
  does. (A new process, as after a crash: one that wrote the arrays may
  still hold them in TensorStore's cache.)"""
  workdir = _first_run(tmp_path)
  step_dir = lambda step: os.path.join(workdir, 'checkpoints', str(step),
                                       'default')
  for data in (os.path.join(step_dir(3), 'd'),
               os.path.join(step_dir(3), 'ocdbt.process_0', 'd')):
    for name in os.listdir(data):
      _truncate(os.path.join(data, name))
  _truncate(os.path.join(step_dir(2), '_METADATA'))
  proc = _train_subprocess(workdir, ROUNDS)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  for step in (3, 2):
    assert f'checkpoint {step} in {workdir}/checkpoints is unusable' in out
    assert os.path.isdir(os.path.join(workdir, 'checkpoints_bad', str(step)))
  assert f'Resumed from {workdir}/checkpoints at round 1' in out
  assert checkpoint_steps(workdir) == [1, 2, 3]
  assert_same_leaves(saved_state(straight[0], ROUNDS),
                     saved_state(workdir, ROUNDS))
  assert rounds_logged(workdir) == [1, 2, 3]


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
  workdir = _first_run(tmp_path, 1)
  _truncate(os.path.join(workdir, 'checkpoints', '1', 'default',
                         '_METADATA'))
  with pytest.raises(errors.ConfigError, match='No intact checkpoint'):
    trainer.train_and_evaluate(tiny(1), workdir)


def _run_until_killed(workdir, rng, kill_after_round):
  """Starts launch/train.py and SIGKILLs it at a random moment: before its
  first round (kill_after_round None) or a random delay after it printed
  round `kill_after_round` (in training, or while saving a checkpoint).
  Returns whether it was killed (rather than finishing)."""
  proc = _train_subprocess(workdir, KILL_ROUNDS)
  ready = threading.Event()
  lines = []

  def read():
    for line in proc.stdout:
      lines.append(line)
      if (kill_after_round is None and 'Devices:' in line) or (
          kill_after_round is not None and
          f'[round {kill_after_round}/' in line):
        ready.set()
    ready.set()

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  ready.wait(timeout=600)
  time.sleep(rng.uniform(0.0, 1.5))
  killed = proc.poll() is None
  if killed:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  reader.join(timeout=10)
  assert killed or proc.returncode == 0, ''.join(lines)
  return killed


KILL_ROUNDS = 8


def test_sigkill_at_random_moments_then_resume_is_bit_for_bit(tmp_path):
  """Three SIGKILLs at random moments (during start-up, and at random
  delays after random rounds: in training or in a checkpoint save), then a
  run to the end: the final checkpoint equals an uninterrupted run's on
  every leaf, and every round is logged exactly once."""
  straight_dir = str(tmp_path / 'straight')
  trainer.train_and_evaluate(tiny(KILL_ROUNDS), straight_dir)
  workdir = str(tmp_path / 'killed')
  rng = random.Random(int(os.environ.get('FEDJAX_KILL_SEED', '13')))
  kills = 0
  second = rng.randint(1, 2)
  for after in (None, second, rng.randint(second + 2, KILL_ROUNDS - 3)):
    kills += _run_until_killed(workdir, rng, after)
  assert kills == 3
  proc = _train_subprocess(workdir, KILL_ROUNDS)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert_same_leaves(saved_state(straight_dir, KILL_ROUNDS),
                     saved_state(workdir, KILL_ROUNDS))
  assert rounds_logged(workdir) == list(range(1, KILL_ROUNDS + 1))
