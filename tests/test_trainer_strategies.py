"""End to end with strategies: FedDM-prox + FedDM-quant in one trainer run.

One tiny run of configs/test.py (2 rounds, no evaluators) and a one-round
resume of it; the strategies themselves are tested against Python loops in
tests/algorithms/test_fedavg_upload.py.
"""

import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from fedjax_diff import comm
from fedjax_diff import trainer
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.strategies import build


def test_prox_and_quantized_run_resumes_bit_for_bit(tmp_path):
  """FedDM-prox + 4-bit FedDM-quant (MSE scales, error feedback) in one
  config: exact bytes in metrics.jsonl and summary.json, and a resume
  that recomputes the last round from a checkpoint reproduces the error
  feedback residuals and everything else bit for bit."""
  config = test_config.get_config()
  config.checkpoint_every = 1
  config.prox_mu = 0.01
  config.upload.quantize_bits = 4
  config.upload.scale_method = 'mse'
  config.upload.error_feedback = True
  config.evaluators = ml_collections.ConfigDict()
  workdir = str(tmp_path / 'combined')
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.round) == 2

  params = jax.tree.leaves(state.params)
  param_bytes = sum(p.size * 4 for p in params)
  upload = build.upload_from_config(config)
  upload_bytes = comm.message_bytes(upload, state.params)
  assert upload_bytes < param_bytes / 6
  rows = workdir_lib.read_metrics(workdir)
  assert [r['round'] for r in rows] == [1, 2]
  for row in rows:
    assert row['uplink_bytes'] == 3 * upload_bytes
    assert row['downlink_bytes'] == 3 * param_bytes
    assert 0 < row['upload_rel_error'] < 1 and row['client_drift'] > 0
  summary = workdir_lib.read_summary(workdir)
  assert summary['total_uplink_bytes'] == 2 * 3 * upload_bytes
  assert summary['total_downlink_bytes'] == 2 * 3 * param_bytes
  assert summary['uplink_compression_vs_fedavg_fp32'] == pytest.approx(
      param_bytes / upload_bytes)
  # One residual row per client (4, padded to 8 for 8 devices); padding
  # clients never train.
  residual = jax.tree.leaves(state.client_states['upload']['residual'])
  assert all(r.shape[0] == 8 for r in residual)
  assert any(np.any(np.asarray(r)[:4] != 0) for r in residual)
  assert all(np.all(np.asarray(r)[4:] == 0) for r in residual)

  resumed_dir = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, 'checkpoints', '2'))
  resumed = trainer.train_and_evaluate(config, resumed_dir)
  leaves = jax.tree.leaves(state)
  assert len(leaves) == len(jax.tree.leaves(resumed))
  for a, b in zip(leaves, jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [r['round'] for r in workdir_lib.read_metrics(resumed_dir)] == [1, 2]


def test_fedphd_protocol_run_resumes_bit_for_bit(tmp_path):
  """FedPhD's protocol (configs/*_fedphd.py: hierarchy without a final
  cloud, torch-pruning's rule, one shared client Adam, the raw model
  evaluated) through the trainer: the shared state counts every client's
  steps, the final global model is the last cloud round's, and a resume
  from a checkpoint reproduces the shared state and everything else."""
  from configs import mnist_fedphd  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  mnist_fedphd.fedphd_protocol(config)
  config.algorithm = 'fedphd'
  config.hierarchy = mnist_fedphd.hierarchy_block(agg_a=100, select_scale=50)
  config.pruning = mnist_fedphd.pruning_block(0.3)
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=1, num_examples=32, batch_size=16)))
  workdir = str(tmp_path / 'fedphd')
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.round) == 2
  rows = workdir_lib.read_metrics(workdir)
  # The cloud aggregates at round 0 only (k = 5, no final cloud): the
  # global model of round 2 is round 1's, and so is its held-out loss.
  assert [r['cloud'] for r in rows] == [1, 0]
  assert rows[0]['heldout_loss'] == rows[1]['heldout_loss']
  assert 'heldout_loss_ema' in rows[1]
  # One Adam: 2 rounds × 3 clients × 2 local steps.
  counts = [int(x) for x in jax.tree.leaves(state.client_opt_state)
            if np.issubdtype(np.asarray(x).dtype, np.integer)]
  assert counts == [2 * 3 * 2]
  assert state.client_states == {}
  info = workdir_lib.read_summary(workdir)['pruning']
  assert info['rule'] == 'torch_pruning'
  # ch=8, ch_mult=(1, 2), 4 GroupNorm groups at 0.3: 4 blocks of ⌊2·0.7⌋ = 1
  # and ⌊4·0.7⌋ = 2 positions; attention at 4×4 reads the stream entering
  # up_1's upsampling, so it keeps 8 too; time embedding ⌊32·0.7⌋ = 22.
  assert (info['stem_width'], info['level_widths'],
          info['upsample_in_widths'], info['temb_width']) == (
              4, [4, 8], [4, 8], 22)

  resumed_dir = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, 'checkpoints', '2'))
  resumed = trainer.train_and_evaluate(config, resumed_dir)
  leaves = jax.tree.leaves(state)
  assert len(leaves) == len(jax.tree.leaves(resumed))
  for a, b in zip(leaves, jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
