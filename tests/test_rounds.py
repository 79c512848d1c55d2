"""The vectorized, sharded round against a plain Python loop over clients."""

import flax.linen as nn
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
from fedjax_diff.state import init_server_state

LOCAL_STEPS = 3
BATCH = 4
EMA = 0.9


class TinyDenoiser(nn.Module):
  """Two convolutions: enough to make vmapped grouped convolutions."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Conv(x.shape[-1], (3, 3))(h)


MODEL = TinyDenoiser()


def loss_fn(params, x, labels, rng):
  """A denoising loss that also depends on labels and on the key."""
  noise = jax.random.normal(rng, x.shape)
  pred = MODEL.apply({'params': params}, x + 0.5 * noise)
  scale = 1.0 + 0.1 * labels.astype(jnp.float32)[:, None, None, None]
  return jnp.mean(scale * (pred - noise) ** 2)


def make_data(num_clients=16, seed=0):
  rng = np.random.default_rng(seed)
  counts = rng.integers(3, 13, size=num_clients)
  n = counts.sum()
  images = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  bounds = np.cumsum(counts)[:-1]
  parts = np.split(np.arange(n), bounds)
  return federation.stack_clients(images, labels, parts)


# SGD with momentum, clipping and warmup on clients and FedAvgM on the server:
# a stateful chain on both sides whose result is a smooth function of the
# inputs. (Adam's first step, lr·g/(|g|+ε), turns float rounding of near-zero
# gradient entries into ±lr jumps, so summation orders that differ by device
# count would not agree to a tolerance; the Adam path is covered on 1 device
# by test_adam_round_matches_python_loop.)
def client_opt(name='sgd'):
  return optimizers.client_optimizer(ml_collections.ConfigDict(dict(
      name=name, learning_rate=5e-2, momentum=0.9, warmup_steps=4,
      grad_clip=1.0)))


SERVER_OPT = optax.sgd(1.0, momentum=0.9)


def init_state():
  params = MODEL.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)))['params']
  return init_server_state(params, SERVER_OPT, jax.random.PRNGKey(42))


def reference_round(state, data, client_ids, client_opt_name='sgd',
                    opt_states=None):
  """FedAvg round written as plain Python loops, following the documented
  key scheme of `rounds.make_client_update`. With `opt_states` (a dict
  client id → optimizer state, updated in place), clients start from and
  keep their own optimizer state; a missing id starts from `init`."""
  opt = client_opt(client_opt_name)
  round_idx = int(state.round)
  round_key = jax.random.fold_in(state.rng, round_idx)
  global_params = state.params
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  deltas, weights, losses = [], [], []
  for cid in client_ids:
    key = jax.random.fold_in(round_key, int(cid))
    order_key, train_key = jax.random.split(key)
    count = int(data.counts[cid])
    images = jnp.asarray(data.images[cid])
    labels = jnp.asarray(data.labels[cid])
    order = rounds.epoch_order(order_key, count, images.shape[0])
    params = global_params
    opt_state = opt.init(params)
    if opt_states is not None:
      opt_state = opt_states.get(int(cid), opt_state)
    client_losses = []
    for s in range(LOCAL_STEPS):
      flip_key, loss_key = jax.random.split(jax.random.fold_in(train_key, s))
      x, y = rounds.client_batch(images, labels, order, count, s, BATCH,
                                 flip_key, random_flip=False)
      loss, grads = grad_fn(params, x, y, loss_key)
      updates, opt_state = opt.update(
          grads, opt_state, params, global_params=global_params,
          global_step=round_idx * LOCAL_STEPS + s)
      params = optax.apply_updates(params, updates)
      client_losses.append(float(loss))
    if opt_states is not None:
      opt_states[int(cid)] = opt_state
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a, np.float64) -
                               np.asarray(b, np.float64), params,
                               global_params))
    weights.append(count)
    losses.append(np.mean(client_losses))
  weights = np.asarray(weights, np.float64)
  mean_delta = jax.tree.map(
      lambda *ds: sum(w * d for w, d in zip(weights, ds)) / weights.sum(),
      *deltas)
  pseudo_grad = jax.tree.map(lambda d: -jnp.asarray(d, jnp.float32),
                             mean_delta)
  updates, opt_state = SERVER_OPT.update(pseudo_grad, state.opt_state,
                                         state.params)
  params = optax.apply_updates(state.params, updates)
  decay = min(EMA, (1 + round_idx) / (10 + round_idx))  # EMA warmup.
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                     state.ema_params, params)
  loss = float(np.sum(weights * losses) / weights.sum())
  return state.replace(params=params, ema_params=ema, opt_state=opt_state,
                       round=state.round + 1), loss


def make_round(mesh, client_optimizer=None, **kwargs):
  """The round under test: TinyDenoiser's loss, LOCAL_STEPS of BATCH, and
  `client_opt()` unless another client optimizer is given."""
  return rounds.make_round_fn(
      loss_fn=loss_fn, client_optimizer=client_optimizer or client_opt(),
      server_optimizer=SERVER_OPT, mesh=mesh, local_steps=LOCAL_STEPS,
      batch_size=BATCH, **kwargs)


def run_rounds(mode, num_devices, chunk_size, data, rounds_ids,
               client_opt_name='sgd'):
  mesh = federation.client_mesh(jax.devices()[:num_devices])
  round_fn = make_round(mesh, client_opt(client_opt_name), mode=mode,
                        chunk_size=chunk_size, ema_decay=EMA)
  sharded = federation.shard_client_data(data, mesh)
  state = federation.replicate(init_state(), mesh)
  losses = []
  for ids in rounds_ids:
    slot_ids, mask = federation.round_slots(ids, num_devices)
    state, metrics = round_fn(state, sharded, slot_ids, mask)
    losses.append(float(metrics['loss']))
  return state, losses, round_fn


ROUND_IDS = [np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 15]),
             np.array([1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15])]


@pytest.fixture(scope='module')
def reference():
  data = make_data()
  state = init_state()
  losses = []
  for ids in ROUND_IDS:
    state, loss = reference_round(state, data, ids)
    losses.append(loss)
  return data, state, losses


def assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize('mode,num_devices,chunk_size', [
    ('vmap', 1, None), ('vmap', 8, None), ('map', 1, None), ('map', 8, None),
    ('chunked', 1, 4), ('chunked', 8, 1)])
def test_round_matches_python_loop(reference, mode, num_devices, chunk_size):
  data, ref_state, ref_losses = reference
  state, losses, round_fn = run_rounds(mode, num_devices, chunk_size, data,
                                       ROUND_IDS)
  assert int(state.round) == 2
  # The round moved the model: the comparison is not between two no-ops.
  moved = sum(float(jnp.abs(p - q).sum()) for p, q in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(init_state().params)))
  assert moved > 1e-3
  assert_trees_close(state.params, ref_state.params)
  assert_trees_close(state.ema_params, ref_state.ema_params)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Two rounds, one compilation.
  assert round_fn._cache_size() == 1


def test_adam_round_matches_python_loop():
  data = make_data()
  ref_state = init_state()
  for ids in ROUND_IDS:
    ref_state, _ = reference_round(ref_state, data, ids, 'adam')
  state, _, _ = run_rounds('vmap', 1, None, data, ROUND_IDS, 'adam')
  assert_trees_close(state.params, ref_state.params, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('mode,num_devices', [('vmap', 8), ('map', 1)])
def test_kept_client_optimizer_state_matches_python_loop(mode, num_devices):
  """Clients that keep their optimizer state across rounds (momentum here):
  the round equals the loop that carries each client's own state, clients
  that sit a round out keep theirs untouched, and padding writes nothing."""
  data = make_data()
  ref_state, ref_opt = init_state(), {}
  for ids in ROUND_IDS:
    ref_state, _ = reference_round(ref_state, data, ids, opt_states=ref_opt)

  mesh = federation.client_mesh(jax.devices()[:num_devices])
  opt = client_opt()
  round_fn = make_round(mesh, opt, mode=mode, ema_decay=EMA,
                        keep_client_optimizer_state=True)
  sharded = federation.shard_client_data(data, mesh)
  state = init_state()
  state = state_lib.place_state(state.replace(
      client_states=state_lib.init_client_states(
          None, state.params, sharded.num_clients, mesh,
          client_optimizer=opt)), mesh)
  for ids in ROUND_IDS:
    state, _ = round_fn(state, sharded, *federation.round_slots(ids,
                                                                num_devices))
  assert_trees_close(state.params, ref_state.params)
  rows = state.client_states[state_lib.CLIENT_OPTIMIZER]
  fresh = opt.init(init_state().params)
  for cid in range(data.num_clients):
    want = ref_opt.get(cid, fresh)
    assert_trees_close(jax.tree.map(lambda x: x[cid], rows), want)
  assert round_fn._cache_size() == 1

  # Not a no-op: resetting the optimizer every round ends elsewhere.
  reset, _, _ = run_rounds(mode, num_devices, None, data, ROUND_IDS)
  gap = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(reset.params), jax.tree.leaves(state.params)))
  assert gap > 1e-4


def test_kept_client_optimizer_state_must_be_built():
  data = make_data()
  mesh = federation.client_mesh(jax.devices()[:1])
  round_fn = make_round(mesh, keep_client_optimizer_state=True)
  with pytest.raises(ValueError, match='client optimizer.*kept across'):
    round_fn(init_state(), data, *federation.round_slots(ROUND_IDS[0], 1))


def test_padding_slots_change_nothing():
  data = make_data()
  mesh = federation.client_mesh(jax.devices()[:1])
  round_fn = make_round(mesh, mode='vmap', ema_decay=EMA, donate=False)
  ids = ROUND_IDS[0]
  state = init_state()
  plain, _ = round_fn(state, data, *federation.round_slots(ids, 1))
  # Four padding slots that point at real clients' data and even at poisoned
  # data: their weight is 0, so nothing of them may reach the aggregate.
  poisoned = data.replace(images=data.images.copy())
  poisoned.images[[1, 4, 8, 14]] = 255
  padded_ids = np.concatenate([ids, [1, 4, 8, 14]]).astype(np.int32)
  mask = np.concatenate([np.ones(len(ids)), np.zeros(4)]).astype(np.float32)
  padded, metrics = round_fn(state, poisoned, padded_ids, mask)
  assert_trees_close(padded.params, plain.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(metrics['client_weights'][-4:]), 0)


def test_client_result_independent_of_slot():
  """A client's update depends on its global id, not on where it runs."""
  data = make_data()
  mesh = federation.client_mesh(jax.devices()[:1])
  round_fn = make_round(mesh, mode='vmap', ema_decay=EMA, donate=False)
  state = init_state()
  a = np.array([3, 7], np.int32)
  _, m1 = round_fn(state, data, a, np.ones(2, np.float32))
  _, m2 = round_fn(state, data, a[::-1].copy(), np.ones(2, np.float32))
  np.testing.assert_allclose(np.asarray(m1['client_losses']),
                             np.asarray(m2['client_losses'])[::-1], rtol=1e-6)


def test_bad_mode_and_chunk_errors():
  mesh = federation.client_mesh(jax.devices()[:1])
  with pytest.raises(ValueError, match='Unknown execution mode'):
    rounds.make_round_fn(loss_fn=loss_fn, client_optimizer=client_opt(),
                         server_optimizer=SERVER_OPT, mesh=mesh,
                         local_steps=1, batch_size=2, mode='pmap')
  with pytest.raises(ValueError, match='chunk_size'):
    rounds.chunk_size_for('chunked', 6, 4)


def test_auto_mode():
  assert rounds.resolve_mode('auto', 'cpu') == 'map'
  assert rounds.resolve_mode('auto', 'gpu') == 'vmap'
  assert rounds.resolve_mode('chunked', 'cpu') == 'chunked'


def test_sample_clients_deterministic():
  a = federation.sample_clients(20, 8, seed=3, round_idx=5)
  b = federation.sample_clients(20, 8, seed=3, round_idx=5)
  c = federation.sample_clients(20, 8, seed=3, round_idx=6)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 8 and not np.array_equal(a, c)
  with pytest.raises(ValueError, match='clients_per_round'):
    federation.sample_clients(5, 6, seed=0, round_idx=0)
