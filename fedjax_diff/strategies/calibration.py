"""Calibration inputs for FedDM-quant's 'calibrated' scales, after PTQ4DM.

PTQ4DM (Shang et al. 2023, "Post-training Quantization on Diffusion Models",
arXiv 2211.15736) calibrates a diffusion model's quantizer on inputs the
full-precision model itself produces along its reverse process, at timesteps
drawn around 0.4·T rather than uniformly; FedDM (Vora et al. 2024, arXiv
2407.14730) adapts it to the uploaded update. Here, after local training,
client k:

1. draws x_{T−1} ~ N(0, I) for a batch of B images and, per image, an end
   timestep t_b = clip(round(T·(f + σ·n_b)), 1, T − 1), n_b ~ N(0, 1),
   f = `t_frac` (0.4), σ = `t_spread`;
2. runs S deterministic DDIM steps (Song et al. 2021, eq. 12, η = 0) with its
   new parameters θ_k, image b along τ_i = round(T−1 − (T−1−t_b)·i/S),
   i = 0..S, ending at x_{t_b};
3. calibrates with f(θ, (x, t, y)) = ε_θ(x_t, t, y), the network's noise
   prediction on those inputs (`quantize.calibrate_scales`).

For class-conditional models the labels y are drawn from the client's own
examples (uniformly over them), so a client calibrates on its own classes.

Cost per client and round, in forward passes of the UNet on a batch of B:
S for the inputs, plus 2 + L·R for `calibrate_scales` (L parameter leaves,
R clipping ratios, one sweep). For configs/mnist_fedavg.py's UNet (L = 152
leaves, R = 11 ratios) that is S + 1,674 passes: with B = 4, about 6.7k
image-forwards, against ≈ 20 local steps × 16 images × 3 (forward and
backward) ≈ 1k for the local training, i.e. calibration costs ≈ 7× the
local training. 'minmax' and 'mse' cost no forward pass. Fewer ratios
(QuantizationConfig.ratios) or a smaller B cut it proportionally.

Keys: `noise_key, t_key, label_key = split(key, 3)`.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp

from fedjax_diff.diffusion import ddim_step
from fedjax_diff.diffusion import NoiseSchedule

PyTree = Any


@flax.struct.dataclass
class CalibInputs:
  """A calibration batch: noisy images x_t at timesteps t, with labels."""
  x: jax.Array            # [B, H, W, C]
  t: jax.Array            # int32 [B]
  labels: Optional[jax.Array]  # int32 [B], or None (unconditional)


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Draws PTQ4DM-style calibration inputs from a client's own model.

  Attributes:
    eps_fn: `eps_fn(params, x_t, t, labels, *, train) -> eps`
      (`models.make_eps_fn`).
    schedule: the diffusion noise schedule (T = schedule.num_timesteps).
    image_shape: (H, W, C) of one image.
    num_classes: the model's number of classes; None if unconditional.
    batch: B, images per client.
    steps: S, DDIM steps from T−1 down to t_b.
    t_frac: f, the centre of the end timesteps as a fraction of T.
    t_spread: σ, their standard deviation as a fraction of T.
  """
  eps_fn: Callable[..., jax.Array]
  schedule: NoiseSchedule
  image_shape: tuple[int, ...]
  num_classes: Optional[int] = None
  batch: int = 4
  steps: int = 4
  t_frac: float = 0.4
  t_spread: float = 0.05

  def __post_init__(self):
    if not isinstance(self.batch, int) or self.batch < 1:
      raise ValueError(f'Calibration: batch must be an int >= 1, got '
                       f'{self.batch!r}.')
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f'Calibration: steps must be an int >= 1, got '
                       f'{self.steps!r}.')
    if not 0.0 < float(self.t_frac) < 1.0:
      raise ValueError(f'Calibration: t_frac must be in (0, 1), got '
                       f'{self.t_frac!r}.')
    if not float(self.t_spread) >= 0.0:
      raise ValueError(f'Calibration: t_spread must be >= 0, got '
                       f'{self.t_spread!r}.')
    if len(self.image_shape) != 3:
      raise ValueError(f'Calibration: image_shape must be (H, W, C), got '
                       f'{self.image_shape!r}.')

  def end_timesteps(self, key: jax.Array) -> jax.Array:
    """t_b = clip(round(T·(f + σ·n_b)), 1, T − 1), int32 [B]."""
    num_t = self.schedule.num_timesteps
    n = jax.random.normal(key, (self.batch,))
    t = jnp.round(num_t * (self.t_frac + self.t_spread * n))
    return jnp.clip(t, 1, num_t - 1).astype(jnp.int32)

  def inputs(self, params: PyTree, key: jax.Array, labels: jax.Array,
             count: jax.Array) -> CalibInputs:
    """Runs the client's model from noise down to x_{t_b} (module docstring).

    Args:
      params: the client's trained parameters θ_k.
      key: the calibration key.
      labels: int32 [max_n], the client's labels.
      count: int32 scalar, its number of examples.
    """
    noise_key, t_key, label_key = jax.random.split(key, 3)
    num_t = self.schedule.num_timesteps
    x = jax.random.normal(noise_key, (self.batch,) + tuple(self.image_shape))
    t_end = self.end_timesteps(t_key)
    y = None
    if self.num_classes is not None:
      idx = jax.random.randint(label_key, (self.batch,), 0,
                               jnp.maximum(count, 1))
      y = labels[idx].astype(jnp.int32)
    frac = jnp.arange(self.steps + 1, dtype=jnp.float32) / self.steps
    # τ[b, i] = round(T−1 − (T−1−t_b)·i/S): T−1 at i = 0, t_b at i = S.
    taus = jnp.round((num_t - 1) - ((num_t - 1) - t_end[:, None]).astype(
        jnp.float32) * frac[None, :]).astype(jnp.int32)

    def step(x, i):
      t, t_prev = taus[:, i], taus[:, i + 1]
      eps = self.eps_fn(params, x, t, y, train=False)
      return ddim_step(self.schedule, x, t, t_prev, eps, eta=0.0), None

    x, _ = jax.lax.scan(step, x, jnp.arange(self.steps))
    return CalibInputs(x=x, t=t_end, labels=y)

  def apply_fn(self, params: PyTree, inputs: CalibInputs) -> jax.Array:
    """What the calibration matches: ε_θ(x_t, t, y)."""
    return self.eps_fn(params, inputs.x, inputs.t, inputs.labels, train=False)
