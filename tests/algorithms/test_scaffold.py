"""SCAFFOLD (option II) on the engine against a plain Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import testlib as lib
from fedjax_diff import comm

ROUND_IDS = [np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 15]),
             np.array([1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15]),
             np.array([0, 1, 3, 4, 7, 8, 10, 13, 14, 15])]
NUM_CLIENTS = 16


def lr(step):
  """testlib's client schedule: 5e-2 with a 4-step linear warmup."""
  return 5e-2 * min(1.0, (step + 1.0) / 4)


def add_correction():
  """u ↦ u − lr(s)·d with d the extra argument `scaffold_correction` (the
  corrected step y ← y − η_s(d_s − c_k + c)), written here independently of
  the algorithm's transform."""
  def update(updates, state, params=None, *, scaffold_correction,
             global_step, **kw):
    del params, kw
    return jax.tree.map(lambda u, d: u - lr(global_step) * d, updates,
                        scaffold_correction), state
  return optax.GradientTransformationExtraArgs(lambda p: (), update)


def reference_run(data, rounds_ids):
  """Algorithm 1 of Karimireddy et al. 2020 (option II) as loops."""
  state = lib.reference_state()
  zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), state.params)
  c, c_k = zeros, {k: zeros for k in range(NUM_CLIENTS)}
  opt = optax.chain(lib.client_opt(), add_correction())
  for ids in rounds_ids:
    r = int(state.round)
    lr_sum = sum(lr(r * lib.LOCAL_STEPS + s) for s in range(lib.LOCAL_STEPS))
    dys, dcs, weights = [], [], []
    for cid in ids:
      cid = int(cid)
      corr = jax.tree.map(lambda a, b: jnp.asarray(a - b, jnp.float32), c,
                          c_k[cid])
      y, _, _ = lib.train_client(
          state.params, data.images[cid], data.labels[cid],
          int(data.counts[cid]), lib.client_key(state.rng, r, cid), r,
          optimizer=opt, extra_args={'scaffold_correction': corr})
      dy = lib.delta64(y, state.params)
      new_ck = jax.tree.map(lambda ck, cc, d: ck - cc - d / lr_sum, c_k[cid],
                            c, dy)
      dcs.append(jax.tree.map(np.subtract, new_ck, c_k[cid]))
      c_k[cid] = new_ck
      dys.append(dy)
      weights.append(int(data.counts[cid]))
    dx = lib.weighted_mean64(dys, weights)
    state = lib.server_step(state, jax.tree.map(np.negative, dx))
    c = jax.tree.map(lambda cc, *d: cc + sum(d) / NUM_CLIENTS, c, *dcs)
  return state, c, c_k


@pytest.fixture(scope='module')
def reference():
  data = lib.make_data(NUM_CLIENTS)
  return (data,) + reference_run(data, ROUND_IDS)


@pytest.mark.parametrize('mode,num_devices', [('map', 1), ('vmap', 8)])
def test_round_matches_python_loop(reference, mode, num_devices):
  data, ref_state, ref_c, ref_ck = reference
  algorithm, sharded = lib.make_algorithm(data, num_devices, name='scaffold',
                                          **{'federation.mode': mode})
  state, _, round_fn = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  assert round_fn._cache_size() == 1
  lib.assert_trees_close(state.params, ref_state.params)
  lib.assert_trees_close(state.ema_params, ref_state.ema_params)
  # Control variates: the server's, and every client's row (clients that sat
  # a round out keep theirs; the padding rows stay 0).
  assert lib.tree_distance(ref_c, jax.tree.map(np.zeros_like, ref_c)) > 1e-3
  lib.assert_trees_close(state.algorithm['c'], ref_c, atol=2e-5)
  rows = state.client_states['scaffold']
  for cid in range(NUM_CLIENTS):
    lib.assert_trees_close(jax.tree.map(lambda x: x[cid], rows), ref_ck[cid],
                           atol=2e-5)


def test_first_round_is_fedavg():
  """With c = c_k = 0 the corrected gradient is the plain one: SCAFFOLD's
  first round moves the model exactly as FedAvg's."""
  data = lib.make_data(NUM_CLIENTS)
  out = {}
  for name in ('scaffold', 'fedavg'):
    algorithm, sharded = lib.make_algorithm(data, 1, name=name)
    out[name], _, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS[:1])
  lib.assert_trees_close(out['scaffold'].params, out['fedavg'].params,
                         rtol=1e-6, atol=1e-7)
  # ... but not the second, once the control variates are non-zero.
  for name in ('scaffold', 'fedavg'):
    algorithm, sharded = lib.make_algorithm(data, 1, name=name)
    out[name], _, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS[:2])
  assert lib.tree_distance(out['scaffold'].params, out['fedavg'].params) > 1e-5


def test_communication_is_twice_fedavg():
  data = lib.make_data(NUM_CLIENTS)
  algorithm, _ = lib.make_algorithm(data, 1, name='scaffold')
  param_bytes = comm.tree_bytes(lib.init_params())
  k = algorithm.clients_per_round
  assert algorithm.round_bytes(0) == {'uplink_bytes': 2 * k * param_bytes,
                                      'downlink_bytes': 2 * k * param_bytes}
  summary = algorithm.summary(5)
  assert summary['total_bytes'] == 4 * 5 * k * param_bytes
  assert summary['uplink_fraction_of_fedavg_fp32'] == 2.0
