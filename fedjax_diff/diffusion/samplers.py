"""Reverse-process samplers: DDPM ancestral sampling and DDIM.

Both samplers use an epsilon-prediction network and follow the conventions of
diffusers' `DDPMScheduler` and `DDIMScheduler` (with their default
`clip_sample=True`, `set_alpha_to_one=True`, `timestep_spacing='leading'`,
`steps_offset=0`), against which they are tested.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff.diffusion import losses
from fedjax_diff.diffusion import schedules as schedules_lib

_METHODS = ('ddpm', 'ddim')


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

  x_T ~ N(0, I) of `shape`, then either
    * method='ddpm': T ancestral steps `ddpm_step` at t = T-1, ..., 0
      (`num_steps` is ignored), or
    * method='ddim': S = `num_steps` steps `ddim_step` at t = tau_i of
      `ddim_timesteps(T, S)`, each to t_prev = t - T // S, with `eta`.
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
    method: 'ddpm' or 'ddim'.
    num_steps: number of DDIM steps S (1 <= S <= T).
    eta: DDIM stochasticity (0: deterministic).
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
    t_prevs = ts - 1
  elif method == 'ddim':
    ts = ddim_timesteps(num_timesteps, num_steps)
    t_prevs = ts - num_timesteps // num_steps
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

  def body(x, inputs):
    t, t_prev, key = inputs
    noise_key, model_key = jax.random.split(key)
    t_batch = jnp.full((batch,), t, dtype=jnp.int32)
    eps = guided_eps(eps_fn, params, x, t_batch, labels, model_key,
                     guidance_scale=guidance_scale, null_label=null_label)
    eps = eps.astype(jnp.float32)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    if method == 'ddpm':
      x = ddpm_step(schedule, x, t, eps, noise, clip_denoised=clip_denoised)
    else:
      x = ddim_step(schedule, x, t, t_prev, eps, noise, eta=eta,
                    clip_denoised=clip_denoised)
    return x, None

  x, _ = jax.lax.scan(body, x,
                      (jnp.asarray(ts), jnp.asarray(t_prevs), step_keys))
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
