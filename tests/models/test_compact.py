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


def test_kept_count_hand_cases():
  # GroupNorm-read groups keep whole multiples of num_groups.
  assert cg.kept_count(128, 0.2, 32) == 96   # 0.8·4 = 3.2 → 3 units
  assert cg.kept_count(256, 0.2, 32) == 192  # 0.8·8 = 6.4 → 6 units
  assert cg.kept_count(256, 0.1, 32) == 224  # 7.2 → 7
  assert cg.kept_count(512, 0.2, 1) == 410   # round(409.6)
  assert cg.kept_count(128, 0.0, 32) == 128
  assert cg.kept_count(64, 0.99, 32) == 32   # at least one unit
  with pytest.raises(ValueError, match='ratio'):
    cg.kept_count(128, 1.0, 32)


def test_groups_of_a_tiny_unet():
  model = _tiny()
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (8, 8, 3)))
  groups = {g.name: g for g in cg.unet_channel_groups(shapes, 2)}
  # Hand-derived: down_0_res_0 (8 -> 8) adds onto conv_in's stream, and so
  # does the downsample conv; down_1_res_0 (8 -> 16) has a skip, so it
  # starts a stream that the mid blocks and their attention join.
  stem = groups['stream:conv_in']
  stem_paths = {m.path[0] for m in stem.members}
  assert {'conv_in', 'down_0_res_0', 'down_0_downsample'} <= stem_paths
  # conv_in's stream is read at offset 8 (after h's 8 channels) by the
  # concatenation of up_0_res_1 and at offset 16 by up_1_res_1.
  offsets = {(m.path[0], m.path[1], m.axis): m.offset for m in stem.members}
  assert offsets[('up_0_res_1', 'conv1', 2)] == 8
  assert offsets[('up_1_res_1', 'conv1', 2)] == 16
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


def test_compact_equals_masked_outputs():
  model = _tiny()
  image_shape = (8, 8, 3)
  params = _random_params(model, image_shape)
  groups = cg.unet_channel_groups(params, model.num_groups)
  channels = pruning.select(pruning.l2_importance(params, groups), groups,
                            0.5)
  masks = pruning.expand_masks(params, groups, channels)
  masked_params = pruning.apply_masks(params, groups, channels)
  small, small_params = compact_lib.compact(model, masked_params, groups,
                                            channels)
  assert small.level_widths == (4, 8) and small.stem_width == 4
  assert small.temb_width == 16
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


def test_cifar10_unet_at_ratio_02_matches_fedphd():
  model = models.UNet()  # DDPM's CIFAR-10 UNet, 35,746,307 parameters.
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (32, 32, 3)))
  groups = cg.unet_channel_groups(shapes, model.num_groups)
  base_macs = macs_lib.unet_macs(model, (32, 32, 3), shapes)
  assert abs(models.count_params(shapes) / FEDPHD_BASE[0] - 1) < 0.01
  assert abs(base_macs / FEDPHD_BASE[1] - 1) < 0.01
  counts = cg.kept_counts(groups, 0.2)
  small_shapes = cg.pruned_shapes(shapes, groups, counts)
  n = models.count_params(small_shapes)
  assert abs(n / FEDPHD_RATIO_02[0] - 1) < 0.02, n
  channels = {g.name: jnp.arange(g.size) < counts[g.name] for g in groups}
  small = compact_lib.compact_model(model, groups, channels)
  assert small.level_widths == (96, 192, 192, 192)
  small_macs = macs_lib.unet_macs(small, (32, 32, 3), small_shapes)
  assert abs(small_macs / FEDPHD_RATIO_02[1] - 1) < 0.02, small_macs


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
