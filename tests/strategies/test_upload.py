"""The upload-transform contract, its combinators, wire bytes and config."""

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import mnist_fedavg
from configs import test as test_config
from fedjax_diff import comm
from fedjax_diff import models
from fedjax_diff.diffusion import ddim_step
from fedjax_diff.diffusion import linear_schedule
from fedjax_diff.strategies import build
from fedjax_diff.strategies import proximal as proximal_lib
from fedjax_diff.strategies import quantize as q_lib
from fedjax_diff.strategies import upload as upload_lib
from fedjax_diff.strategies.calibration import Calibration

Config = q_lib.QuantizationConfig


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.01,
                                         jnp.float32),
                   'bias': jnp.asarray(rng.normal(size=(4,)) * 0.001,
                                       jnp.float32)},
          'scale': jnp.asarray(0.3, jnp.float32)}


def _ctx(params):
  return upload_lib.UploadContext(
      global_params=jax.tree.map(jnp.zeros_like, params), params=params,
      labels=jnp.zeros((4,), jnp.int32), count=jnp.asarray(4),
      round=jnp.asarray(0))


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def keep_first_half() -> upload_lib.UploadTransform:
  """A toy sparsifier for the contract: zeroes the second half of each
  flattened leaf; sends a bitmap of ⌈n/8⌉ bytes, then the kept half."""

  def apply(delta, z, key, ctx):
    del key, ctx
    def leaf(d):
      flat = d.reshape(-1)
      keep = jnp.arange(flat.size) < (flat.size + 1) // 2
      return jnp.where(keep, flat, 0).reshape(d.shape)
    return jax.tree.map(leaf, delta), z

  def wire_bytes(shapes, rest):
    kept = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(((math.prod(s.shape) + 1) // 2,),
                                       s.dtype), shapes)
    bitmap = sum(-(-math.prod(s.shape) // 8) for s in jax.tree.leaves(shapes))
    return bitmap + rest(kept)

  return upload_lib.UploadTransform(lambda p: (), apply, wire_bytes, 'half')


def test_identity_and_fedavg_bytes():
  tree = _tree()
  ident = upload_lib.identity()
  out, z = ident.apply(tree, (), jax.random.PRNGKey(0), _ctx(tree))
  assert out is tree and z == ()
  n = 3 * 3 * 2 * 4 + 4 + 1
  assert comm.message_bytes(ident, tree) == comm.message_bytes(None, tree) \
      == 4 * n
  assert upload_lib.chain().name == 'fp32'


def test_chain_keys_state_and_wire_bytes():
  tree = _tree()
  cfg4 = Config(bits=4, rounding='stochastic')
  q4 = upload_lib.quantizer(cfg4)
  assert upload_lib.chain(q4) is q4
  ef = upload_lib.error_feedback(q4)
  both = upload_lib.chain(keep_first_half(), ef)
  assert both.encodes
  key = jax.random.PRNGKey(3)
  z0 = both.init_client_state(tree)
  assert z0[0] == () and set(z0[1]) == {'residual', 'inner'}
  out, z = both.apply(tree, z0, key, _ctx(tree))
  # Stage i gets fold_in(key, i); the quantizer rounds with split(key)[0].
  half, _ = keep_first_half().apply(tree, (), None, None)
  expected, residual = q_lib.error_feedback_quantize(
      half, q_lib.init_residual(tree), cfg4,
      jax.random.split(jax.random.fold_in(key, 1))[0])
  for a, b in zip(jax.tree.leaves((out, z[1]['residual'])),
                  jax.tree.leaves((expected, residual))):
    np.testing.assert_array_equal(a, b)
  assert float(out['conv']['kernel'].reshape(-1)[-1]) == 0.0

  # A sparsifier then a quantizer: bitmap + codes of the kept entries.
  masked = upload_lib.chain(keep_first_half(), q4)
  assert masked.name == 'half -> int4 per_tensor stochastic minmax'
  # Leaves: bias (4 → 2 kept), kernel (72 → 36), scale (1 → 1); per leaf
  # ⌈n/8⌉ bitmap bytes, ⌈4·kept/8⌉ code bytes and one 4-byte scale.
  bitmap = 1 + 9 + 1
  codes = (1 + 4) + (18 + 4) + (1 + 4)
  assert comm.message_bytes(masked, tree) == bitmap + codes
  assert comm.message_bytes(both, tree) == bitmap + codes
  # Without an encoder after it, the kept half goes as float32.
  assert comm.message_bytes(keep_first_half(), tree) == bitmap + 4 * (
      2 + 36 + 1)


def test_chain_rejects_non_transforms_and_early_encoders():
  with pytest.raises(TypeError, match='stage 1'):
    upload_lib.chain(upload_lib.identity(), lambda x: x)
  q = upload_lib.quantizer(Config(bits=8))
  with pytest.raises(ValueError, match='must be the last stage'):
    upload_lib.chain(upload_lib.error_feedback(q), keep_first_half())


@pytest.mark.parametrize('rounding', ['nearest', 'stochastic'])
def test_error_feedback_wrapper_is_error_feedback_quantize(rounding):
  cfg = Config(bits=2, granularity='per_channel', rounding=rounding)
  ef = upload_lib.error_feedback(upload_lib.quantizer(cfg))
  z = ef.init_client_state(_tree())
  assert jax.tree.structure(z['residual']) == jax.tree.structure(_tree())
  residual = q_lib.init_residual(_tree())
  apply = jax.jit(ef.apply)
  for r in range(3):
    delta = _tree(seed=r)
    key = jax.random.PRNGKey(r)
    out, z = apply(delta, z, key, _ctx(delta))
    ref, residual = q_lib.error_feedback_quantize(
        delta, residual, cfg,
        jax.random.split(key)[0] if rounding == 'stochastic' else None)
    for a, b in zip(jax.tree.leaves((out, z['residual'])),
                    jax.tree.leaves((ref, residual))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  # The residual is what the compressor has not delivered yet.
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(z))
  assert comm.message_bytes(ef, _tree()) == q_lib.wire_bytes(_tree(), cfg)


@pytest.mark.parametrize('bits', [8, 4, 2])
@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
def test_wire_bytes_are_the_packed_message(bits, granularity):
  """message_bytes equals len(pack(...)) at the test UNet's shapes."""
  config = test_config.get_config()
  model = models.unet_from_config(config.model)
  params = jax.eval_shape(
      lambda k: models.init_params(model, k, (8, 8, 1)), jax.random.PRNGKey(0))
  cfg = Config(bits=bits, granularity=granularity, rounding='stochastic')
  rng = np.random.default_rng(0)
  codes = jax.tree.map(lambda p: rng.integers(
      -cfg.qmax, cfg.qmax + 1, p.shape).astype(np.int8), params)
  scales = jax.tree.map(lambda p: np.ones(
      p.shape[-1:] if granularity == 'per_channel' and len(p.shape) >= 2
      else (), np.float32), params)
  message = q_lib.pack(codes, scales, cfg)
  assert len(message) == comm.message_bytes(upload_lib.quantizer(cfg),
                                            params)


def _mnist_shapes():
  model = models.unet_from_config(mnist_fedavg.get_config().model)
  return jax.eval_shape(
      lambda k: models.init_params(model, k, (28, 28, 1)),
      jax.random.PRNGKey(0))


def test_mnist_unet_uplink_ratios():
  """configs/mnist_fedavg.py's UNet: 8 bits ≥ 3.9×, 4 bits ≥ 7.5× less."""
  shapes = _mnist_shapes()
  config = mnist_fedavg.get_config()
  fp32 = comm.message_bytes(build.upload_from_config(config), shapes)
  assert fp32 == 4 * 267_313 == 1_069_252
  got = {}
  for bits in (8, 4, 2):
    config.upload.quantize_bits = bits  # per channel, the default.
    got[bits] = comm.message_bytes(build.upload_from_config(config), shapes)
  # Codes ⌈bits·numel/8⌉ per leaf + 4 B for each of the 1,589 scales.
  assert got == {8: 273_669, 4: 140_013, 2: 73_185}
  assert fp32 / got[8] >= 3.9
  assert fp32 / got[4] >= 7.5
  assert fp32 / got[2] >= 14.5
  summary = comm.run_summary(shapes, num_rounds=20, clients_per_round=10,
                             upload=build.upload_from_config(config))
  assert summary['total_uplink_bytes'] == 200 * 73_185
  assert summary['total_downlink_bytes'] == 200 * fp32
  assert summary['uplink_compression_vs_fedavg_fp32'] == fp32 / 73_185


def test_round_bytes():
  tree = _tree()
  q = upload_lib.quantizer(Config(bits=4))
  assert comm.round_bytes(tree, 3, q) == {
      'downlink_bytes': 3 * 4 * 77, 'uplink_bytes': 3 * (
          q_lib.wire_bytes(tree, Config(bits=4)))}
  assert comm.round_bytes(tree, 3) == comm.fedavg_round_bytes(tree, 3)


def test_calibration_inputs_follow_ddim_to_0_4_T():
  schedule = linear_schedule(100)

  def eps_fn(params, x, t, labels, *, train):
    del train
    bias = 0.0 if labels is None else labels[:, None, None, None] * 0.01
    return params['a'] * x + 1e-3 * t[:, None, None, None] + bias

  calib = Calibration(eps_fn=eps_fn, schedule=schedule, image_shape=(4, 4, 1),
                      num_classes=3, batch=5, steps=3, t_frac=0.4,
                      t_spread=0.05)
  params = {'a': jnp.asarray(0.5)}
  labels = jnp.asarray([2, 1, 0, 0], jnp.int32)
  key = jax.random.PRNGKey(7)
  inputs = jax.jit(calib.inputs)(params, key, labels, jnp.asarray(2))
  noise_key, t_key, label_key = jax.random.split(key, 3)
  t_end = np.asarray(calib.end_timesteps(t_key))
  np.testing.assert_array_equal(inputs.t, t_end)
  assert np.all(np.abs(t_end - 40) <= 25) and np.all(t_end >= 1)
  # Labels come from the client's own first `count` examples.
  assert set(np.asarray(inputs.labels).tolist()) <= {2, 1}
  np.testing.assert_array_equal(
      inputs.labels,
      labels[jax.random.randint(label_key, (5,), 0, 2)])
  # By hand: S DDIM steps along τ_i = round(99 − (99 − t_b)·i/S).
  x = jax.random.normal(noise_key, (5, 4, 4, 1))
  for i in range(3):
    t = np.round(99 - (99 - t_end) * i / 3).astype(np.int32)
    t_prev = np.round(99 - (99 - t_end) * (i + 1) / 3).astype(np.int32)
    eps = eps_fn(params, x, jnp.asarray(t), inputs.labels, train=False)
    x = ddim_step(schedule, x, jnp.asarray(t), jnp.asarray(t_prev), eps)
  np.testing.assert_allclose(inputs.x, x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      calib.apply_fn(params, inputs),
      eps_fn(params, inputs.x, inputs.t, inputs.labels, train=False))


def test_calibration_validation():
  schedule = linear_schedule(10)
  f = lambda *a, **k: None  # pylint: disable=unnecessary-lambda-assignment
  with pytest.raises(ValueError, match='t_frac'):
    Calibration(f, schedule, (4, 4, 1), t_frac=1.0)
  with pytest.raises(ValueError, match='steps'):
    Calibration(f, schedule, (4, 4, 1), steps=0)
  with pytest.raises(ValueError, match='image_shape'):
    Calibration(f, schedule, (4, 4))
  with pytest.raises(ValueError, match='calibration'):
    upload_lib.quantizer(Config(bits=4, scale_method='calibrated'))


def _config(**upload):
  config = mnist_fedavg.get_config()
  config.upload = ml_collections.ConfigDict({**config.upload, **upload})
  return config


def test_build_from_config():
  assert build.upload_from_config(mnist_fedavg.get_config()) is None
  old = ml_collections.ConfigDict({'model': {}})  # A config from before.
  assert build.upload_from_config(old) is None
  assert build.client_transforms(old) == []
  q = build.upload_from_config(_config(quantize_bits=4))
  assert q.name == 'int4 per_channel stochastic minmax'
  ef = build.upload_from_config(_config(quantize_bits=2, error_feedback=True,
                                        rounding='nearest',
                                        scale_method='mse'))
  assert ef.name == 'error_feedback(int2 per_channel nearest mse)'
  calibrated = build.upload_from_config(
      _config(quantize_bits=8, scale_method='calibrated'),
      eps_fn=lambda *a, **k: None, schedule=linear_schedule(10),
      image_shape=(8, 8, 1))
  assert 'calibrated' in calibrated.name

  config = mnist_fedavg.get_config()
  assert build.client_transforms(config) == []
  config.prox_mu = 0.01
  (prox,) = build.client_transforms(config)
  assert isinstance(prox, type(proximal_lib.proximal(0.01)))


@pytest.mark.parametrize('upload,match', [
    (dict(quantize_bits=1), 'bits'),
    (dict(quantize_bits='4'), 'quantize_bits must be an int'),
    (dict(quantize_bits=4, granularity='per_row'), 'granularity'),
    (dict(quantize_bits=4, rounding='up'), 'rounding'),
    (dict(error_feedback=True), 'needs a compressor'),
    (dict(quantize_bits=4, scale_method='calibrated'), 'eps_fn'),
])
def test_build_errors(upload, match):
  with pytest.raises(ValueError, match=match):
    build.upload_from_config(_config(**upload))


def test_prox_mu_errors():
  config = mnist_fedavg.get_config()
  config.prox_mu = -0.1
  with pytest.raises(ValueError, match='prox_mu'):
    build.client_transforms(config)


def test_error_feedback_keeps_what_a_bfloat16_cast_rounds_off():
  """Δ̂ + e' = Δ (+ e = 0) per round for a bfloat16 Δ, to float32 rounding:
  the residual carries the rounding of the cast to Δ's dtype as well (before,
  that rounding was lost: ~28% of a quantization step per entry)."""
  t = upload_lib.error_feedback(upload_lib.quantizer(
      q_lib.QuantizationConfig(bits=8)))
  d = {'w': jnp.asarray(np.random.default_rng(0).normal(size=64) * 0.01,
                        jnp.bfloat16)}
  hat, z = t.apply(d, t.init_client_state(d), jax.random.key(0), None)
  assert hat['w'].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(hat['w'].astype(jnp.float32) + z['residual']['w']),
      np.asarray(d['w'].astype(jnp.float32)), rtol=0, atol=2e-9)


# --- Unbiased uploads when the scales clip. ---


def _heavy_tree(seed=0):
  """A heavy-tailed (Student-t, 2 dof) update: at 2 bits the 'mse' search
  clips its large entries."""
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.standard_t(2.0, (12, 4)) * 0.01, jnp.float32),
          'b': jnp.asarray(rng.standard_t(2.0, (6,)) * 0.01, jnp.float32)}


def _calibration_stub():
  """What `quantizer` reads of a Calibration: inputs and apply_fn. The
  inputs weigh the rows of w unequally (rows 8.. barely count), so clipping
  those rows' outliers costs the output little: the search clips."""
  x = np.ones((3, 12), np.float32)
  x[:, 8:] = 1e-3
  x = jnp.asarray(x)
  return types.SimpleNamespace(
      inputs=lambda params, key, labels, count: x,
      apply_fn=lambda p, inputs: inputs @ p['w'] + p['b'][:4])


def _default_quantizer(scale_method):
  """The quantizer a config builds with its default rounding."""
  qcfg = build.quantization_config(ml_collections.ConfigDict(dict(
      quantize_bits=2, granularity='per_channel',
      scale_method=scale_method)))
  assert qcfg.rounding == 'stochastic'   # the default rounding.
  calibration = _calibration_stub() if scale_method == 'calibrated' else None
  return qcfg, upload_lib.quantizer(qcfg, calibration)


def _draws(transform, delta, z, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  ctx = _ctx(delta)
  return jax.jit(jax.vmap(lambda k: transform.apply(delta, z, k, ctx)))(keys)


@pytest.mark.parametrize('scale_method', q_lib.SCALE_METHODS)
def test_default_rounding_is_unbiased_for_every_scale_method(scale_method):
  """Monte Carlo over 20k rounding draws: E[Δ̂] = Δ + m − m', with m the
  mass the client carried in and m' what it carries out (0 for minmax)."""
  qcfg, q = _default_quantizer(scale_method)
  delta = _heavy_tree()
  z = q.init_client_state(delta)
  if scale_method != 'minmax':   # A carried mass from an earlier round.
    z = {'clipped': jax.tree.map(lambda x: 0.3 * x, _heavy_tree(1))}
  carried_in = z['clipped'] if z else jax.tree.map(jnp.zeros_like, delta)
  n = 20000
  sent, z_out = _draws(q, delta, z, n)
  carried_out = (z_out['clipped'] if z_out else
                 jax.tree.map(jnp.zeros_like, sent))
  worst, clipped = 0.0, 0.0
  for d, m_in, hat, m_out in zip(*map(jax.tree.leaves, (delta, carried_in,
                                                        sent, carried_out))):
    hat, m_out = np.asarray(hat, np.float64), np.asarray(m_out, np.float64)
    # m' is deterministic given the input (the scales are).
    np.testing.assert_array_equal(m_out, m_out[:1].repeat(n, 0))
    want = np.asarray(d, np.float64) + np.asarray(m_in, np.float64)
    err = np.abs(hat.mean(0) + m_out[0] - want)
    # Per entry the draw is one of two grid points: the standard error of
    # the mean, plus float32 rounding for entries that never vary.
    tol = hat.std(0) / math.sqrt(n) + 1e-6 * np.abs(want) + 1e-9
    worst = max(worst, float(np.max(err / tol)))
    clipped = max(clipped, float(np.max(np.abs(m_out[0]))))
  assert worst < 5.0, worst
  if scale_method == 'minmax':
    assert not z_out and clipped == 0.0
  else:
    # The scales do clip here: without the carried mass Δ̂ would be biased.
    assert clipped > 0.0 and q.carries


def test_without_the_carry_clipping_is_biased():
  """The same 2-bit 'mse' quantizer with carry_clipped=False (meant for
  error feedback only) loses the clipped mass: a bias of many standard
  errors, which the test above would catch."""
  qcfg, _ = _default_quantizer('mse')
  q = upload_lib.quantizer(qcfg, carry_clipped=False)
  assert not q.carries and not q.init_client_state(_heavy_tree())
  delta = _heavy_tree()
  n = 20000
  sent, _ = _draws(q, delta, (), n)
  _, mass = q_lib.clip_quantize(delta, qcfg, jax.random.key(0))
  for d, hat, m in zip(*map(jax.tree.leaves, (delta, sent, mass))):
    hat = np.asarray(hat, np.float64)
    np.testing.assert_allclose(hat.mean(0), np.asarray(d) - np.asarray(m),
                               atol=5 * float(hat.std(0).max()) /
                               math.sqrt(n) + 1e-9)
  se = max(float(np.asarray(h).std(0).max()) for h in jax.tree.leaves(sent))
  bias = max(float(np.abs(np.asarray(h).mean(0) - np.asarray(d)).max())
             for h, d in zip(jax.tree.leaves(sent), jax.tree.leaves(delta)))
  assert bias > 50 * se / math.sqrt(n), (bias, se)


@pytest.mark.parametrize('scale_method', ['mse', 'calibrated'])
def test_carried_mass_telescopes_over_rounds(scale_method):
  """Σ_t E[Δ̂_t] = Σ_t Δ_t − m_T over 6 rounds (a plain loop over rounds,
  2,000 draws of the whole sequence)."""
  _, q = _default_quantizer(scale_method)
  deltas = [_heavy_tree(seed) for seed in range(6)]
  ctx = _ctx(deltas[0])

  def sequence(key):
    z = q.init_client_state(deltas[0])
    total = jax.tree.map(jnp.zeros_like, deltas[0])
    for t, d in enumerate(deltas):
      sent, z = q.apply(d, z, jax.random.fold_in(key, t), ctx)
      total = jax.tree.map(jnp.add, total, sent)
    return total, z['clipped']

  n = 2000
  totals, last = jax.jit(jax.vmap(sequence))(
      jax.random.split(jax.random.key(3), n))
  for leaves in zip(*(jax.tree.leaves(d) for d in deltas),
                    jax.tree.leaves(totals), jax.tree.leaves(last)):
    *ds, tot, m_t = (np.asarray(x, np.float64) for x in leaves)
    want = sum(ds) - m_t.mean(0)
    tol = tot.std(0) / math.sqrt(n) + 1e-6 * np.abs(want) + 1e-9
    assert np.all(np.abs(tot.mean(0) - want) <= 5 * tol)


def test_carrying_quantizer_is_carry_clipped_quantize():
  qcfg, q = _default_quantizer('mse')
  z = q.init_client_state(_heavy_tree())
  carry = q_lib.init_residual(_heavy_tree())
  apply = jax.jit(q.apply)
  for r in range(3):
    delta = _heavy_tree(seed=r)
    key = jax.random.PRNGKey(r)
    out, z = apply(delta, z, key, _ctx(delta))
    ref, carry = q_lib.carry_clipped_quantize(delta, carry, qcfg,
                                              jax.random.split(key)[0])
    for a, b in zip(jax.tree.leaves((out, z['clipped'])),
                    jax.tree.leaves((ref, carry))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(z))
  assert comm.message_bytes(q, _tree()) == q_lib.wire_bytes(_tree(), qcfg)


def test_error_feedback_refuses_a_quantizer_that_carries():
  qcfg, q = _default_quantizer('mse')
  with pytest.raises(ValueError, match='carry_clipped=False'):
    upload_lib.error_feedback(q)
  ef = upload_lib.error_feedback(upload_lib.quantizer(qcfg,
                                                      carry_clipped=False))
  assert ef.carries
  # From a config: error feedback carries the clipped mass, or the
  # quantizer does; nearest rounding and minmax scales carry nothing.
  made = build.upload_from_config(_config(quantize_bits=2,
                                          scale_method='mse'))
  assert made.carries and 'clipped mass carried' in made.name
  made = build.upload_from_config(_config(quantize_bits=2, scale_method='mse',
                                          error_feedback=True))
  assert made.name == 'error_feedback(int2 per_channel stochastic mse)'
  for fields in (dict(scale_method='mse', rounding='nearest'),
                 dict(scale_method='minmax')):
    made = build.upload_from_config(_config(quantize_bits=2, **fields))
    assert not made.carries and not made.init_client_state(_tree())
