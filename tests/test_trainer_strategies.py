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
