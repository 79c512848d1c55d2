"""End to end: the workdir contract and bit-for-bit resume, on configs/test.py."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from fedjax_diff import federation
from fedjax_diff import trainer
from fedjax_diff import workdir as workdir_lib


def _config(num_rounds):
  config = test_config.get_config()
  config.num_rounds = num_rounds
  config.checkpoint_every = 2
  return config


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  state = trainer.train_and_evaluate(_config(4), workdir)
  return workdir, state


def test_workdir_contract(straight_run):
  workdir, state = straight_run
  files = set(workdir_lib.all_files(workdir))
  assert 'config.json' in files and 'summary.json' in files
  assert 'label_histogram.txt' in files and 'label_histogram.png' in files
  assert any(f.startswith('events.out.tfevents') for f in files)
  assert any(f.startswith('checkpoints/4/') for f in files)
  samples = sorted(f for f in files if f.startswith('samples/'))
  assert samples == ['samples/round_000002.png', 'samples/round_000004.png']
  grid = np.asarray(Image.open(os.path.join(workdir, samples[-1])))
  assert grid.ndim == 2 and grid.std() > 0  # a real picture, not blank.

  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_rounds'] == 4
  rows = workdir_lib.read_metrics(workdir)
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  params = jax.tree.leaves(state.params)
  param_bytes = sum(p.size * 4 for p in params)
  for row in rows:
    for key in ('loss', 'uplink_bytes', 'downlink_bytes', 'seconds',
                'client_examples_per_second', 'heldout_loss'):
      assert key in row and np.isfinite(row[key]), (key, row)
    # 3 clients per round, each receiving θ and sending Δ in float32.
    assert row['uplink_bytes'] == row['downlink_bytes'] == 3 * param_bytes
    assert row['client_drift'] > 0 and 'upload_rel_error' not in row
  assert int(state.round) == 4
  # The reference config's clients keep their Adam state across rounds: one
  # row per client, whose step count is the local steps it has run.
  assert set(state.client_states) == {'optimizer'}
  counts = [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(
      state.client_states['optimizer']) if 'count' in jax.tree_util.keystr(path)]
  assert len(counts) == 1
  config = _config(4)
  fed = config.federation
  want = np.zeros(counts[0].shape[0], np.int64)
  for r in range(4):
    want[federation.sample_clients(fed.num_clients, fed.clients_per_round,
                                   config.seed, r)] += fed.local_steps
  np.testing.assert_array_equal(counts[0], want)
  summary = workdir_lib.read_summary(workdir)
  assert summary['total_uplink_bytes'] == 4 * 3 * param_bytes
  assert summary['total_bytes'] == 2 * 4 * 3 * param_bytes
  assert summary['uplink_compression_vs_fedavg_fp32'] == 1.0
  assert summary['upload'] == 'fp32'


def test_resume_is_bit_for_bit(straight_run, tmp_path):
  workdir, state = straight_run
  resumed_dir = str(tmp_path / 'resumed')
  first = trainer.train_and_evaluate(_config(2), resumed_dir)
  assert int(first.round) == 2
  resumed = trainer.train_and_evaluate(_config(4), resumed_dir)
  assert int(resumed.round) == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One metrics row per round even across the restart.
  assert [r['round'] for r in workdir_lib.read_metrics(resumed_dir)] == [
      1, 2, 3, 4]


def test_resume_with_other_config_is_refused(straight_run):
  workdir, _ = straight_run
  before = sorted(workdir_lib.all_files(workdir))
  config = _config(4)
  config.model.ch = 16
  with pytest.raises(ValueError, match=r'model\.ch: 8 in the workdir, 16 now'):
    trainer.train_and_evaluate(config, workdir)
  assert sorted(workdir_lib.all_files(workdir)) == before


def test_attribute_labels():
  from fedjax_diff.data import Dataset  # pylint: disable=g-import-not-at-top
  ds = Dataset(images=np.zeros((4, 2, 2, 3), np.uint8),
               labels=np.zeros(4, np.int32), num_classes=1, name='celeb_a',
               attributes={'Male': np.array([0, 1, 0, 1], bool),
                           'Young': np.array([0, 0, 1, 1], bool)})
  out = trainer.attribute_labels(ds, ('Male', 'Young'))
  np.testing.assert_array_equal(out.labels, [0, 1, 2, 3])
  assert out.num_classes == 4
  with pytest.raises(ValueError, match='Smiling'):
    trainer.attribute_labels(ds, ('Smiling',))
