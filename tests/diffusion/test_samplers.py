"""Tests of fedjax_diff.diffusion.samplers against diffusers' schedulers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff import diffusion
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
  schedule = diffusion.linear_schedule(T)
  params = {'a': jnp.float32(0.1)}
  rng = jax.random.PRNGKey(1)
  shape = (2, 4, 4, 1)
  labels = jnp.array([1, 3])
  w, null = 2.5, 9
  got = _jit_sample(_label_eps_fn, params, schedule, rng, shape, num_steps=8,
                    labels=labels, guidance_scale=w, null_label=null)

  def guided(x, t, k):
    tb = jnp.full((2,), t, jnp.int32)
    e_c = _label_eps_fn(params, x, tb, labels, train=False, rng=k)
    e_u = _label_eps_fn(params, x, tb, jnp.full((2,), null), train=False,
                        rng=k)
    return e_u + w * (e_c - e_u)

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
  with pytest.raises(ValueError, match="'ddpm', 'ddim'"):
    diffusion.sample(*args, method='euler')
  with pytest.raises(ValueError, match='needs labels'):
    diffusion.sample(*args, num_steps=5, guidance_scale=2.0, null_label=3)
  with pytest.raises(ValueError, match='needs null_label'):
    diffusion.sample(*args, num_steps=5, guidance_scale=2.0,
                     labels=jnp.array([1]))
  with pytest.raises(ValueError, match='batch size'):
    diffusion.sample(*args, num_steps=5, labels=jnp.array([1, 2]))
