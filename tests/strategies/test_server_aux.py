"""FedDDPM's server step on the auxiliary data."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fedddpm_testlib as lib
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import ema as ema_lib
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.state import init_server_state
from fedjax_diff.strategies import server_aux

SCHEDULE = make_schedule('linear', 100)
EMA = 0.9


def loss_fn(params, x, labels, rng):
  return diffusion_loss(lib.eps_fn, params, SCHEDULE, x, rng, labels=labels,
                        null_label=lib.NUM_CLASSES, cond_drop_prob=0.1)


def aux_set(n=48, seed=0):
  """Class-dependent smooth images: learnable structure for ε_θ."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, lib.NUM_CLASSES, size=n).astype(np.int32)
  grid = np.linspace(0, 1, 8)
  base = np.sin(np.pi * (grid[:, None] + grid[None, :]))
  imgs = (base[None] * (labels[:, None, None] + 1) / lib.NUM_CLASSES)
  return (np.clip(imgs * 255, 0, 255).astype(np.uint8)[..., None], labels)


def state_after_round(round_done=3):
  params = lib.init_params()
  state = init_server_state(params, optax.sgd(1.0), jax.random.PRNGKey(0))
  # As just after round `round_done`: an EMA that differs from θ.
  return state.replace(
      ema_params=jax.tree.map(lambda x: x + 0.1, params),
      round=jnp.asarray(round_done, jnp.int32))


def test_server_step_reduces_loss_on_aux_data():
  images, labels = aux_set()
  measure = server_aux.make_aux_loss(
      eps_fn=lib.eps_fn, schedule=SCHEDULE, images=images, labels=labels,
      conditional=True, seed=5, batch_size=16)
  opt = server_aux.server_aux_optimizer(ml_collections.ConfigDict(dict(
      name='adam', learning_rate=2e-2, grad_clip=1.0)))
  update = server_aux.make_server_update(
      loss_fn=loss_fn, optimizer=opt, num_steps=60, batch_size=16,
      ema_decay=EMA, donate=False)
  state = state_after_round()
  before = float(measure(state.params))
  new_state, train_loss = update(state, jnp.asarray(images),
                                 jnp.asarray(labels))
  after = float(measure(new_state.params))
  assert np.isfinite(float(train_loss))
  assert after < 0.8 * before, (before, after)
  assert int(new_state.round) == int(state.round)
  # Same state in, same batches out (keys from state.rng and the round).
  again, _ = update(state, jnp.asarray(images), jnp.asarray(labels))
  for a, b in zip(jax.tree.leaves(new_state.params),
                  jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ema_sees_the_corrected_model():
  images, labels = aux_set(16)
  opt = server_aux.server_aux_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1)))
  update = server_aux.make_server_update(
      loss_fn=loss_fn, optimizer=opt, num_steps=2, batch_size=8,
      ema_decay=EMA, donate=False)
  state = state_after_round(3)
  new, _ = update(state, jnp.asarray(images), jnp.asarray(labels))
  d = min(EMA, (1 + 2) / (10 + 2))  # the decay round 3 (index 2) used.
  for e0, p0, e1, p1 in zip(*map(jax.tree.leaves, (
      state.ema_params, state.params, new.ema_params, new.params))):
    want = np.asarray(e0, np.float64) + (1 - d) * (
        np.asarray(p1, np.float64) - np.asarray(p0, np.float64))
    np.testing.assert_allclose(np.asarray(e1), want, rtol=1e-6, atol=1e-7)
  assert ema_lib.ema_decay_at(EMA, 2) == pytest.approx(d)


def test_bad_optimizer_name_is_refused():
  with pytest.raises(ValueError, match="'adam' or 'sgd'"):
    server_aux.server_aux_optimizer(ml_collections.ConfigDict(dict(
        name='lion', learning_rate=1e-3)))
