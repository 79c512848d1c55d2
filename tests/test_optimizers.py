"""Tests of fedjax_diff.optimizers: the client learning-rate schedule."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_diff import optimizers


def _cosine_by_hand(lr, warmup, decay, step):
  """The schedule written out with math, one step at a time."""
  value = lr * min(1.0, (step + 1) / warmup) if warmup else lr
  if decay:
    frac = min(max((step - warmup) / (decay - warmup), 0.0), 1.0)
    value *= 0.5 * (1.0 + math.cos(math.pi * frac))
  return value


@pytest.mark.parametrize('warmup,decay', [(0, 0), (4, 0), (0, 10), (4, 12)])
def test_warmup_schedule_matches_hand_computation(warmup, decay):
  schedule = optimizers.warmup_schedule(0.5, warmup, decay)
  for step in range(16):
    np.testing.assert_allclose(float(schedule(step)),
                               _cosine_by_hand(0.5, warmup, decay, step),
                               rtol=1e-6, atol=1e-7)


def test_cosine_decay_landmarks():
  # W = 4, D = 12: full rate at the end of warmup, half way at step 8, 0 at
  # step 12 and after.
  schedule = optimizers.warmup_schedule(2.0, 4, 12)
  assert float(schedule(3)) == pytest.approx(2.0)
  assert float(schedule(4)) == pytest.approx(2.0)
  assert float(schedule(8)) == pytest.approx(1.0)
  assert float(schedule(12)) == pytest.approx(0.0, abs=1e-7)
  assert float(schedule(40)) == pytest.approx(0.0, abs=1e-7)


def test_sgd_client_optimizer_steps_by_the_decayed_rate():
  cfg = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, warmup_steps=0, decay_steps=10,
      grad_clip=0.0))
  opt = optimizers.client_optimizer(cfg)
  params = {'w': jnp.zeros(3)}
  grads = {'w': jnp.array([1.0, -2.0, 4.0])}
  state = opt.init(params)
  for step in (0, 5, 9, 10):
    updates, state = opt.update(grads, state, params, global_step=step)
    rate = 0.1 * 0.5 * (1.0 + math.cos(math.pi * min(step / 10, 1.0)))
    np.testing.assert_allclose(updates['w'], -rate * grads['w'], rtol=1e-6,
                               atol=1e-8)


def test_decay_not_after_warmup_is_refused_with_the_field():
  cfg = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-3, warmup_steps=100, decay_steps=100,
      grad_clip=1.0))
  with pytest.raises(ValueError, match=r'config\.client_optimizer\.'
                     r'decay_steps \(100\) must exceed .*warmup_steps \(100\)'):
    optimizers.client_optimizer(cfg)
