"""launch/evaluate.py: evaluators on a workdir's checkpoint, no training."""

import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import test as test_config
from fedjax_diff import data as data_lib
from fedjax_diff import models
from fedjax_diff import state as state_lib
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import make_schedule

import launch_scripts

evaluate = launch_scripts.load('evaluate')


def test_restores_the_checkpoint_and_runs_the_evaluators(tmp_path):
  config = test_config.get_config()
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=1, num_examples=32, batch_size=16)))
  workdir = str(tmp_path)
  workdir_lib.check_and_write_config(workdir, config)
  model = models.unet_from_config(config.model)
  params = jax.jit(lambda k: models.init_params(model, k, (8, 8, 1)))(
      jax.random.key(3, impl='rbg'))
  # EMA params distinct from the raw ones: the output layer's bias + 1
  # (ε̂ off by 1 everywhere: the ε-loss grows by about 1).
  def shift(path, p):
    name = jax.tree_util.keystr(path)
    return p + 1.0 if 'conv_out' in name and 'bias' in name else p
  ema = jax.tree_util.tree_map_with_path(shift, params)
  state = state_lib.init_server_state(params, optax.sgd(1.0),
                                      jax.random.PRNGKey(0), {})
  state = state.replace(ema_params=ema, round=state.round + 7)
  manager = workdir_lib.checkpoint_manager(workdir)
  workdir_lib.save_checkpoint(manager, 7, state)
  manager.close()

  round_idx, figures, seconds = evaluate.evaluate_workdir(workdir)
  assert round_idx == 7 and set(seconds) == {'denoising_loss'}
  # The evaluator's figure, recomputed from the saved EMA params.
  test = data_lib.load_dataset('digits', 'test')
  schedule = make_schedule('linear', config.diffusion.num_timesteps)
  key = jax.random.PRNGKey(config.seed + 7919)
  x = test.images[:32].astype(np.float32) / 127.5 - 1.0
  loss = jax.jit(lambda p, xb, k: diffusion_loss(
      models.make_eps_fn(model), p, schedule, xb, k, labels=None,
      train=False))
  losses = [loss(ema, x[i * 16:(i + 1) * 16], jax.random.fold_in(key, i))
            for i in range(2)]
  assert figures['heldout_loss'] == pytest.approx(float(np.mean(losses)),
                                                  rel=1e-5)
  assert figures['heldout_loss'] > figures['heldout_loss_raw'] + 0.5

  with pytest.raises(ValueError, match='not in the evaluators'):
    evaluate.evaluate_workdir(workdir, only=['fid'])
  with pytest.raises(FileNotFoundError, match='no checkpoint 3'):
    evaluate.evaluate_workdir(workdir, step=3)
