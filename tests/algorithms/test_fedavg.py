"""FedAvg on the engine against the plain Python loop of the test library."""

import jax
import ml_collections
import numpy as np
import pytest

import testlib as lib
from fedjax_diff import client as client_lib
from fedjax_diff import federation
from fedjax_diff import optimizers

ROUND_IDS = [np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 15]),
             np.array([1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15])]


@pytest.fixture(scope='module')
def reference():
  data = lib.make_data()
  state = lib.reference_state()
  losses = []
  for ids in ROUND_IDS:
    state, loss = lib.fedavg_round(state, data, ids)
    losses.append(loss)
  return data, state, losses


@pytest.mark.parametrize('mode,num_devices,chunk_size', [
    ('vmap', 1, None), ('vmap', 8, None), ('map', 1, None), ('map', 8, None),
    ('chunked', 1, 4), ('chunked', 8, 1)])
def test_round_matches_python_loop(reference, mode, num_devices, chunk_size):
  data, ref_state, ref_losses = reference
  algorithm, sharded = lib.make_algorithm(
      data, num_devices, **{'federation.mode': mode,
                            'federation.chunk_size': chunk_size or 0})
  state, metrics, round_fn = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  assert int(state.round) == 2
  # The round moved the model: the comparison is not between two no-ops.
  assert lib.tree_distance(state.params, lib.init_params()) > 1e-3
  lib.assert_trees_close(state.params, ref_state.params)
  lib.assert_trees_close(state.ema_params, ref_state.ema_params)
  np.testing.assert_allclose([float(m['loss']) for m in metrics], ref_losses,
                             rtol=1e-5)
  # The weights are the real clients' example counts, padding weighs 0.
  for m, ids in zip(metrics, ROUND_IDS):
    w = m['client_weights']
    assert sorted(w[w > 0].tolist()) == sorted(
        np.asarray(data.counts)[ids].astype(float).tolist())
  # Two rounds, one compilation.
  assert round_fn._cache_size() == 1


def test_adam_round_matches_python_loop():
  data = lib.make_data()
  ref = lib.reference_state()
  for ids in ROUND_IDS:
    ref, _ = lib.fedavg_round(ref, data, ids, optimizer=lib.client_opt('adam'))
  algorithm, sharded = lib.make_algorithm(data, 1,
                                          optimizer=lib.client_opt('adam'))
  state, _, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  lib.assert_trees_close(state.params, ref.params, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('mode,num_devices', [('vmap', 8), ('map', 1)])
def test_kept_client_optimizer_state_matches_python_loop(mode, num_devices):
  """Clients that keep their optimizer state across rounds (momentum here):
  the round equals the loop that carries each client's own state, clients
  that sit a round out keep theirs untouched, and padding writes nothing."""
  data = lib.make_data()
  ref, ref_opt = lib.reference_state(), {}
  for ids in ROUND_IDS:
    ref, _ = lib.fedavg_round(ref, data, ids, opt_states=ref_opt)
  algorithm, sharded = lib.make_algorithm(
      data, num_devices, **{'federation.mode': mode,
                            'client_optimizer.keep_state': True})
  state, _, round_fn = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  lib.assert_trees_close(state.params, ref.params)
  rows = state.client_states[client_lib.OPTIMIZER]
  fresh = lib.client_opt().init(lib.init_params())
  for cid in range(data.num_clients):
    lib.assert_trees_close(jax.tree.map(lambda x: x[cid], rows),
                           ref_opt.get(cid, fresh))
  assert round_fn._cache_size() == 1
  # Not a no-op: resetting the optimizer every round ends elsewhere.
  reset, sharded = lib.make_algorithm(data, num_devices,
                                      **{'federation.mode': mode})
  reset_state, _, _ = lib.run_rounds(reset, sharded, ROUND_IDS)
  assert lib.tree_distance(reset_state.params, state.params) > 1e-4


def test_kept_state_of_a_stateless_optimizer_is_nothing():
  """keep_state with plain SGD (no momentum, no warmup count): nothing to
  keep, so the round runs as with a fresh optimizer each round."""
  data = lib.make_data()
  plain_sgd = optimizers.client_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=5e-2, momentum=0.0, warmup_steps=0,
      grad_clip=1.0)))
  assert not jax.tree.leaves(plain_sgd.init(lib.init_params()))
  final = []
  for keep in (True, False):
    algorithm, sharded = lib.make_algorithm(
        data, 1, optimizer=plain_sgd,
        **{'client_optimizer.keep_state': keep})
    state, _, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS)
    assert state.client_states == {}
    final.append(state.params)
  lib.assert_trees_close(final[0], final[1], rtol=0, atol=0)


def test_client_rows_must_match_the_algorithm():
  data = lib.make_data()
  kept, sharded = lib.make_algorithm(data, 1,
                                     **{'client_optimizer.keep_state': True})
  plain, _ = lib.make_algorithm(data, 1)
  state = plain.initial_state(lib.init_params(), jax.random.PRNGKey(0))
  round_fn = kept.make_round()
  with pytest.raises(ValueError, match='client_states does not match'):
    round_fn(state, sharded, *federation.round_slots(ROUND_IDS[0], 1, 16))


def test_padding_slots_change_nothing():
  """Padding slots point at real clients' (even poisoned) data: their weight
  is 0, so nothing of them may reach the aggregate."""
  data = lib.make_data()
  algorithm, sharded = lib.make_algorithm(data, 1)
  round_fn = algorithm.make_round(donate=False)
  state = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(42))
  ids = ROUND_IDS[0]
  plain, _ = round_fn(state, sharded, *federation.round_slots(ids, 1, 16))
  poisoned = data.replace(images=data.images.copy())
  poisoned.images[[1, 4, 8, 14]] = 255
  padded_ids = np.concatenate([ids, [1, 4, 8, 14]]).astype(np.int32)
  mask = np.concatenate([np.ones(len(ids)), np.zeros(4)]).astype(np.float32)
  padded, metrics = round_fn(state, poisoned, padded_ids, mask)
  lib.assert_trees_close(padded.params, plain.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(metrics['client_weights'][-4:]), 0)


def test_client_result_independent_of_slot_and_devices():
  """A client's update depends on its global id, not on where it runs."""
  data = lib.make_data()
  losses = {}
  for num_devices in (1, 8):
    algorithm, sharded = lib.make_algorithm(data, num_devices)
    _, metrics, _ = lib.run_rounds(algorithm, sharded, [[3, 7, 12]])
    ids, _ = federation.round_slots(
        np.array([3, 7, 12]), num_devices, 16,
        federation.max_slots_per_device([[3, 7, 12]], 16, num_devices))
    w = metrics[0]['client_weights']
    losses[num_devices] = dict(zip(ids[w > 0].tolist(),
                                   metrics[0]['client_losses'][w > 0]))
  assert sorted(losses[1]) == [3, 7, 12]
  for cid in (3, 7, 12):
    np.testing.assert_allclose(losses[8][cid], losses[1][cid], rtol=1e-6)


def test_bad_mode_is_refused():
  with pytest.raises(ValueError, match='Unknown execution mode'):
    lib.make_algorithm(lib.make_data(), 1, **{'federation.mode': 'pmap'})


def test_sample_clients_deterministic():
  a = federation.sample_clients(20, 8, seed=3, round_idx=5)
  b = federation.sample_clients(20, 8, seed=3, round_idx=5)
  c = federation.sample_clients(20, 8, seed=3, round_idx=6)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 8 and not np.array_equal(a, c)
  with pytest.raises(ValueError, match='clients_per_round'):
    federation.sample_clients(5, 6, seed=0, round_idx=0)
