"""Phase 1 of FedDDPM: the engine's program against a per-client loop."""

import jax
import ml_collections
import numpy as np
import pytest

import fedddpm_testlib as lib
import testlib
from fedjax_diff import federation
from fedjax_diff import optimizers
from fedjax_diff.algorithms import fedddpm
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import make_schedule

STEPS = 3
BATCH = 4
SCHEDULE = make_schedule('linear', 100)


def loss_fn(params, x, labels, rng):
  return diffusion_loss(lib.eps_fn, params, SCHEDULE, x, rng, labels=labels,
                        null_label=lib.NUM_CLASSES, cond_drop_prob=0.2)


def client_opt():
  # SGD with momentum, clipping and warmup: stateful, and smooth in its
  # inputs (see tests/testlib.py on Adam's first step).
  return optimizers.client_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=5e-2, momentum=0.9, warmup_steps=2,
      grad_clip=1.0)))


def reference(init_params, data, rng, k):
  """Client k's phase 1 as a plain Python loop over its steps, following the
  documented key scheme: key fold_in(rng, k), round 0, then the local
  training's (testlib.train_client, batches from testlib.batch_indices)."""
  params, loss, _ = testlib.train_client(
      init_params, data.images[k], data.labels[k], int(data.counts[k]),
      jax.random.fold_in(rng, k), 0, loss=loss_fn, optimizer=client_opt(),
      local_steps=STEPS, batch_size=BATCH)
  return params, loss


@pytest.mark.parametrize('mode', ['map', 'vmap'])
def test_phase1_matches_per_client_loop(mode):
  mesh = federation.client_mesh()
  data = lib.make_data(num_clients=5)
  sharded = federation.shard_client_data(data, mesh)
  init = lib.init_params()
  rng = jax.random.PRNGKey(7)
  pretrain = fedddpm.make_phase1(
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
    fedddpm.make_phase1(
        loss_fn=loss_fn, client_optimizer=client_opt(),
        mesh=federation.client_mesh(), steps=0, batch_size=BATCH)
