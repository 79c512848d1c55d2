"""Tests for structured pruning (FedPhD arXiv 2507.06449, Diff-Pruning
arXiv 2305.10924): importance, masks, masked training, group lasso, upload."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_diff import comm
from fedjax_diff import models
from fedjax_diff import optimizers
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.models import channel_groups as cg
from fedjax_diff.models import compact as compact_lib
from fedjax_diff.strategies import pruning


def _model():
  return models.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_groups=2)


IMAGE = (8, 8, 1)


def _random_tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope='module')
def setup():
  model = _model()
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), IMAGE))
  params = _random_tree(shapes, 0)
  groups = cg.unet_channel_groups(shapes, model.num_groups)
  return model, params, groups


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree, np.float64)


def _loop_group_sums(tree, groups, fn, kernels_only=False):
  """Reference: Σ_members Σ fn(slice of channel c), one channel at a time
  (members that are a 'kernel' only, with `kernels_only`)."""
  out = {}
  for g in groups:
    vals = []
    for c in range(g.size):
      vals.append(sum(float(np.sum(fn(np.take(_leaf(tree, m.path),
                                              m.offset + c, axis=m.axis))))
                      for m in g.members
                      if not kernels_only or m.path[-1] == 'kernel'))
    out[g.name] = np.array(vals)
  return out


@pytest.mark.parametrize('terms', pruning.IMPORTANCE_PARAMS)
def test_l2_and_taylor_importance_against_a_loop(setup, terms):
  _, params, groups = setup
  kernels_only = terms == 'kernels'
  got = pruning.l2_importance(params, groups, terms)
  ref = _loop_group_sums(params, groups, np.square, kernels_only)
  for g in groups:
    np.testing.assert_allclose(got[g.name], np.sqrt(ref[g.name]), rtol=1e-5)
  grads = _random_tree(params, 1)
  prod = jax.tree.map(lambda p, d: p * d, params, grads)
  got = pruning.taylor_importance(params, grads, groups, terms)
  ref = _loop_group_sums(prod, groups, np.abs, kernels_only)
  for g in groups:
    np.testing.assert_allclose(got[g.name], ref[g.name], rtol=1e-5)
  # Kernels only leaves out the biases and GroupNorm parameters.
  if kernels_only:
    full = _loop_group_sums(params, groups, np.square)
    assert any(np.any(full[g.name] > ref[g.name]) for g in groups)
  with pytest.raises(ValueError, match='importance params'):
    pruning.l2_importance(params, groups, 'biases')


def test_select_keeps_the_most_important_whole_units():
  group = cg.ChannelGroup('g', 'stream', 8, [], granularity=2)
  imp = {'g': jnp.array([5., 1., 7., 3., 3., 0., 2., 9.])}
  keep = pruning.select(imp, [group], 0.5, 'nearest')['g']
  # 4 of 8 (2 units of 2): the largest 9, 7, 5 and the first of the tied 3s.
  np.testing.assert_array_equal(keep, [1, 0, 1, 1, 0, 0, 0, 1])
  keep = pruning.select(imp, [group], 0.2, 'nearest')['g']  # round(3.2)=3
  assert int(keep.sum()) == 6
  # torch-pruning: 2 blocks of 4 positions; position scores are the block
  # means (5+3)/2, (1+0)/2, (7+2)/2, (3+9)/2 = 4, 0.5, 4.5, 6: ⌊4·0.5⌋ = 2
  # positions (3 and 2) kept in both blocks; at 0.2, ⌊3.2⌋ = 3 (and 0).
  keep = pruning.select(imp, [group], 0.5, 'torch_pruning')['g']
  np.testing.assert_array_equal(keep, [0, 0, 1, 1, 0, 0, 1, 1])
  keep = pruning.select(imp, [group], 0.2, 'torch_pruning')['g']
  np.testing.assert_array_equal(keep, [1, 0, 1, 1, 1, 0, 1, 1])
  with pytest.raises(ValueError, match='shape'):
    pruning.select({'g': jnp.ones(3)}, [group], 0.5)
  with pytest.raises(ValueError, match='rule'):
    pruning.select(imp, [group], 0.5, 'ceil')


def test_expand_masks_against_a_loop(setup):
  _, params, groups = setup
  channels = {g.name: jnp.asarray(np.random.default_rng(2).integers(
      0, 2, g.size), jnp.float32) for g in groups}
  masks = pruning.expand_masks(params, groups, channels)
  # Reference: which (group, channel) each index of each axis belongs to.
  owner = {}
  for g in groups:
    for m in g.members:
      for c in range(g.size):
        owner[(m.path, m.axis, m.offset + c)] = float(channels[g.name][c])
  # The up-path conv reads a concatenation (two groups along its input).
  for path in [('up_0_res_1', 'conv1', 'kernel'), ('up_0_res_1', 'skip',
                                                   'bias'),
               ('conv_out', 'kernel'), ('label_embed',) * 0 +
               ('temb_dense1', 'kernel')]:
    mask = _leaf(masks, path)
    for idx in itertools.product(*map(range, mask.shape)):
      want = np.prod([owner.get((path, a, i), 1.0) for a, i in
                      enumerate(idx)])
      assert mask[idx] == want, (path, idx)


def test_masked_params_stay_exactly_zero_through_adam():
  model = models.UNet(ch=4, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(), dropout=0.0, num_groups=2,
                      conv_impl='im2col')
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), IMAGE))
  params = _random_tree(shapes, 0)
  groups = cg.unet_channel_groups(shapes, model.num_groups)
  channels = pruning.select(pruning.l2_importance(params, groups), groups,
                            0.5)
  masks = pruning.expand_masks(params, groups, channels)
  params = pruning.apply_masks(params, groups, channels)
  eps_fn = models.make_eps_fn(model)   # the plain UNet: pruned entries
  schedule = make_schedule('linear', 100)  # get non-zero gradients.
  opt = optimizers.client_optimizer(
      ml_collections.ConfigDict(dict(name='adam', learning_rate=1e-2,
                                     warmup_steps=2, grad_clip=1.0)),
      extra=[pruning.mask_transform(groups, channels)])
  x = jax.random.normal(jax.random.key(3), (4, *IMAGE))

  def loss(p, key):
    return diffusion_loss(eps_fn, p, schedule, x, key, train=True)

  @jax.jit
  def steps(p, key):
    def body(carry, k):
      p, s, step = carry
      g = jax.grad(loss)(p, k)
      u, s = opt.update(g, s, p, global_step=step)
      return (optax.apply_updates(p, u), s, step + 1), g
    (p, _, _), grads = jax.lax.scan(body, (p, opt.init(p), 0),
                                    jax.random.split(key, 3))
    return p, grads

  trained, grads = jax.device_get(steps(params, jax.random.key(4)))
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  triples = list(zip(leaves(trained), leaves(params), leaves(masks)))
  pruned_grad = sum(np.abs(g[:, m == 0]).sum()
                    for g, (_, _, m) in zip(leaves(grads), triples))
  assert pruned_grad > 0   # the mask, not the loss, keeps them at zero.
  for p, _, m in triples:
    assert np.all(p[m == 0] == 0.0)
  assert sum(np.abs(p - p0)[m > 0].sum() for p, p0, m in triples) > 0


def test_group_lasso_adds_the_penalty_gradient(setup):
  _, params, groups = setup
  lam = 0.3
  ref = _loop_group_sums(params, groups, np.square)
  penalty = sum(np.sum(np.sqrt(v)) for v in ref.values())
  np.testing.assert_allclose(
      jax.jit(lambda p: pruning.group_lasso_penalty(p, groups))(params),
      penalty, rtol=1e-5)
  want = jax.jit(jax.grad(
      lambda p: lam * pruning.group_lasso_penalty(p, groups)))(params)
  incoming = _random_tree(params, 5)
  tx = pruning.group_lasso(groups, lam)
  got, _ = jax.jit(lambda u, p: tx.update(u, tx.init(p), p))(incoming,
                                                             params)
  for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                     jax.tree.leaves(incoming)):
    np.testing.assert_allclose(a, b + c, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='lam'):
    pruning.group_lasso(groups, -1.0)


def test_frobenius_penalty_adds_the_gradient_of_fedphds_penalty(setup):
  _, params, _ = setup
  lam = 0.3
  # Reference: FedPhD's Σ over tensors PyTorch calls 'weight' (conv/dense
  # kernels, GroupNorm scales, embedding tables) of ‖W‖_F, by hand.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  weights = [n.endswith(("['kernel']", "['scale']", "['embedding']"))
             for n in names]
  assert any(weights) and not all(weights)   # biases stay out.
  penalty = sum(np.sqrt(np.sum(np.square(np.asarray(x, np.float64))))
                for (_, x), w in zip(flat, weights) if w)
  np.testing.assert_allclose(pruning.frobenius_penalty_value(params),
                             penalty, rtol=1e-5)
  incoming = _random_tree(params, 7)
  tx = pruning.frobenius_penalty(lam)
  got, _ = jax.jit(lambda u, p: tx.update(u, tx.init(p), p))(incoming,
                                                             params)
  for (_, x), w, a, c in zip(flat, weights, jax.tree.leaves(got),
                             jax.tree.leaves(incoming)):
    x = np.asarray(x, np.float64)
    want = np.asarray(c) + (lam * x / np.sqrt(np.sum(x * x)) if w else 0.0)
    np.testing.assert_allclose(a, want, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='lam'):
    pruning.frobenius_penalty(-1.0)


def test_mask_upload_sends_only_kept_entries(setup):
  _, params, groups = setup
  channels = pruning.select(pruning.l2_importance(params, groups), groups,
                            0.5)
  kept = models.count_params(compact_lib.compact_params(params, groups,
                                                        channels))
  total_channels = sum(g.size for g in groups)
  for send_mask in (False, True):
    up = pruning.mask_upload(groups, channels, send_mask=send_mask)
    want = 4 * kept + (-(-total_channels // 8) if send_mask else 0)
    assert comm.message_bytes(up, params) == want
    assert pruning.masked_bytes(params, groups, channels, send_mask) == want
  assert kept < models.count_params(params)
  delta = _random_tree(params, 6)
  sent, _ = up.apply(delta, (), jax.random.key(0), None)
  masks = pruning.expand_masks(params, groups, channels)
  for s, d, m in zip(jax.tree.leaves(sent), jax.tree.leaves(delta),
                     jax.tree.leaves(masks)):
    np.testing.assert_array_equal(s, np.where(m > 0, d, 0.0))


def test_mask_then_quantize_counts_the_codes_of_kept_entries(setup):
  from fedjax_diff.strategies import quantize
  from fedjax_diff.strategies import upload as upload_lib
  _, params, groups = setup
  channels = pruning.select(pruning.l2_importance(params, groups), groups,
                            0.5)
  qcfg = quantize.QuantizationConfig(bits=4, granularity='per_channel',
                                     rounding='nearest',
                                     scale_method='minmax')
  up = upload_lib.chain(pruning.mask_upload(groups, channels, send_mask=True),
                        upload_lib.quantizer(qcfg))
  small = compact_lib.compact_params(params, groups, channels)
  # By hand: 4-bit codes of the kept entries, 4 bytes per kept output
  # channel's scale (per-channel: the last axis of ≥2-D leaves, 1 per 1-D
  # leaf), and the channel bitmask.
  want = sum(-(-4 * x.size // 8) + 4 * (x.shape[-1] if x.ndim >= 2 else 1)
             for x in jax.tree.leaves(small))
  want += -(-sum(g.size for g in groups) // 8)
  assert comm.message_bytes(up, params) == want
