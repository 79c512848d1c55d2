"""Noise schedules of the discrete-time Gaussian diffusion process.

The forward process of DDPM (Ho et al., 2020, "Denoising Diffusion
Probabilistic Models", https://arxiv.org/abs/2006.11239) adds Gaussian noise in
T steps,

  q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I),

so that, with alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s,

  q(x_t | x_0) = N(x_t; sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)   (eq. 4).

Timesteps are 0-indexed here, t in {0, ..., T-1}, as in diffusers and in the
reference DDPM code: index t holds beta_{t+1} of the paper.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class NoiseSchedule:
  """Precomputed float32 coefficients of a diffusion schedule (a pytree).

  All fields are arrays of shape [T], indexed by the 0-based timestep t.

  Attributes:
    betas: beta_t, the variance of the forward step q(x_t | x_{t-1}).
    alphas: alpha_t = 1 - beta_t.
    alphas_cumprod: alpha_bar_t = prod_{s<=t} alpha_s.
    alphas_cumprod_prev: alpha_bar_{t-1}, with alpha_bar_{-1} = 1.
    sqrt_alphas_cumprod: sqrt(alpha_bar_t).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha_bar_t).
    posterior_variance: beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 -
      alpha_bar_t), the variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 7), used as
      the "fixed_small" reverse-process variance. It is 0 at t = 0.
    posterior_log_variance_clipped: log beta~_t, with the value at t = 0
      replaced by the one at t = 1 so that the log stays finite.
    posterior_mean_coef1: beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t), the
      coefficient of x_0 in the posterior mean mu~_t(x_t, x_0) (DDPM eq. 7).
    posterior_mean_coef2: sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 -
      alpha_bar_t), the coefficient of x_t in mu~_t(x_t, x_0).
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, the number of diffusion steps (static, read from the array shape)."""
    return self.betas.shape[0]


def schedule_from_betas(betas: np.ndarray) -> NoiseSchedule:
  """Builds a `NoiseSchedule` from betas of shape [T].

  All derived quantities are computed in float64 numpy and cast to float32 at
  the end.

  Args:
    betas: the forward-process variances beta_t, t = 0..T-1, each in (0, 1).

  Returns:
    The schedule.

  Raises:
    ValueError: if `betas` is not a non-empty 1-D array with values in (0, 1].
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f'betas must be a non-empty 1-D array, got shape '
                     f'{betas.shape}.')
  if not np.all((betas > 0) & (betas <= 1)):
    raise ValueError('betas must lie in (0, 1].')
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = (
      betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod))
  if posterior_variance.shape[0] > 1:
    log_var_first = posterior_variance[1]
  else:
    log_var_first = betas[0]
  posterior_log_variance_clipped = np.log(
      np.append(log_var_first, posterior_variance[1:]))
  posterior_mean_coef1 = (
      betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
  posterior_mean_coef2 = (
      (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))

  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return NoiseSchedule(
      betas=f32(betas),
      alphas=f32(alphas),
      alphas_cumprod=f32(alphas_cumprod),
      alphas_cumprod_prev=f32(alphas_cumprod_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
      posterior_variance=f32(posterior_variance),
      posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
      posterior_mean_coef1=f32(posterior_mean_coef1),
      posterior_mean_coef2=f32(posterior_mean_coef2),
  )


def linear_schedule(num_timesteps: int = 1000,
                    beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> NoiseSchedule:
  """The linear schedule of DDPM (Ho et al., 2020, Sec. 4).

  beta_t = beta_start + (beta_end - beta_start) t / (T - 1), t = 0..T-1.
  The defaults are the paper's (1e-4 to 0.02 over T = 1000 steps).

  Args:
    num_timesteps: T.
    beta_start: beta_0.
    beta_end: beta_{T-1}.

  Returns:
    The schedule.
  """
  _check_num_timesteps(num_timesteps)
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  return schedule_from_betas(betas)


def scaled_linear_schedule(num_timesteps: int = 1000,
                           beta_start: float = 1e-4,
                           beta_end: float = 0.02) -> NoiseSchedule:
  """The schedule latent diffusion trains with (Rombach et al. 2022, arXiv
  2112.10752; LDM's `make_beta_schedule('linear')`, diffusers'
  'scaled_linear'): linear in √β,

  beta_t = (√beta_start + (√beta_end − √beta_start) t / (T − 1))², t = 0..T−1.

  LDM's LSUN-Church model uses beta_start = 0.0015, beta_end = 0.0155.

  Args:
    num_timesteps: T.
    beta_start: beta_0.
    beta_end: beta_{T-1}.

  Returns:
    The schedule.
  """
  _check_num_timesteps(num_timesteps)
  betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps,
                      dtype=np.float64) ** 2
  return schedule_from_betas(betas)


def cosine_schedule(num_timesteps: int = 1000,
                    s: float = 0.008,
                    max_beta: float = 0.999) -> NoiseSchedule:
  """The cosine schedule of Nichol & Dhariwal (2021), eq. 17.

  "Improved Denoising Diffusion Probabilistic Models",
  https://arxiv.org/abs/2102.09672. With

    f(u) = cos(((u + s) / (1 + s)) * pi / 2)^2,

  the betas are beta_t = min(1 - f((t + 1) / T) / f(t / T), max_beta) for
  t = 0..T-1, so that alpha_bar_t = f((t + 1) / T) / f(0) up to the clipping.
  This matches diffusers' `beta_schedule='squaredcos_cap_v2'`.

  Args:
    num_timesteps: T.
    s: the small offset that keeps beta_0 from being too small.
    max_beta: the upper clip on beta_t, which avoids the singularity at t = T.

  Returns:
    The schedule.
  """
  _check_num_timesteps(num_timesteps)
  def f(u):
    return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
  betas = np.array([
      min(1.0 - f((t + 1) / num_timesteps) / f(t / num_timesteps), max_beta)
      for t in range(num_timesteps)
  ], dtype=np.float64)
  return schedule_from_betas(betas)


_SCHEDULES: dict[str, Callable[..., NoiseSchedule]] = {
    'linear': linear_schedule,
    'scaled_linear': scaled_linear_schedule,
    'cosine': cosine_schedule,
}


def make_schedule(name: str, num_timesteps: int, **kwargs: Any
                  ) -> NoiseSchedule:
  """Builds a schedule by name.

  Args:
    name: 'linear' (`linear_schedule`), 'scaled_linear'
      (`scaled_linear_schedule`) or 'cosine' (`cosine_schedule`).
    num_timesteps: T.
    **kwargs: passed on to the schedule function (e.g. `beta_start`,
      `beta_end` for 'linear'; `s`, `max_beta` for 'cosine').

  Returns:
    The schedule.

  Raises:
    ValueError: if `name` is not a known schedule.
  """
  try:
    fn = _SCHEDULES[name]
  except KeyError:
    raise ValueError(
        f'Unknown noise schedule {name!r}; valid choices are '
        f'{sorted(_SCHEDULES)}.') from None
  return fn(num_timesteps, **kwargs)


def schedule_from_config(cfg) -> NoiseSchedule:
  """The schedule of `config.diffusion` (fields `schedule`, a name,
  `num_timesteps`, T, and `beta_start` / `beta_end` where given, e.g. LDM's
  scaled_linear).

  Raises:
    ValueError: an unknown name or a T that is not an int >= 1.
  """
  num = cfg.get('num_timesteps')
  if isinstance(num, bool) or not isinstance(num, int) or num < 1:
    raise ValueError(f'config.diffusion.num_timesteps must be an int >= 1 '
                     f'(DDPM: 1000), got {num!r}.')
  betas = {k: float(cfg[k]) for k in ('beta_start', 'beta_end')
           if cfg.get(k) is not None}
  try:
    return make_schedule(cfg.get('schedule', 'linear'), num, **betas)
  except ValueError as e:
    raise ValueError(f'config.diffusion.schedule: {e}') from None


def _check_num_timesteps(num_timesteps: int) -> None:
  if int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(
        f'num_timesteps must be a positive integer, got {num_timesteps!r}.')


def extract(values: jax.Array, t: jax.Array | int, ndim: int) -> jax.Array:
  """Gathers `values[t]` and shapes it to broadcast against an ndim array.

  Args:
    values: a schedule array of shape [T].
    t: a scalar timestep (python int or 0-d int array) or int array of shape
      [B].
    ndim: rank of the array the result is to broadcast against (e.g. 4 for
      NHWC images).

  Returns:
    A 0-d array when t is a scalar, else an array of shape [B, 1, ..., 1] with
    `ndim` dimensions.
  """
  t = jnp.asarray(t, dtype=jnp.int32)
  out = values[t]
  if t.ndim == 0:
    return out
  if t.ndim != 1:
    raise ValueError(
        f't must be a scalar or of shape [B], got shape {t.shape}.')
  return out.reshape(t.shape + (1,) * (ndim - 1))


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Samples x_t ~ q(x_t | x_0) by reparameterization (DDPM eq. 4).

  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

  Args:
    schedule: the noise schedule.
    x0: clean data of shape [B, ...] (e.g. NHWC in [-1, 1]).
    t: int timesteps of shape [B] (or a scalar, for all examples).
    noise: eps ~ N(0, I), same shape as `x0`.

  Returns:
    x_t, same shape and dtype as `x0`.
  """
  a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return (a * x0 + b * noise).astype(x0.dtype)
