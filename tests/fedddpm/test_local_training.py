"""Phase 1 of FedDDPM: the vectorized program against a per-client loop."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_diff import federation
from fedjax_diff import local_training
from fedjax_diff import optimizers
from fedjax_diff import rounds
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import make_schedule

import fedddpm_testlib as lib

STEPS = 3
BATCH = 4
SCHEDULE = make_schedule('linear', 100)


def loss_fn(params, x, labels, rng):
  return diffusion_loss(lib.eps_fn, params, SCHEDULE, x, rng, labels=labels,
                        null_label=lib.NUM_CLASSES, cond_drop_prob=0.2)


def client_opt():
  # SGD with momentum, clipping and warmup: stateful, and smooth in its
  # inputs (see tests/test_rounds.py on Adam's first step).
  return optimizers.client_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=5e-2, momentum=0.9, warmup_steps=2,
      grad_clip=1.0)))


def reference(init_params, data, rng, k):
  """Client k's phase 1 as a plain Python loop over its steps, following the
  documented key scheme (fold_in(rng, k), then rounds.make_local_training's)."""
  opt = client_opt()
  key = jax.random.fold_in(rng, k)
  order_key, train_key = jax.random.split(key)
  count = int(data.counts[k])
  images, labels = np.asarray(data.images[k]), np.asarray(data.labels[k])
  order = rounds.epoch_order(order_key, count, images.shape[0])
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  params, opt_state, losses = init_params, opt.init(init_params), []
  for s in range(STEPS):
    flip_key, loss_key = jax.random.split(jax.random.fold_in(train_key, s))
    x, y = rounds.client_batch(images, labels, order, count, s, BATCH,
                               flip_key, random_flip=False)
    loss, grads = grad_fn(params, x, y, loss_key)
    updates, opt_state = opt.update(grads, opt_state, params,
                                    global_params=init_params, global_step=s)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  return params, np.mean(losses)


@pytest.mark.parametrize('mode', ['map', 'vmap'])
def test_phase1_matches_per_client_loop(mode):
  mesh = federation.client_mesh()
  data = lib.make_data(num_clients=5)
  sharded = federation.shard_client_data(data, mesh)
  init = lib.init_params()
  rng = jax.random.PRNGKey(7)
  pretrain = local_training.make_pretrain_fn(
      loss_fn=loss_fn, client_optimizer=client_opt(), mesh=mesh, steps=STEPS,
      batch_size=BATCH, mode=mode)
  client_params, losses = pretrain(init, sharded, rng)
  assert np.asarray(losses).shape == (sharded.num_clients,)
  for k in range(data.num_clients):
    want, want_loss = reference(init, data, rng, k)
    got = jax.tree.map(lambda x: np.asarray(x[k]), client_params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(losses[k]), want_loss, rtol=1e-5)
  # The clients really trained, and differently (their own data).
  moved = [float(np.abs(np.asarray(x[0]) - np.asarray(x[1])).max())
           for x in jax.tree.leaves(client_params)]
  assert max(moved) > 0


def test_bad_budget_is_refused():
  with pytest.raises(ValueError, match='steps >= 1'):
    local_training.make_pretrain_fn(
        loss_fn=loss_fn, client_optimizer=client_opt(),
        mesh=federation.client_mesh(), steps=0, batch_size=BATCH)
