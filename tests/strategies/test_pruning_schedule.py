"""config.pruning (FedPhD's structured pruning in a run): the trainer's
`pruning_schedule.sparse_stage` and `prepare`, and the group lasso of
`config.group_lasso`."""

import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from fedjax_diff import experiment
from fedjax_diff import models
from fedjax_diff import trainer
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.models import channel_groups as cg
from fedjax_diff.models import compact as compact_lib
from fedjax_diff.strategies import build
from fedjax_diff.strategies import pruning
from fedjax_diff.strategies import pruning_schedule

IMAGE = (8, 8, 1)


def _config(**pruning_fields):
  config = test_config.get_config()
  config.model = ml_collections.ConfigDict(dict(
      ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
      dropout=0.0, num_groups=4, num_classes=None, conv_impl='auto'))
  config.pruning = ml_collections.ConfigDict(pruning_fields)
  return config


def _params(model, seed):
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), IMAGE))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def _prepare(config, workdir, params):
  model = models.unet_from_config(config.model)
  schedule = make_schedule('linear', 100)
  images = np.random.default_rng(0).integers(0, 256, (16, *IMAGE), np.uint8)
  return pruning_schedule.prepare(
      config, workdir, model, params, image_shape=IMAGE,
      loss_fn_for=lambda m: experiment.make_loss_fn(models.make_eps_fn(m),
                                                 schedule, config),
      images=images, labels=None, seed=0, log=lambda msg: None)


def test_config_errors():
  with pytest.raises(ValueError, match='ratio'):
    pruning_schedule.config_from(_config(ratio=1.5))
  with pytest.raises(ValueError, match='ratio'):
    pruning_schedule.config_from(_config(importance='l2'))
  with pytest.raises(ValueError, match='importance'):
    pruning_schedule.config_from(_config(ratio=0.5, importance='l1'))
  with pytest.raises(ValueError, match='sparse_rounds'):
    pruning_schedule.config_from(_config(ratio=0.5, schedule='after_sparse'))
  with pytest.raises(ValueError, match='schedule'):
    pruning_schedule.config_from(_config(ratio=0.5, schedule='during'))
  with pytest.raises(ValueError, match='rule'):
    pruning_schedule.config_from(_config(ratio=0.5, rule='ceil'))
  with pytest.raises(ValueError, match='importance_params'):
    pruning_schedule.config_from(_config(ratio=0.5,
                                         importance_params='biases'))
  with pytest.raises(ValueError, match='penalty'):
    pruning_schedule.config_from(_config(ratio=0.5, penalty='l1'))
  config = _config(ratio=0.5)
  config.pruning = None
  assert pruning_schedule.config_from(config) is None
  # Each rule's importance terms by default; FedPhD's rule by default.
  cfg = pruning_schedule.config_from(_config(ratio=0.5))
  assert (cfg.rule, cfg.importance_params, cfg.penalty) == (
      'torch_pruning', 'kernels', 'group_lasso')
  cfg = pruning_schedule.config_from(_config(ratio=0.5, rule='nearest'))
  assert cfg.importance_params == 'all'
  cfg = pruning_schedule.config_from(_config(ratio=0.5, rule='nearest',
                                             importance_params='kernels'))
  assert cfg.importance_params == 'kernels'


def test_no_pruning_returns_the_model_unchanged(tmp_path):
  config = _config()
  config.pruning = None
  model = models.unet_from_config(config.model)
  params = _params(model, 0)
  got_model, got_params, info = _prepare(config, str(tmp_path), params)
  assert info is None and got_params is params
  assert got_model == model


@pytest.mark.parametrize('rule,ratio,widths', [
    # ch=8, ch_mult=(1, 2), 4 GroupNorm groups: ratio 0.5 keeps 4 of 8 and 8
    # of 16 channels, 16 of the 32 time-embedding ones, 8 of the 16 that
    # enter the upsampling conv (no GroupNorm reads them).
    ('torch_pruning', 0.5, (4, (4, 8), (4, 8), 16)),
    # 0.3: 4 blocks of ⌊2·0.7⌋ = 1 and ⌊4·0.7⌋ = 2 positions, ⌊22.4⌋ and
    # ⌊11.2⌋ channels; 'nearest' rounds 2.8 up to 3 positions.
    ('torch_pruning', 0.3, (4, (4, 8), (4, 11), 22)),
    ('nearest', 0.3, (4, (4, 12), (4, 11), 22)),
])
def test_before_prunes_and_compacts_the_initial_unet(tmp_path, rule, ratio,
                                                      widths):
  config = _config(ratio=ratio, importance='l2', schedule='before',
                   rule=rule)
  model = models.unet_from_config(config.model)
  params = _params(model, 0)
  small, small_params, info = _prepare(config, str(tmp_path), params)
  assert (small.stem_width, tuple(small.level_widths),
          tuple(small.upsample_in_widths), small.temb_width) == widths
  groups = cg.unet_channel_groups(params, 4)
  # The rule's ranking: torch-pruning's Σθ² over kernels, else ‖θ‖₂ of all.
  if rule == 'torch_pruning':
    importance = {k: v ** 2 for k, v in pruning.l2_importance(
        params, groups, 'kernels').items()}
  else:
    importance = pruning.l2_importance(params, groups, 'all')
  channels = pruning.select(importance, groups, ratio, rule)
  want = compact_lib.compact_params(params, groups, channels)
  for a, b in zip(jax.tree.leaves(small_params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert info['params_after'] == models.count_params(small_params)
  assert (info['rule'], info['importance_params']) == (
      rule, pruning.DEFAULT_IMPORTANCE_PARAMS[rule])
  if ratio == 0.5:
    assert info['params_after'] < 0.4 * info['params_before']
    assert info['macs_after'] < 0.4 * info['macs_before']
  with open(tmp_path / 'pruning.json') as f:
    assert json.load(f) == json.loads(json.dumps(info))
  # A tool restoring the run's checkpoint builds the same compact UNet.
  restored = pruning_schedule.model_for_run(config, str(tmp_path))
  shapes = jax.eval_shape(
      lambda: models.init_params(restored, jax.random.key(0), IMAGE))
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape,
                                                        small_params)


def test_sparse_stage_config():
  config = _config(ratio=0.5, importance='taylor', schedule='after_sparse',
                   sparse_rounds=3, lasso=1e-3)
  before = config.to_json()
  stage = pruning_schedule.sparse_stage(config)
  assert stage.pruning is None
  assert stage.group_lasso == 1e-3
  assert stage.num_rounds == 3
  assert stage.checkpoint_every == 3
  assert not stage.evaluators
  # Everything else is the run's own config, which stays as it was.
  assert stage.model == config.model and stage.seed == config.seed
  assert config.to_json() == before
  assert not stage.get('frobenius_penalty')
  # FedPhD's penalty over whole tensors instead.
  config.pruning.penalty = 'frobenius'
  stage = pruning_schedule.sparse_stage(config)
  assert stage.frobenius_penalty == 1e-3 and not stage.get('group_lasso')
  config.pruning.penalty = 'group_lasso'
  # No first stage without pruning or with schedule='before'.
  assert pruning_schedule.sparse_stage(_config(ratio=0.5)) is None
  config.pruning = None
  assert pruning_schedule.sparse_stage(config) is None


def test_after_sparse_prunes_the_sparse_stage_model_by_taylor(tmp_path,
                                                              monkeypatch):
  """The trainer's path: `setup` runs the sparse stage (a run of its own, in
  <workdir>/sparse, here a stand-in) and prunes its final model."""
  config = _config(ratio=0.5, importance='taylor', schedule='after_sparse',
                   sparse_rounds=3, lasso=1e-3, taylor_batches=2,
                   taylor_examples=8)
  model = models.unet_from_config(config.model)
  sparse_trained = _params(model, 1)
  calls = []

  def train_stage(stage_config, stage_dir):
    calls.append((stage_config, stage_dir))
    return types.SimpleNamespace(params=sparse_trained)

  monkeypatch.setattr(trainer, 'train_and_evaluate', train_stage)
  run, small_params, _, info = trainer.setup(config, str(tmp_path))
  (stage_config, stage_dir), = calls
  assert stage_dir == os.path.join(str(tmp_path), 'sparse')
  assert stage_config.to_json() == pruning_schedule.sparse_stage(
      config).to_json()
  assert info['importance'] == 'taylor'
  assert tuple(info['level_widths']) == (4, 8)
  assert jax.tree.map(np.shape, run.param_shapes) == jax.tree.map(
      np.shape, small_params)
  # The kept channels are sliced from the sparse stage's model (its Taylor
  # ranking is tested in test_pruning.py), not from the initial one.
  for name in ('conv_in', 'temb_dense0'):
    full = np.asarray(sparse_trained[name]['kernel'])
    cols = np.asarray(small_params[name]['kernel'])
    for c in range(cols.shape[-1]):
      assert any(np.array_equal(cols[..., c], full[..., j])
                 for j in range(full.shape[-1]))


def test_config_group_lasso_puts_the_penalty_in_the_client_chain():
  config = _config()
  config.pruning = None
  assert build.client_transforms(config) == []
  config.group_lasso = 0.01
  (tx,) = build.client_transforms(config)
  model = models.unet_from_config(config.model)
  params = _params(model, 2)
  groups = cg.unet_channel_groups(params, 4)
  zeros = jax.tree.map(jnp.zeros_like, params)
  got, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p))(params)
  want = jax.jit(jax.grad(
      lambda p: 0.01 * pruning.group_lasso_penalty(p, groups)))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  config.group_lasso = -1.0
  with pytest.raises(ValueError, match='group_lasso'):
    build.client_transforms(config)
  config.group_lasso = 0.0
  config.frobenius_penalty = 0.01
  (tx,) = build.client_transforms(config)
  got, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p))(params)
  want = jax.jit(jax.grad(
      lambda p: 0.01 * pruning.frobenius_penalty_value(p)))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  config.frobenius_penalty = -1.0
  with pytest.raises(ValueError, match='frobenius_penalty'):
    build.client_transforms(config)
