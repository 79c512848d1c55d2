"""`config.client_optimizer.shared_state`: one client optimizer state shared
by the clients, FedPhD's one Adam and warmup (arXiv 2507.06449), against
plain loops (algorithms/base.py documents the scheme)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import testlib as lib
from fedjax_diff import algorithms
from fedjax_diff import optimizers
from fedjax_diff.algorithms import base

ROUND_IDS = [np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 15]),
             np.array([1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15])]


def shared_fedavg(data, num_devices, optimizer_name='sgd', **overrides):
  return lib.make_algorithm(
      data, num_devices, optimizer=lib.client_opt(optimizer_name),
      **{'client_optimizer.name': optimizer_name,
         'client_optimizer.shared_state': True,
         'federation.mode': 'map' if num_devices == 1 else 'vmap',
         **overrides})


@pytest.mark.parametrize('optimizer_name', ['adam', 'sgd'])
def test_one_client_a_round_is_the_sequential_carry(optimizer_name):
  """With one client a round, FedPhD's sequential code exactly: one
  optimizer state and one warmup schedule carried from client to client,
  round to round (global step = r·S + s)."""
  data = lib.make_data()
  rounds = [[3], [7], [3], [11]]
  opt = lib.client_opt(optimizer_name)
  ref = lib.reference_state()
  carried = opt.init(ref.params)
  for r, (cid,) in enumerate(rounds):
    params, _, carried = lib.train_client(
        ref.params, data.images[cid], data.labels[cid],
        int(data.counts[cid]), lib.client_key(ref.rng, r, cid), r,
        optimizer=opt, opt_state=carried, step_offset=r * lib.LOCAL_STEPS)
    ref = lib.server_step(ref, lib.delta64(ref.params, params))
  algorithm, sharded = shared_fedavg(data, 1, optimizer_name,
                                     **{'federation.clients_per_round': 1})
  state, _, _ = lib.run_rounds(algorithm, sharded, rounds)
  lib.assert_trees_close(state.params, ref.params, rtol=1e-4, atol=1e-6)
  lib.assert_trees_close(state.client_opt_state, carried, rtol=1e-4,
                         atol=1e-7)
  if optimizer_name == 'adam':   # Adam's bias correction counts every step.
    counts = [x for x in jax.tree.leaves(state.client_opt_state)
              if jnp.issubdtype(x.dtype, jnp.integer)]
    assert counts and all(int(c) == 4 * lib.LOCAL_STEPS for c in counts)


def reference_rounds(data, rounds_ids, groups_of=None):
  """FedAvg rounds with a shared optimizer state as plain loops: every
  client trains from the round's state x_r with the schedule's steps of a
  sequential pass (r·K + p)·S + s; x_{r+1} is one optimizer's state after
  all the round's gradients in that order (by client id)."""
  opt = lib.client_opt()
  ref = lib.reference_state()
  shared = opt.init(ref.params)
  for r, ids in enumerate(rounds_ids):
    order = sorted(int(c) for c in ids)
    grads, deltas, weights = [], [], []
    for p, cid in enumerate(order):
      log = []
      params, _, _ = lib.train_client(
          ref.params, data.images[cid], data.labels[cid],
          int(data.counts[cid]), lib.client_key(ref.rng, r, cid), r,
          opt_state=shared,
          step_offset=(r * len(order) + p) * lib.LOCAL_STEPS,
          grads_log=log)
      grads += log
      deltas.append(lib.delta64(params, ref.params))
      weights.append(int(data.counts[cid]))
    shared = lib.sequential_state(opt, shared, grads, ref.params)
    mean = lib.weighted_mean64(deltas, weights)
    ref = lib.server_step(ref, jax.tree.map(np.negative, mean))
  return ref, shared


@pytest.mark.parametrize('num_devices', [1, 8])
def test_round_composes_the_clients_in_order(num_devices):
  data = lib.make_data()
  ref, shared = reference_rounds(data, ROUND_IDS)
  algorithm, sharded = shared_fedavg(data, num_devices)
  state, _, round_fn = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  lib.assert_trees_close(state.params, ref.params)
  lib.assert_trees_close(state.client_opt_state, shared, rtol=1e-4,
                         atol=1e-6)
  # The momentum moved: the comparison is not between two fresh states.
  assert max(float(jnp.abs(x).max())
             for x in jax.tree.leaves(state.client_opt_state)) > 1e-3
  assert state.client_states == {} and round_fn._cache_size() == 1


def test_compose_sequential_by_hand():
  """Two clients of S = 2 steps of the EMA x ← βx + (1 − β)g, β = 1/2, from
  x0 = 8, and a counter: by hand, the sequential pass over client 1's
  gradients (position 0) then client 0's (position 1)."""
  beta, steps = 0.5, 2
  x0 = {'m': jnp.array([8.0]), 'n': jnp.array(5, jnp.int32)}
  g = {0: [2.0, 4.0], 1: [6.0, 0.0]}

  def run(x, gs):
    for v in gs:
      x = beta * x + (1 - beta) * v
    return x

  finals = {'m': jnp.array([[run(8.0, g[0])], [run(8.0, g[1])], [99.0]]),
            'n': jnp.array([7, 7, 123], jnp.int32)}
  positions = jnp.array([1, 0, 2])
  mask = jnp.array([1.0, 1.0, 0.0])   # the third slot is padding.
  out = optimizers.compose_sequential(x0, finals, positions, mask, steps,
                                      {'m': beta, 'n': 1.0})
  np.testing.assert_allclose(out['m'], [run(8.0, g[1] + g[0])], rtol=1e-6)
  assert int(out['n']) == 5 + 2 * steps


def test_state_decays_follow_the_config():
  params = lib.init_params()
  adam_cfg = ml_collections.ConfigDict(dict(lib.client_opt_config('adam'),
                                            b1=0.8, b2=0.99))
  state = optimizers.client_optimizer(adam_cfg).init(params)
  decays = optimizers.state_decays(adam_cfg, state)
  (adam,) = [d for d in jax.tree.leaves(
      decays, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(d, optax.ScaleByAdamState)]
  assert adam.count == 1.0
  assert set(jax.tree.leaves(adam.mu)) == {0.8}
  assert set(jax.tree.leaves(adam.nu)) == {0.99}
  sgd_cfg = lib.client_opt_config('sgd')
  with pytest.raises(ValueError, match='Adam'):
    optimizers.state_decays(sgd_cfg, state)
  sgd_state = optimizers.client_optimizer(sgd_cfg).init(params)
  assert set(jax.tree.leaves(optimizers.state_decays(sgd_cfg, sgd_state))
             ) == {0.9}


def test_order_positions():
  ids = jnp.array([9, 2, 0, 5, 7, 0])
  mask = jnp.array([1, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(base.order_positions(ids, mask),
                                [3, 0, 4, 1, 2, 5])
  # FedPhD's loops: edge 0's clients by id, then edge 1's.
  edges = jnp.array([0, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(base.order_positions(ids, mask, edges),
                                [1, 2, 4, 0, 3, 5])


def test_keep_and_shared_state_exclude_each_other():
  with pytest.raises(ValueError, match='exclude each other'):
    lib.make_algorithm(lib.make_data(), 1,
                       **{'client_optimizer.keep_state': True,
                          'client_optimizer.shared_state': True})
