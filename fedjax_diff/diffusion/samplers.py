"""Reverse-process samplers: DDPM ancestral sampling, DDIM, DPM-Solver++(2M).

All use an epsilon-prediction network. DDPM and DDIM follow the conventions
of diffusers' `DDPMScheduler` and `DDIMScheduler` (with their default
`clip_sample=True`, `set_alpha_to_one=True`, `timestep_spacing='leading'`,
`steps_offset=0`), DPM-Solver++(2M) those of its
`DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2,
solver_type='midpoint', lower_order_final=True, timestep_spacing='linspace',
final_sigmas_type='zero')`, with `thresholding=True, sample_max_value=1.0`
for clipping; they are tested against these.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff.diffusion import losses
from fedjax_diff.diffusion import schedules as schedules_lib

_METHODS = ('ddpm', 'ddim', 'dpm_solver++')


def _to_ndim(a: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a 0-d or [B] array to broadcast against an ndim array."""
  return a if a.ndim == 0 else a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _predict_x0(schedule: schedules_lib.NoiseSchedule, x_t: jax.Array,
                t: jax.Array | int, eps: jax.Array) -> jax.Array:
  """x^_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
  sqrt_ab = schedules_lib.extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  sqrt_1m_ab = schedules_lib.extract(schedule.sqrt_one_minus_alphas_cumprod,
                                     t, x_t.ndim)
  return (x_t - sqrt_1m_ab * eps) / sqrt_ab


def ddpm_step(schedule: schedules_lib.NoiseSchedule,
              x_t: jax.Array,
              t: jax.Array | int,
              eps: jax.Array,
              noise: jax.Array,
              *,
              clip_denoised: bool = True) -> jax.Array:
  """One ancestral sampling step x_t -> x_{t-1} of DDPM (Ho et al., 2020).

  With the predicted clean sample (DDPM eq. 15)

    x^_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t),

  clipped to [-1, 1] when `clip_denoised`, the step draws from the posterior
  q(x_{t-1} | x_t, x^_0) (DDPM eqs. 6-7):

    x_{t-1} = mu~_t(x_t, x^_0) + sigma_t z,
    mu~_t = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t) x^_0
            + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
    sigma_t^2 = beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)

  ("fixed_small" variance), with no noise added at t = 0. Equal to diffusers'
  `DDPMScheduler.step` with `variance_type='fixed_small'`.

  Args:
    schedule: the noise schedule.
    x_t: current samples, [B, ...].
    t: the current timestep: a python int, a 0-d int array (e.g. inside
      `lax.scan`), or int array of shape [B].
    eps: predicted noise eps_theta(x_t, t), same shape as `x_t`.
    noise: z ~ N(0, I), same shape as `x_t` (unused where t = 0).
    clip_denoised: clip x^_0 to [-1, 1].

  Returns:
    x_{t-1}, same shape as `x_t`.
  """
  nd = x_t.ndim
  x0_hat = _predict_x0(schedule, x_t, t, eps)
  if clip_denoised:
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
  coef1 = schedules_lib.extract(schedule.posterior_mean_coef1, t, nd)
  coef2 = schedules_lib.extract(schedule.posterior_mean_coef2, t, nd)
  mean = coef1 * x0_hat + coef2 * x_t
  var = schedules_lib.extract(schedule.posterior_variance, t, nd)
  nonzero = _to_ndim(jnp.asarray(t, dtype=jnp.int32) > 0, nd)
  std = jnp.where(nonzero, jnp.sqrt(var), 0.0)
  return (mean + std * noise).astype(x_t.dtype)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The DDIM timestep sub-sequence, with "leading" spacing, descending.

  tau_i = i * (T // S) for i = 0..S-1, returned in reverse order, i.e.
  `np.arange(0, S)[::-1] * (T // S)`. This is diffusers' default
  (`timestep_spacing='leading'`, `steps_offset=0`). The timestep that follows
  tau_i in sampling is tau_i - T // S (negative after the last one).

  Args:
    num_timesteps: T, the number of training timesteps.
    num_steps: S, the number of sampling steps, 1 <= S <= T.

  Returns:
    int32 numpy array of shape [S], from the largest timestep down to 0.

  Raises:
    ValueError: if S is not in [1, T].
  """
  _check_num_steps(num_timesteps, num_steps)
  step_ratio = num_timesteps // num_steps
  return (np.arange(0, num_steps) * step_ratio)[::-1].astype(np.int32)


def ddim_step(schedule: schedules_lib.NoiseSchedule,
              x_t: jax.Array,
              t: jax.Array | int,
              t_prev: jax.Array | int,
              eps: jax.Array,
              noise: Optional[jax.Array] = None,
              *,
              eta: float | jax.Array = 0.0,
              clip_denoised: bool = True,
              use_clipped_model_output: bool = False) -> jax.Array:
  """One DDIM step x_t -> x_{t_prev} (Song et al., 2021, eq. 12).

  "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502.
  With a_t = alpha_bar_t, a_p = alpha_bar_{t_prev} (a_p = 1 when t_prev < 0,
  diffusers' `set_alpha_to_one=True`):

    x^_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)       (clipped to [-1, 1]
                                                         when clip_denoised)
    sigma = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p)      (eq. 16)
    x_{t_prev} = sqrt(a_p) x^_0 + sqrt(1 - a_p - sigma^2) eps + sigma z.

  eta = 0 is the deterministic DDIM sampler; eta = 1 with all T steps is DDPM
  with the "fixed_small" variance. As in diffusers' `DDIMScheduler.step`
  (whose `use_clipped_model_output` defaults to False, also in its
  `DDIMPipeline`), the direction term uses the network's eps even when x^_0
  was clipped; with `use_clipped_model_output=True` it uses instead
  eps = (x_t - sqrt(a_t) x^_0) / sqrt(1 - a_t), recomputed from the clipped
  x^_0 (as in GLIDE).

  Args:
    schedule: the noise schedule.
    x_t: current samples, [B, ...].
    t: the current timestep (python int, 0-d int array, or [B] int array).
    t_prev: the next (smaller) timestep of the sampling sequence; negative
      for the last step. With a static eta = 0 it may also be larger than
      t: the deterministic DDIM inversion step x_t -> x_{t_prev}.
    eps: predicted noise eps_theta(x_t, t), same shape as `x_t`.
    noise: z ~ N(0, I), same shape as `x_t`; may be None when eta = 0.
    eta: the stochasticity eta >= 0.
    clip_denoised: clip x^_0 to [-1, 1] (diffusers' `clip_sample`).
    use_clipped_model_output: recompute eps from the clipped x^_0.

  Returns:
    x_{t_prev}, same shape as `x_t`.
  """
  nd = x_t.ndim
  a_t = schedules_lib.extract(schedule.alphas_cumprod, t, nd)
  t_prev = jnp.asarray(t_prev, dtype=jnp.int32)
  a_p = schedules_lib.extract(schedule.alphas_cumprod,
                              jnp.maximum(t_prev, 0), nd)
  a_p = jnp.where(_to_ndim(t_prev >= 0, nd), a_p, 1.0)

  x0_hat = (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
  if clip_denoised:
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
  if use_clipped_model_output:
    eps = (x_t - jnp.sqrt(a_t) * x0_hat) / jnp.sqrt(1.0 - a_t)
  if isinstance(eta, (int, float)) and eta == 0:
    # Deterministic: also valid upwards (t_prev > t, DDIM inversion), where
    # the variance formula below would be negative.
    sigma = 0.0
  else:
    variance = (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
    sigma = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(jnp.maximum(1.0 - a_p - sigma**2, 0.0)) * eps
  x_prev = jnp.sqrt(a_p) * x0_hat + direction
  if noise is not None:
    x_prev = x_prev + sigma * noise
  elif not (isinstance(eta, (int, float)) and eta == 0):
    raise ValueError('ddim_step with eta != 0 needs noise.')
  return x_prev.astype(x_t.dtype)


def dpm_solver_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The DPM-Solver++ timesteps, with "linspace" spacing, descending.

  `round(linspace(0, T - 1, N + 1))[::-1][:-1]`, i.e. N timesteps from T - 1
  down to round((T - 1) / N); t = 0 itself is not visited: the last step of
  `sample` goes from the smallest of them to sigma = 0. This is diffusers'
  `DPMSolverMultistepScheduler` with `timestep_spacing='linspace'` (numpy's
  round, halves to even, as there). With N = T the rounding repeats one
  timestep (see `dpm_solver_step`).

  Args:
    num_timesteps: T, the number of training timesteps.
    num_steps: N, the number of sampling steps, 1 <= N <= T.

  Returns:
    int32 numpy array of shape [N], from T - 1 down.

  Raises:
    ValueError: if N is not in [1, T].
  """
  _check_num_steps(num_timesteps, num_steps)
  ts = np.round(np.linspace(0, num_timesteps - 1, num_steps + 1))
  return ts[::-1][:-1].astype(np.int32)


def dpm_solver_step(
    schedule: schedules_lib.NoiseSchedule,
    x_t: jax.Array,
    t: jax.Array | int,
    t_next: jax.Array | int,
    eps: jax.Array,
    t_prev: jax.Array | int = -1,
    x0_prev: Optional[jax.Array] = None,
    *,
    clip_denoised: bool = True) -> tuple[jax.Array, jax.Array]:
  """One step x_t -> x_{t_next} of multistep DPM-Solver++(2M).

  Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
  Probabilistic Models", https://arxiv.org/abs/2211.01095, Algorithm 2 (data
  prediction, order 2), on the discrete-time VP schedule with
  alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and
  lambda_t = log alpha_t - log sigma_t. With the data prediction

    x^_0 = (x_t - sigma_t eps) / alpha_t       (clipped to [-1, 1] when
                                                 clip_denoised)

  and h = lambda_{t_next} - lambda_t, the step is

    x_{t_next} = (sigma_{t_next} / sigma_t) x_t
                 - alpha_{t_next} (e^{-h} - 1) D,

  with D = x^_0 for the first-order step (deterministic DDIM), and for the
  second-order one, given x^_0' = the x^_0 of the previous step, at t_prev,
  r = h' / h with h' = lambda_t - lambda_{t_prev}:

    D = (1 + 1 / (2 r)) x^_0 - 1 / (2 r) x^_0'.

  A negative t_next stands for sigma = 0 (alpha = 1, lambda = +inf, e^{-h} =
  0): the step returns x^_0, first order, as diffusers'
  `DPMSolverMultistepScheduler` with `final_sigmas_type='zero'` (whose
  `thresholding=True, sample_max_value=1.0` is exactly the clip: the
  quantile s is clamped to [1, 1]).

  The step is first order when t_prev < 0 or x0_prev is None, and also when
  h' = 0 (t_prev == t: a timestep repeated by `dpm_solver_timesteps` with
  N = T), where diffusers divides by zero and returns NaN. When h = 0 the
  step is the identity.

  Args:
    schedule: the noise schedule.
    x_t: current samples, [B, ...].
    t: the current timestep (python int, 0-d int array, or [B] int array).
    t_next: the next (smaller) timestep; negative for the final step to
      sigma = 0.
    eps: predicted noise eps_theta(x_t, t), same shape as `x_t`.
    t_prev: the timestep of the previous step; negative for none.
    x0_prev: x^_0 of the previous step (the second output of that step), same
      shape as `x_t`, or None for a first-order step.
    clip_denoised: clip x^_0 to [-1, 1].

  Returns:
    (x_{t_next}, x^_0), both the shape and dtype of `x_t`; x^_0 is the
    `x0_prev` of the next step.
  """
  nd = x_t.ndim
  sqrt_ab = schedule.sqrt_alphas_cumprod
  sqrt_1m_ab = schedule.sqrt_one_minus_alphas_cumprod

  def alpha_sigma_lambda(s):
    a = schedules_lib.extract(sqrt_ab, s, nd)
    sig = schedules_lib.extract(sqrt_1m_ab, s, nd)
    return a, sig, jnp.log(a) - jnp.log(sig)

  alpha, sigma, lam = alpha_sigma_lambda(t)
  x0_hat = (x_t - sigma * eps) / alpha
  if clip_denoised:
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
  t_next = jnp.asarray(t_next, dtype=jnp.int32)
  alpha_n, sigma_n, lam_n = alpha_sigma_lambda(jnp.maximum(t_next, 0))
  h = lam_n - lam
  d = x0_hat
  if x0_prev is not None:
    t_prev = jnp.asarray(t_prev, dtype=jnp.int32)
    h_prev = lam - alpha_sigma_lambda(jnp.maximum(t_prev, 0))[2]
    second = _to_ndim(t_prev >= 0, nd) & (h_prev != 0)
    # 1 / (2 r) = h / (2 h'), and 0 for a first-order step.
    half_inv_r = jnp.where(second, h / (2.0 * jnp.where(second, h_prev, 1.0)),
                           0.0)
    d = x0_hat + half_inv_r * (x0_hat - x0_prev)
  x_next = (sigma_n / sigma) * x_t - alpha_n * jnp.expm1(-h) * d
  x_next = jnp.where(_to_ndim(t_next < 0, nd), x0_hat, x_next)
  return x_next.astype(x_t.dtype), x0_hat.astype(x_t.dtype)


def guided_eps(eps_fn: losses.EpsFn,
               params: Any,
               x_t: jax.Array,
               t: jax.Array,
               labels: Optional[jax.Array],
               rng: jax.Array,
               *,
               guidance_scale: Optional[float | jax.Array] = None,
               null_label: Any = None) -> jax.Array:
  """eps_theta at evaluation time, with optional classifier-free guidance.

  Without guidance (`guidance_scale=None`) this is
  `eps_fn(params, x_t, t, labels, train=False, rng=rng)`. With guidance scale
  w it is (Ho & Salimans, 2022, "Classifier-Free Diffusion Guidance",
  https://arxiv.org/abs/2207.12598, eq. 6 written with w' = 1 + w)

    eps = eps_theta(x_t, null) + w (eps_theta(x_t, y) - eps_theta(x_t, null)),

  so w = 1 is the plain conditional model and w = 0 the unconditional one. The
  conditional and unconditional passes are one call on the concatenated batch
  [x_t; x_t] with labels [y; null].

  Args:
    eps_fn: the noise-prediction network, see `losses.EpsFn`.
    params: its parameters.
    x_t: [B, H, W, C] noisy samples.
    t: int32 timesteps of shape [B].
    labels: int labels of shape [B], or None.
    rng: PRNG key passed to eps_fn (ignored there since train=False).
    guidance_scale: w, or None for no guidance.
    null_label: the "no condition" label; required with guidance.

  Returns:
    The (guided) predicted noise, same shape as `x_t`.

  Raises:
    ValueError: if guidance is asked for without labels or null_label.
  """
  if guidance_scale is None:
    return eps_fn(params, x_t, t, labels, train=False, rng=rng)
  _check_guidance(labels, null_label)
  batch = x_t.shape[0]
  labels = jnp.asarray(labels)
  null = jnp.full_like(labels, jnp.asarray(null_label, dtype=labels.dtype))
  eps = eps_fn(params, jnp.concatenate([x_t, x_t], axis=0),
               jnp.concatenate([t, t], axis=0),
               jnp.concatenate([labels, null], axis=0),
               train=False, rng=rng)
  eps_cond, eps_uncond = eps[:batch], eps[batch:]
  return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def sample(eps_fn: losses.EpsFn,
           params: Any,
           schedule: schedules_lib.NoiseSchedule,
           rng: jax.Array,
           shape: Sequence[int],
           *,
           method: str = 'ddim',
           num_steps: int = 50,
           eta: float | jax.Array = 0.0,
           labels: Optional[jax.Array] = None,
           guidance_scale: Optional[float | jax.Array] = None,
           null_label: Any = None,
           clip_denoised: bool = True) -> jax.Array:
  """Draws samples x_0 by running the reverse process from pure noise.

  x_T ~ N(0, I) of `shape`, then one of
    * method='ddpm': T ancestral steps `ddpm_step` at t = T-1, ..., 0
      (`num_steps` and `eta` are ignored);
    * method='ddim': S = `num_steps` steps `ddim_step` at t = tau_i of
      `ddim_timesteps(T, S)`, each to t_prev = t - T // S, with `eta`;
    * method='dpm_solver++': S = `num_steps` steps of multistep
      DPM-Solver++(2M) (Lu et al., 2022, arXiv 2211.01095, Algorithm 2),
      `dpm_solver_step` at t_i of `dpm_solver_timesteps(T, S)`, each to
      t_{i+1}, the last to sigma = 0 (it returns its x^_0). The first and
      the last step are first order, the others second order (diffusers'
      `lower_order_final` changes nothing at order 2 with a final sigma of
      0). Deterministic: `eta` and the noise drawn below are ignored.
  The loop is a `lax.scan`; the result is clipped to [-1, 1] when
  `clip_denoised` (pixels; not latents, which are not bounded).

  The randomness is derived from `rng` as follows (so a plain Python loop over
  the steps can reproduce it):

    init_key, loop_key = jax.random.split(rng)
    x = jax.random.normal(init_key, shape, jnp.float32)
    step_keys = jax.random.split(loop_key, num_sampling_steps)
    # at step i:
    noise_key, model_key = jax.random.split(step_keys[i])
    eps = guided_eps(..., rng=model_key)      # eps_fn gets train=False
    noise = jax.random.normal(noise_key, shape, jnp.float32)

  To jit, mark `eps_fn`, `shape`, `method`, `num_steps` and `clip_denoised`
  static, e.g. `jax.jit(sample, static_argnums=(0, 4), static_argnames=(
  'method', 'num_steps', 'clip_denoised'))`; `null_label` should then be a
  python int or an array, and `guidance_scale` None or a number/array.

  Args:
    eps_fn: the noise-prediction network, see `losses.EpsFn`.
    params: its parameters.
    schedule: the noise schedule.
    rng: PRNG key.
    shape: output shape (NHWC), e.g. (B, H, W, C).
    method: 'ddpm', 'ddim' or 'dpm_solver++'.
    num_steps: number of DDIM or DPM-Solver++ steps S (1 <= S <= T).
    eta: DDIM stochasticity (0: deterministic); ignored by the others.
    labels: optional int labels of shape [B] for a conditional model.
    guidance_scale: classifier-free guidance scale w, see `guided_eps`; None
      for no guidance.
    null_label: the "no condition" label; required with guidance.
    clip_denoised: clip x^_0 to [-1, 1] in each step, and the result.

  Returns:
    float32 samples of `shape` (in [-1, 1] when `clip_denoised`).

  Raises:
    ValueError: for an unknown method, num_steps outside [1, T], guidance
      without labels or null_label, or labels not of batch size B.
  """
  shape = tuple(int(d) for d in shape)
  num_timesteps = schedule.num_timesteps
  if method == 'ddpm':
    ts = np.arange(num_timesteps - 1, -1, -1, dtype=np.int32)
    t_nexts = ts - 1
  elif method == 'ddim':
    ts = ddim_timesteps(num_timesteps, num_steps)
    t_nexts = ts - num_timesteps // num_steps
  elif method == 'dpm_solver++':
    ts = dpm_solver_timesteps(num_timesteps, num_steps)
    t_nexts = np.append(ts[1:], -1).astype(np.int32)
  else:
    raise ValueError(f'Unknown sampling method {method!r}; valid choices are '
                     f'{list(_METHODS)}.')
  if guidance_scale is not None:
    _check_guidance(labels, null_label)
  if labels is not None:
    labels = jnp.asarray(labels)
    if labels.shape[:1] != shape[:1]:
      raise ValueError(f'labels must have batch size {shape[0]}, got shape '
                       f'{labels.shape}.')
  batch = shape[0]

  init_key, loop_key = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32)
  step_keys = jax.random.split(loop_key, len(ts))

  # The timestep of the previous step (DPM-Solver++), -1 at the first.
  t_prevs = np.append(-1, ts[:-1]).astype(np.int32)

  def body(carry, inputs):
    x, x0_prev = carry
    t, t_next, t_prev, key = inputs
    noise_key, model_key = jax.random.split(key)
    t_batch = jnp.full((batch,), t, dtype=jnp.int32)
    eps = guided_eps(eps_fn, params, x, t_batch, labels, model_key,
                     guidance_scale=guidance_scale, null_label=null_label)
    eps = eps.astype(jnp.float32)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    if method == 'ddpm':
      x = ddpm_step(schedule, x, t, eps, noise, clip_denoised=clip_denoised)
    elif method == 'ddim':
      x = ddim_step(schedule, x, t, t_next, eps, noise, eta=eta,
                    clip_denoised=clip_denoised)
    else:
      x, x0_prev = dpm_solver_step(schedule, x, t, t_next, eps, t_prev,
                                   x0_prev, clip_denoised=clip_denoised)
    return (x, x0_prev), None

  # The carried x^_0 of the previous step (DPM-Solver++ only).
  x0_init = jnp.zeros_like(x) if method == 'dpm_solver++' else None
  (x, _), _ = jax.lax.scan(
      body, (x, x0_init),
      (jnp.asarray(ts), jnp.asarray(t_nexts), jnp.asarray(t_prevs),
       step_keys))
  return jnp.clip(x, -1.0, 1.0) if clip_denoised else x


def _check_num_steps(num_timesteps: int, num_steps: int) -> None:
  if (not isinstance(num_steps, (int, np.integer))
      or not 1 <= num_steps <= num_timesteps):
    raise ValueError(
        f'num_steps must be an integer in [1, num_timesteps={num_timesteps}], '
        f'got {num_steps!r}.')


def _check_guidance(labels: Optional[jax.Array], null_label: Any) -> None:
  if labels is None:
    raise ValueError('Classifier-free guidance (guidance_scale is not None) '
                     'needs labels.')
  if null_label is None:
    raise ValueError('Classifier-free guidance (guidance_scale is not None) '
                     'needs null_label, the "no condition" label the model '
                     'was trained with.')
