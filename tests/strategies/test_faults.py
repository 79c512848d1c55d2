"""Client faults: isolation of non-finite clients and injected faults, on
the engine against the plain loops of the test library."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import testlib as lib
from fedjax_diff import client as client_lib
from fedjax_diff import federation
from fedjax_diff import optimizers
from fedjax_diff.strategies import build
from fedjax_diff.strategies import faults
from fedjax_diff.strategies import quantize
from fedjax_diff.strategies import upload as upload_lib

# Clients holding only this label train on a NaN loss: their update is NaN.
POISON = 3
BAD = (1, 6, 12)
ROUND_IDS = [np.array([0, 1, 2, 5, 6, 9, 12, 14]),
             np.array([1, 3, 4, 6, 7, 10, 11, 15])]


def classes(k):
  return [POISON] if k in BAD else [0, 1, 2]


def poisoned_loss(params, x, labels, rng):
  """testlib's loss, NaN on a batch with a POISON label."""
  nan = jnp.where(jnp.any(labels == POISON), jnp.nan, 1.0)
  return lib.loss_fn(params, x, labels, rng) * nan


@pytest.fixture(scope='module')
def data():
  return lib.make_data(16, classes=classes)


def rows_of(state, cid):
  return jax.tree.map(lambda x: np.asarray(x[cid]), state.client_states)


@pytest.mark.parametrize('num_devices', [1, 8])
def test_nan_clients_are_dropped_as_if_not_sampled(data, num_devices):
  """FedAvg with clients whose updates are NaN: the round equals the plain
  loop over the other clients, the NaN clients' kept optimizer states stay
  as they were, and the round counts them."""
  ref, ref_opt = lib.reference_state(), {}
  for ids in ROUND_IDS:
    ref, _ = lib.fedavg_round(ref, data, ids, opt_states=ref_opt,
                              dropped=BAD)
  algorithm, sharded = lib.make_algorithm(
      data, num_devices, loss=poisoned_loss,
      **{'client_optimizer.keep_state': True,
         'federation.clients_per_round': 8})
  state, metrics, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  assert lib.tree_distance(state.params, lib.init_params()) > 1e-3
  lib.assert_trees_close(state.params, ref.params)
  lib.assert_trees_close(state.ema_params, ref.ema_params)
  fresh = lib.client_opt().init(lib.init_params())
  for cid in range(16):
    lib.assert_trees_close(rows_of(state, cid)[client_lib.OPTIMIZER],
                           ref_opt.get(cid, fresh))
  for m, ids in zip(metrics, ROUND_IDS):
    counts = faults.round_counts(m)
    bad = len(set(ids.tolist()) & set(BAD))
    assert counts == {'clients_dropped': bad, 'clients_nonfinite': bad}
    assert np.isfinite(m['loss']) and not faults.diverged(m)


def _round_pair(algorithm, sharded, first, second):
  """States after `first`, then after `second` (one compiled round)."""
  round_fn = algorithm.make_round(donate=False)
  per_device = federation.max_slots_per_device([first, second],
                                               sharded.num_clients,
                                               algorithm.run.mesh.size)
  state = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(42))
  out = []
  for ids in (first, second):
    state, metrics = round_fn(state, sharded, *federation.round_slots(
        np.asarray(ids), algorithm.run.mesh.size, sharded.num_clients,
        per_device))
    out.append((state, jax.device_get(metrics)))
  return out


def _fedphd(**kw):
  return {'hierarchy': ml_collections.ConfigDict(dict(
      num_edges=2, cloud_every=2, agg_a=5.0, selection='fedphd',
      select_scale=20.0, final_cloud=False)), **kw}


ALGORITHMS = [('fedavg', {'client_optimizer.keep_state': True}),
              ('scaffold', {}), ('fedphd', _fedphd())]


@pytest.mark.parametrize('name,overrides', ALGORITHMS,
                         ids=[a[0] for a in ALGORITHMS])
def test_round_without_clients_changes_nothing(data, name, overrides):
  """A round whose every client is NaN keeps params, EMA, the server
  optimizer's momentum, the algorithm's state (SCAFFOLD's c, FedPhD's
  edges) and every client row, and only counts the round; the reference
  loop does the same."""
  algorithm, sharded = lib.make_algorithm(
      data, 1, name=name, loss=poisoned_loss,
      **{'federation.clients_per_round': 3, **overrides})
  (first, _), (second, metrics) = _round_pair(algorithm, sharded,
                                              [0, 2, 5], list(BAD))
  assert int(second.round) == int(first.round) + 1 == 2
  assert faults.diverged(metrics) and np.isnan(metrics['loss'])
  assert faults.round_counts(metrics)['clients_dropped'] == 3
  for a, b in zip(jax.tree.leaves(first.replace(round=second.round)),
                  jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if name == 'fedavg':
    ref, _ = lib.fedavg_round(lib.reference_state(), data, [0, 2, 5])
    ref2, loss = lib.fedavg_round(ref, data, BAD, dropped=BAD)
    assert np.isnan(loss) and int(ref2.round) == 2
    lib.assert_trees_close(ref2.params, second.params)
    lib.assert_trees_close(ref2.ema_params, second.ema_params)


def _ef_quantizer():
  return upload_lib.error_feedback(upload_lib.quantizer(
      quantize.QuantizationConfig(bits=4, granularity='per_tensor',
                                  rounding='stochastic')))


DROP_CASES = [
    ('fedavg_ef', 'fedavg', {'client_optimizer.keep_state': True}, True),
    ('scaffold', 'scaffold', {}, False),
    ('fedphd', 'fedphd', _fedphd(**{'client_optimizer.keep_state': True}),
     False)]


@pytest.mark.parametrize('name,overrides,ef', [c[1:] for c in DROP_CASES],
                         ids=[c[0] for c in DROP_CASES])
def test_dropped_clients_equal_clients_not_sampled(data, name, overrides,
                                                   ef):
  """Every algorithm, with every kind of client row (kept optimizer state,
  error-feedback residuals, SCAFFOLD's c_k; FedPhD's edges, Q and N): two
  rounds with NaN clients sampled end exactly where the same rounds without
  them do."""
  with_bad = [[0, 1, 5, 6, 9], [2, 6, 7, 12, 14]]
  without = [[c for c in ids if c not in BAD] for ids in with_bad]
  out = []
  for rounds in (with_bad, without):
    algorithm, sharded = lib.make_algorithm(
        data, 8, name=name, loss=poisoned_loss,
        upload=_ef_quantizer() if ef else None,
        **{'federation.clients_per_round': 5, **overrides})
    state, metrics, _ = lib.run_rounds(algorithm, sharded, rounds)
    out.append((state, metrics))
  (a, metrics), (b, _) = out
  assert [faults.round_counts(m)['clients_nonfinite'] for m in metrics] == [
      2, 2]
  assert lib.tree_distance(a.params, lib.init_params()) > 1e-3
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=1e-6,
                               atol=1e-7)
  assert a.client_states  # rows were kept (and compared) in every case.


FRACTIONS = {'dropout': 0.25, 'nan': 0.125, 'inf': 0.125, 'straggler': 0.25}


def _injected(data, num_devices, **kw):
  return lib.make_algorithm(
      data, num_devices,
      **{'faults': ml_collections.ConfigDict(dict(FRACTIONS, **kw)),
         'federation.clients_per_round': 8,
         'client_optimizer.keep_state': True})


@pytest.mark.parametrize('weight_by_steps', [False, True])
def test_injected_faults_match_python_loop(weight_by_steps):
  """Dropouts, NaN and Inf uploads and stragglers, chosen by the documented
  scheme (testlib.fault_plan), on 1 and 8 devices: the same clients fail in
  the same way, and the rounds equal the loop that leaves the failed
  clients out and trains stragglers for their steps."""
  data = lib.make_data(16)
  ref, ref_opt = lib.reference_state(), {}
  plans = []
  for r, ids in enumerate(ROUND_IDS):
    plan = lib.fault_plan(ref.rng, r, ids, FRACTIONS)
    plans.append(plan)
    kinds = [k for k, _ in plan.values()]
    assert [kinds.count(k) for k in lib.FAULT_KINDS] == [2, 1, 1, 2]
    ref, _ = lib.fedavg_round(
        ref, data, ids, opt_states=ref_opt,
        dropped={c for c, (k, _) in plan.items()
                 if k in ('dropout', 'nan', 'inf')},
        steps={c: s for c, (k, s) in plan.items() if k == 'straggler'},
        weight_by_steps=weight_by_steps)
  assert any(s < lib.LOCAL_STEPS for p in plans for k, s in p.values()
             if k == 'straggler')
  by_devices = {}
  # 1 against 8 devices once; weighting by steps on 8 only (test time).
  for num_devices in ((8,) if weight_by_steps else (1, 8)):
    algorithm, sharded = _injected(data, num_devices,
                                   weight_by_steps=weight_by_steps)
    state, metrics, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS)
    by_devices[num_devices] = state
    lib.assert_trees_close(state.params, ref.params)
    lib.assert_trees_close(state.ema_params, ref.ema_params)
    fresh = lib.client_opt().init(lib.init_params())
    for cid in range(16):
      lib.assert_trees_close(rows_of(state, cid)[client_lib.OPTIMIZER],
                             ref_opt.get(cid, fresh))
    per = federation.max_slots_per_device(ROUND_IDS, sharded.num_clients,
                                          num_devices)
    for m, ids, plan in zip(metrics, ROUND_IDS, plans):
      slot_ids, mask = federation.round_slots(ids, num_devices,
                                              sharded.num_clients, per)
      got = {int(c): int(k) for c, k, real in zip(
          slot_ids, m['client_faults'], mask) if real}
      want = {c: faults.KINDS.get(k, 0) for c, (k, _) in plan.items()}
      assert got == want
      counts = faults.round_counts(m)
      assert counts['clients_dropped'] == 4
      assert counts['clients_nonfinite'] == 2    # the NaN and Inf uploads.
      assert not faults.diverged(m)
  if weight_by_steps:
    return
  for x, y in zip(jax.tree.leaves(by_devices[1]),
                  jax.tree.leaves(by_devices[8])):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=2e-5,
                               atol=2e-6)


def test_plan_counts_round_and_never_pick_padding():
  cfg = faults.FaultConfig(dropout=0.5, nan=0.3)
  rng = jax.random.PRNGKey(7)
  ids = jnp.array([4, 9, 2, 0, 0, 0], jnp.int32)
  mask = jnp.array([1, 1, 1, 0, 0, 0], jnp.float32)
  kinds, steps = faults.plan(cfg, rng, 3, ids, mask, 5)
  kinds = np.asarray(kinds)
  # K = 3: round(1.5) = 2 dropouts, round(0.8·3) − 2 = 0 NaN; no padding.
  assert sorted(kinds[:3].tolist()) == [0, faults.DROPOUT, faults.DROPOUT]
  assert kinds[3:].tolist() == [0, 0, 0]
  np.testing.assert_array_equal(steps, 5)
  want = lib.fault_plan(rng, 3, [4, 9, 2], {'dropout': 0.5, 'nan': 0.3},
                        local_steps=5)
  assert {int(c): int(k) for c, k in zip(ids[:3], kinds[:3])} == {
      c: faults.KINDS.get(k, 0) for c, (k, _) in want.items()}


@pytest.mark.parametrize('block,match', [
    (dict(nan=1.5), r'faults\.nan .*\[0, 1\], got 1\.5'),
    (dict(dropout=-0.1), r'faults\.dropout'),
    (dict(dropout=0.6, nan=0.6), 'add up to 1.2 > 1'),
    (dict(straggler=0.2, straggler_min_steps=3), 'straggler_min_steps < 3'),
    (dict(weight_by_steps='yes'), 'weight_by_steps must be True or False'),
    (dict(nans=0.1), r"unknown fields \['nans'\]"),
])
def test_config_errors(block, match):
  config = lib.tiny_config(faults=ml_collections.ConfigDict(block))
  with pytest.raises(ValueError, match=match):
    faults.config_from(config)


def test_config_off_by_default():
  assert faults.config_from(lib.tiny_config()) is None
  zeros = ml_collections.ConfigDict(dict(dropout=0.0, nan=0.0))
  assert faults.config_from(lib.tiny_config(faults=zeros)) is None


def test_isolate_and_finite():
  ok = {'a': jnp.ones(3), 'n': jnp.arange(3)}
  assert float(faults.isolate(1.0, ok, jnp.float32(2.0))) == 1.0
  assert float(faults.isolate(0.5, ok)) == 0.5
  bad = {'a': jnp.array([1.0, jnp.inf])}
  assert float(faults.isolate(1.0, ok, bad)) == 0.0
  assert float(faults.isolate(1.0, jnp.float32(jnp.nan))) == 0.0
  assert faults.non_finite_leaves({'x': bad, 'y': ok}) == ["['x']['a']"]
  for check in (faults.all_finite, faults.state_finite):
    assert bool(check(ok)) and bool(check({'n': jnp.arange(2)}))
    assert not bool(check({'y': ok, 'b': jnp.array([jnp.nan], jnp.bfloat16)}))
  corrupt = faults.corrupt(ok, faults.INF)
  assert np.all(np.isinf(corrupt['a'])) and corrupt['n'].dtype == jnp.int32


def test_compose_sequential_leaves_dropped_clients_out():
  """The shared optimizer state after a round with a dropped client (its
  final state NaN, a gap in the positions) and a straggler of 1 step: by
  hand, the sequential pass over the kept clients' gradients in order."""
  beta = 0.5
  x0 = {'m': jnp.array([8.0]), 'n': jnp.array(5, jnp.int32)}
  g = {0: [2.0, 4.0], 2: [6.0]}   # slot 1 is dropped, slot 2 a straggler.

  def run(x, gs):
    for v in gs:
      x = beta * x + (1 - beta) * v
    return x

  finals = {'m': jnp.array([[run(8.0, g[0])], [jnp.nan], [run(8.0, g[2])],
                            [99.0]]),
            'n': jnp.array([7, 7, 6, 123], jnp.int32)}
  positions = jnp.array([2, 0, 1, 3])   # order: slot 1, slot 2, slot 0.
  mask = jnp.array([1.0, 0.0, 1.0, 0.0])
  out = optimizers.compose_sequential(x0, finals, positions, mask,
                                      jnp.array([2, 2, 1, 2]),
                                      {'m': beta, 'n': 1.0})
  np.testing.assert_allclose(out['m'], [run(8.0, g[2] + g[0])], rtol=1e-6)
  assert int(out['n']) == 5 + 2 + 1


def test_shared_optimizer_state_skips_nan_clients(data):
  """FedAvg with one client optimizer state shared by the clients
  (`shared_state`) and NaN clients sampled: the kept clients train with the
  schedule's steps of their positions among all the round's clients, and
  the next shared state is one optimizer's after the kept clients'
  gradients in order, as a plain loop computes it."""
  opt = lib.client_opt()
  ref = lib.reference_state()
  shared = opt.init(ref.params)
  for r, ids in enumerate(ROUND_IDS):
    order = sorted(int(c) for c in ids)
    grads, deltas, weights = [], [], []
    for p, cid in enumerate(order):
      if cid in BAD:
        continue
      log = []
      params, _, _ = lib.train_client(
          ref.params, data.images[cid], data.labels[cid],
          int(data.counts[cid]), lib.client_key(ref.rng, r, cid), r,
          opt_state=shared, step_offset=(r * len(order) + p) * lib.LOCAL_STEPS,
          grads_log=log)
      grads += log
      deltas.append(lib.delta64(params, ref.params))
      weights.append(int(data.counts[cid]))
    shared = lib.sequential_state(opt, shared, grads, ref.params)
    ref = lib.server_step(ref, jax.tree.map(
        np.negative, lib.weighted_mean64(deltas, weights)))
  algorithm, sharded = lib.make_algorithm(
      data, 1, loss=poisoned_loss, optimizer=opt,
      **{'client_optimizer.shared_state': True, 'federation.mode': 'map',
         'federation.clients_per_round': 8})
  state, metrics, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  assert [faults.round_counts(m)['clients_nonfinite'] for m in metrics] == [
      3, 2]
  lib.assert_trees_close(state.params, ref.params)
  lib.assert_trees_close(state.client_opt_state, shared, rtol=1e-4,
                         atol=1e-6)


def test_dp_round_skips_nan_clients(data):
  """DP-FedAvg with NaN clients sampled: a dropped client is as if not
  sampled (weight 0 in the noised sum, the divisor is still the expected
  cohort m), against testlib's DP loop over the other clients."""
  config = lib.tiny_config(dp=lib.dp_config(clip_norm=0.1,
                                            noise_multiplier=0.5))
  config.federation.clients_per_round = 8
  config.federation.mode = 'map'
  algorithm, sharded = lib.make_algorithm(
      data, 1, config=config, loss=poisoned_loss,
      upload=build.upload_from_config(config))
  state, metrics, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  ref = lib.reference_state()
  for ids in ROUND_IDS:
    ref, _, _ = lib.dp_fedavg_round(
        ref, data, [c for c in ids if c not in BAD], clip_norm=0.1,
        noise_multiplier=0.5, expected_cohort=8)
  assert [faults.round_counts(m)['clients_dropped'] for m in metrics] == [
      3, 2]
  lib.assert_trees_close(state.params, ref.params)
  lib.assert_trees_close(state.ema_params, ref.ema_params)
