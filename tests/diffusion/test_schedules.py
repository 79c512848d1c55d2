"""Tests of fedjax_diff.diffusion.schedules against diffusers' DDPMScheduler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff import diffusion
import testlib

# The torch references: run on Python 3.11 too (tests/conftest.py).
pytestmark = pytest.mark.py311

# The reference; a test that uses it when it is absent is skipped.
diffusers = testlib.reference_module('diffusers')


@pytest.mark.parametrize('num_timesteps', [1000, 40])
@pytest.mark.parametrize('name,hf_name,betas', [
    ('linear', 'linear', {}), ('cosine', 'squaredcos_cap_v2', {}),
    ('scaled_linear', 'scaled_linear', {}),
    # LDM's LSUN-Church schedule (configs/lsun_church_ldm.py).
    ('scaled_linear', 'scaled_linear', dict(beta_start=0.0015,
                                            beta_end=0.0155))])
def test_schedule_matches_diffusers(name, hf_name, betas, num_timesteps):
  ours = diffusion.make_schedule(name, num_timesteps, **betas)
  ref = diffusers.DDPMScheduler(num_train_timesteps=num_timesteps,
                                beta_schedule=hf_name, **betas)
  assert ours.num_timesteps == num_timesteps
  for field in ('betas', 'alphas', 'alphas_cumprod'):
    value = getattr(ours, field)
    assert value.dtype == jnp.float32 and value.shape == (num_timesteps,)
    np.testing.assert_allclose(value, getattr(ref, field).numpy(),
                               rtol=1e-5, atol=1e-5, err_msg=field)
  # The posterior variance is diffusers' "fixed_small" variance. diffusers
  # computes 1 - alpha_bar_t / alpha_bar_{t-1} in float32, which cancels
  # badly at small t (relative error ~2e-4 at t = 1), hence the rtol.
  for t in (1, num_timesteps // 2, num_timesteps - 1):
    np.testing.assert_allclose(ours.posterior_variance[t],
                               ref._get_variance(t).item(), rtol=5e-4)


def test_derived_quantities_hand_check():
  betas = np.array([0.1, 0.2, 0.5])
  s = diffusion.schedule_from_betas(betas)
  ab = np.array([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.5])
  ab_prev = np.array([1.0, 0.9, 0.72])
  np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod_prev, ab_prev, rtol=1e-6)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(ab), rtol=1e-6)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod,
                             np.sqrt(1 - ab), rtol=1e-6)
  var = betas * (1 - ab_prev) / (1 - ab)  # [0, 0.2*0.1/0.28, 0.5*0.28/0.64]
  np.testing.assert_allclose(s.posterior_variance, var, rtol=1e-6, atol=1e-12)
  assert s.posterior_variance[0] == 0.0
  np.testing.assert_allclose(s.posterior_log_variance_clipped,
                             np.log([var[1], var[1], var[2]]), rtol=1e-6)
  np.testing.assert_allclose(s.posterior_mean_coef1,
                             betas * np.sqrt(ab_prev) / (1 - ab), rtol=1e-6)
  np.testing.assert_allclose(s.posterior_mean_coef2,
                             (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab),
                             rtol=1e-6)
  # At t = 0 the posterior mean is x_0 itself.
  np.testing.assert_allclose([s.posterior_mean_coef1[0],
                              s.posterior_mean_coef2[0]], [1.0, 0.0],
                             atol=1e-6)


def test_make_schedule_kwargs_and_bad_name():
  a = diffusion.make_schedule('linear', 10, beta_start=1e-3, beta_end=0.1)
  np.testing.assert_allclose(a.betas, np.linspace(1e-3, 0.1, 10), rtol=1e-6)
  with pytest.raises(ValueError, match=r"'cosine', 'linear'"):
    diffusion.make_schedule('quadratic', 10)
  with pytest.raises(ValueError, match='num_timesteps'):
    diffusion.linear_schedule(0)


def test_schedule_is_a_pytree_with_static_length():
  s = diffusion.cosine_schedule(20)
  assert len(jax.tree.leaves(s)) == 10
  f = jax.jit(lambda s: s.alphas_cumprod[s.num_timesteps - 1] + 0.0 * s.betas)
  np.testing.assert_allclose(f(s), np.full(20, s.alphas_cumprod[-1]))


def test_q_sample_hand_check():
  s = diffusion.linear_schedule(10, beta_start=0.1, beta_end=0.5)
  ab = np.cumprod(1 - np.linspace(0.1, 0.5, 10))
  x0 = np.arange(2 * 2 * 3 * 1, dtype=np.float32).reshape(2, 2, 3, 1) / 10
  noise = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 2, 3, 1)
  t = np.array([0, 9])
  got = diffusion.q_sample(s, jnp.asarray(x0), jnp.asarray(t),
                           jnp.asarray(noise))
  assert got.shape == x0.shape and got.dtype == jnp.float32
  want = np.stack([np.sqrt(ab[ti]) * x0[i] + np.sqrt(1 - ab[ti]) * noise[i]
                   for i, ti in enumerate(t)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Same as diffusers' add_noise.
  ref = diffusers.DDPMScheduler(num_train_timesteps=10, beta_start=0.1,
                                beta_end=0.5)
  torch = testlib.reference_module('torch')
  hf = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                     torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(got, hf, rtol=1e-5, atol=1e-6)
