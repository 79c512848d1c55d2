"""One federated round as one jitted program.

A call of the round function does, on device and with no host round-trip:

1. broadcast θ_global to the round's client slots (an unmapped `vmap`
   argument, never K copies);
2. each client runs `local_steps` optimizer steps under `lax.scan` on batches
   drawn by index from its own on-device data;
3. each client's update Δ_k = θ_k − θ_global goes through the upload
   transform (`strategies.upload`; FedAvg: none), which returns the Δ̂_k the
   server receives and the client's new persistent state;
4. Δ̂_k is folded into the aggregator's accumulator on its device, then
   reduced over the mesh (`psum`);
5. the server optimizer applies the aggregate as the pseudo-gradient −Δ̄
   (`sgd(1.0)`: FedAvg, McMahan et al. 2017, arXiv 1602.05629);
6. the EMA of the global parameters is updated (with decay warmup).

Client slots are sharded over the mesh axis `clients` with `shard_map`. Inside
one device, clients run in chunks: a `lax.scan` over chunks, each chunk a
`vmap` over its clients. `mode='vmap'` is one chunk of all the device's
clients (fastest where grouped convolutions are fast), `mode='map'` chunks of
one (least memory; one client after another), `mode='chunked'` chunks of
`chunk_size`. Accumulating chunk by chunk means no device ever holds more
than one chunk of client models.

Random numbers: round r uses `fold_in(state.rng, r)`, and client k's key is
that folded with k's global id, so a client's training does not depend on the
slot or device it lands on, nor on the number of devices. Its upload key is
`fold_in(client_key, upload.UPLOAD_KEY_TAG)` (`upload_key`).

Per-client state (`ServerState.client_states`: the upload path's
error-feedback residuals under key 'upload', the client optimizer's state
under 'optimizer' when clients keep it across rounds) has one row per client
of the federation, sharded over `clients` like the client data. The round
gathers the rows of its client ids, passes them through `shard_map` with the
clients, and scatters the updated rows back for real clients only
(mask > 0); padding slots write nothing. It is empty, and costs nothing, when
no component keeps client state (FedAvg).
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_diff import federation
from fedjax_diff import state as state_lib
from fedjax_diff.diffusion import ema as ema_lib
from fedjax_diff.state import ServerState
from fedjax_diff.strategies.aggregator import Aggregator
from fedjax_diff.strategies import upload as upload_lib
from fedjax_diff.strategies.fedavg import fedavg

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]
MODES = ('vmap', 'map', 'chunked')


def resolve_mode(mode: str, platform: Optional[str] = None) -> str:
  """'auto' → the execution mode that wins on the backend in use.

  On CPU, XLA runs the grouped convolutions that a vmap over per-client
  weights produces far slower than one client at a time (measured here: a
  10-client MNIST round did not finish in 16 minutes with 'vmap', against
  ~0.12 s per local step with 'map'; see launch/bench.py), so 'auto' is
  'map' there. On GPU and TPU it is 'vmap' (all clients at once), not yet
  measured by this project: run launch/bench.py and pick.
  """
  if mode != 'auto':
    return mode
  platform = platform or jax.devices()[0].platform
  return 'map' if platform == 'cpu' else 'vmap'


def ema_decay_at(decay: float, round_idx: jax.Array) -> jax.Array:
  """EMA decay with warmup: min(decay, (1 + r) / (10 + r)) at round r.

  The EMA is updated once per round, and federated runs have few rounds: a
  fixed 0.999 would keep the EMA at the initial weights for a short run.
  The warmup is that of tf.train.ExponentialMovingAverage(num_updates=r).
  """
  r = jnp.asarray(round_idx, jnp.float32)
  return jnp.minimum(decay, (1.0 + r) / (10.0 + r))


def to_float_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] → float32 [−1, 1], the range the diffusion model sees."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def epoch_order(key: jax.Array, count: jax.Array, max_n: int) -> jax.Array:
  """A random permutation of `[0, count)` followed by the padding indices.

  Batches are read cyclically from it, so a client sees each of its examples
  once per local epoch (sampling without replacement).
  """
  scores = jax.random.uniform(key, (max_n,))
  scores = jnp.where(jnp.arange(max_n) < count, scores, 2.0)
  return jnp.argsort(scores)


def client_batch(images, labels, order, count, step, batch_size, key,
                 random_flip: bool):
  """The `step`-th local batch of one client, as float images and labels."""
  pos = (step * batch_size + jnp.arange(batch_size)) % jnp.maximum(count, 1)
  idx = order[pos]
  x = to_float_images(images[idx])
  if random_flip:
    flip = jax.random.bernoulli(key, 0.5, (batch_size,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return x, labels[idx]


def chunk_size_for(mode: str, clients_per_device: int,
                   chunk_size: Optional[int]) -> int:
  """Clients vmapped together on one device, for an execution mode."""
  if mode == 'vmap':
    return clients_per_device
  if mode == 'map':
    return 1
  if mode == 'chunked':
    if not chunk_size or clients_per_device % chunk_size:
      raise ValueError(
          f"mode='chunked' needs chunk_size dividing the {clients_per_device} "
          f'client slots per device; got chunk_size={chunk_size}. Pick a '
          'divisor, or change clients_per_round / the device count.')
    return chunk_size
  raise ValueError(f'Unknown execution mode {mode!r}; use one of {MODES}.')


def _as_varying(tree, axis_name: str):
  """Marks every leaf of `tree` as varying over `axis_name` (in shard_map)."""
  def cast(x):
    if axis_name in jax.typeof(x).manual_axis_type.varying:
      return x
    return jax.lax.pcast(x, (axis_name,), to='varying')
  return jax.tree.map(cast, tree)


def make_local_training(loss_fn: LossFn,
                        client_optimizer: optax.GradientTransformationExtraArgs,
                        local_steps: int, batch_size: int,
                        random_flip: bool = False):
  """Local training of one client: `local_steps` steps under `lax.scan`.

  Returns `train(global_params, images, labels, count, key, round,
  opt_state=None) -> (params, mean_loss, opt_state)`, with `images` the
  client's uint8 `[max_n, H, W, C]`. The client optimizer starts from
  `opt_state` when given (a client that keeps its optimizer state across
  rounds, see `make_client_fn`), else from a fresh `init` (FedAvg); the
  returned `opt_state` is the one after the last step. Keys:
  `order_key, train_key = split(key)`; step s uses `fold_in(train_key, s)`
  split into (flip, loss) keys.
  """

  def train(global_params, images, labels, count, key, round_idx,
            opt_state=None):
    order_key, train_key = jax.random.split(key)
    order = epoch_order(order_key, count, images.shape[0])
    if opt_state is None:
      opt_state = client_optimizer.init(global_params)

    def step(carry, s):
      params, opt_state = carry
      flip_key, loss_key = jax.random.split(jax.random.fold_in(train_key, s))
      x, y = client_batch(images, labels, order, count, s, batch_size,
                          flip_key, random_flip)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y, loss_key)
      updates, opt_state = client_optimizer.update(
          grads, opt_state, params, global_params=global_params,
          global_step=round_idx * local_steps + s)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(
        step, (global_params, opt_state), jnp.arange(local_steps))
    return params, losses.mean(), opt_state

  return train


def make_client_update(loss_fn: LossFn,
                       client_optimizer: optax.GradientTransformationExtraArgs,
                       local_steps: int, batch_size: int,
                       random_flip: bool = False):
  """`make_local_training` returning the update instead of the parameters.

  Returns `client_update(global_params, images, labels, count, key, round)
  -> (delta, mean_loss)`, Δ = θ_k − θ_global (see `make_local_training`
  for the keys).
  """
  train = make_local_training(loss_fn, client_optimizer, local_steps,
                              batch_size, random_flip)

  def client_update(global_params, images, labels, count, key, round_idx):
    params, loss, _ = train(global_params, images, labels, count, key,
                            round_idx)
    return jax.tree.map(jnp.subtract, params, global_params), loss

  return client_update


def upload_key(client_key: jax.Array) -> jax.Array:
  """A client's upload key: `fold_in(client_key, upload.UPLOAD_KEY_TAG)`."""
  return jax.random.fold_in(client_key, upload_lib.UPLOAD_KEY_TAG)


def tree_norm(tree) -> jax.Array:
  """‖tree‖₂ over all leaves, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def make_client_fn(train, upload: Optional[upload_lib.UploadTransform]):
  """One client of a round: local training from `start_params`, then upload.

  Shared by the flat round (`make_round_fn`, where `start_params` is
  θ_global) and the hierarchical one (`fedjax_diff.hierarchy`, where it is
  the client's edge model).

  Args:
    train: from `make_local_training`.
    upload: the upload transform, or None (Δ is sent as is).

  Returns:
    `client_fn(start_params, images, labels, count, key, client_state,
    round) -> (delta_hat, client_state, loss, ‖Δ‖, ‖Δ̂ − Δ‖)` with
    Δ = θ_k − start_params. When `client_state` holds the client's optimizer
    state (key `state.CLIENT_OPTIMIZER`), local training continues from it
    and the state after the last local step replaces it.
  """

  def client_fn(start_params, images, labels, count, key, client_state,
                round_idx):
    opt_state = client_state.get(state_lib.CLIENT_OPTIMIZER)
    params, loss, opt_state = train(start_params, images, labels, count, key,
                                    round_idx, opt_state)
    if state_lib.CLIENT_OPTIMIZER in client_state:
      client_state = {**client_state, state_lib.CLIENT_OPTIMIZER: opt_state}
    delta = jax.tree.map(jnp.subtract, params, start_params)
    norm = tree_norm(delta)
    if upload is None:
      return delta, client_state, loss, norm, jnp.zeros_like(norm)
    ctx = upload_lib.UploadContext(global_params=start_params, params=params,
                                   labels=labels, count=count,
                                   round=round_idx)
    # A stateless upload has no rows: its (leafless) state is rebuilt here.
    z = client_state.get(state_lib.UPLOAD)
    if z is None:
      z = upload.init_client_state(params)
    delta_hat, z = upload.apply(delta, z, upload_key(key), ctx)
    if state_lib.UPLOAD in client_state:
      client_state = {**client_state, state_lib.UPLOAD: z}
    err = tree_norm(jax.tree.map(jnp.subtract, delta_hat, delta))
    return delta_hat, client_state, loss, norm, err

  return client_fn


def make_round_fn(*, loss_fn: LossFn,
                  client_optimizer: optax.GradientTransformationExtraArgs,
                  server_optimizer: optax.GradientTransformation,
                  mesh: Mesh, local_steps: int, batch_size: int,
                  aggregator: Optional[Aggregator] = None,
                  upload: Optional[upload_lib.UploadTransform] = None,
                  mode: str = 'vmap', chunk_size: Optional[int] = None,
                  ema_decay: float = 0.9999, random_flip: bool = False,
                  keep_client_optimizer_state: bool = False,
                  donate: bool = True):
  """Builds the jitted round function.

  Args:
    loss_fn: `(params, x, labels, rng) -> scalar`, x float32 NHWC in [−1, 1].
    client_optimizer: optax chain, called with extra args `global_params`
      and `global_step` (see `fedjax_diff.optimizers`).
    server_optimizer: optax transform applied to −Δ̄.
    mesh: a 1-D mesh with axis `clients` (`federation.client_mesh`).
    local_steps: optimizer steps per client per round.
    batch_size: local batch size.
    aggregator: defaults to `fedavg()`.
    upload: the upload transform applied to each client's Δ before
      aggregation (`strategies.upload`); None sends Δ as is (FedAvg). When it
      keeps client state, `state.client_states` must hold one row per client
      of `data` (`fedjax_diff.state.init_client_states`).
    mode: 'vmap', 'map', 'chunked' (see the module docstring) or 'auto'
      (`resolve_mode`).
    chunk_size: clients per chunk for mode='chunked'.
    ema_decay: decay of the EMA of the global parameters (with warmup,
      `ema_decay_at`).
    random_flip: random horizontal flips of local batches.
    keep_client_optimizer_state: each client keeps its optimizer state (e.g.
      Adam's moments) from one round it takes part in to the next, as the
      workers of DiLoCo (Douillard et al. 2023, arXiv 2311.08105) keep their
      inner AdamW state, instead of starting from `init` every round (FedAvg,
      McMahan et al. 2017). The rows live in
      `state.client_states['optimizer']` (`state.init_client_states(...,
      client_optimizer=...)`); nothing extra is communicated.
    donate: donate the input state's buffers to the output.

  Returns:
    `round_fn(state, data, client_ids, client_mask) -> (state, metrics)`.
    `data` is a `federation.ClientData` (sharded or not), `client_ids` int32
    `[slots]` global ids and `client_mask` float32 `[slots]` (0 = padding
    slot), with `slots` a multiple of the mesh size
    (`federation.round_slots`); the real clients' ids must be distinct.
    metrics: `loss` (example-weighted mean local training loss), and per
    slot `client_losses`, `client_weights`, `client_update_norms` (‖Δ_k‖,
    the client's drift from θ_global) and, with an upload transform,
    `client_upload_errors` (‖Δ̂_k − Δ_k‖).
  """
  aggregator = aggregator or fedavg()
  mode = resolve_mode(mode, mesh.devices.flat[0].platform)
  if mode not in MODES:
    raise ValueError(f'Unknown execution mode {mode!r}; use one of {MODES}.')
  train = make_local_training(loss_fn, client_optimizer, local_steps,
                              batch_size, random_flip)
  clients = federation.CLIENTS

  client_fn = make_client_fn(train, upload)

  def device_block(global_params, images, labels, counts, keys, weights,
                   client_states, round_idx):
    """The clients of one device, chunk by chunk, then the mesh reduction."""
    per_device = counts.shape[0]
    c = chunk_size_for(mode, per_device, chunk_size)
    # θ_global arrives replicated (invariant over the mesh axis). Mark it as
    # varying before clients train from it: differentiating through an
    # invariant input transposes to a psum, which would add up the gradients
    # of clients on different devices. pcast changes the type, not the data.
    global_params = _as_varying(global_params, clients)
    chunked = jax.tree.map(
        lambda x: x.reshape((per_device // c, c) + x.shape[1:]),
        (images, labels, counts, keys, weights, client_states))
    # θ_global is unmapped: one copy per device, shared by its clients.
    vmapped = jax.vmap(client_fn, in_axes=(None, 0, 0, 0, 0, 0, None))

    def body(acc, xs):
      imgs, lbls, cnts, ks, ws, zs = xs
      deltas, zs, losses, norms, errs = vmapped(global_params, imgs, lbls,
                                                cnts, ks, zs, round_idx)
      return aggregator.accumulate(acc, deltas, ws), (zs, losses, norms, errs)

    # The accumulator differs from device to device: it must be varying over
    # the mesh axis for the scan's carry types to match.
    acc0 = _as_varying(aggregator.init(global_params), clients)
    acc, per_client = jax.lax.scan(body, acc0, chunked)
    per_client = jax.tree.map(
        lambda x: x.reshape((per_device,) + x.shape[2:]), per_client)
    return (aggregator.finalize(acc, clients),) + per_client

  sharded_block = jax.shard_map(
      device_block, mesh=mesh,
      in_specs=(P(), P(clients), P(clients), P(clients), P(clients),
                P(clients), P(clients), P()),
      out_specs=(P(), P(clients), P(clients), P(clients), P(clients)))
  client_sharding = state_lib.client_rows_sharding(mesh)

  def round_fn(state: ServerState, data: federation.ClientData,
               client_ids: jax.Array, client_mask: jax.Array):
    if client_ids.shape[0] % mesh.size:
      raise ValueError(
          f'{client_ids.shape[0]} client slots do not split over {mesh.size} '
          'devices; pad them with federation.round_slots.')
    check_client_states(
        state.client_states, upload, state.params, data.num_clients,
        client_optimizer if keep_client_optimizer_state else None)
    round_key = jax.random.fold_in(state.rng, state.round)
    keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(client_ids)
    images = data.images[client_ids]
    labels = data.labels[client_ids]
    counts = jnp.where(client_mask > 0, data.counts[client_ids], 0)
    weights = counts.astype(jnp.float32)
    slot_states = jax.tree.map(lambda x: x[client_ids], state.client_states)
    delta, slot_states, losses, norms, errs = sharded_block(
        state.params, images, labels, counts, keys, weights, slot_states,
        state.round)
    # Scatter back the real clients' rows; padding slots (which repeat real
    # ids) point past the end and are dropped.
    rows = jnp.where(client_mask > 0, client_ids, data.num_clients)
    client_states = jax.tree.map(
        lambda full, new: jax.lax.with_sharding_constraint(
            full.at[rows].set(new, mode='drop'), client_sharding),
        state.client_states, slot_states)
    updates, opt_state = server_optimizer.update(
        jax.tree.map(jnp.negative, delta), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        params=params,
        ema_params=ema_lib.ema_update(
            state.ema_params, params, ema_decay_at(ema_decay, state.round)),
        opt_state=opt_state,
        round=state.round + 1,
        client_states=client_states)
    total = jnp.maximum(weights.sum(), 1.0)
    metrics = {
        'loss': jnp.sum(jnp.where(weights > 0, losses, 0) * weights) / total,
        'client_losses': losses,
        'client_weights': weights,
        'client_update_norms': norms,
    }
    if upload is not None:
      metrics['client_upload_errors'] = errs
    return new_state, metrics

  return jax.jit(round_fn, donate_argnums=(0,) if donate else ())


def check_client_states(client_states, upload, params, num_clients: int,
                        client_optimizer=None):
  """Raises a ValueError unless `client_states` fits (trace time).

  They fit when `client_states` is `state.client_state_shapes(upload, params,
  client_optimizer)` (`{}` for FedAvg) with a leading axis of `num_clients`
  on every leaf.
  """
  want = state_lib.client_state_shapes(upload, params, client_optimizer)
  how = ('Build them with fedjax_diff.state.init_client_states(upload, '
         'params, data.num_clients, client_optimizer=...).')
  if jax.tree.structure(client_states) != jax.tree.structure(want):
    raise ValueError(
        'state.client_states does not match the upload transform '
        f'{getattr(upload, "name", None)!r} and the client optimizer '
        f'({"kept" if client_optimizer is not None else "not kept"} across '
        f'rounds): got the tree {jax.tree.structure(client_states)}, '
        f'expected {jax.tree.structure(want)}. {how}')
  for got, one in zip(jax.tree.leaves(client_states), jax.tree.leaves(want)):
    if tuple(got.shape) != (num_clients,) + tuple(one.shape):
      raise ValueError(
          f'state.client_states has a leaf of shape {tuple(got.shape)}; '
          f'expected {(num_clients,) + tuple(one.shape)}: one row per client '
          f'of the data ({num_clients}, padding included). {how}')


def num_slots(clients_per_round: int, mesh: Mesh) -> int:
  """Client slots per round: `clients_per_round` rounded up to the mesh."""
  return math.ceil(clients_per_round / mesh.size) * mesh.size
