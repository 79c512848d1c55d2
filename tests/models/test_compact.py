"""Tests for UNet channel groups, compaction and MAC counts (FedPhD pruning)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff import models
from fedjax_diff.models import channel_groups as cg
from fedjax_diff.models import compact as compact_lib
from fedjax_diff.models import macs as macs_lib
from fedjax_diff.strategies import pruning

# FedPhD's code (EricLoong/fed_phd, torch-pruning's counter) on the DDPM
# CIFAR-10 UNet: 35.75M params / 6.06 GMACs, and 20.34M / 3.42 GMACs after
# pruning every channel group by ratio 0.2.
FEDPHD_BASE = (35.75e6, 6.06e9)
FEDPHD_RATIO_02 = (20.34e6, 3.42e9)
# torch-pruning 1.6.1 itself, run as FedPhD's structure_prune.py calls it
# (MetaPruner, GroupMagnitudeImportance(p=2) — the GroupNormImportance of
# torch-pruning 1.4 —, ignored_layers=[conv_out]) on diffusers' UNet2DModel
# with FedPhD's CIFAR-10 settings, then each attention's q/k/v/out sliced to
# its input width as FedPhD's prune_and_adjust_attention_layers does;
# parameters counted by summing numel (measured once for this test, not by
# this library): 20,340,086 at ratio 0.2 and 9,259,190 at ratio 0.4, with
# 3,423,106,787 and 1,532,565,167 MACs by tp.utils.count_ops_and_params.
TORCH_PRUNING_PARAMS = {0.2: 20_340_086, 0.4: 9_259_190}
TORCH_PRUNING_MACS = {0.2: 3_423_106_787, 0.4: 1_532_565_167}


def _tiny(**kw):
  cfg = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
             dropout=0.0, num_groups=2, num_classes=3)
  cfg.update(kw)
  return models.UNet(**cfg)


def _random_params(model, image_shape, seed=0):
  """Random weights everywhere (DDPM's init zeroes residual branches)."""
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), image_shape))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    std = 0.3 if len(s.shape) == 1 else fan_in ** -0.5
    return jnp.asarray(base + std * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize('rule', cg.RULES)
def test_kept_count_hand_cases(rule):
  # GroupNorm-read groups keep whole multiples of num_groups.
  assert cg.kept_count(128, 0.2, 32, rule) == 96   # 0.8·4 = 3.2 → 3 units
  assert cg.kept_count(256, 0.2, 32, rule) == 192  # 0.8·8 = 6.4 → 6 units
  assert cg.kept_count(256, 0.1, 32, rule) == 224  # 7.2 → 7
  assert cg.kept_count(128, 0.0, 32, rule) == 128
  assert cg.kept_count(64, 0.99, 32, rule) == 32   # at least one unit
  # 409.6: floor (torch-pruning's int(·)) or round; 8·0.6 = 4.8 units.
  want = {'torch_pruning': (409, 128, 153), 'nearest': (410, 160, 154)}
  assert (cg.kept_count(512, 0.2, 1, rule), cg.kept_count(256, 0.4, 32, rule),
          cg.kept_count(256, 0.4, 1, rule)) == want[rule]
  with pytest.raises(ValueError, match='ratio'):
    cg.kept_count(128, 1.0, 32, rule)
  with pytest.raises(ValueError, match='rule'):
    cg.kept_count(128, 0.2, 32, 'ceil')


def _loop_torch_pruning_select(importance, size, blocks, ratio):
  """torch-pruning's local rule as a plain loop over positions: position j
  of the size/blocks per GroupNorm block scores the mean of its channels'
  importances; the int(u·(1 − r)) best positions (ties: lower j) are kept
  in every block."""
  units = size // blocks
  scores = []
  for j in range(units):
    total = 0.0
    for b in range(blocks):
      total += float(importance[b * units + j])
    scores.append((-(total / blocks), j))
  keep_units = max(1, int(units * (1 - ratio)))
  kept = {j for _, j in sorted(scores)[:keep_units]}
  return [1.0 if c % units in kept else 0.0 for c in range(size)]


@pytest.mark.parametrize('ratio', [0.1, 0.2, 0.4, 0.7])
def test_torch_pruning_select_against_a_plain_loop(ratio):
  rng = np.random.default_rng(int(ratio * 100))
  groups = [cg.ChannelGroup('gn32', 'stream', 256, [], granularity=32),
            cg.ChannelGroup('gn8', 'inner', 40, [], granularity=8),
            cg.ChannelGroup('plain', 'temb', 37, [], granularity=1)]
  importance = {g.name: rng.random(g.size) for g in groups}
  # Ties: equal scores at two positions of every block.
  importance['gn8'][1::5] = importance['gn8'][2::5]
  got = pruning.select({k: jnp.asarray(v) for k, v in importance.items()},
                       groups, ratio, 'torch_pruning')
  for g in groups:
    want = _loop_torch_pruning_select(importance[g.name], g.size,
                                      g.granularity, ratio)
    np.testing.assert_array_equal(got[g.name], want, err_msg=g.name)
    assert int(np.sum(want)) == cg.kept_count(g.size, ratio, g.granularity)
    # Every GroupNorm block keeps the same positions.
    blocks = np.asarray(got[g.name]).reshape(g.granularity, -1)
    assert (blocks == blocks[0]).all()


def test_nearest_select_regroups_where_torch_pruning_keeps_blocks():
  # The compact GroupNorm splits the kept channels into G groups by rank.
  # Under 'torch_pruning' each such group is one original block minus its
  # pruned positions; under 'nearest' (free top-k) channels change group.
  rng = np.random.default_rng(0)
  group = cg.ChannelGroup('g', 'stream', 256, [], granularity=32)
  imp = {'g': jnp.asarray(rng.random(256))}
  for rule, same in (('torch_pruning', True), ('nearest', False)):
    keep = np.asarray(pruning.select(imp, [group], 0.2, rule)['g']) > 0
    kept = np.nonzero(keep)[0]
    new_group = np.arange(kept.size) * 32 // kept.size
    assert (new_group == kept // 8).all() == same, rule


def test_groups_of_a_tiny_unet():
  model = _tiny()
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (8, 8, 3)))
  groups = {g.name: g for g in cg.unet_channel_groups(shapes, 2)}
  # Hand-derived: down_0_res_0 (8 -> 8) adds onto conv_in's stream, which
  # the downsample conv reads; its output starts a stream of its own (a
  # conv's input and output channels are independent, as in DepGraph).
  # down_1_res_0 (8 -> 16) has a skip, so it starts a stream that the mid
  # blocks and their attention join.
  stem = groups['stream:conv_in']
  members = lambda g: {(m.path[0], m.path[1], m.axis) for m in g.members}
  assert {('conv_in', 'kernel', 3), ('down_0_res_0', 'conv2', 3),
          ('down_0_downsample', 'conv', 2)} <= members(stem)
  assert ('down_0_downsample', 'conv', 3) not in members(stem)
  # conv_in's stream is read at offset 8 (after h's 8 channels) by the
  # concatenation of up_0_res_1, the downsample's at offset 16 by up_1_res_1.
  offsets = {(m.path[0], m.path[1], m.axis): m.offset for m in stem.members}
  assert offsets[('up_0_res_1', 'conv1', 2)] == 8
  down = groups['stream:down_0_downsample']
  assert {('down_0_downsample', 'conv', 3), ('down_1_res_0', 'conv1', 2),
          ('down_1_res_0', 'skip', 2)} <= members(down)
  assert {(m.path[0], m.offset) for m in down.members
          if m.path[:2] == ('up_1_res_1', 'conv1')} == {('up_1_res_1', 16)}
  # The last up block of level 1 feeds the upsampling conv (and its
  # attention); the conv's output is the stream up_0_res_0 reads first.
  pre = groups['stream:up_1_res_1']
  assert pre.kind == 'upsample_in' and pre.granularity == 2  # attention norm
  assert ('up_1_upsample', 'conv', 2) in members(pre)
  up = groups['stream:up_1_upsample']
  assert up.kind == 'stream' and ('up_1_upsample', 'conv', 3) in members(up)
  assert {(m.path[0], m.offset) for m in up.members
          if m.path[:2] == ('up_0_res_0', 'conv1')} == {('up_0_res_0', 0)}
  mid = groups['stream:down_1_res_0']
  mid_paths = {m.path[0] for m in mid.members}
  assert {'down_1_attn_0', 'mid_res_0', 'mid_attn', 'mid_res_1',
          'up_1_res_0'} <= mid_paths
  assert all(m.axis != 3 for m in mid.members if m.path[0] == 'up_1_res_0')
  # The output conv's output channels are never pruned; its input is.
  assert not any(m.path[0] == 'conv_out' and m.axis == 3
                 for g in groups.values() for m in g.members)
  last = groups['stream:up_0_res_1']
  assert (('conv_out', 'kernel'), 2) in {(m.path, m.axis)
                                         for m in last.members}
  # The label table's columns follow the time embedding.
  assert (('label_embed', 'embedding'), 1) in {
      (m.path, m.axis) for m in groups['temb'].members}
  assert groups['temb'].granularity == 1
  assert groups['inner:down_1_res_0'].granularity == 2


@pytest.mark.parametrize('rule,attn,ratio,widths', [
    # Attention at 4x4 reads the stream entering up_1_upsample: a GroupNorm.
    ('torch_pruning', (4,), 0.5, (4, (4, 8), (4, 8), 16)),
    # No attention: that stream keeps ⌊16·0.7⌋ = 11 of its own, the
    # GroupNorm-read ones 2 blocks of ⌊4·0.7⌋ = 2 and ⌊8·0.7⌋ = 5.
    ('torch_pruning', (), 0.3, (4, (4, 10), (4, 11), 22)),
    ('nearest', (4,), 0.5, (4, (4, 8), (4, 8), 16)),
    ('nearest', (), 0.3, (6, (6, 12), (6, 11), 22)),
])
def test_compact_equals_masked_outputs(rule, attn, ratio, widths):
  model = _tiny(attn_resolutions=attn)
  image_shape = (8, 8, 3)
  params = _random_params(model, image_shape)
  groups = cg.unet_channel_groups(params, model.num_groups)
  channels = pruning.select(pruning.l2_importance(params, groups), groups,
                            ratio, rule)
  masks = pruning.expand_masks(params, groups, channels)
  masked_params = pruning.apply_masks(params, groups, channels)
  small, small_params = compact_lib.compact(model, masked_params, groups,
                                            channels)
  assert (small.stem_width, small.level_widths, small.upsample_in_widths,
          small.temb_width) == widths
  # The compact parameters are exactly what the small UNet initialises.
  expect = jax.eval_shape(
      lambda: models.init_params(small, jax.random.key(0), image_shape))
  assert jax.tree.map(lambda a: a.shape, expect) == jax.tree.map(
      lambda a: a.shape, small_params)
  assert models.count_params(small_params) == models.count_params(
      cg.pruned_shapes(params, groups, pruning.counts(channels)))
  x = jax.random.normal(jax.random.key(1), (2, *image_shape))
  t = jnp.array([3, 700])
  labels = jnp.array([0, 3])
  masked_out = compact_lib.masked_apply_fn(model, masks)(
      masked_params, x, t, labels)
  small_out = jax.jit(lambda p: small.apply({'params': p}, x, t, labels,
                                            train=False))(small_params)
  assert float(jnp.max(jnp.abs(small_out))) > 0.1
  np.testing.assert_allclose(small_out, masked_out, atol=2e-5, rtol=1e-5)


def test_compact_rejects_unequal_level_widths():
  model = _tiny()
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (8, 8, 3)))
  groups = cg.unet_channel_groups(shapes, 2)
  channels = {g.name: jnp.ones(g.size) for g in groups}
  channels['inner:down_0_res_0'] = jnp.arange(8) < 6
  with pytest.raises(ValueError, match='one width per level'):
    compact_lib.compact_model(model, groups, channels)


def test_macs_against_hand_count():
  # One level, one block, 4x4x1 input, ch=4: every layer counted by hand.
  model = models.UNet(ch=4, ch_mult=(1,), num_res_blocks=1,
                      attn_resolutions=(), dropout=0.0, num_groups=2)
  px = 16
  temb = 4 * 16 + 16 * 16
  conv_in = px * 9 * 1 * 4
  res_same = px * 9 * 4 * 4 + 16 * 4 + px * 9 * 4 * 4   # conv1, temb, conv2
  res_cat = px * 9 * 8 * 4 + 16 * 4 + px * 9 * 4 * 4 + px * 8 * 4  # + skip
  attn = 4 * px * 4 * 4                                 # q, k, v, proj_out
  conv_out = px * 9 * 4 * 1
  expected = (temb + conv_in + res_same + 2 * res_same + attn + 2 * res_cat
              + conv_out)
  assert macs_lib.unet_macs(model, (4, 4, 1)) == expected
  assert macs_lib.unet_macs(model, (4, 4, 1), include_attention=True) == (
      expected + 2 * px * px * 4)


@pytest.mark.parametrize('ratio,widths', [
    (0.2, (96, (96, 192, 192, 192), (96, 192, 204, 204), 409)),
    (0.4, (64, (64, 128, 128, 128), (64, 128, 153, 153), 307)),
])
def test_cifar10_unet_matches_fedphd_and_torch_pruning(ratio, widths):
  model = models.UNet()  # DDPM's CIFAR-10 UNet, 35,746,307 parameters.
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (32, 32, 3)))
  groups = cg.unet_channel_groups(shapes, model.num_groups)
  base_macs = macs_lib.unet_macs(model, (32, 32, 3), shapes)
  assert abs(models.count_params(shapes) / FEDPHD_BASE[0] - 1) < 0.01
  assert abs(base_macs / FEDPHD_BASE[1] - 1) < 0.01
  counts = cg.kept_counts(groups, ratio, 'torch_pruning')
  small_shapes = cg.pruned_shapes(shapes, groups, counts)
  n = models.count_params(small_shapes)
  assert n == TORCH_PRUNING_PARAMS[ratio]
  channels = {g.name: jnp.arange(g.size) < counts[g.name] for g in groups}
  small = compact_lib.compact_model(model, groups, channels)
  assert (small.stem_width, small.level_widths, small.upsample_in_widths,
          small.temb_width) == widths
  # The compact UNet has exactly these parameters.
  expect = jax.eval_shape(
      lambda: models.init_params(small, jax.random.key(0), (32, 32, 3)))
  assert jax.tree.map(lambda a: a.shape, expect) == jax.tree.map(
      lambda a: a.shape, small_shapes)
  # torch-pruning's counter also counts a few ops besides convolutions and
  # linear layers: 0.17% more unpruned (6,064,135,040 against 6.054e9).
  small_macs = macs_lib.unet_macs(small, (32, 32, 3), small_shapes)
  assert abs(small_macs / TORCH_PRUNING_MACS[ratio] - 1) < 5e-3, small_macs
  if ratio == 0.2:
    assert abs(n / FEDPHD_RATIO_02[0] - 1) < 0.003, n
    assert abs(small_macs / FEDPHD_RATIO_02[1] - 1) < 0.01, small_macs


def test_live_group_norm_with_every_channel_live_is_group_norm():
  # The masked UNet with nothing pruned is the plain UNet (flax GroupNorm).
  model = _tiny(attn_resolutions=(), num_classes=None)
  image_shape = (8, 8, 3)
  params = _random_params(model, image_shape, seed=1)
  groups = cg.unet_channel_groups(params, model.num_groups)
  ones = {g.name: jnp.ones(g.size) for g in groups}
  masks = pruning.expand_masks(params, groups, ones)
  x = jax.random.normal(jax.random.key(2), (2, *image_shape))
  t = jnp.array([10, 900])
  masked = compact_lib.masked_apply_fn(model, masks)(params, x, t)
  plain = jax.jit(lambda p: model.apply({'params': p}, x, t,
                                        train=False))(params)
  np.testing.assert_allclose(masked, plain, atol=2e-5, rtol=1e-5)
