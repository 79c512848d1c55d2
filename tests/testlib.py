"""The shared test library: tiny models and data, an independent batch
sampler, and the plain-Python reference of a federated round.

Nothing here calls the code under test to compute an expected value: the
sampler and the loops below are written from the documented key scheme
(`fedjax_diff.client` and `fedjax_diff.engine` module docstrings) with
numpy and plain Python, so a round test compares two independent
implementations. The library only *builds* objects under test (an algorithm
from a tiny config) through `make_algorithm`.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import optax

from fedjax_diff import algorithms
from fedjax_diff import federation
from fedjax_diff import optimizers
from fedjax_diff.state import init_server_state

PyTree = Any
LOCAL_STEPS = 3
BATCH = 4
EMA = 0.9
NUM_CLASSES = 4
SERVER_OPT = optax.sgd(1.0, momentum=0.9)
# The documented tag of a client's upload key (strategies/upload.py).
UPLOAD_KEY_TAG = 0x75706C64
# The documented tag of the aggregator's key (engine.py).
AGGREGATOR_KEY_TAG = 0x61676772


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


def eps_fn(params, x, t, labels, *, train, rng=None):
  """The tiny denoiser as an ε-network (it ignores t and labels)."""
  del t, labels, train, rng
  return MODEL.apply({'params': params}, x)


def init_params(seed: int = 1) -> PyTree:
  return MODEL.init(jax.random.PRNGKey(seed),
                    jnp.zeros((1, 8, 8, 1)))['params']


def make_data(num_clients: int = 16, seed: int = 0,
              classes: Optional[Callable[[int], list[int]]] = None):
  """Clients with 3..12 uint8 8×8×1 images each; labels uniform over
  NUM_CLASSES, or over `classes(k)` for client k."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(3, 13, size=num_clients)
  images, labels = [], []
  for k, n in enumerate(counts):
    pool = classes(k) if classes else list(range(NUM_CLASSES))
    labels.append(rng.choice(pool, size=n).astype(np.int32))
    images.append(rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8))
  parts = np.split(np.arange(counts.sum()), np.cumsum(counts)[:-1])
  return federation.stack_clients(np.concatenate(images),
                                  np.concatenate(labels), parts)


# SGD with momentum, clipping and warmup on clients and FedAvgM on the server:
# a stateful chain on both sides whose result is a smooth function of the
# inputs. (Adam's first step, lr·g/(|g|+ε), turns float rounding of near-zero
# gradient entries into ±lr jumps, so summation orders that differ by device
# count would not agree to a tolerance.)
def client_opt_config(name: str = 'sgd') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, learning_rate=5e-2, momentum=0.9, warmup_steps=4,
      grad_clip=1.0))


def client_opt(name: str = 'sgd', extra=None):
  return optimizers.client_optimizer(client_opt_config(name), extra=extra)


def assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)


def tree_distance(a, b) -> float:
  return max(float(np.abs(np.asarray(x, np.float64) -
                          np.asarray(y, np.float64)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- The independent sampler. ---


def client_key(rng, round_idx: int, cid: int):
  """Client `cid`'s key in round `round_idx`: fold_in(fold_in(rng, r), k)."""
  return jax.random.fold_in(jax.random.fold_in(rng, round_idx), cid)


def batch_indices(order_key, count: int, max_n: int, step: int,
                  batch_size: int) -> np.ndarray:
  """The example indices of a client's local batch `step`, as documented:
  the valid positions [0, count) ordered by their scores
  `uniform(order_key, (max_n,))`, read cyclically B at a time."""
  scores = np.asarray(jax.random.uniform(order_key, (max_n,)))
  order = sorted(range(count), key=lambda i: (scores[i], i))
  return np.array([order[(step * batch_size + j) % count]
                   for j in range(batch_size)])


def train_client(start, images, labels, count, key, round_idx, *,
                 loss=loss_fn, optimizer=None, local_steps=LOCAL_STEPS,
                 batch_size=BATCH, opt_state=None, extra_args=None,
                 step_offset=None, grads_log=None, num_steps=None):
  """One client's local training as a plain loop over steps: all
  `local_steps`, or the first `num_steps` of them (a straggler; the
  optimizer's global step still counts `local_steps` a round).

  Step s calls the optimizer with global_step = step_offset + s (default
  offset: round_idx·local_steps); `grads_log`, a list, receives each step's
  gradients. Returns (params, mean loss, optimizer state)."""
  opt = optimizer or client_opt()
  grad_fn = jax.jit(jax.value_and_grad(loss))
  order_key, train_key = jax.random.split(key)
  images, labels = np.asarray(images), np.asarray(labels)
  params = start
  opt_state = opt.init(start) if opt_state is None else opt_state
  offset = round_idx * local_steps if step_offset is None else step_offset
  losses = []
  for s in range(local_steps if num_steps is None else num_steps):
    _, loss_key = jax.random.split(jax.random.fold_in(train_key, s))
    idx = batch_indices(order_key, count, images.shape[0], s, batch_size)
    x = jnp.asarray(images[idx], jnp.float32)
    if images.dtype == np.uint8:   # pixels; float data (latents) are as is.
      x = x / 127.5 - 1.0
    value, grads = grad_fn(params, x, jnp.asarray(labels[idx]), loss_key)
    if grads_log is not None:
      grads_log.append(grads)
    updates, opt_state = opt.update(
        grads, opt_state, params, global_params=start,
        global_step=offset + s, **(extra_args or {}))
    params = optax.apply_updates(params, updates)
    losses.append(float(value))
  return params, float(np.mean(losses)), opt_state


def sequential_state(optimizer, opt_state, grads_in_order, params):
  """The optimizer state after `grads_in_order`, one update after another
  (the state of FedPhD's one optimizer after its loop over clients). The
  chains here keep state that depends on the gradients only."""
  for g in grads_in_order:
    _, opt_state = optimizer.update(g, opt_state, params,
                                    global_params=params, global_step=0)
  return opt_state


def upload_key(key):
  return jax.random.fold_in(key, UPLOAD_KEY_TAG)


def delta64(params, start):
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) -
                      np.asarray(b, np.float64), params, start)


def weighted_mean64(trees, weights):
  w = np.asarray(weights, np.float64)
  return jax.tree.map(lambda *ds: sum(a * d for a, d in zip(w, ds)) / w.sum(),
                      *trees)


def server_step(state, pseudo_grad64, ema_decay=EMA, server_opt=SERVER_OPT):
  """The server optimizer on a float64 pseudo-gradient, then the EMA with
  its documented warmup min(d, (1 + r)/(10 + r))."""
  grad = jax.tree.map(lambda d: jnp.asarray(d, jnp.float32), pseudo_grad64)
  updates, opt_state = server_opt.update(grad, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  r = int(state.round)
  decay = min(ema_decay, (1 + r) / (10 + r))
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                     state.ema_params, params)
  return state.replace(params=params, ema_params=ema, opt_state=opt_state,
                       round=state.round + 1)


def fedavg_round(state, data, client_ids, *, optimizer=None,
                 upload_fn=None, opt_states=None, server_opt=SERVER_OPT,
                 local_steps=LOCAL_STEPS, dropped=(), steps=None,
                 weight_by_steps=False):
  """A FedAvg round as a plain Python loop over clients.

  Args:
    state: the server state (params, ema_params, opt_state, round, rng).
    data: a `federation.ClientData` of numpy arrays.
    client_ids: the round's clients.
    optimizer: the client optimizer (default `client_opt()`).
    upload_fn: `(cid, delta, upload_key, params) -> delta_hat`; None sends Δ.
    opt_states: dict client id → optimizer state, updated in place, when
      clients keep theirs across rounds (a missing id starts from `init`).
    server_opt, local_steps: as in the round.
    dropped: clients left out of the round (fault isolation or injected
      dropout): as if not sampled, their optimizer states untouched. When
      every client is dropped the state changes only its round counter.
    steps: dict client id → local steps it runs (stragglers); others run
      `local_steps`.
    weight_by_steps: weigh client k by n_k·s_k/local_steps, not n_k.

  Returns:
    (state, example-weighted mean loss; NaN when every client is dropped).
  """
  r = int(state.round)
  steps = steps or {}
  deltas, weights, losses = [], [], []
  for cid in client_ids:
    cid = int(cid)
    if cid in dropped:
      continue
    key = client_key(state.rng, r, cid)
    count = int(data.counts[cid])
    params, loss, opt_state = train_client(
        state.params, data.images[cid], data.labels[cid], count, key, r,
        optimizer=optimizer, local_steps=local_steps,
        opt_state=None if opt_states is None else opt_states.get(cid),
        num_steps=steps.get(cid))
    if opt_states is not None:
      opt_states[cid] = opt_state
    delta = jax.tree.map(jnp.subtract, params, state.params)
    if upload_fn is not None:
      delta = upload_fn(cid, delta, upload_key(key), params)
    deltas.append(jax.tree.map(lambda d: np.asarray(d, np.float64), delta))
    weights.append(count * (steps.get(cid, local_steps) / local_steps
                            if weight_by_steps else 1))
    losses.append(loss)
  if not deltas:
    return state.replace(round=state.round + 1), float('nan')
  mean = weighted_mean64(deltas, weights)
  new = server_step(state, jax.tree.map(np.negative, mean),
                    server_opt=server_opt)
  return new, float(np.average(losses, weights=weights))


# The documented tag of the fault-injection stream (strategies/faults.py).
FAULT_KEY_TAG = 0x666C7421
FAULT_KINDS = ('dropout', 'nan', 'inf', 'straggler')


def fault_plan(rng, round_idx: int, client_ids, fractions: dict,
               local_steps: int = LOCAL_STEPS, min_steps: int = 1):
  """The injected faults of a round, from the documented scheme: client k
  scores uniform(fold_in(fold_in(fold_in(rng, TAG), r), k)); in increasing
  (score, id) order the first round(f_dropout·K) drop out, the next
  round((f_dropout + f_nan)·K) − round(f_dropout·K) upload NaN, then Inf,
  then stragglers, which run randint(fold_in(key_k, 1), min_steps, S) steps.

  Returns:
    dict client id → (kind name or None, local steps).
  """
  key = jax.random.fold_in(jax.random.fold_in(rng, FAULT_KEY_TAG), round_idx)
  keys = {int(c): jax.random.fold_in(key, int(c)) for c in client_ids}
  scores = {c: float(jax.random.uniform(k)) for c, k in keys.items()}
  order = sorted(keys, key=lambda c: (scores[c], c))
  plan = {c: (None, local_steps) for c in order}
  below, cum = 0, 0.0
  for name in FAULT_KINDS:
    cum += fractions.get(name, 0.0)
    upto = int(np.floor(np.float32(cum) * np.float32(len(order)) +
                        np.float32(0.5)))
    for c in order[below:upto]:
      steps = local_steps
      if name == 'straggler':
        steps = int(jax.random.randint(jax.random.fold_in(keys[c], 1), (),
                                       min_steps, local_steps))
      plan[c] = (name, steps)
    below = upto
  return plan


def aggregator_key(rng, round_idx: int):
  """The aggregator's key in round r: fold_in(fold_in(rng, TAG), r)."""
  return jax.random.fold_in(jax.random.fold_in(rng, AGGREGATOR_KEY_TAG),
                            round_idx)


def norm64(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def dp_fedavg_round(state, data, client_ids, *, clip_norm, noise_multiplier,
                    expected_cohort, count_stddev=None, target_quantile=0.5,
                    clip_lr=0.2, upload_fn=None, optimizer=None):
  """A DP-FedAvg round (McMahan et al. 2018, arXiv 1710.06963; adaptive
  clipping of Andrew et al. 2021, arXiv 1905.03871) as a plain loop.

  Client k's update Δ_k is clipped to ‖·‖ ≤ C, sent through `upload_fn(cid,
  clipped, upload_key, params)` if given, clipped to C again by the server,
  and summed with weight 1; the server adds σ_Δ·C·z, z_i =
  normal(fold_in(key_u, i)) for leaf i, with key_u, key_b =
  split(aggregator_key), divides by the expected cohort m, and takes a
  server step. σ_Δ = σ without `count_stddev`, else (σ⁻² − (2σ_b)⁻²)^(−½),
  and the clip norm moves to C·exp(−η(clip(b̄, 0, 1) − γ)) with
  b̄ = (Σ_k (1[‖Δ_k‖ ≤ C] − ½) + σ_b·normal(key_b))/m + ½.

  Returns:
    (state, the next clip norm, b̄ or None).
  """
  r = int(state.round)
  total, below = None, 0.0
  for cid in client_ids:
    cid = int(cid)
    key = client_key(state.rng, r, cid)
    params, _, _ = train_client(state.params, data.images[cid],
                                data.labels[cid], int(data.counts[cid]), key,
                                r, optimizer=optimizer)
    delta = jax.tree.map(jnp.subtract, params, state.params)
    norm = norm64(delta)
    scale = min(1.0, clip_norm / norm)
    sent = jax.tree.map(lambda d: jnp.asarray(np.asarray(d, np.float64) *
                                              scale, jnp.float32), delta)
    if upload_fn is not None:
      sent = upload_fn(cid, sent, upload_key(key), params)
    server_scale = min(1.0, clip_norm / norm64(sent))
    sent = jax.tree.map(lambda d: np.asarray(d, np.float64) * server_scale,
                        sent)
    total = sent if total is None else jax.tree.map(np.add, total, sent)
    below += float(norm <= clip_norm) - 0.5
  if total is None:
    total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64),
                         state.params)
  sigma = noise_multiplier
  if count_stddev is not None:
    sigma = (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5
  key_u, key_b = jax.random.split(aggregator_key(state.rng, r))
  leaves, treedef = jax.tree.flatten(total)
  noisy = [t + sigma * clip_norm * np.asarray(
      jax.random.normal(jax.random.fold_in(key_u, i), t.shape), np.float64)
           for i, t in enumerate(leaves)]
  mean = jax.tree.unflatten(treedef, [x / expected_cohort for x in noisy])
  new = server_step(state, jax.tree.map(np.negative, mean))
  frac, next_clip = None, clip_norm
  if count_stddev is not None:
    frac = (below + count_stddev * float(jax.random.normal(key_b, ()))
            ) / expected_cohort + 0.5
    next_clip = clip_norm * np.exp(
        -clip_lr * (min(max(frac, 0.0), 1.0) - target_quantile))
  return new, next_clip, frac


# --- Building the objects under test from a tiny config. ---


def dp_config(clip_norm=0.05, noise_multiplier=0.5, target_epsilon=None,
              adaptive=False, count_stddev=None, **kw
              ) -> ml_collections.ConfigDict:
  """A `config.dp` block (fields of strategies/privacy.py)."""
  return ml_collections.ConfigDict(dict(
      enabled=True, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
      target_epsilon=target_epsilon, delta=1e-5, accountant='rdp',
      adaptive=dict(enabled=adaptive, target_quantile=0.5, learning_rate=0.2,
                    count_stddev=count_stddev), **kw))


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The config fields an algorithm reads, for the tiny model above; a
  `dp=dp_config(...)` override adds a DP block."""
  dp = overrides.pop('dp', None)
  config = ml_collections.ConfigDict(dict(
      seed=0, num_rounds=4, ema_decay=EMA, algorithm='fedavg',
      data=dict(random_flip=False),
      federation=dict(num_clients=16, clients_per_round=12,
                      local_steps=LOCAL_STEPS, batch_size=BATCH,
                      mode='vmap', chunk_size=0),
      client_optimizer=dict(client_opt_config(), keep_state=False),
      model=dict(num_classes=None)))
  if dp is not None:
    config.dp = dp
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def make_algorithm(data, num_devices: int = 1, *, name: str = 'fedavg',
                   config=None, optimizer=None, upload=None,
                   num_classes: int = NUM_CLASSES, loss=loss_fn,
                   params=None, **overrides):
  """(algorithm, sharded data) for `data` on the first `num_devices`
  devices, built from `tiny_config(**overrides)` (or `config`), for a model
  of `params` (default: the tiny denoiser's) trained with `loss`."""
  config = config or tiny_config(**overrides)
  with config.unlocked():
    config.algorithm = name
  mesh = federation.client_mesh(jax.devices()[:num_devices])
  sharded = federation.shard_client_data(data, mesh)
  params = init_params() if params is None else params
  run = algorithms.Run(
      config=config, workdir='/nonexistent', mesh=mesh, data=sharded,
      num_clients=int(np.sum(np.asarray(data.counts) > 0)),
      num_classes=num_classes, image_shape=(8, 8, 1), eps_fn=eps_fn,
      schedule=None, loss_fn=loss, client_optimizer=optimizer or client_opt(),
      server_optimizer=SERVER_OPT, upload=upload,
      param_shapes=jax.eval_shape(lambda: params), log=lambda msg: None)
  return algorithms.build(name, run), sharded


def run_rounds(algorithm, sharded, rounds_ids, *, state=None, donate=True,
               params=None):
  """Runs the algorithm's round over `rounds_ids` from `state` (default: the
  initial state of `params`, default the tiny denoiser's); returns (state,
  list of host metrics, round_fn)."""
  round_fn = algorithm.make_round(donate=donate)
  mesh = algorithm.run.mesh
  if state is None:
    state = algorithm.initial_state(
        init_params() if params is None else params, jax.random.PRNGKey(42))
  all_metrics = []
  # As many slots in every round (one compilation), as few as fit them all.
  per_device = federation.max_slots_per_device(rounds_ids, sharded.num_clients,
                                               mesh.size)
  for ids in rounds_ids:
    slots = federation.round_slots(np.asarray(ids), mesh.size,
                                   sharded.num_clients, per_device)
    state, metrics = round_fn(state, sharded, *slots)
    all_metrics.append(jax.tree.map(np.asarray, metrics))
  return state, all_metrics, round_fn


def reference_state(params=None):
  """The round-0 server state the reference loops start from (the same
  `init_server_state` fields as `Algorithm.initial_state`, on the host)."""
  return init_server_state(init_params() if params is None else params,
                           SERVER_OPT, jax.random.PRNGKey(42))


# Why the torch references can be absent: see setup.py's `test` extra.
NO_TORCH = ('the torch references (torch, diffusers, pytorch-fid) are in the '
            'test extra on Python 3.11 only: their CPU torch wheel is at hand '
            'for 3.11 alone, and on 3.12 pip would fetch the multi-GB CUDA '
            'build (setup.py, README "Install")')


class _MissingReference:
  """Stands for a reference package that is not installed: using it skips
  the test that does, with `NO_TORCH` as the reason."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr):
    pytest.skip(f'{self._name} is not installed; {NO_TORCH}.')


def reference_module(name: str):
  """The module `name` (torch, diffusers), or a stand-in that skips the
  test that uses it when it is not installed."""
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(name)
  except ImportError:
    return _MissingReference(name)
