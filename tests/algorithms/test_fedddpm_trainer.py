"""FedDDPM+ end to end in the trainer: phase 1 cached, trigger resumed."""

import json
import os

import jax
import numpy as np
import pytest

from configs import mnist_fedddpm
from configs import test as test_config
from fedjax_diff import comm
from fedjax_diff import trainer
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.algorithms import fedddpm


def _config(num_rounds):
  config = test_config.get_config()
  config.num_rounds = num_rounds
  config.checkpoint_every = 1
  config.model.num_classes = 10
  config.diffusion.cond_drop_prob = 0.1
  config.evaluators = {}
  config.algorithm = 'fedddpm'
  # Window 1 and a threshold no improvement reaches: the trigger fires at
  # round 2 (the first with 2 values). One-shot: never again, unless a resumed
  # run forgot that it fired (it would fire again at round 4).
  config.fedddpm = mnist_fedddpm.fedddpm_fields(
      plus=True, pretrain_steps=2, aux_per_class=2, aux_sample_steps=2,
      aux_sample_batch=4, heldout_fraction=0.5, server_batch_size=4,
      correction_steps=3, plus_window=1, plus_threshold=10.0,
      plus_max_corrections=1)
  return config


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('fedddpm'))
  return workdir, trainer.train_and_evaluate(_config(2), workdir)


def test_phase1_cache_metrics_and_bytes(first_run):
  workdir, _ = first_run
  assert os.path.exists(os.path.join(workdir, 'fedddpm', 'aux.npz'))
  with open(os.path.join(workdir, 'fedddpm', 'phase1.json')) as f:
    phase1 = json.load(f)
  assert phase1['aux_images'] == 2 * 10 and phase1['clients'] == 4
  rows = workdir_lib.read_metrics(workdir)
  assert [r['aux_correction'] for r in rows] == [0, 1]
  assert [r['server_aux_steps'] for r in rows] == [0, 3]
  assert rows[1]['aux_heldout_loss_after'] < rows[1]['aux_heldout_loss']
  summary = workdir_lib.read_summary(workdir)
  param_bytes = summary['param_bytes']
  assert summary['one_time_uplink_bytes'] == 4 * param_bytes
  plain = comm.run_summary(
      {'p': jax.ShapeDtypeStruct((param_bytes // 4,), np.float32)}, 2, 3)
  assert summary['total_uplink_bytes'] == (plain['total_uplink_bytes']
                                           + 4 * param_bytes)
  assert summary['server_aux_steps'] == 3
  assert summary['fedddpm_plus_corrections'] == 1


def test_resume_skips_phase1_and_keeps_the_trigger_state(first_run,
                                                         monkeypatch):
  workdir, _ = first_run

  def refuse(**kwargs):
    raise AssertionError('phase 1 ran again on resume')

  monkeypatch.setattr(fedddpm, 'make_phase1', refuse)
  state = trainer.train_and_evaluate(_config(4), workdir)
  assert int(state.round) == 4
  rows = workdir_lib.read_metrics(workdir)
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  assert [r['aux_correction'] for r in rows] == [0, 1, 0, 0]
  assert [r['server_aux_steps'] for r in rows] == [0, 3, 3, 3]
  summary = workdir_lib.read_summary(workdir)
  assert summary['server_aux_steps'] == 3
  assert summary['fedddpm_plus_corrections'] == 1
