"""Trainer runs with config.pruning (FedPhD's structured pruning)."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from fedjax_diff import models
from fedjax_diff import trainer
from fedjax_diff.strategies import pruning_schedule


def _config(**pruning):
  config = test_config.get_config()
  config.num_rounds = 1
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=1, num_examples=16, batch_size=16)))
  config.pruning = ml_collections.ConfigDict(pruning)
  return config


def test_config_errors():
  with pytest.raises(ValueError, match='ratio'):
    pruning_schedule.config_from(_config(ratio=1.5))
  with pytest.raises(ValueError, match='importance'):
    pruning_schedule.config_from(_config(ratio=0.5, importance='l1'))
  with pytest.raises(ValueError, match='sparse_rounds'):
    pruning_schedule.config_from(_config(ratio=0.5, schedule='after_sparse'))
  config = _config(ratio=0.5)
  config.pruning = None
  assert pruning_schedule.config_from(config) is None


def test_after_sparse_taylor_run_trains_the_compact_unet(tmp_path):
  config = _config(ratio=0.5, importance='taylor', schedule='after_sparse',
                   sparse_rounds=1, lasso=1e-3, taylor_batches=2,
                   taylor_examples=8)
  workdir = str(tmp_path / 'run')
  state = trainer.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  info = summary['pruning']
  # test config: ch=8, ch_mult=(1, 2), 4 GroupNorm groups; ratio 0.5 keeps
  # 4 of 8 and 8 of 16 channels, and 16 of the 32 time-embedding ones.
  assert info['level_widths'] == [4, 8] and info['stem_width'] == 4
  assert info['temb_width'] == 16
  assert info['params_after'] < 0.4 * info['params_before']
  assert info['macs_after'] < 0.4 * info['macs_before']
  assert models.count_params(state.params) == info['params_after']
  # The sparse stage ran the full UNet with the group lasso in its own dir.
  with open(os.path.join(workdir, 'sparse', 'config.json')) as f:
    assert json.load(f)['group_lasso'] == 1e-3
  with open(os.path.join(workdir, 'sparse', 'summary.json')) as f:
    assert json.load(f)['param_bytes'] == 4 * info['params_before']
  # Communication counts the compact model.
  assert summary['param_bytes'] == 4 * info['params_after']
  model = pruning_schedule.model_for_run(config, workdir)
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (8, 8, 1)))
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape,
                                                        state.params)
