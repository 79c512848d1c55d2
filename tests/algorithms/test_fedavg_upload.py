"""FedDM-prox and FedDM-quant through the real round, against Python loops.

The reference rounds train each client with the documented key scheme of
`rounds.make_local_training`, derive its upload key as documented in
`strategies.upload` (fold_in(client_key, UPLOAD_KEY_TAG), then the
quantizer's `round_key, calib_key = split(key)`), and apply the pure
functions of `strategies.quantize` client by client.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_diff import federation
from fedjax_diff import optimizers
from fedjax_diff import rounds
from fedjax_diff import state as state_lib
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.diffusion import linear_schedule
from fedjax_diff.strategies import proximal as proximal_lib
from fedjax_diff.strategies import quantize as q_lib
from fedjax_diff.strategies import upload as upload_lib
from fedjax_diff.strategies.calibration import Calibration
from test_rounds import assert_trees_close
from test_rounds import BATCH
from test_rounds import client_opt
from test_rounds import EMA
from test_rounds import init_state
from test_rounds import LOCAL_STEPS
from test_rounds import loss_fn
from test_rounds import make_data
from test_rounds import MODEL
from test_rounds import ROUND_IDS
from test_rounds import SERVER_OPT

Config = q_lib.QuantizationConfig


def eps_fn(params, x, t, labels, *, train):
  """The tiny denoiser as an ε-network (it ignores t and labels)."""
  del t, labels, train
  return MODEL.apply({'params': params}, x)


CALIBRATION = Calibration(eps_fn=eps_fn, schedule=linear_schedule(100),
                          image_shape=(8, 8, 1), batch=2, steps=2)


def make_round(num_devices=1, mode='vmap', upload=None, optimizer=None,
               local_steps=LOCAL_STEPS, donate=True):
  mesh = federation.client_mesh(jax.devices()[:num_devices])
  round_fn = rounds.make_round_fn(
      loss_fn=loss_fn, client_optimizer=optimizer or client_opt(),
      server_optimizer=SERVER_OPT, mesh=mesh, local_steps=local_steps,
      batch_size=BATCH, upload=upload, mode=mode, ema_decay=EMA,
      donate=donate)
  return mesh, round_fn


def start_state(upload, data, mesh):
  state = init_state()
  states = state_lib.init_client_states(upload, state.params,
                                        data.num_clients, mesh)
  return state_lib.place_state(state.replace(client_states=states), mesh)


def upload_key(state, cid):
  """The documented upload key of client `cid` in the state's round."""
  round_key = jax.random.fold_in(state.rng, int(state.round))
  client_key = jax.random.fold_in(round_key, int(cid))
  return client_key, jax.random.fold_in(client_key,
                                        upload_lib.UPLOAD_KEY_TAG)


_grad_fn = jax.jit(jax.value_and_grad(loss_fn))


def train_client(state, data, cid, key):
  """Local training of one client as a plain loop (test_rounds' scheme)."""
  opt = client_opt()
  round_idx = int(state.round)
  order_key, train_key = jax.random.split(key)
  count = int(data.counts[cid])
  images = jnp.asarray(data.images[cid])
  labels = jnp.asarray(data.labels[cid])
  order = rounds.epoch_order(order_key, count, images.shape[0])
  params = state.params
  opt_state = opt.init(params)
  for s in range(LOCAL_STEPS):
    flip_key, loss_key = jax.random.split(jax.random.fold_in(train_key, s))
    x, y = rounds.client_batch(images, labels, order, count, s, BATCH,
                               flip_key, random_flip=False)
    _, grads = _grad_fn(params, x, y, loss_key)
    updates, opt_state = opt.update(
        grads, opt_state, params, global_params=state.params,
        global_step=round_idx * LOCAL_STEPS + s)
    params = optax.apply_updates(params, updates)
  return params


def reference_round(state, data, ids, upload_fn):
  """A round as a Python loop; `upload_fn(cid, delta, key, params)` -> Δ̂."""
  deltas, weights = [], []
  for cid in ids:
    client_key, key = upload_key(state, cid)
    params = train_client(state, data, cid, client_key)
    delta = jax.tree.map(jnp.subtract, params, state.params)
    delta_hat = upload_fn(int(cid), delta, key, params)
    deltas.append(jax.tree.map(lambda d: np.asarray(d, np.float64),
                               delta_hat))
    weights.append(int(data.counts[cid]))
  w = np.asarray(weights, np.float64)
  mean = jax.tree.map(lambda *ds: sum(a * d for a, d in zip(w, ds)) / w.sum(),
                      *deltas)
  updates, opt_state = SERVER_OPT.update(
      jax.tree.map(lambda d: -jnp.asarray(d, jnp.float32), mean),
      state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  r = int(state.round)
  decay = min(EMA, (1 + r) / (10 + r))
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                     state.ema_params, params)
  return state.replace(params=params, ema_params=ema, opt_state=opt_state,
                       round=state.round + 1)


def run(round_fn, state, data, mesh, rounds_ids=ROUND_IDS):
  sharded = federation.shard_client_data(data, mesh)
  states, all_metrics = [], []
  for ids in rounds_ids:
    state, metrics = round_fn(state, sharded,
                              *federation.round_slots(ids, mesh.size))
    states.append(jax.device_get(state))
    all_metrics.append(jax.device_get(metrics))
  return states, all_metrics


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
  data = make_data()
  mesh, round_fn = make_round(devices, mode, upload)
  ids = ROUND_IDS[:1]
  states, metrics = run(round_fn, start_state(upload, data, mesh), data, mesh,
                        ids)

  def upload_fn(cid, delta, key, params):
    del cid, params
    round_key, _ = jax.random.split(key)
    return q_lib.quantize_dequantize(
        delta, cfg, round_key if rounding == 'stochastic' else None)

  ref = reference_round(init_state(), data, ids[0], upload_fn)
  assert_trees_close(states[0].params, ref.params, rtol=1e-5, atol=1e-7)
  assert_trees_close(states[0].ema_params, ref.ema_params, rtol=1e-5,
                     atol=1e-7)
  # Quantization changed the updates, by a relative error that shrinks with
  # more bits; padding slots report nothing.
  m = metrics[0]
  real = m['client_weights'] > 0
  rel = m['client_upload_errors'][real] / m['client_update_norms'][real]
  assert np.all(rel > 0) and np.all(rel < {8: 0.02, 4: 0.3, 2: 1.0}[bits])
  assert states[-1].client_states == {}


def test_calibrated_round_matches_python_loop():
  cfg = Config(bits=4, granularity='per_channel', rounding='stochastic',
               scale_method='calibrated')
  upload = upload_lib.quantizer(cfg, CALIBRATION)
  data = make_data()
  mesh, round_fn = make_round(8, 'vmap', upload)
  ids = ROUND_IDS[:1]
  states, _ = run(round_fn, start_state(upload, data, mesh), data, mesh, ids)
  calibrated_differs = []

  @jax.jit
  def calibrate(delta, params, calib_key, labels, count):
    inputs = CALIBRATION.inputs(params, calib_key, labels, count)
    scales = q_lib.calibrate_scales(delta, init_state().params,
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

  ref = reference_round(init_state(), data, ids[0], upload_fn)
  assert_trees_close(states[0].params, ref.params, rtol=1e-5, atol=1e-7)
  # The calibration chose other clipping ratios than minmax for some client.
  assert any(calibrated_differs)


def test_error_feedback_residuals_persist_and_only_real_clients_change():
  cfg = Config(bits=2, granularity='per_channel', rounding='stochastic')
  upload = upload_lib.error_feedback(upload_lib.quantizer(cfg))
  data = make_data()
  mesh, round_fn = make_round(8, 'vmap', upload)
  state0 = start_state(upload, data, mesh)
  assert state0.client_states['upload']['residual']['Conv_0']['kernel'].sharding.spec \
      == jax.sharding.PartitionSpec(federation.CLIENTS)
  previous = jax.device_get(state0.client_states)  # state0 gets donated.
  states, _ = run(round_fn, state0, data, mesh)
  assert round_fn._cache_size() == 1
  residuals = {cid: jax.tree.map(jnp.zeros_like, init_state().params)
               for cid in range(data.num_clients)}

  def upload_fn(cid, delta, key, params):
    del params
    round_key, _ = jax.random.split(key)
    delta_hat, residuals[cid] = q_lib.error_feedback_quantize(
        delta, residuals[cid], cfg, round_key)
    return delta_hat

  ref = init_state()
  for r, (ids, state) in enumerate(zip(ROUND_IDS, states)):
    ref = reference_round(ref, data, ids, upload_fn)
    assert_trees_close(state.params, ref.params, rtol=1e-5, atol=1e-7)
    for cid in range(data.num_clients):
      row = jax.tree.map(lambda x, c=cid: x[c], state.client_states)
      if cid in ids:
        assert_trees_close(row['upload']['residual'], residuals[cid], rtol=1e-4,
                           atol=1e-7)
        assert any(np.any(x != 0) for x in jax.tree.leaves(row))
      else:
        # Bit for bit untouched, even client 0 of round 2, which the padding
        # slots of 8 devices point at.
        old = jax.tree.map(lambda x, c=cid: x[c], previous)
        for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(old)):
          np.testing.assert_array_equal(a, b)
    previous = state.client_states
  assert 0 in ROUND_IDS[0] and 0 not in ROUND_IDS[1]


def test_error_feedback_state_resumes_bit_for_bit(tmp_path):
  upload = upload_lib.error_feedback(upload_lib.quantizer(
      Config(bits=4, rounding='stochastic')))
  data = make_data()
  mesh, round_fn = make_round(8, 'vmap', upload, donate=False)
  sharded = federation.shard_client_data(data, mesh)
  slots = [federation.round_slots(ids, mesh.size) for ids in ROUND_IDS]
  state = start_state(upload, data, mesh)
  after_one, _ = round_fn(state, sharded, *slots[0])
  straight, _ = round_fn(after_one, sharded, *slots[1])

  manager = workdir_lib.checkpoint_manager(str(tmp_path))
  workdir_lib.save_checkpoint(manager, 1, after_one)
  like = start_state(upload, data, mesh)  # fresh zeros, placed.
  restored, step = workdir_lib.restore_checkpoint(manager, like)
  manager.close()
  assert step == 1
  resumed, _ = round_fn(restored, sharded, *slots[1])
  assert round_fn._cache_size() == 1
  leaves = jax.tree.leaves(straight)
  assert len(leaves) == len(jax.tree.leaves(resumed))
  for a, b in zip(leaves, jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prox_mu_zero_is_fedavg_bit_for_bit():
  data = make_data()
  cfg = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=5e-2, momentum=0.9, warmup_steps=4,
      grad_clip=1.0))
  with_prox = optimizers.client_optimizer(cfg, extra=[proximal_lib.proximal(
      0.0)])
  mesh, plain_fn = make_round(8, 'vmap')
  _, prox_fn = make_round(8, 'vmap', optimizer=with_prox)
  plain, _ = run(plain_fn, start_state(None, data, mesh), data, mesh,
                 ROUND_IDS[:1])
  prox, _ = run(prox_fn, start_state(None, data, mesh), data, mesh,
                ROUND_IDS[:1])
  for a, b in zip(jax.tree.leaves(plain[-1]), jax.tree.leaves(prox[-1])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name,mus', [('sgd', (0.0, 2.0, 10.0)),
                                      ('adam', (0.0, 30.0))])
def test_larger_mu_gives_smaller_client_drift(name, mus):
  """Mean ‖θ_k − θ_global‖ over a round's clients decreases with μ."""
  data = make_data()
  ids = ROUND_IDS[0]
  drifts = []
  for mu in mus:
    cfg = ml_collections.ConfigDict(dict(
        name=name, learning_rate=5e-2 if name == 'sgd' else 1e-2,
        momentum=0.0, warmup_steps=0, grad_clip=0.0))
    extra = [proximal_lib.proximal(mu)] if mu else []
    mesh, round_fn = make_round(
        1, 'vmap', optimizer=optimizers.client_optimizer(cfg, extra=extra),
        local_steps=8)
    _, metrics = run(round_fn, start_state(None, data, mesh), data, mesh,
                     [ids])
    m = metrics[0]
    drifts.append(float(np.mean(m['client_update_norms'][:len(ids)])))
  assert all(a > b for a, b in zip(drifts, drifts[1:])), drifts
  assert drifts[-1] < 0.9 * drifts[0], drifts


def test_client_states_must_match_the_upload():
  upload = upload_lib.error_feedback(upload_lib.quantizer(Config(bits=4)))
  data = make_data()
  mesh, round_fn = make_round(1, 'vmap', upload, donate=False)
  ids, mask = federation.round_slots(ROUND_IDS[0], 1)
  with pytest.raises(ValueError, match='init_client_states'):
    round_fn(init_state(), data, ids, mask)
  short = state_lib.init_client_states(upload, init_state().params, 4)
  with pytest.raises(ValueError, match='one row per client'):
    round_fn(init_state().replace(client_states=short), data, ids, mask)
