"""Tests of fedjax_diff.diffusion.samplers against diffusers' schedulers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff import diffusion
from fedjax_diff.diffusion import samplers
import testlib

# The torch references: run on Python 3.11 too (tests/conftest.py).
pytestmark = pytest.mark.py311

# The references; a test that uses one that is absent is skipped.
diffusers = testlib.reference_module('diffusers')
torch = testlib.reference_module('torch')

T = 1000
SHAPE = (2, 4, 4, 3)
_HF_NAMES = {'linear': 'linear', 'cosine': 'squaredcos_cap_v2'}


def _float64(ref):
  """Makes a diffusers scheduler do its schedule arithmetic in float64.

  diffusers keeps alpha_bar in float32 and computes e.g.
  1 - alpha_bar_t / alpha_bar_{t-1} in float32, which cancels badly at small t
  (relative errors up to ~1e-4 in the posterior coefficients). Ours are
  computed in float64 and then rounded, so we compare with diffusers' own
  algorithm run on float64 schedule scalars. The step outputs stay float32.
  """
  ref.betas = ref.betas.double()
  ref.alphas = 1.0 - ref.betas
  ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
  return ref


def _random_inputs(seed):
  rng = np.random.default_rng(seed)
  # Scaled up so that x^_0 leaves [-1, 1] and the clipping matters.
  x_t = (1.5 * rng.standard_normal(SHAPE)).astype(np.float32)
  eps = rng.standard_normal(SHAPE).astype(np.float32)
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  return x_t, eps, noise


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_ddpm_step_matches_diffusers(name, clip):
  schedule = diffusion.make_schedule(name, T)
  ref = _float64(diffusers.DDPMScheduler(
      num_train_timesteps=T, beta_schedule=_HF_NAMES[name],
      variance_type='fixed_small', clip_sample=clip))
  for seed, t in enumerate([0, 1, 10, 500, T - 1]):
    x_t, eps, _ = _random_inputs(seed)
    # diffusers draws its noise with torch.randn(shape, generator=g); draw
    # the same numbers from a generator with the same seed and hand them to
    # ours.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x_t),
                    generator=torch.Generator().manual_seed(seed)).prev_sample
    got = diffusion.ddpm_step(schedule, jnp.asarray(x_t), t, jnp.asarray(eps),
                              jnp.asarray(noise.numpy()), clip_denoised=clip)
    assert got.shape == SHAPE and got.dtype == jnp.float32
    assert want.dtype == torch.float32
    _close(got, want.numpy())
    # The noise matters exactly when t > 0.
    no_noise = diffusion.ddpm_step(schedule, jnp.asarray(x_t), t,
                                   jnp.asarray(eps), jnp.zeros(SHAPE),
                                   clip_denoised=clip)
    assert (np.abs(got - no_noise).max() > 1e-3) == (t > 0)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_ddim_step_matches_diffusers(name, clip, eta):
  schedule = diffusion.make_schedule(name, T)
  ref = _float64(diffusers.DDIMScheduler(
      num_train_timesteps=T, beta_schedule=_HF_NAMES[name], clip_sample=clip))
  for num_steps in (1, 7, 50):
    ref.set_timesteps(num_steps)
    timesteps = ref.timesteps.numpy()
    for i in sorted({0, len(timesteps) // 2, len(timesteps) - 1}):
      t = int(timesteps[i])
      t_prev = t - T // num_steps
      x_t, eps, noise = _random_inputs(1000 * num_steps + i)
      for use_clipped in (False, True):
        want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x_t),
                        eta=eta, use_clipped_model_output=use_clipped,
                        variance_noise=torch.from_numpy(noise)).prev_sample
        got = diffusion.ddim_step(schedule, jnp.asarray(x_t), t, t_prev,
                                  jnp.asarray(eps), jnp.asarray(noise),
                                  eta=eta, clip_denoised=clip,
                                  use_clipped_model_output=use_clipped)
        assert got.shape == SHAPE and got.dtype == jnp.float32
        _close(got, want.numpy())


def test_steps_with_traced_and_per_example_timesteps():
  schedule = diffusion.cosine_schedule(T)
  x_t, eps, noise = (jnp.asarray(a) for a in _random_inputs(7))
  ddpm = jax.jit(diffusion.ddpm_step)
  ddim = jax.jit(functools.partial(diffusion.ddim_step, eta=0.3))
  for t, t_prev in [(0, -20), (37, 17), (T - 1, T - 21)]:
    _close(ddpm(schedule, x_t, jnp.int32(t), eps, noise),
           diffusion.ddpm_step(schedule, x_t, t, eps, noise))
    _close(ddim(schedule, x_t, jnp.int32(t), jnp.int32(t_prev), eps, noise),
           diffusion.ddim_step(schedule, x_t, t, t_prev, eps, noise, eta=0.3))
  # A [B] vector of timesteps acts per example.
  ts, t_prevs = jnp.array([0, 500]), jnp.array([-1, 480])
  got = diffusion.ddpm_step(schedule, x_t, ts, eps, noise)
  got_ddim = diffusion.ddim_step(schedule, x_t, ts, t_prevs, eps, noise,
                                 eta=0.3)
  for b in range(2):
    _close(got[b], diffusion.ddpm_step(schedule, x_t[b:b + 1], int(ts[b]),
                                       eps[b:b + 1], noise[b:b + 1])[0])
    _close(got_ddim[b],
           diffusion.ddim_step(schedule, x_t[b:b + 1], int(ts[b]),
                               int(t_prevs[b]), eps[b:b + 1], noise[b:b + 1],
                               eta=0.3)[0])


@pytest.mark.parametrize('num_timesteps,num_steps',
                         [(1000, 50), (1000, 7), (1000, 3), (1000, 1000),
                          (100, 1), (100, 30)])
def test_ddim_timesteps_match_diffusers(num_timesteps, num_steps):
  ref = diffusers.DDIMScheduler(num_train_timesteps=num_timesteps)
  ref.set_timesteps(num_steps)
  got = diffusion.ddim_timesteps(num_timesteps, num_steps)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, ref.timesteps.numpy())


def test_ddim_timesteps_bad_num_steps():
  for bad in (0, 1001):
    with pytest.raises(ValueError, match='num_steps'):
      diffusion.ddim_timesteps(1000, bad)


# ---------------------------------------------------------------------------
# sample()


def _toy_eps_fn(params, x_t, t, labels, *, train, rng):
  del labels, rng
  assert not train
  assert t.shape == x_t.shape[:1] and t.dtype == jnp.int32
  return params['a'] * x_t


def _label_eps_fn(params, x_t, t, labels, *, train, rng):
  del t, rng
  assert not train
  return params['a'] * x_t + 0.05 * labels[:, None, None, None].astype(
      x_t.dtype)


_jit_sample = jax.jit(diffusion.sample, static_argnums=(0, 4),
                      static_argnames=('method', 'num_steps', 'clip_denoised'))


def _python_loop(eps_fn, schedule, rng, shape, ts, t_prevs, step,
                 clip=True):
  """Reference: the documented key derivation, in an eager Python loop."""

  def one_step(x, t, t_prev, key):
    noise_key, model_key = jax.random.split(key)
    eps = eps_fn(x, t, model_key)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    return step(schedule, x, t, t_prev, eps, noise)

  init_key, loop_key = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32)
  step_keys = jax.random.split(loop_key, len(ts))
  for i, (t, t_prev) in enumerate(zip(ts, t_prevs)):
    x = one_step(x, jnp.int32(t), jnp.int32(t_prev), step_keys[i])
  return jnp.clip(x, -1.0, 1.0) if clip else x


def test_sample_ddim_jit_equals_python_loop():
  schedule = diffusion.linear_schedule(T)
  params = {'a': jnp.float32(0.1)}
  rng = jax.random.PRNGKey(3)
  shape = (2, 4, 4, 1)
  num_steps, eta = 10, 0.5
  got = _jit_sample(_toy_eps_fn, params, schedule, rng, shape, method='ddim',
                    num_steps=num_steps, eta=eta)
  assert got.shape == shape and got.dtype == jnp.float32
  assert np.all(np.isfinite(got))
  assert np.abs(got).max() <= 1.0
  assert np.std(got) > 1e-2  # not a constant image
  ts = diffusion.ddim_timesteps(T, num_steps)
  want = _python_loop(
      lambda x, t, k: _toy_eps_fn(params, x, jnp.full((2,), t, jnp.int32),
                                  None, train=False, rng=k),
      schedule, rng, shape, ts, ts - T // num_steps,
      functools.partial(diffusion.ddim_step, eta=eta))
  _close(got, want)
  # Another key, another sample.
  other = _jit_sample(_toy_eps_fn, params, schedule, jax.random.PRNGKey(4),
                      shape, method='ddim', num_steps=num_steps, eta=eta)
  assert np.abs(other - got).max() > 1e-2


def test_sample_ddpm_equals_python_loop():
  schedule = diffusion.cosine_schedule(30)
  params = {'a': jnp.float32(0.1)}
  rng = jax.random.PRNGKey(0)
  shape = (2, 4, 4, 1)
  got = _jit_sample(_toy_eps_fn, params, schedule, rng, shape, method='ddpm',
                    clip_denoised=False)
  ts = np.arange(29, -1, -1)
  want = _python_loop(
      lambda x, t, k: _toy_eps_fn(params, x, jnp.full((2,), t, jnp.int32),
                                  None, train=False, rng=k),
      schedule, rng, shape, ts, ts - 1,
      lambda s, x, t, tp, e, n: diffusion.ddpm_step(s, x, t, e, n,
                                                    clip_denoised=False),
      clip=False)
  assert got.shape == shape and np.all(np.isfinite(got))
  _close(got, want)


def test_sample_ddim_matches_diffusers_loop():
  """Deterministic DDIM (eta=0) from the same x_T as diffusers' loop."""
  schedule = diffusion.cosine_schedule(T)
  params = {'a': jnp.float32(0.1)}
  rng = jax.random.PRNGKey(5)
  shape = (2, 4, 4, 1)  # Same static arguments as above: no recompilation.
  got = _jit_sample(_toy_eps_fn, params, schedule, rng, shape, method='ddim',
                    num_steps=10, eta=0.0)
  x = torch.from_numpy(np.array(
      jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)))
  ref = _float64(diffusers.DDIMScheduler(num_train_timesteps=T,
                                         beta_schedule='squaredcos_cap_v2'))
  ref.set_timesteps(10)
  for t in ref.timesteps:
    x = ref.step(0.1 * x, t, x, eta=0.0).prev_sample
  _close(got, x.clamp(-1, 1).numpy())


# ---------------------------------------------------------------------------
# DPM-Solver++(2M)


def _t_eps_fn(params, x_t, t, labels, *, train, rng):
  """A toy eps that also depends on t, so that a timestep off by one shows."""
  del labels, rng
  assert not train
  return params['a'] * x_t + 0.3 * (t / T).astype(x_t.dtype)[:, None, None,
                                                              None]


def _dpm_reference(schedule, clip):
  """diffusers' DPM-Solver++(2M) with the settings `sample` follows."""
  return _float64(diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=schedule.num_timesteps,
      trained_betas=np.asarray(schedule.betas), algorithm_type='dpmsolver++',
      solver_order=2, solver_type='midpoint', lower_order_final=True,
      timestep_spacing='linspace', final_sigmas_type='zero',
      thresholding=clip, sample_max_value=1.0))


def _dpm_python_loop(eps, schedule, rng, shape, num_steps, clip=True):
  """Reference: the documented key derivation, in an eager Python loop of
  `dpm_solver_step` with python int timesteps."""
  ts = [int(t) for t in samplers.dpm_solver_timesteps(
      schedule.num_timesteps, num_steps)]
  init_key, loop_key = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32)
  step_keys = jax.random.split(loop_key, num_steps)
  x0_prev, t_prev = None, -1
  for i, t in enumerate(ts):
    _, model_key = jax.random.split(step_keys[i])
    t_next = ts[i + 1] if i + 1 < num_steps else -1
    x, x0_prev = samplers.dpm_solver_step(
        schedule, x, t, t_next, eps(x, t, model_key), t_prev, x0_prev,
        clip_denoised=clip)
    t_prev = t
  return jnp.clip(x, -1.0, 1.0) if clip else x


@pytest.mark.parametrize('num_timesteps,num_steps',
                         [(1000, 10), (1000, 20), (1000, 7), (1000, 999),
                          (1000, 1000), (100, 1), (100, 2), (10, 3)])
def test_dpm_solver_timesteps_match_diffusers(num_timesteps, num_steps):
  ref = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=num_timesteps, timestep_spacing='linspace')
  ref.set_timesteps(num_steps)
  got = samplers.dpm_solver_timesteps(num_timesteps, num_steps)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, ref.timesteps.numpy())
  for bad in (0, num_timesteps + 1):
    with pytest.raises(ValueError, match='num_steps'):
      samplers.dpm_solver_timesteps(num_timesteps, bad)


@pytest.mark.parametrize('num_steps', [1, 2, 3, 10, 20])
@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_sample_dpm_solver_matches_diffusers_loop(name, clip, num_steps):
  """The whole trajectory from the same x_T as diffusers' loop.

  Both sides use the same float32 betas (diffusers' `trained_betas` are
  float32; rebuilding our schedule from them removes their rounding, which
  at cosine's beta_{T-1} = 0.999 alone changes 1 - beta by up to 6e-5
  relative). The rest is float32 arithmetic on both sides, and the measured
  differences are below 1e-6 relative; unclipped, the toy's samples reach
  |x| ~ 3e4 (x^_0 = x_T / alpha_{T-1} at the first step), hence rtol.
  """
  schedule = diffusion.schedule_from_betas(
      np.asarray(diffusion.make_schedule(name, T).betas))
  params = {'a': jnp.float32(0.1)}
  rng = jax.random.PRNGKey(5)
  shape = (2, 4, 4, 1)
  got = _jit_sample(_t_eps_fn, params, schedule, rng, shape,
                    method='dpm_solver++', num_steps=num_steps,
                    clip_denoised=clip)
  assert got.shape == shape and got.dtype == jnp.float32
  x = torch.from_numpy(np.array(
      jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)))
  ref = _dpm_reference(schedule, clip)
  ref.set_timesteps(num_steps)
  for t in ref.timesteps:
    x = ref.step(0.1 * x + 0.3 * float(t) / T, t, x).prev_sample
  if clip:
    x = x.clamp(-1, 1)
    assert np.abs(x.numpy()).max() == 1.0  # The clipping mattered.
  _close(got, x.numpy())


def _guided_case():
  """The guided-sampling case of the tests below: (schedule, params, rng,
  shape, labels, w, null label)."""
  return (diffusion.linear_schedule(T), {'a': jnp.float32(0.1)},
          jax.random.PRNGKey(1), (2, 4, 4, 1), jnp.array([1, 3]), 2.5, 9)


def _guided_by_hand(params, labels, w, null):
  """Classifier-free guidance of `_label_eps_fn` written out (Ho & Salimans
  2022, eq. 6): ε_null + w·(ε_label − ε_null)."""

  def guided(x, t, k):
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    e_c = _label_eps_fn(params, x, tb, labels, train=False, rng=k)
    e_u = _label_eps_fn(params, x, tb, jnp.full((x.shape[0],), null),
                        train=False, rng=k)
    return e_u + w * (e_c - e_u)

  return guided


def test_sample_dpm_solver_equals_python_loop_with_guidance():
  schedule, params, rng, shape, labels, w, null = _guided_case()
  got = _jit_sample(_label_eps_fn, params, schedule, rng, shape,
                    method='dpm_solver++', num_steps=8, eta=0.7,
                    labels=labels, guidance_scale=w, null_label=null)
  guided = _guided_by_hand(params, labels, w, null)
  _close(got, _dpm_python_loop(guided, schedule, rng, shape, 8))
  # Deterministic: eta is ignored.
  _close(got, _jit_sample(_label_eps_fn, params, schedule, rng, shape,
                          method='dpm_solver++', num_steps=8, eta=0.0,
                          labels=labels, guidance_scale=w, null_label=null))


@pytest.mark.parametrize('num_steps', [1, 2, 3, 7, 20])
def test_dpm_solver_exact_noise_recovers_x0(num_steps):
  """With eps the exact noise of a known x0, every step stays on
  x_t = alpha_t x0 + sigma_t e (e fixed by x_T) and predicts x^_0 = x0.

  eps(x_t, t) = (x_t - alpha_t x0) / sigma_t gives x^_0 = x0 at every step,
  so D = x0 also at second order, and the step maps alpha_t x0 + sigma_t e
  to alpha_{t'} x0 + sigma_{t'} e; the sampler returns x0. N = T = 20
  repeats a timestep (linspace rounding): there the step is the identity and
  the next one first order.
  """
  num_timesteps = 20
  schedule = diffusion.linear_schedule(num_timesteps)
  alpha = np.asarray(schedule.sqrt_alphas_cumprod, np.float64)
  sigma = np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)
  shape = (2, 3, 3, 1)
  x0 = np.linspace(-0.9, 0.9, np.prod(shape)).reshape(shape)

  def eps_fn(params, x_t, t, labels, *, train, rng):
    del params, labels, train, rng
    a = jnp.asarray(alpha, jnp.float32)[t][:, None, None, None]
    s = jnp.asarray(sigma, jnp.float32)[t][:, None, None, None]
    return (x_t - a * jnp.asarray(x0, jnp.float32)) / s

  rng = jax.random.PRNGKey(2)
  x_big_t = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape),
                       np.float64)
  ts = samplers.dpm_solver_timesteps(num_timesteps, num_steps)
  e = (x_big_t - alpha[ts[0]] * x0) / sigma[ts[0]]
  x, x0_prev, t_prev = jnp.asarray(x_big_t, jnp.float32), None, -1
  for i, t in enumerate(ts):
    t_next = int(ts[i + 1]) if i + 1 < num_steps else -1
    eps = eps_fn(None, x, jnp.full((2,), t, jnp.int32), None, train=False,
                 rng=None)
    x, x0_prev = samplers.dpm_solver_step(schedule, x, int(t), t_next, eps,
                                          t_prev, x0_prev)
    t_prev = int(t)
    np.testing.assert_allclose(x0_prev, x0, atol=1e-5)
    want = x0 if t_next < 0 else alpha[t_next] * x0 + sigma[t_next] * e
    np.testing.assert_allclose(x, want, atol=1e-5)
  for clip in (True, False):
    got = _jit_sample(eps_fn, None, schedule, rng, shape,
                      method='dpm_solver++', num_steps=num_steps,
                      clip_denoised=clip)
    np.testing.assert_allclose(got, x0, atol=1e-5)


@pytest.mark.parametrize('clip', [True, False])
def test_sample_dpm_solver_three_steps_by_hand(clip):
  """N = 3 written out in float64 numpy: a first-order step, a second-order
  one and the final step to sigma = 0 (Lu et al. 2022, Algorithm 2).
  (N = 2 is the first-order step and the final one.)"""
  num_timesteps = 10
  betas = np.linspace(0.01, 0.2, num_timesteps)
  schedule = diffusion.schedule_from_betas(betas)
  alpha = np.sqrt(np.cumprod(1.0 - betas))
  sigma = np.sqrt(1.0 - np.cumprod(1.0 - betas))
  lam = np.log(alpha) - np.log(sigma)
  shape = (2, 3, 3, 1)
  rng = jax.random.PRNGKey(4)
  got = _jit_sample(_t_eps_fn, {'a': jnp.float32(0.4)}, schedule, rng, shape,
                    method='dpm_solver++', num_steps=3, clip_denoised=clip)
  # round(linspace(0, 9, 4)) = [0, 3, 6, 9]: t = 9, 6, 3, then sigma = 0.
  np.testing.assert_array_equal(
      samplers.dpm_solver_timesteps(num_timesteps, 3), [9, 6, 3])

  def x0_hat(x, t):
    eps = 0.4 * x + 0.3 * t / T
    x0 = (x - sigma[t] * eps) / alpha[t]
    return np.clip(x0, -1.0, 1.0) if clip else x0

  x9 = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape),
                  np.float64)
  # t = 9 -> 6, first order.
  d9 = x0_hat(x9, 9)
  h1 = lam[6] - lam[9]
  x6 = sigma[6] / sigma[9] * x9 - alpha[6] * (np.exp(-h1) - 1.0) * d9
  # t = 6 -> 3, second order, r = h1 / h2.
  d6 = x0_hat(x6, 6)
  h2 = lam[3] - lam[6]
  r = h1 / h2
  d = (1.0 + 1.0 / (2.0 * r)) * d6 - 1.0 / (2.0 * r) * d9
  x3 = sigma[3] / sigma[6] * x6 - alpha[3] * (np.exp(-h2) - 1.0) * d
  # t = 3 -> sigma = 0: x_0 = x^_0.
  want = x0_hat(x3, 3)
  _close(got, want)
  # The second-order correction matters: with D = x^_0 at t = 6 it differs.
  x3_first = sigma[3] / sigma[6] * x6 - alpha[3] * (np.exp(-h2) - 1.0) * d6
  assert np.abs(x0_hat(x3_first, 3) - want).max() > 1e-3
  if clip:
    assert np.abs(d9).max() == 1.0  # The clipping mattered.


def test_guided_eps_formula_single_batched_call():
  calls = []

  def eps_fn(params, x_t, t, labels, *, train, rng):
    calls.append(x_t.shape[0])
    return _label_eps_fn(params, x_t, t, labels, train=train, rng=rng)

  params = {'a': jnp.float32(0.1)}
  x = jnp.asarray(_random_inputs(0)[0])
  labels = jnp.array([2, 7])
  t = jnp.array([5, 5], jnp.int32)
  got = diffusion.guided_eps(eps_fn, params, x, t, labels,
                             jax.random.PRNGKey(0), guidance_scale=3.0,
                             null_label=10)
  assert calls == [4]  # cond and uncond in one call on the doubled batch.
  # eps_u + w (eps_c - eps_u) = 0.1 x + 0.05 (10 + 3 (y - 10)).
  want = 0.1 * x + 0.05 * (10 + 3.0 * (labels - 10))[:, None, None, None]
  _close(got, want)
  # w = 1 is the conditional model, no guidance the plain call.
  _close(diffusion.guided_eps(eps_fn, params, x, t, labels, None,
                              guidance_scale=1.0, null_label=10),
         _label_eps_fn(params, x, t, labels, train=False, rng=None))
  _close(diffusion.guided_eps(eps_fn, params, x, t, labels, None),
         _label_eps_fn(params, x, t, labels, train=False, rng=None))


def test_sample_with_guidance_equals_python_loop():
  schedule, params, rng, shape, labels, w, null = _guided_case()
  got = _jit_sample(_label_eps_fn, params, schedule, rng, shape, num_steps=8,
                    labels=labels, guidance_scale=w, null_label=null)
  guided = _guided_by_hand(params, labels, w, null)

  ts = diffusion.ddim_timesteps(T, 8)
  want = _python_loop(guided, schedule, rng, shape, ts, ts - T // 8,
                      diffusion.ddim_step)
  _close(got, want)
  # w = 1 (plain conditional sampling; same compiled program) differs.
  w_one = _jit_sample(_label_eps_fn, params, schedule, rng, shape,
                      num_steps=8, labels=labels, guidance_scale=1.0,
                      null_label=null)
  assert np.abs(w_one - got).max() > 1e-3


def test_sample_bad_inputs():
  schedule = diffusion.linear_schedule(10)
  args = (_toy_eps_fn, {'a': 0.1}, schedule, jax.random.PRNGKey(0),
          (1, 2, 2, 1))
  with pytest.raises(ValueError, match='num_steps'):
    diffusion.sample(*args, num_steps=11)
  with pytest.raises(ValueError, match='num_steps'):
    diffusion.sample(*args, num_steps=0)
  with pytest.raises(ValueError, match=r"'ddpm', 'ddim', 'dpm_solver\+\+'"):
    diffusion.sample(*args, method='euler')
  with pytest.raises(ValueError, match='needs labels'):
    diffusion.sample(*args, num_steps=5, guidance_scale=2.0, null_label=3)
  with pytest.raises(ValueError, match='needs null_label'):
    diffusion.sample(*args, num_steps=5, guidance_scale=2.0,
                     labels=jnp.array([1]))
  with pytest.raises(ValueError, match='batch size'):
    diffusion.sample(*args, num_steps=5, labels=jnp.array([1, 2]))
