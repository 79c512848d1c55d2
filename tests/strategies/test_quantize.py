"""Tests for FedDM-quant (fedjax_diff.strategies.quantize)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff.strategies import quantize as q_lib

Config = q_lib.QuantizationConfig

# One compilation per config rather than op-by-op dispatch.
_quantize = jax.jit(q_lib.quantize, static_argnums=1)
_qdq = jax.jit(q_lib.quantize_dequantize, static_argnums=1)


def _draw(rng, shape, heavy):
  """Gaussian or heavy-tailed (Student-t, 2 dof) float32 test data."""
  x = rng.standard_t(2.0, shape) if heavy else rng.standard_normal(shape)
  return jnp.asarray(x, jnp.float32)


def _tree(seed=0, heavy=False):
  """A small UNet-like update: conv, dense, bias and scalar leaves."""
  rng = np.random.default_rng(seed)
  return {
      'conv': {'kernel': 0.01 * _draw(rng, (3, 3, 4, 8), heavy),
               'bias': 0.001 * _draw(rng, (8,), heavy)},
      'dense': {'kernel': 0.02 * _draw(rng, (16, 8), heavy)},
      'scalar': 0.5 * _draw(rng, (), heavy),
  }


def _broadcast_scales(tree, scales):
  return jax.tree.map(lambda x, s: jnp.broadcast_to(s, x.shape), tree, scales)


def _sse(a, b):
  return sum(float(jnp.sum(jnp.square(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
@pytest.mark.parametrize('bits', [8, 4, 2])
def test_nearest_error_at_most_half_a_step(bits, granularity):
  tree = _tree()
  cfg = Config(bits=bits, granularity=granularity)
  codes, scales = _quantize(tree, cfg)
  qmax = 2 ** (bits - 1) - 1
  assert scales['conv']['kernel'].shape == (
      (8,) if granularity == 'per_channel' else ())
  assert scales['conv']['bias'].shape == ()  # 1-D falls back to per-tensor.
  assert scales['scalar'].shape == ()
  for c in jax.tree.leaves(codes):
    assert c.dtype == jnp.int8
    assert int(jnp.max(jnp.abs(c))) <= qmax
  # s = max|Δ| / q_max per group (minmax).
  np.testing.assert_allclose(
      scales['dense']['kernel'],
      jnp.max(jnp.abs(tree['dense']['kernel']),
              axis=0 if granularity == 'per_channel' else None) / qmax,
      rtol=1e-6)
  recon = q_lib.dequantize(codes, scales)
  s_full = _broadcast_scales(tree, scales)
  for x, y, s in zip(jax.tree.leaves(tree), jax.tree.leaves(recon),
                     jax.tree.leaves(s_full)):
    assert np.all(np.abs(x - y) <= s / 2 * (1 + 1e-5) + 1e-12)
  # The largest entry of each group is represented exactly up to float error.
  np.testing.assert_allclose(recon['scalar'], tree['scalar'], rtol=1e-6)


@pytest.mark.parametrize('bits', [4, 2])
def test_stochastic_rounding_is_unbiased(bits):
  x = {'a': jnp.linspace(-1.0, 1.0, 23).reshape(23, 1) * jnp.array([1., .3]),
       'b': jnp.array([0.013, -0.4, 0.0])}
  cfg = Config(bits=bits, granularity='per_channel', rounding='stochastic')
  n = 4000
  keys = jax.random.split(jax.random.key(1), n)
  draws = jax.jit(jax.vmap(lambda k: q_lib.quantize_dequantize(x, cfg, k)))(
      keys)
  _, scales = _quantize(x, cfg, keys[0])
  s_full = _broadcast_scales(x, scales)
  for xi, d, s in zip(jax.tree.leaves(x), jax.tree.leaves(draws),
                      jax.tree.leaves(s_full)):
    mean = jnp.mean(d, axis=0)
    # Per entry the std is at most s/2, so 5 standard errors is 2.5 s/√n.
    assert np.all(np.abs(mean - xi) <= 2.5 * s / math.sqrt(n) + 1e-7)
    # Every draw is one of the two neighbouring grid points.
    assert np.all(np.abs(d - xi) < s * (1 + 1e-5))
  # It is genuinely random.
  assert float(jnp.max(jnp.std(draws['a'], axis=0))) > 0.0


@pytest.mark.parametrize('rounding', ['nearest', 'stochastic'])
@pytest.mark.parametrize('scale_method', ['minmax', 'mse'])
@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
def test_zero_stays_exactly_zero(rounding, scale_method, granularity):
  tree = _tree(seed=2)
  kernel = tree['conv']['kernel']
  kernel = kernel.at[..., 3].set(0.0)  # A pruned output channel.
  kernel = jnp.where(jnp.abs(kernel) < 0.005, 0.0, kernel)  # Pruned weights.
  tree['conv']['kernel'] = kernel
  tree['dense']['kernel'] = jnp.zeros((16, 8))  # An all-zero leaf.
  tree['dense']['kernel'] = tree['dense']['kernel'].at[0, 0].set(-0.0)
  cfg = Config(bits=2, granularity=granularity, rounding=rounding,
               scale_method=scale_method)
  codes, scales = _quantize(tree, cfg, jax.random.key(3))
  recon = q_lib.dequantize(codes, scales)
  for x, c, y, s in zip(jax.tree.leaves(tree), jax.tree.leaves(codes),
                        jax.tree.leaves(recon), jax.tree.leaves(scales)):
    zero = np.asarray(x) == 0
    assert np.all(np.asarray(c)[zero] == 0)
    assert np.all(np.asarray(y)[zero] == 0)
    assert np.all(np.isfinite(s))
  assert np.all(np.asarray(scales['dense']['kernel']) == 0)
  assert np.any(np.asarray(kernel) == 0)


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
@pytest.mark.parametrize('bits', [8, 4, 2])
def test_mse_scales_beat_minmax(bits, granularity):
  tree = _tree(seed=4, heavy=True)
  minmax = Config(bits=bits, granularity=granularity)
  mse = Config(bits=bits, granularity=granularity, scale_method='mse')
  err_minmax = _sse(tree, _qdq(tree, minmax))
  err_mse = _sse(tree, _qdq(tree, mse))
  # Per group the search includes r = 1 (minmax) and keeps the least error.
  assert err_mse <= err_minmax
  if bits < 8:  # Heavy tails: clipping pays off at low bit widths.
    assert err_mse < err_minmax, (err_mse, err_minmax)


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
def test_mse_scales_with_stochastic_rounding(granularity):
  # The search then minimises the expected error, so on average over draws
  # it is not worse than minmax.
  tree = _tree(seed=4, heavy=True)
  cfg_m = Config(bits=4, granularity=granularity, rounding='stochastic')
  cfg_s = Config(bits=4, granularity=granularity, rounding='stochastic',
                 scale_method='mse')
  keys = jax.random.split(jax.random.key(5), 256)
  draws = jax.jit(jax.vmap(lambda k, c: q_lib.quantize_dequantize(tree, c, k),
                           in_axes=(0, None)), static_argnums=1)
  batch = jax.tree.map(lambda x: x[None], tree)
  e_m = _sse(batch, draws(keys, cfg_m))
  e_s = _sse(batch, draws(keys, cfg_s))
  assert e_s < e_m, (e_s, e_m)


def test_pack_known_layout():
  cfg = Config(bits=4)
  codes = {'a': np.array([-7, 7, 0], np.int8)}
  scales = {'a': np.float32(0.5)}
  # u = q + 7 = [0, 14, 7]; byte 0 = 0 | 14 << 4, byte 1 = 7; then the scale.
  assert q_lib.pack(codes, scales, cfg) == (
      bytes([0xE0, 0x07]) + np.float32(0.5).astype('<f4').tobytes())
  # With 8 bits each code is the byte q + 127.
  assert q_lib.pack(codes, scales, Config(bits=8))[:3] == bytes(
      [120, 134, 127])


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
@pytest.mark.parametrize('bits', [2, 3, 4, 5, 8, 16])
def test_pack_unpack_round_trip_and_exact_size(bits, granularity):
  tree = _tree(seed=6)
  tree['odd'] = jnp.linspace(-1.0, 1.0, 7)  # 7·bits is rarely whole bytes.
  tree['empty'] = jnp.zeros((0, 3))
  cfg = Config(bits=bits, granularity=granularity)
  codes, scales = _quantize(tree, cfg)
  assert jax.tree.leaves(codes)[0].dtype == (jnp.int8 if bits <= 8
                                             else jnp.int32)
  data = q_lib.pack(codes, scales, cfg)
  shapes = jax.tree.map(lambda x: x.shape, tree)
  assert len(data) == q_lib.wire_bytes(shapes, cfg)
  assert len(data) == q_lib.wire_bytes(tree, cfg)  # Arrays work as well.
  leaves = jax.tree.leaves(tree)
  assert q_lib.wire_bits(shapes, cfg) <= 8 * len(data) < (
      q_lib.wire_bits(shapes, cfg) + 8 * len(leaves))
  codes2, scales2 = q_lib.unpack(data, shapes, cfg)
  assert jax.tree.structure(codes2) == jax.tree.structure(codes)
  for a, b in zip(jax.tree.leaves((codes, scales)),
                  jax.tree.leaves((codes2, scales2))):
    assert np.asarray(a).dtype == b.dtype
    assert np.asarray(a).shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(ValueError, match='bytes'):
    q_lib.unpack(data[:-1], shapes, cfg)


def test_pack_large_leaf_round_trip():
  # Crosses the bit-packing chunk boundary (65536 codes).
  cfg = Config(bits=3)
  rng = np.random.default_rng(0)
  codes = {'w': rng.integers(-3, 4, size=(70001,)).astype(np.int8)}
  scales = {'w': np.float32(0.25)}
  data = q_lib.pack(codes, scales, cfg)
  assert len(data) == math.ceil(3 * 70001 / 8) + 4
  codes2, _ = q_lib.unpack(data, {'w': (70001,)}, cfg)
  np.testing.assert_array_equal(codes2['w'], codes['w'])


def test_wire_bits_by_hand_and_ratios():
  shapes = {'k': (3, 3, 4, 8), 'b': (8,), 's': ()}
  numel = 288 + 8 + 1
  assert q_lib.wire_bits(shapes, Config(bits=4)) == 4 * numel + 32 * 3
  assert q_lib.wire_bits(
      shapes, Config(bits=4, granularity='per_channel')) == (
          4 * numel + 32 * (8 + 1 + 1))
  assert q_lib.wire_bytes(shapes, Config(bits=3)) == (
      math.ceil(3 * 288 / 8) + math.ceil(3 * 8 / 8) + 1 + 4 * 3)
  # A UNet-like tree (only shapes: no arrays are made).
  unet = {
      'conv_in': {'kernel': (3, 3, 3, 64), 'bias': (64,)},
      'down': [{'conv': {'kernel': (3, 3, 64, 64), 'bias': (64,)},
                'norm': {'scale': (64,), 'bias': (64,)}},
               {'conv': {'kernel': (3, 3, 64, 128), 'bias': (128,)},
                'norm': {'scale': (128,), 'bias': (128,)}}],
      'time_mlp': {'kernel': (128, 512), 'bias': (512,)},
      'attn': {'qkv': (128, 384), 'out': (128, 128)},
      'conv_out': {'kernel': (3, 3, 64, 3), 'bias': (3,)},
  }
  numel = sum(math.prod(s) for s in jax.tree.leaves(
      unet, is_leaf=lambda x: isinstance(x, tuple)))
  for granularity in ('per_tensor', 'per_channel'):
    ratio8 = 32 * numel / q_lib.wire_bits(unet, Config(8, granularity))
    ratio4 = 32 * numel / q_lib.wire_bits(unet, Config(4, granularity))
    assert ratio8 >= 3.9, ratio8
    assert ratio4 >= 7.5, ratio4
    assert 4 * numel / q_lib.wire_bytes(unet, Config(8, granularity)) >= 3.9
    assert 4 * numel / q_lib.wire_bytes(unet, Config(4, granularity)) >= 7.5


def _ef_run(deltas, cfg, use_ef, keys):
  """Quantizes a sequence of updates; returns Σ Δ − Σ Δ̂ after every round."""

  def step(carry, inputs):
    residual, drift = carry
    delta, key = inputs
    if use_ef:
      hat, residual = q_lib.error_feedback_quantize(delta, residual, cfg, key)
    else:
      hat = q_lib.quantize_dequantize(delta, cfg, key)
    drift = jax.tree.map(lambda a, d, h: a + d - h, drift, delta, hat)
    return (residual, drift), (drift, residual)

  zeros = q_lib.init_residual(jax.tree.map(lambda x: x[0], deltas))
  _, (drifts, residuals) = jax.lax.scan(step, (zeros, zeros), (deltas, keys))
  return drifts, residuals


@pytest.mark.parametrize('rounding', ['nearest', 'stochastic'])
def test_error_feedback_bounds_the_accumulated_error(rounding):
  rounds = 60
  k1, k2 = jax.random.split(jax.random.key(7))
  # One large entry sets the scale; the others are below s/2 every round and
  # would always round to zero without error feedback.
  base = jnp.array([1.0, 0.02, -0.03, 0.05, 0.0])
  noise = 0.005 * jax.random.normal(k1, (rounds, 5)) * (base != 0)
  deltas = {'w': base + noise, 'k': jnp.tile(base[:4].reshape(2, 2), (
      rounds, 1, 1))}
  keys = jax.random.split(k2, rounds)
  cfg = Config(bits=4, rounding=rounding)
  run = jax.jit(_ef_run, static_argnums=(1, 2))
  drift_ef, residuals = run(deltas, cfg, True, keys)
  drift_plain, _ = run(deltas, cfg, False, keys)
  # Σ Δ − Σ Δ̂ telescopes to the current residual e_t ...
  for d, e in zip(jax.tree.leaves(drift_ef), jax.tree.leaves(residuals)):
    np.testing.assert_allclose(d, e, atol=1e-5)
  # ... and |e_t| ≤ s (s/2 for nearest rounding) with s ≈ max|Δ + e| / 7.
  s_max = 1.2 / 7
  bound = s_max / 2 if rounding == 'nearest' else s_max
  for d in jax.tree.leaves(drift_ef):
    assert float(jnp.max(jnp.abs(d))) <= bound
  # Exactly, for the last round: |e_T| ≤ s_T / 2 with the actual scale.
  if rounding == 'nearest':
    last = jax.tree.map(lambda x, e: x[-1] + e[-2], deltas, residuals)
    scales = q_lib.compute_scales(last, cfg)
    for e, s in zip(jax.tree.leaves(residuals), jax.tree.leaves(scales)):
      assert np.all(np.abs(e[-1]) <= s / 2 * (1 + 1e-5) + 1e-7)
  # Without error feedback and with nearest rounding the small entries are
  # lost every round: the drift grows linearly. (With stochastic rounding it
  # is an unbiased random walk, growing like √T; not asserted.)
  if rounding == 'nearest':
    plain = np.abs(np.asarray(drift_plain['w']))
    assert plain[-1, 3] > 0.9 * 0.05 * rounds
    assert plain[-1].max() > 10 * bound
    assert plain[-1].max() > 4 * plain[rounds // 5 - 1].max()


def _mlp_apply(params, x):
  h = jnp.tanh(x @ params['l1']['w'] + params['l1']['b'])
  return h @ params['l2']['w'] + params['l2']['b']


def _mlp(seed):
  rng = np.random.default_rng(seed)
  params = {'l1': {'w': _draw(rng, (4, 16), False) / 2, 'b': jnp.zeros(16)},
            'l2': {'w': _draw(rng, (16, 4), False) / 4, 'b': jnp.zeros(4)}}
  delta = {'l1': {'w': 0.1 * _draw(rng, (4, 16), True),
                  'b': 0.05 * _draw(rng, (16,), True)},
           'l2': {'w': 0.1 * _draw(rng, (16, 4), True),
                  'b': 0.05 * _draw(rng, (4,), False)}}
  x = _draw(rng, (32, 4), False)
  return params, delta, x


def _output_mse(params, delta, delta_hat, x):
  add = lambda d: jax.tree.map(lambda p, e: p + e, params, d)
  return float(jnp.mean(jnp.square(_mlp_apply(add(delta), x) -
                                   _mlp_apply(add(delta_hat), x))))


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
def test_calibrated_scales_beat_minmax_on_outputs(granularity):
  params, delta, x = _mlp(0)
  cfg = Config(bits=3, granularity=granularity, scale_method='calibrated')
  calibrate = jax.jit(lambda d, p, x: q_lib.calibrate_scales(
      d, p, _mlp_apply, x, cfg))
  scales = calibrate(delta, params, x)
  assert jax.tree.map(jnp.shape, scales) == jax.tree.map(
      jnp.shape, q_lib.compute_scales(delta, Config(bits=3,
                                                    granularity=granularity)))
  calibrated = _output_mse(
      params, delta, q_lib.quantize_dequantize(delta, cfg, scales=scales), x)
  minmax = _output_mse(params, delta, q_lib.quantize_dequantize(
      delta, Config(bits=3, granularity=granularity)), x)
  assert calibrated <= minmax * (1 + 1e-6)
  assert calibrated < 0.9 * minmax, (calibrated, minmax)
  with pytest.raises(ValueError, match='calibrate'):
    q_lib.quantize(delta, cfg)


def test_jit_and_vmap_over_clients():
  num_clients = 3
  trees = [_tree(seed=10 + i, heavy=True) for i in range(num_clients)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  keys = jax.random.split(jax.random.key(11), num_clients)
  cfg = Config(bits=4, granularity='per_channel', rounding='stochastic',
               scale_method='mse')
  quant = jax.jit(jax.vmap(lambda t, k: q_lib.quantize(t, cfg, k)))
  codes, scales = quant(stacked, keys)
  # Scales are per client (per-tensor leaves get one scale per client).
  assert scales['scalar'].shape == (num_clients,)
  assert scales['conv']['kernel'].shape == (num_clients, 8)
  jit_q = jax.jit(q_lib.quantize, static_argnums=1)
  for i in range(num_clients):
    c_i, s_i = jit_q(trees[i], cfg, keys[i])
    for a, b in zip(jax.tree.leaves((c_i, s_i)),
                    jax.tree.leaves((codes, scales))):
      np.testing.assert_array_equal(a, b[i])
  # Error feedback with the residual stacked on the client axis.
  ef = jax.jit(jax.vmap(
      lambda d, e, k: q_lib.error_feedback_quantize(d, e, cfg, k)))
  hat, residual = ef(stacked, q_lib.init_residual(stacked), keys)
  for d, h, e in zip(jax.tree.leaves(stacked), jax.tree.leaves(hat),
                     jax.tree.leaves(residual)):
    np.testing.assert_allclose(d - h, e, atol=1e-7)
  # Calibration vmapped over clients, with shared global params.
  params, _, x = _mlp(1)
  deltas = jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[_mlp(2 + i)[1] for i in range(2)])
  cal_cfg = Config(bits=4, ratios=(1.0, 0.8, 0.6))
  cal_one = lambda d: q_lib.calibrate_scales(d, params, _mlp_apply, x, cal_cfg)
  cal_scales = jax.jit(jax.vmap(cal_one))(deltas)
  cal_one = jax.jit(cal_one)
  for i in range(2):
    one = cal_one(jax.tree.map(lambda v: v[i], deltas))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(cal_scales)):
      np.testing.assert_allclose(a, b[i], rtol=1e-6)


def test_searches_run_inside_shard_map():
  """The scale searches' loops keep their carry types under shard_map, where
  the update varies over the mesh axis and θ_global does not."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2,), ('c',), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  params, _, x = _mlp(1)
  deltas = jax.tree.map(lambda *xs: jnp.concatenate(xs),
                        *[jax.tree.map(lambda v: v[None], _mlp(2 + i)[1])
                          for i in range(2)])
  mse = Config(bits=4, granularity='per_channel', scale_method='mse')
  cal = Config(bits=4, ratios=(1.0, 0.8, 0.6))

  def per_device(d, g):
    d = jax.tree.map(lambda v: v[0], d)
    g = jax.tree.map(lambda v: jax.lax.pcast(v, ('c',), to='varying'), g)
    out = (q_lib.compute_scales(d, mse),
           q_lib.calibrate_scales(d, g, _mlp_apply, x, cal))
    return jax.tree.map(lambda v: v[None], out)

  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                  in_specs=(P('c'), P()), out_specs=P('c')))
  got = sharded(deltas, params)
  for i in range(2):
    d = jax.tree.map(lambda v, i=i: v[i], deltas)
    want = (q_lib.compute_scales(d, mse),
            q_lib.calibrate_scales(d, params, _mlp_apply, x, cal))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b[i], rtol=1e-6)


def test_config_validation():
  for bad in (dict(bits=1), dict(bits=17), dict(granularity='per_row'),
              dict(rounding='up'), dict(scale_method='max'),
              dict(ratios=()), dict(ratios=(1.2,))):
    with pytest.raises(ValueError):
      Config(**bad)
  assert Config(bits=16).code_dtype == np.int32
  hash(Config())  # Static under jit.
  with pytest.raises(ValueError, match='rng'):
    q_lib.quantize({'a': jnp.ones(3)}, Config(rounding='stochastic'))


@pytest.mark.parametrize('rounding', ['nearest', 'stochastic'])
def test_clip_quantize_mass_by_hand(rounding):
  # 2 bits (q_max = 1), one scale s = 0.5: the grid is {-0.5, 0, 0.5}.
  x = {'a': jnp.array([0.2, -0.4, 1.3, -2.0, 0.5, 0.0])}
  cfg = Config(bits=2, rounding=rounding)
  scales = {'a': jnp.asarray(0.5)}
  key = jax.random.key(0) if rounding == 'stochastic' else None
  hat, mass = q_lib.clip_quantize(x, cfg, key, scales=scales)
  np.testing.assert_allclose(mass['a'], [0, 0, 0.8, -1.5, 0, 0], atol=1e-7)
  np.testing.assert_array_equal(
      hat['a'], q_lib.quantize_dequantize(x, cfg, key, scales=scales)['a'])
  # What clipping left: the clipped entries sit on the grid's ends.
  np.testing.assert_allclose(hat['a'][2:4], [0.5, -0.5])
  assert q_lib.clips(Config(bits=2, scale_method='mse'))
  assert q_lib.clips(Config(bits=2, scale_method='calibrated'))
  assert not q_lib.clips(Config(bits=2, scale_method='minmax'))
  assert not q_lib.clips(Config(bits=2, scale_method='mse', ratios=(1.0,)))
