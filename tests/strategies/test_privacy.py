"""DP-FedAvg's pieces: the config block, Poisson sampling, the noise."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

import testlib as lib
from fedjax_diff import federation
from fedjax_diff.algorithms import base
from fedjax_diff.strategies import accountant
from fedjax_diff.strategies import privacy


def _config(**dp):
  config = lib.tiny_config(dp=lib.dp_config())
  for k, v in dp.items():
    with config.dp.ignore_type():
      config.dp[k] = v
  return config


# -- The config block. -----------------------------------------------------


def test_settings_absent_or_disabled_is_none():
  assert privacy.Settings.from_config(lib.tiny_config()) is None
  assert privacy.Settings.from_config(_config(enabled=False)) is None
  s = privacy.Settings.from_config(_config())
  assert (s.clip_norm, s.noise_multiplier, s.target_epsilon, s.delta,
          s.adaptive) == (0.05, 0.5, None, 1e-5, False)


@pytest.mark.parametrize('field,value,match', [
    ('noise_multiplier', None, 'exactly one of noise_multiplier'),
    ('target_epsilon', 3.0, 'exactly one of noise_multiplier'),
    ('clip_norm', 0.0, r'clip_norm must be in \(0'),
    ('clip_norm', 'big', 'clip_norm must be a number'),
    ('delta', 1.0, r'delta must be in \(0, 1'),
    ('noise_multiplier', -1.0, r'noise_multiplier must be in \[0'),
    ('accountant', 'moments', "use one of \\('rdp', 'pld'\\)"),
])
def test_settings_errors_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    privacy.Settings.from_config(_config(**{field: value}))


def test_settings_unknown_field():
  config = _config()
  config.dp.clip = 1.0
  with pytest.raises(ValueError, match=r"unknown fields \['clip'\]"):
    privacy.Settings.from_config(config)


def test_update_noise_multiplier_splits_the_budget():
  """Andrew et al. 2021, Thm. 1: σ^-2 = σ_Δ^-2 + (2σ_b)^-2."""
  sigma_u = privacy.update_noise_multiplier(1.0, 2.0)
  assert math.isclose(sigma_u ** -2 + 4.0 ** -2, 1.0, rel_tol=1e-12)
  assert privacy.update_noise_multiplier(1.0, None) == 1.0
  with pytest.raises(ValueError, match='2σ_b > σ'):
    privacy.update_noise_multiplier(1.0, 0.5)


def test_mechanism_calibrates_sigma_from_target_epsilon():
  config = _config(noise_multiplier=None, target_epsilon=4.0)
  s = privacy.Settings.from_config(config)
  mech = privacy.Mechanism(s, num_clients=16, clients_per_round=4,
                           num_rounds=5)
  assert mech.sampling_rate == 0.25
  want = accountant.calibrate_noise(4.0, 0.25, 5, 1e-5)
  assert mech.noise_multiplier == want
  assert mech.epsilon(5) <= 4.0 and mech.epsilon(5) > 0.99 * 4.0
  with pytest.raises(ValueError, match='expected cohort'):
    privacy.Mechanism(s, num_clients=16, clients_per_round=17, num_rounds=5)


def test_resumed_run_with_another_sigma_is_refused():
  s = privacy.Settings.from_config(_config())
  mech = privacy.Mechanism(s, num_clients=16, clients_per_round=4,
                           num_rounds=5)
  mech.check_resumed(mech.init())
  other = {**mech.init(), 'noise_multiplier': jnp.asarray(0.7)}
  with pytest.raises(ValueError, match='resume with the original num_rounds'):
    mech.check_resumed(other)


# -- Poisson sampling. ---------------------------------------------------------


def test_poisson_sampling_rate_and_determinism():
  n, q, rounds = 200, 0.1, 2000
  cohorts = [federation.poisson_sample_clients(n, q, 7, r)
             for r in range(rounds)]
  again = federation.poisson_sample_clients(n, q, 7, 3)
  np.testing.assert_array_equal(again, cohorts[3])
  sizes = np.array([len(c) for c in cohorts])
  # Binomial(n, q): mean nq = 20, variance nq(1 − q) = 18.
  assert abs(sizes.mean() - 20) < 4 * math.sqrt(18 / rounds)
  assert abs(sizes.var() - 18) < 0.15 * 18
  # Every client is in with probability q, independently of the round.
  hits = np.bincount(np.concatenate(cohorts), minlength=n) / rounds
  assert abs(hits.mean() - q) < 0.002 and hits.min() > 0.06
  assert len({tuple(c) for c in cohorts}) > rounds - 5
  assert all(np.all(np.diff(c) > 0) for c in cohorts)
  with pytest.raises(ValueError, match='rate must be in'):
    federation.poisson_sample_clients(n, 0.0, 7, 0)


def test_round_clients_follows_the_config():
  plain = lib.tiny_config()
  dp = _config()
  a = base.round_clients(plain, 16, 2)
  np.testing.assert_array_equal(a, federation.sample_clients(16, 12, 0, 2))
  b = base.round_clients(dp, 16, 2)
  np.testing.assert_array_equal(
      b, federation.poisson_sample_clients(16, 12 / 16, 0, 2))


# -- The noise. -------------------------------------------------------------


def _finalize(noise_multiplier, divisor, count_stddev, shapes, key,
              num_devices=1, contributions=None, weights=None):
  """gaussian_sum's aggregate of `contributions` (default: zeros of one
  client per device) on a `num_devices` mesh."""
  agg = privacy.gaussian_sum(noise_multiplier, divisor, count_stddev)
  mesh = jax.make_mesh((num_devices,), ('clients',),
                       devices=jax.devices()[:num_devices])
  if contributions is None:
    contributions = privacy.Contribution(
        update={k: jnp.zeros((num_devices,) + s) for k, s in shapes.items()},
        below=jnp.zeros((num_devices,)))
    weights = jnp.ones((num_devices,))
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     contributions)

  def run(c, w, k):
    return agg.finalize(agg.accumulate(agg.init(one), c, w), 'clients', k)

  split = jax.sharding.NamedSharding(mesh, P('clients'))
  contributions, weights = jax.device_put((contributions, weights), split)
  return jax.jit(jax.shard_map(run, mesh=mesh,
                               in_specs=(P('clients'), P('clients'), P()),
                               out_specs=P()))(contributions, weights, key)


def test_noise_has_the_stated_standard_deviation():
  """Zero updates: the aggregate is σ_Δ·z/m, z ~ N(0, I). 300k draws at a
  fixed seed: the sample standard deviation is σ_Δ/m to 1% (its standard
  error is 0.13%), the mean 0 to 5 standard errors, the leaves independent,
  and a Kolmogorov–Smirnov test does not reject normality."""
  sigma, m = 0.8, 40.0
  shapes = {'w': (500, 400), 'b': (100000,)}
  mean, frac = _finalize(sigma, m, None, shapes, jax.random.key(1234))
  assert frac is None
  z = np.concatenate([np.asarray(mean['w']).ravel(),
                      np.asarray(mean['b']).ravel()]) * m / sigma
  assert abs(z.std() - 1.0) < 0.01
  assert abs(z.mean()) < 5 / math.sqrt(z.size)
  w, b = np.asarray(mean['w']).ravel()[:100000], np.asarray(mean['b'])
  assert abs(np.corrcoef(w, b)[0, 1]) < 5 / math.sqrt(100000)
  assert stats.kstest(z[:50000], 'norm').pvalue > 1e-3
  # Another key, other noise.
  other, _ = _finalize(sigma, m, None, shapes, jax.random.key(1235))
  assert not np.allclose(other['b'], mean['b'])


def test_count_noise_has_the_stated_standard_deviation():
  """b̄ − ½ = σ_b·z/m over 2,000 keys (zero contributions)."""
  sigma_b, m = 3.0, 50.0
  agg = privacy.gaussian_sum(1.0, m, sigma_b)
  mesh = jax.make_mesh((1,), ('clients',), devices=jax.devices()[:1])
  contrib = privacy.Contribution(update={'w': jnp.zeros((1, 3))},
                                 below=jnp.zeros((1,)))
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                     contrib)

  def run(k):
    acc = agg.accumulate(agg.init(one), contrib, jnp.ones((1,)))
    return agg.finalize(acc, 'clients', k)[1]

  fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P(), out_specs=P()))
  fracs = np.array([float(fn(jax.random.key(i))) for i in range(2000)])
  z = (fracs - 0.5) * m / sigma_b
  assert abs(z.std() - 1.0) < 0.05 and abs(z.mean()) < 0.1


def test_every_device_adds_the_same_noise():
  """The key is replicated and the noise is drawn after the psum: 8 devices
  give the 1-device aggregate of the same contributions."""
  rng = np.random.default_rng(0)
  contrib = privacy.Contribution(
      update={'w': jnp.asarray(rng.normal(size=(8, 6, 5)), jnp.float32)},
      below=jnp.asarray(rng.choice([-0.5, 0.5], size=8), jnp.float32))
  weights = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
  out = [_finalize(0.7, 6.0, 2.0, None, jax.random.key(5), n, contrib,
                   weights) for n in (1, 8)]
  lib.assert_trees_close(out[0], out[1], rtol=1e-5, atol=1e-6)
