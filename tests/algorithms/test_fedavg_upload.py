"""FedDM-prox and FedDM-quant through FedAvg's round on the engine, against
the test library's Python loop.

The reference rounds are `testlib.fedavg_round`: each client trains with the
documented key scheme (`fedjax_diff.client`), its upload key is derived as
documented in `strategies.upload` (fold_in(client_key, UPLOAD_KEY_TAG), then
the quantizer's `round_key, calib_key = split(key)`), and the pure functions
of `strategies.quantize` are applied client by client.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import testlib as lib
from fedjax_diff import client as client_lib
from fedjax_diff import federation
from fedjax_diff import optimizers
from fedjax_diff import state as state_lib
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.diffusion import linear_schedule
from fedjax_diff.strategies import proximal as proximal_lib
from fedjax_diff.strategies import quantize as q_lib
from fedjax_diff.strategies import upload as upload_lib
from fedjax_diff.strategies.calibration import Calibration

Config = q_lib.QuantizationConfig
UPLOAD = client_lib.UPLOAD
ROUND_IDS = [np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 15]),
             np.array([1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15])]

CALIBRATION = Calibration(eps_fn=lib.eps_fn, schedule=linear_schedule(100),
                          image_shape=(8, 8, 1), batch=2, steps=2)


def make_fedavg(data, num_devices=1, mode='vmap', upload=None, optimizer=None,
                **overrides):
  """(algorithm, sharded data): FedAvg with the upload path under test."""
  return lib.make_algorithm(data, num_devices, upload=upload,
                            optimizer=optimizer,
                            **{'federation.mode': mode, **overrides})


def run_each(algorithm, sharded, rounds_ids, state=None, donate=True):
  """The rounds of `rounds_ids` with one round function; returns the host
  copy of the state and metrics after every round, and the round function."""
  round_fn = algorithm.make_round(donate=donate)
  if state is None:
    state = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(42))
  states, all_metrics = [], []
  for ids in rounds_ids:
    state, metrics = round_fn(state, sharded, *federation.round_slots(
        ids, algorithm.run.mesh.size, sharded.num_clients))
    states.append(jax.device_get(state))
    all_metrics.append(jax.device_get(metrics))
  return states, all_metrics, round_fn


@pytest.mark.parametrize('bits,granularity,rounding,scale_method,mode,devices', [
    (4, 'per_channel', 'stochastic', 'minmax', 'vmap', 8),
    (8, 'per_tensor', 'nearest', 'mse', 'vmap', 8),
    (2, 'per_channel', 'stochastic', 'mse', 'map', 1),
])
def test_quantized_round_matches_python_loop(bits, granularity, rounding,
                                             scale_method, mode, devices):
  cfg = Config(bits=bits, granularity=granularity, rounding=rounding,
               scale_method=scale_method)
  upload = upload_lib.quantizer(cfg)
  # Stochastic rounding with clipping 'mse' scales carries the clipped mass
  # from a client's round to its next: two rounds, with clients in both.
  assert upload.carries == (rounding == 'stochastic' and
                            scale_method == 'mse')
  data = lib.make_data()
  algorithm, sharded = make_fedavg(data, devices, mode, upload)
  ids = ROUND_IDS if upload.carries else ROUND_IDS[:1]
  states, metrics, _ = run_each(algorithm, sharded, ids)
  carries = {}

  def upload_fn(cid, delta, key, params):
    del params
    round_key, _ = jax.random.split(key)
    rng = round_key if rounding == 'stochastic' else None
    if not upload.carries:
      return q_lib.quantize_dequantize(delta, cfg, rng)
    carry = carries.get(cid, q_lib.init_residual(delta))
    hat, carries[cid] = q_lib.carry_clipped_quantize(delta, carry, cfg, rng)
    return hat

  ref = lib.reference_state()
  for round_ids in ids:
    ref, _ = lib.fedavg_round(ref, data, round_ids, upload_fn=upload_fn)
  lib.assert_trees_close(states[-1].params, ref.params, rtol=1e-5, atol=1e-7)
  lib.assert_trees_close(states[-1].ema_params, ref.ema_params, rtol=1e-5,
                         atol=1e-7)
  # Quantization changed the updates, by a relative error that shrinks with
  # more bits; padding slots report nothing.
  m = metrics[0]
  real = m['client_weights'] > 0
  assert real.sum() == len(ids[0])
  rel = m['client_upload_errors'][real] / m['client_update_norms'][real]
  assert np.all(rel > 0) and np.all(rel < {8: 0.02, 4: 0.3, 2: 1.0}[bits])
  if not upload.carries:
    # A stateless upload keeps no rows.
    assert states[-1].client_states == {}
    return
  rows = states[-1].client_states[UPLOAD]['clipped']
  for cid, carry in carries.items():
    lib.assert_trees_close(jax.tree.map(lambda r: r[cid], rows), carry,
                           rtol=1e-4, atol=1e-7)
  assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(carries))


def test_calibrated_round_matches_python_loop():
  cfg = Config(bits=4, granularity='per_channel', rounding='stochastic',
               scale_method='calibrated')
  upload = upload_lib.quantizer(cfg, CALIBRATION)
  data = lib.make_data()
  algorithm, sharded = make_fedavg(data, 8, 'vmap', upload)
  ids = ROUND_IDS[:1]
  states, _, _ = run_each(algorithm, sharded, ids)
  calibrated_differs = []

  @jax.jit
  def calibrate(delta, params, calib_key, labels, count):
    inputs = CALIBRATION.inputs(params, calib_key, labels, count)
    scales = q_lib.calibrate_scales(delta, lib.init_params(),
                                    CALIBRATION.apply_fn, inputs, cfg)
    return scales, inputs.t

  def upload_fn(cid, delta, key, params):
    round_key, calib_key = jax.random.split(key)
    scales, t = calibrate(delta, params, calib_key, data.labels[cid],
                          data.counts[cid])
    # The calibration inputs are x_t at t around 0.4·T.
    assert np.all(np.abs(np.asarray(t) - 40) <= 25)
    minmax = q_lib.compute_scales(delta, Config(bits=4,
                                                granularity='per_channel'))
    calibrated_differs.append(any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(scales),
                                              jax.tree.leaves(minmax))))
    return q_lib.quantize_dequantize(delta, cfg, round_key, scales=scales)

  ref, _ = lib.fedavg_round(lib.reference_state(), data, ids[0],
                            upload_fn=upload_fn)
  lib.assert_trees_close(states[0].params, ref.params, rtol=1e-5, atol=1e-7)
  # The calibration chose other clipping ratios than minmax for some client.
  assert len(calibrated_differs) == len(ids[0])
  assert any(calibrated_differs)


def test_error_feedback_residuals_persist_and_only_real_clients_change():
  cfg = Config(bits=2, granularity='per_channel', rounding='stochastic')
  upload = upload_lib.error_feedback(upload_lib.quantizer(cfg))
  data = lib.make_data()
  algorithm, sharded = make_fedavg(data, 8, 'vmap', upload)
  state0 = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(42))
  assert set(state0.client_states) == {UPLOAD}
  kernel = state0.client_states[UPLOAD]['residual']['Conv_0']['kernel']
  assert kernel.shape[0] == data.num_clients
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(federation.CLIENTS)
  previous = jax.device_get(state0.client_states)  # state0 gets donated.
  states, _, round_fn = run_each(algorithm, sharded, ROUND_IDS, state=state0)
  assert round_fn._cache_size() == 1
  residuals = {cid: jax.tree.map(jnp.zeros_like, lib.init_params())
               for cid in range(data.num_clients)}

  def upload_fn(cid, delta, key, params):
    del params
    round_key, _ = jax.random.split(key)
    delta_hat, residuals[cid] = q_lib.error_feedback_quantize(
        delta, residuals[cid], cfg, round_key)
    return delta_hat

  ref = lib.reference_state()
  for ids, state in zip(ROUND_IDS, states):
    ref, _ = lib.fedavg_round(ref, data, ids, upload_fn=upload_fn)
    lib.assert_trees_close(state.params, ref.params, rtol=1e-5, atol=1e-7)
    for cid in range(data.num_clients):
      row = jax.tree.map(lambda x, c=cid: x[c], state.client_states)
      if cid in ids:
        lib.assert_trees_close(row[UPLOAD]['residual'], residuals[cid],
                               rtol=1e-4, atol=1e-7)
        assert any(np.any(x != 0) for x in jax.tree.leaves(row))
      else:
        # Bit for bit untouched, even client 0 of round 2, which the padding
        # slots of 8 devices point at.
        old = jax.tree.map(lambda x, c=cid: x[c], previous)
        for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(old)):
          np.testing.assert_array_equal(a, b)
    previous = state.client_states
  assert 0 in ROUND_IDS[0] and 0 not in ROUND_IDS[1]
  slot_ids, mask = federation.round_slots(ROUND_IDS[1], 8, sharded.num_clients)
  assert 0 in slot_ids[mask == 0]


def test_error_feedback_state_resumes_bit_for_bit(tmp_path):
  upload = upload_lib.error_feedback(upload_lib.quantizer(
      Config(bits=4, rounding='stochastic')))
  data = lib.make_data()
  algorithm, sharded = make_fedavg(data, 8, 'vmap', upload)
  round_fn = algorithm.make_round(donate=False)
  slots = [federation.round_slots(ids, 8, sharded.num_clients)
           for ids in ROUND_IDS]
  start = lambda: algorithm.initial_state(lib.init_params(),  # pylint: disable=g-long-lambda
                                          jax.random.PRNGKey(42))
  after_one, _ = round_fn(start(), sharded, *slots[0])
  straight, _ = round_fn(after_one, sharded, *slots[1])

  manager = workdir_lib.checkpoint_manager(str(tmp_path))
  workdir_lib.save_checkpoint(manager, 1, after_one)
  like = start()  # fresh zeros, placed.
  restored, step = workdir_lib.restore_checkpoint(manager, like)
  manager.close()
  assert step == 1
  # The residuals came back from disk, not from `like`'s zeros.
  assert any(np.any(np.asarray(x) != 0) for x in
             jax.tree.leaves(restored.client_states[UPLOAD]))
  resumed, _ = round_fn(restored, sharded, *slots[1])
  assert round_fn._cache_size() == 1
  leaves = jax.tree.leaves(straight)
  assert len(leaves) == len(jax.tree.leaves(resumed))
  for a, b in zip(leaves, jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prox_mu_zero_is_fedavg_bit_for_bit():
  data = lib.make_data()
  with_prox = lib.client_opt(extra=[proximal_lib.proximal(0.0)])
  plain_alg, sharded = make_fedavg(data, 8, 'vmap')
  prox_alg, _ = make_fedavg(data, 8, 'vmap', optimizer=with_prox)
  plain, _, _ = run_each(plain_alg, sharded, ROUND_IDS[:1])
  prox, _, _ = run_each(prox_alg, sharded, ROUND_IDS[:1])
  assert lib.tree_distance(plain[-1].params, lib.init_params()) > 1e-3
  leaves = jax.tree.leaves(plain[-1])
  assert len(leaves) == len(jax.tree.leaves(prox[-1]))
  for a, b in zip(leaves, jax.tree.leaves(prox[-1])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name,mus', [('sgd', (0.0, 2.0, 10.0)),
                                      ('adam', (0.0, 30.0))])
def test_larger_mu_gives_smaller_client_drift(name, mus):
  """Mean ‖θ_k − θ_global‖ over a round's clients decreases with μ."""
  data = lib.make_data()
  ids = ROUND_IDS[0]
  drifts = []
  for mu in mus:
    cfg = ml_collections.ConfigDict(dict(
        name=name, learning_rate=5e-2 if name == 'sgd' else 1e-2,
        momentum=0.0, warmup_steps=0, grad_clip=0.0))
    extra = [proximal_lib.proximal(mu)] if mu else []
    algorithm, sharded = make_fedavg(
        data, 1, 'vmap',
        optimizer=optimizers.client_optimizer(cfg, extra=extra),
        **{'federation.local_steps': 8})
    _, metrics, _ = run_each(algorithm, sharded, [ids])
    m = metrics[0]
    real = m['client_weights'] > 0
    assert real.sum() == len(ids)
    drifts.append(float(np.mean(m['client_update_norms'][real])))
  assert all(a > b for a, b in zip(drifts, drifts[1:])), drifts
  assert drifts[-1] < 0.9 * drifts[0], drifts


def test_client_states_must_match_the_upload():
  upload = upload_lib.error_feedback(upload_lib.quantizer(Config(bits=4)))
  data = lib.make_data()
  algorithm, sharded = make_fedavg(data, 1, 'vmap', upload)
  round_fn = algorithm.make_round(donate=False)
  ids, mask = federation.round_slots(ROUND_IDS[0], 1, sharded.num_clients)
  bare = lib.reference_state()  # no client states at all.
  with pytest.raises(ValueError, match='client_states does not match'):
    round_fn(bare, sharded, ids, mask)
  short = state_lib.init_client_states(algorithm.client_rows,
                                       lib.init_params(), 4)
  with pytest.raises(ValueError, match='one row per client'):
    round_fn(bare.replace(client_states=short), sharded, ids, mask)
