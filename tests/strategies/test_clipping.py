"""Clipping client updates (DP-FedAvg's sensitivity bound), by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff.strategies import clipping
from fedjax_diff.strategies import privacy
from fedjax_diff.strategies import upload as upload_lib


def _ctx(clip_norm=None):
  zeros = {'a': jnp.zeros((2,)), 'b': jnp.zeros((1, 1))}
  return upload_lib.UploadContext(
      global_params=zeros, params=zeros, labels=jnp.zeros((4,), jnp.int32),
      count=jnp.asarray(4), round=jnp.asarray(0), clip_norm=clip_norm)


# ‖Δ‖ = ‖(3, 0, 4)‖ = 5.
DELTA = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([[4.0]])}


def test_clip_hand_case():
  t = clipping.clip(1.0)
  hat, z = t.apply(DELTA, (), jax.random.key(0), _ctx())
  # Δ · 1/5 over all leaves together, not per leaf.
  np.testing.assert_allclose(hat['a'], [0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(hat['b'], [[0.8]], rtol=1e-6)
  assert z == ()
  assert math.isclose(float(clipping.global_norm(hat)), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize('c', [5.0, 10.0, float('inf')])
def test_clip_leaves_small_updates_bit_for_bit(c):
  hat, _ = jax.jit(clipping.clip(c).apply)(DELTA, (), jax.random.key(0),
                                          _ctx())
  for k in DELTA:
    np.testing.assert_array_equal(np.asarray(hat[k]), np.asarray(DELTA[k]))


def test_clip_zero_update_and_bfloat16():
  zero = jax.tree.map(jnp.zeros_like, DELTA)
  hat, _ = clipping.clip(1.0).apply(zero, (), jax.random.key(0), _ctx())
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(hat))
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), DELTA)
  hat, _ = clipping.clip(2.5).apply(bf, (), jax.random.key(0), _ctx())
  assert hat['a'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(hat['a'], np.float32), [1.5, 0.0],
                             rtol=1e-2)
  np.testing.assert_allclose(np.asarray(hat['b'], np.float32), [[2.0]],
                             rtol=1e-2)


def test_clip_reads_the_rounds_clip_norm():
  t = clipping.clip()
  hat, _ = jax.jit(t.apply)(DELTA, (), jax.random.key(0),
                            _ctx(jnp.asarray(2.0)))
  np.testing.assert_allclose(hat['a'], [1.2, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match='UploadContext.clip_norm'):
    t.apply(DELTA, (), jax.random.key(0), _ctx())
  with pytest.raises(ValueError, match='must be > 0'):
    clipping.clip(0.0)


def test_clip_sends_what_follows_it():
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        DELTA)
  assert clipping.clip(1.0).wire_bytes(shapes, lambda s: 123) == 123


def test_adapt_clip_norm_hand_case():
  # b̄ = 0.8 > γ = 0.5: too many updates fit, C shrinks by exp(−0.2·0.3).
  np.testing.assert_allclose(
      clipping.adapt_clip_norm(1.0, 0.8, 0.5, 0.2), math.exp(-0.06),
      rtol=1e-6)
  np.testing.assert_allclose(
      clipping.adapt_clip_norm(2.0, 0.1, 0.5, 0.2), 2.0 * math.exp(0.08),
      rtol=1e-6)
  # A noised fraction outside [0, 1] is clamped.
  np.testing.assert_allclose(
      clipping.adapt_clip_norm(1.0, -0.7, 0.5, 0.2), math.exp(0.1),
      rtol=1e-6)


def _aggregate(contributions, weights, noise_multiplier=0.0, divisor=1.0):
  """gaussian_sum over one chunk, finalized in a 1-device shard_map."""
  agg = privacy.gaussian_sum(noise_multiplier, divisor, count_stddev=1.0)
  mesh = jax.make_mesh((1,), ('clients',), devices=jax.devices()[:1])
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     contributions)

  def run(c, w, key):
    acc = agg.accumulate(agg.init(one), c, w)
    return agg.finalize(acc, 'clients', key)

  return jax.jit(jax.shard_map(
      run, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),) * 3,
      out_specs=jax.sharding.PartitionSpec()))(
          contributions, weights, jax.random.key(0))


def test_each_clients_contribution_is_bounded():
  """Hand case: with σ = 0 and C = 1, a client whose update is 100× the
  bound adds exactly its direction at norm C; one within the bound adds
  itself; a padding slot (weight 0, even NaN) adds nothing; a contribution
  a quantizer pushed over the bound (norm 1.3 after clipping) is clipped
  again where the noise is added."""
  clip_norm = 1.0
  raw = [{'a': jnp.array([300.0, 0.0]), 'b': jnp.array([[400.0]])},  # 500
         {'a': jnp.array([0.0, 0.3]), 'b': jnp.array([[0.4]])},      # 0.5
         {'a': jnp.array([1.3, 0.0]), 'b': jnp.array([[0.0]])},      # 1.3
         {'a': jnp.array([jnp.nan, 1.0]), 'b': jnp.array([[1.0]])}]
  norms = [500.0, 0.5, 1.3, 1.0]
  contribs = []
  for i, d in enumerate(raw[:2]):
    hat, _ = clipping.clip(clip_norm).apply(d, (), jax.random.key(0), _ctx())
    contribs.append(privacy.contribution(hat, norms[i], clip_norm))
  # Client 2's Δ̂ is what a quantizer returned after clipping (norm 1.3).
  contribs.append(privacy.contribution(raw[2], 0.9, clip_norm))
  contribs.append(privacy.contribution(raw[3], norms[3], clip_norm))
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *contribs)
  mean, frac = _aggregate(stacked, jnp.array([1.0, 1.0, 1.0, 0.0]),
                          divisor=2.0)
  # (0.6, 0.0; 0.8) + (0.0, 0.3; 0.4) + (1.0, 0.0; 0.0), over m = 2.
  np.testing.assert_allclose(mean['a'], [0.8, 0.15], rtol=1e-6)
  np.testing.assert_allclose(mean['b'], [[0.6]], rtol=1e-6)
  # No client moves the sum by more than C, whatever its update.
  for d in contribs[:3]:
    assert float(clipping.global_norm(d.update)) <= 1.3 + 1e-6
  assert np.isfinite(float(frac))
