"""`config.eval_params`: the evaluators judge the EMA (default) or the raw
global model (FedPhD's code evaluates the raw one, arXiv 2507.06449)."""

import dataclasses
import os
import types

import jax
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from fedjax_diff import data as data_lib
from fedjax_diff import evaluators as evaluators_lib
from fedjax_diff import models
from fedjax_diff import trainer
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.evaluators import _generative
from fedjax_diff.evaluators import base


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = test_config.get_config()
  model = models.unet_from_config(config.model)
  init = jax.jit(lambda k: models.init_params(model, k, (8, 8, 1)))
  a = init(jax.random.key(0, impl='rbg'))
  b = init(jax.random.key(1, impl='rbg'))
  test = data_lib.load_dataset('digits', 'test')
  ctx = evaluators_lib.EvalContext(
      eps_fn=models.make_eps_fn(model),
      schedule=make_schedule('linear', config.diffusion.num_timesteps),
      test_data=test, image_shape=(8, 8, 1), num_classes=None,
      workdir=str(tmp_path_factory.mktemp('wd')), seed=0,
      write_images=lambda *a: None)
  return ctx, a, b


def _state(ema, raw):
  return types.SimpleNamespace(ema_params=ema, params=raw)


def test_denoising_loss_judges_the_chosen_model(setup):
  ctx, a, b = setup
  cfg = ml_collections.ConfigDict(dict(num_examples=64, batch_size=32))
  ema_ev = evaluators_lib.build_evaluators(
      ml_collections.ConfigDict({'denoising_loss': cfg}), ctx)
  raw_ctx = dataclasses.replace(ctx, params='raw')
  raw_ev = evaluators_lib.build_evaluators(
      ml_collections.ConfigDict({'denoising_loss': cfg}), raw_ctx)
  on_ema = ema_ev['denoising_loss'](_state(a, b), 1)
  on_raw = raw_ev['denoising_loss'](_state(a, b), 1)
  assert set(on_ema) == {'heldout_loss', 'heldout_loss_raw'}
  assert set(on_raw) == {'heldout_loss', 'heldout_loss_ema'}
  # The raw evaluator judges b, the EMA one a; each reports the other too.
  assert on_raw['heldout_loss'] == on_ema['heldout_loss_raw']
  assert on_raw['heldout_loss_ema'] == on_ema['heldout_loss']
  assert on_raw['heldout_loss'] != on_ema['heldout_loss']


def test_samples_come_from_the_chosen_model(setup):
  ctx, a, b = setup
  cfg = base.parse(ml_collections.ConfigDict(dict(num_samples=8, batch_size=8,
                                                 num_steps=2)),
                   _generative.FIELDS, 'config.evaluators.fid')
  raw = _generative.Generator(cfg, dataclasses.replace(ctx, params='raw'))
  ema = _generative.Generator(cfg, ctx)
  got = raw(_state(a, b), 1)
  np.testing.assert_array_equal(got, ema(_state(b, a), 2))
  assert not np.array_equal(got, ema(_state(a, b), 3))


def test_bad_eval_params_is_refused_before_anything_is_written(setup,
                                                               tmp_path):
  ctx, _, _ = setup
  with pytest.raises(ValueError, match="'ema', 'raw'"):
    dataclasses.replace(ctx, params='best')
  config = test_config.get_config()
  config.eval_params = 'best'
  with pytest.raises(ValueError, match='eval_params'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
