"""Tests for the DDPM UNet (Ho et al. 2020, arXiv:2006.11239)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_diff import models
from fedjax_diff.models import unet as unet_lib

# Measured with this implementation; PyTorch re-implementations of the DDPM
# CIFAR-10 UNet give the same 35,746,307 (paper: "35.7M").
DDPM_CIFAR10_PARAMS = 35_746_307


def _tiny(**kw):
  cfg = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
             dropout=0.3, num_groups=4)
  cfg.update(kw)
  return models.UNet(**cfg)


def _random_params(model, image_shape, seed=0):
  """Random float32 parameters with the model's structure, without init.

  DDPM initialises the last conv of every residual branch (and the output
  conv) to ~0, so at init the output hardly depends on t, labels or dropout;
  functional tests therefore use random weights everywhere. Building them
  with numpy from `eval_shape` also avoids compiling one threefry RNG per
  parameter, which dominates test time on a small CPU.
  """
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), image_shape))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    base = 1.0 if name.endswith("['scale']") else 0.0
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    std = 0.1 if len(s.shape) == 1 or 'embed' in name else fan_in ** -0.5
    return jnp.asarray(base + std * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _setup(model, image_shape, seed=0):
  params = _random_params(model, image_shape, seed)
  x = jax.random.normal(jax.random.key(seed), (2, *image_shape))
  t = jnp.array([3, 500], jnp.int32)
  return params, x, t


def test_ddpm_cifar10_param_count():
  cfg = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
      dropout=0.1))
  model = models.unet_from_config(cfg)
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (32, 32, 3)))
  n = models.count_params(shapes)
  print(f'DDPM CIFAR-10 UNet parameters: {n:,}')
  assert n == DDPM_CIFAR10_PARAMS
  assert abs(n - 35.7e6) / 35.7e6 < 0.01
  leaves = jax.tree.leaves(shapes)
  assert all(p.dtype == jnp.float32 for p in leaves)
  assert isinstance(shapes, dict)


# Dropout keys: 'rbg' compiles much faster on CPU than the default threefry,
# which is still exercised on the 8x8 case.
@pytest.mark.parametrize('image_shape,ch_mult,attn,key_impl', [
    ((28, 28, 1), (1, 2, 2), (14,), 'rbg'),
    ((8, 8, 1), (1, 2), (4,), None),
    ((32, 32, 3), (1, 2, 2), (16,), 'rbg'),
])
def test_forward_shape_and_dropout(image_shape, ch_mult, attn, key_impl):
  model = _tiny(ch_mult=ch_mult, attn_resolutions=attn)
  params, x, t = _setup(model, image_shape)
  eps_fn = jax.jit(models.make_eps_fn(model), static_argnames='train')
  k1 = jax.random.key(1, impl=key_impl)
  k2 = jax.random.key(2, impl=key_impl)
  out_eval = eps_fn(params, x, t, None, train=False, rng=k1)
  assert out_eval.shape == x.shape
  assert out_eval.dtype == jnp.float32
  assert np.all(np.isfinite(out_eval))
  # train=False: no dropout, the key is ignored.
  np.testing.assert_array_equal(
      out_eval, eps_fn(params, x, t, None, train=False, rng=k2))
  # t actually matters.
  out_t = eps_fn(params, x, t + 7, None, train=False, rng=k1)
  assert not np.allclose(out_eval, out_t)
  # Dropout: key-dependent in training, deterministic per key.
  out_a = eps_fn(params, x, t, None, train=True, rng=k1)
  out_a2 = eps_fn(params, x, t, None, train=True, rng=k1)
  out_b = eps_fn(params, x, t, None, train=True, rng=k2)
  assert np.all(np.isfinite(out_a))
  np.testing.assert_array_equal(out_a, out_a2)
  assert not np.allclose(out_a, out_b)
  assert not np.allclose(out_a, out_eval)


def test_no_dropout_train_is_deterministic():
  model = _tiny(dropout=0.0, ch_mult=(1, 2))
  params, x, t = _setup(model, (8, 8, 1))
  eps_fn = jax.jit(models.make_eps_fn(model), static_argnames='train')
  out_a = eps_fn(params, x, t, None, train=True, rng=jax.random.key(1))
  out_b = eps_fn(params, x, t, None, train=True, rng=jax.random.key(2))
  out_e = eps_fn(params, x, t, None, train=False, rng=None)
  np.testing.assert_allclose(out_a, out_b)
  np.testing.assert_allclose(out_a, out_e)


def test_init_is_near_identity_residual():
  # DDPM scales the output conv variance by 1e-10: the prediction is ~0.
  model = _tiny(ch_mult=(1, 2), num_classes=3)
  # An rbg key: threefry init compiles far slower on CPU (same result shape).
  params = jax.jit(lambda k: models.init_params(model, k, (8, 8, 1), 3))(
      jax.random.key(0, impl='rbg'))
  assert isinstance(params, dict)
  assert models.count_params(params) == models.count_params(
      _random_params(model, (8, 8, 1)))
  assert params['conv_out']['bias'].shape == (1,)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  out = jax.jit(models.make_eps_fn(model), static_argnames='train')(
      params, x, jnp.array([0, 1]), jnp.array([0, 2]), train=False)
  assert out.shape == x.shape
  assert np.max(np.abs(out)) < 1e-3


def test_class_conditioning_and_null_class():
  num_classes = 10
  model = _tiny(num_classes=num_classes, ch_mult=(1, 2), attn_resolutions=(4,))
  params, x, t = _setup(model, (8, 8, 1))
  emb = params['label_embed']['embedding']
  assert emb.shape == (num_classes + 1, 4 * model.ch)
  eps_fn = jax.jit(models.make_eps_fn(model), static_argnames='train')
  out_1 = eps_fn(params, x, t, jnp.array([1, 1]), train=False, rng=None)
  out_2 = eps_fn(params, x, t, jnp.array([2, 7]), train=False, rng=None)
  assert not np.allclose(out_1, out_2)
  out_none = eps_fn(params, x, t, None, train=False, rng=None)
  out_null = eps_fn(params, x, t, jnp.full((2,), num_classes), train=False,
                    rng=None)
  np.testing.assert_allclose(out_none, out_null, rtol=1e-6, atol=1e-6)
  assert not np.allclose(out_none, out_1)


def test_unconditional_model_rejects_labels():
  model = _tiny(ch_mult=(1, 2))
  params, x, t = _setup(model, (8, 8, 1))
  with pytest.raises(ValueError, match='num_classes is None'):
    model.apply({'params': params}, x, t, jnp.array([0, 1]), train=False)
  with pytest.raises(ValueError, match='num_classes=3'):
    models.init_params(model, jax.random.key(0), (8, 8, 1), num_classes=3)


def test_out_ch_and_config():
  cfg = ml_collections.ConfigDict(dict(
      ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
      dropout=0.0, num_groups=4, num_classes=3, out_ch=2))
  model = models.unet_from_config(cfg)
  assert model.ch_mult == (1, 2) and model.attn_resolutions == (4,)
  assert model.num_classes == 3 and model.out_ch == 2 and model.num_groups == 4
  params = _random_params(model, (8, 8, 1))
  out = jax.eval_shape(
      lambda p: model.apply({'params': p}, jnp.zeros((1, 8, 8, 1)),
                            jnp.array([1]), jnp.array([0]), train=False),
      params)
  assert out.shape == (1, 8, 8, 2)
  # Defaults for the optional fields.
  del cfg.num_classes, cfg.out_ch, cfg.num_groups
  model = models.unet_from_config(cfg)
  assert (model.num_classes, model.out_ch, model.num_groups) == (None, None,
                                                                 32)


def test_label_embed_std_initialises_the_label_table():
  """config.model.label_embed_std: the label table drawn from N(0, std²)
  (ADM's nn.Embedding init at 1.0); None keeps flax's, whose rows have
  norm ≈ 1 at any width. Only the table's init changes: the other
  parameters are drawn the same."""
  cfg = ml_collections.ConfigDict(dict(
      ch=8, ch_mult=[1], num_res_blocks=1, attn_resolutions=[],
      dropout=0.0, num_groups=4, num_classes=10))
  default = models.unet_from_config(cfg)
  cfg.label_embed_std = 1.0
  adm = models.unet_from_config(cfg)
  assert default.label_embed_std is None and adm.label_embed_std == 1.0
  key = jax.random.key(0)
  p0 = models.init_params(default, key, (8, 8, 1))
  p1 = models.init_params(adm, key, (8, 8, 1))
  e0 = np.asarray(p0['label_embed']['embedding'])
  e1 = np.asarray(p1['label_embed']['embedding'])
  assert e1.shape == (11, 32)
  # 352 draws: the sample std is within 10% of 1; flax's rows have norm ~1.
  assert abs(e1.std() - 1.0) < 0.1 and abs(e1.mean()) < 0.1
  assert np.all(np.abs(np.linalg.norm(e0, axis=1) - 1.0) < 0.5)
  del p0['label_embed'], p1['label_embed']
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  fields = cfg.to_dict()
  for bad in (0.0, -1.0, True, 'big'):
    with pytest.raises(ValueError, match='label_embed_std must be None'):
      models.unet_from_config(ml_collections.ConfigDict(
          dict(fields, label_embed_std=bad)))
  with pytest.raises(ValueError, match='model is unconditional'):
    models.unet_from_config(ml_collections.ConfigDict(
        dict(fields, num_classes=None)))


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(ch_mult=(1, 2), dtype=jnp.bfloat16)
  params, x, t = _setup(model, (8, 8, 1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = jax.jit(lambda p: model.apply({'params': p}, x, t, train=False))(
      params)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))


@pytest.mark.parametrize('shape,ch_mult,msg', [
    ((30, 30, 3), (1, 2, 2, 2), r'30x30.*divisible by.*= 8.*at most 2'),
    ((28, 28, 1), (1, 2, 2, 2), r'28x28.*divisible by.*= 8.*at most 3'),
    ((32, 20, 1), (1, 2, 2, 2), r'32x20.*multiple of 8'),
])
def test_bad_input_size_raises(shape, ch_mult, msg):
  model = _tiny(ch_mult=ch_mult)
  with pytest.raises(ValueError, match=msg):
    jax.eval_shape(
        lambda: models.init_params(model, jax.random.key(0), shape))


def test_bad_num_groups_raises():
  model = _tiny(ch=12, num_groups=8)
  with pytest.raises(ValueError, match=r'num_groups=8 must divide.*\[12, 24\]'):
    jax.eval_shape(
        lambda: models.init_params(model, jax.random.key(0), (8, 8, 1)))
  # The default num_groups=32 with a small ch is a common mistake.
  model = models.UNet(ch=16, ch_mult=(1, 2))
  with pytest.raises(ValueError, match='num_groups=32'):
    jax.eval_shape(
        lambda: models.init_params(model, jax.random.key(0), (8, 8, 1)))


def test_timestep_embedding():
  emb = unet_lib.timestep_embedding(jnp.array([0, 10]), 8)
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  # Highest frequency is 1: sin(10), lowest is 1e-4: sin(1e-3).
  np.testing.assert_allclose(emb[1, 0], np.sin(10.0), rtol=1e-5)
  np.testing.assert_allclose(emb[1, 3], np.sin(10.0 * 1e-4), rtol=1e-4)


def test_im2col_conv_equals_xla_conv():
  """Both conv implementations compute the same UNet from the same params."""
  cfg = ml_collections.ConfigDict(dict(
      ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
      dropout=0.0, num_groups=4, conv_impl='xla'))
  xla = models.unet_from_config(cfg)
  cfg.conv_impl = 'im2col'
  im2col = models.unet_from_config(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([3, 700])
  shapes = jax.eval_shape(
      lambda: xla.init(jax.random.PRNGKey(1), x, t, train=False))['params']
  # Random (not DDPM-init) weights, so every conv, incl. the zero-initialised
  # ones, the stride-2 and the 1x1 convs, matters for the output.
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])

  def loss(model, p):
    return jnp.mean(model.apply({'params': p}, x, t, train=False) ** 2)

  # Jitted: op by op, the UNet's forward and backward take minutes on CPU.
  def apply(model):
    return jax.jit(lambda p: model.apply({'params': p}, x, t, train=False))

  out_a = apply(xla)(params)
  out_b = apply(im2col)(params)
  assert float(jnp.abs(out_a).max()) > 1e-2
  np.testing.assert_allclose(out_b, out_a, rtol=1e-4, atol=1e-4)
  grads_a = jax.jit(jax.grad(lambda p: loss(xla, p)))(params)
  grads_b = jax.jit(jax.grad(lambda p: loss(im2col, p)))(params)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(gb, ga, rtol=1e-3, atol=1e-5)
  with pytest.raises(ValueError, match='conv_impl'):
    models.unet.resolve_conv_impl('cudnn')
  assert models.unet.resolve_conv_impl('auto', 'cpu') == 'im2col'
  assert models.unet.resolve_conv_impl('auto', 'gpu') == 'xla'
