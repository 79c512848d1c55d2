"""The client engine: every client of a round, on every device, in one program.

This module is the only place that knows about meshes, execution modes and
per-client rows. Its users (the algorithms' rounds, FedDDPM's phase 1 and
its auxiliary sampler) give it a function of ONE client and get back a
function of all of them:

    f(shared, slot_inputs, data, rows, client_ids, mask, key)
        -> (aggregate, outputs, rows')

* `shared` (e.g. θ_global, or FedPhD's edge models) is replicated and
  broadcast to the clients of a device as an unmapped `vmap` argument: never
  K copies.
* `slot_inputs` has one entry per client slot (keys, an edge index, a
  client's model), sharded over the mesh axis `clients`.
* `data` and `rows` are resident per-client arrays with one row per client
  of the federation (`federation.ClientData`, `ServerState.client_states`),
  split over `clients` in contiguous blocks. A slot reads the rows of its
  client on the device that holds them (`federation.round_slots` puts every
  client's slot there), so client images never cross devices; the rows the
  client returns are written back in place, for real clients only.
* Inside a device the clients run in chunks: `lax.scan` over chunks, each
  chunk a `vmap` over its clients. 'vmap' is one chunk of all the device's
  clients, 'map' chunks of one (least memory), 'chunked' chunks of
  `chunk_size`. Each chunk's contributions are folded into the aggregator's
  accumulator as they come (no device holds more than a chunk of client
  models), then `finalize` reduces it over the mesh (`psum`) with the
  aggregator's key (DP noise).
* Weights: a slot weighs `mask · keep · aggregator.weight(count)`, with
  `keep` from the client (0 drops it, e.g. a non-finite update:
  `strategies.faults`) and 0 for padding slots, whose contributions never
  leak into the aggregate. A dropped client's rows are not written back:
  the round leaves them as they were, as if it had not been sampled.

`make_client_round` adds the round's bookkeeping on top: client k's key is
`fold_in(fold_in(state.rng, round), k)` with k its global id (so a client's
training does not depend on its slot, its device or the device count), the
rows are `state.client_states`, and their shapes are checked.

A vmapped convolution over per-client weights is a grouped convolution,
which some backends run slowly (jax issues 13800 and 26568): the modes exist
because neither wins everywhere (see launch/bench.py).
"""

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_diff import federation
from fedjax_diff import state as state_lib
from fedjax_diff.strategies.aggregator import Aggregator

PyTree = Any
MODES = ('vmap', 'map', 'chunked')


def resolve_mode(mode: str, platform: Optional[str] = None) -> str:
  """'auto' → the execution mode that wins on the backend in use.

  On CPU, XLA runs the grouped convolutions that a vmap over per-client
  weights produces far slower than one client at a time (a 10-client MNIST
  round did not finish in 16 minutes with 'vmap', against ~0.12 s per local
  step with 'map'; see launch/bench.py), so 'auto' is 'map' there. On GPU
  and TPU it is 'vmap' (all clients at once).
  """
  if mode == 'auto':
    platform = platform or jax.devices()[0].platform
    return 'map' if platform == 'cpu' else 'vmap'
  if mode not in MODES:
    raise ValueError(f'Unknown execution mode {mode!r}; use one of '
                     f'{MODES + ("auto",)}.')
  return mode


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


def as_varying(tree, axis_name: str = federation.CLIENTS):
  """Marks every leaf of `tree` as varying over `axis_name` (in shard_map).

  A replicated input is invariant over the mesh axis; differentiating
  through it would transpose to a psum that adds up the gradients of
  clients on different devices. pcast changes the type, not the data.
  """
  def cast(x):
    if axis_name in jax.typeof(x).manual_axis_type.varying:
      return x
    return jax.lax.pcast(x, (axis_name,), to='varying')
  return jax.tree.map(cast, tree)


class ClientResult(NamedTuple):
  """What the function of one client returns to the engine.

  Attributes:
    contribution: what the aggregator folds in (e.g. Δ̂_k); None without an
      aggregator.
    rows: the client's rows after the round (same structure as it got).
    outputs: anything else, returned stacked per slot (losses, norms, a
      client's whole model in FedDDPM's phase 1).
    count: the client's example count, which the aggregator may weigh by.
    keep: a factor of the client's weight in [0, 1]; 0 drops the client:
      its weight is 0 and its rows are not written back.
  """
  contribution: PyTree
  rows: dict
  outputs: PyTree
  count: Any = 1
  keep: Any = 1.0


ClientFn = Callable[[PyTree, PyTree, PyTree, dict], ClientResult]


def for_each_client(client_fn: ClientFn, *, mesh: Mesh, mode: str = 'auto',
                    chunk_size: Optional[int] = None,
                    aggregator: Optional[Aggregator] = None):
  """Runs `client_fn` for every client slot, sharded over `mesh`.

  Args:
    client_fn: `(shared, slot_input, data_row, rows) -> ClientResult`, one
      client (no client axis anywhere).
    mesh: a 1-D mesh with axis `clients` (`federation.client_mesh`).
    mode: 'vmap', 'map', 'chunked' or 'auto' (`resolve_mode`).
    chunk_size: clients per chunk for mode='chunked'.
    aggregator: folds the clients' contributions; None: no aggregate.

  Returns:
    `run(shared, slot_inputs, data, rows, local_ids, mask, key) ->
    (aggregate, outputs, weights, rows')` to call inside `jit`: `slot_inputs`,
    `local_ids` (int32, the slot's client's row within its device's block)
    and `mask` (float32, 0 for padding slots) have one entry per slot, a
    multiple of the mesh size laid out by `federation.round_slots`; `data`
    and `rows` are resident `[num_rows, ...]` trees (either may be None or
    `{}`); `key` is the aggregator's (replicated). `weights` are the
    slots' weights in the aggregate.
  """
  mode = resolve_mode(mode, mesh.devices.flat[0].platform)
  clients = federation.CLIENTS

  def device_block(shared, slot_inputs, data, rows, local_ids, mask, key):
    per_device = mask.shape[0]
    c = chunk_size_for(mode, per_device, chunk_size)
    shared = as_varying(shared, clients)
    chunked = jax.tree.map(
        lambda x: x.reshape((per_device // c, c) + x.shape[1:]),
        (slot_inputs, local_ids, mask))

    def one(slot_input, local_id, m):
      data_row = jax.tree.map(lambda x: x[local_id], data)
      row = jax.tree.map(lambda x: x[local_id], rows)
      res = client_fn(shared, slot_input, data_row, row)
      keep = m * jnp.asarray(res.keep, jnp.float32)
      weight = keep
      if aggregator is not None:
        weight = weight * aggregator.weight(res.count)
      return res.contribution, weight, res.rows, (res.outputs, keep)

    vmapped = jax.vmap(one)

    def body(acc, xs):
      contrib, weights, new_rows, outs = vmapped(*xs)
      if aggregator is not None:
        acc = aggregator.accumulate(acc, contrib, weights)
      return acc, (new_rows, outs, weights)

    acc0 = None
    if aggregator is not None:
      shapes = jax.eval_shape(lambda *a: one(*a)[0],
                              *jax.tree.map(lambda x: x[0, 0], chunked))
      acc0 = as_varying(aggregator.init(shapes), clients)
    acc, per_slot = jax.lax.scan(body, acc0, chunked)
    new_rows, (outs, keeps), weights = jax.tree.map(
        lambda x: x.reshape((per_device,) + x.shape[2:]), per_slot)
    # Kept real clients write their rows back; padding slots and dropped
    # clients point past the end.
    num_local = jax.tree.leaves(rows)[0].shape[0] if jax.tree.leaves(
        rows) else 0
    where = jnp.where(keeps > 0, local_ids, num_local)
    rows = jax.tree.map(lambda full, new: full.at[where].set(new, mode='drop'),
                        rows, new_rows)
    aggregate = (aggregator.finalize(acc, clients, key)
                 if aggregator is not None else None)
    return aggregate, outs, weights, rows

  return jax.shard_map(
      device_block, mesh=mesh,
      in_specs=(P(), P(clients), P(clients), P(clients), P(clients),
                P(clients), P()),
      out_specs=(P(), P(clients), P(clients), P(clients)))


def client_keys(rng: jax.Array, round_idx, client_ids: jax.Array):
  """Client k's key in round r: `fold_in(fold_in(rng, r), k)`."""
  round_key = jax.random.fold_in(rng, round_idx)
  return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(client_ids)


# Folded into the run's key to derive the aggregators' stream ('aggr').
AGGREGATOR_KEY_TAG = 0x61676772


def aggregator_key(rng: jax.Array, round_idx) -> jax.Array:
  """The aggregator's key in round r (DP noise): replicated, apart from every
  client's stream."""
  return jax.random.fold_in(jax.random.fold_in(rng, AGGREGATOR_KEY_TAG),
                            round_idx)


def check_rows(rows: PyTree, want_one: PyTree, num_rows: int) -> None:
  """Raises a ValueError unless `rows` are `want_one`'s shapes with a
  leading axis of `num_rows` (checked at trace time)."""
  how = ('Build them with fedjax_diff.state.init_client_states(...) from '
         'the algorithm (algorithm.client_rows).')
  if jax.tree.structure(rows) != jax.tree.structure(want_one):
    raise ValueError(
        'state.client_states does not match what the round keeps per client: '
        f'got the tree {jax.tree.structure(rows)}, expected '
        f'{jax.tree.structure(want_one)} (a kept client optimizer state, '
        f'upload state or algorithm rows). {how}')
  for got, one in zip(jax.tree.leaves(rows), jax.tree.leaves(want_one)):
    if tuple(got.shape) != (num_rows,) + tuple(one.shape):
      raise ValueError(
          f'state.client_states has a leaf of shape {tuple(got.shape)}; '
          f'expected {(num_rows,) + tuple(one.shape)}: one row per client '
          f'of the data ({num_rows}, padding included). {how}')


def make_client_round(client_fn: ClientFn, *, mesh: Mesh, mode: str = 'auto',
                      chunk_size: Optional[int] = None,
                      aggregator: Optional[Aggregator] = None,
                      row_shapes: Optional[PyTree] = None):
  """`for_each_client` with a round's bookkeeping, for algorithms' rounds.

  Args:
    client_fn: `(shared, (key, slot_input), data_row, rows) ->
      ClientResult`; `key` is the client's key of the round (see the module
      docstring) and `data_row` its `federation.ClientData` row.
    mesh, mode, chunk_size, aggregator: as for `for_each_client`.
    row_shapes: the shapes of one client's rows (`jax.eval_shape` of the
      algorithm's `client_rows`), checked against `state.client_states`.

  Returns:
    `run(state, data, client_ids, client_mask, shared, slot_inputs=None,
    key=None) -> (aggregate, outputs, client_states)` to call inside the
    round's `jit`, with `client_ids`/`client_mask` from
    `federation.round_slots`; `outputs` (a dict) gains `'weight'`, each
    slot's weight in the aggregate, and `'mask'`, `client_mask`.
  """
  run_clients = for_each_client(client_fn, mesh=mesh, mode=mode,
                                chunk_size=chunk_size, aggregator=aggregator)
  rows_sharding = state_lib.client_rows_sharding(mesh)

  def run(state, data: federation.ClientData, client_ids, client_mask,
          shared, slot_inputs=None, key=None):
    if client_ids.shape[0] % mesh.size:
      raise ValueError(
          f'{client_ids.shape[0]} client slots do not split over {mesh.size} '
          'devices; lay them out with federation.round_slots.')
    if data.num_clients % mesh.size:
      raise ValueError(
          f'{data.num_clients} client rows do not split over {mesh.size} '
          'devices; pad them with federation.shard_client_data.')
    if row_shapes is not None:
      check_rows(state.client_states, row_shapes, data.num_clients)
    keys = client_keys(state.rng, state.round, client_ids)
    local_ids = client_ids % (data.num_clients // mesh.size)
    if key is None:
      key = aggregator_key(state.rng, state.round)
    aggregate, outputs, weights, rows = run_clients(
        shared, (keys, slot_inputs), data, state.client_states, local_ids,
        client_mask, key)
    rows = jax.lax.with_sharding_constraint(rows, rows_sharding)
    return aggregate, {**outputs, 'weight': weights, 'mask': client_mask}, rows

  return run


def client_metrics(outputs: dict) -> dict:
  """A round's client figures from `outputs` of `client.ClientUpdate`
  fields: `loss` (weighted mean over the clients kept; NaN when none was),
  `clients_dropped` (real clients given weight 0) and per slot
  `client_losses`, `client_weights` (0: padding or dropped),
  `client_mask` (0: padding), `client_update_norms`,
  `client_upload_errors`, `client_nonfinite` (1: dropped for a non-finite
  upload or loss) and, with fault injection, `client_faults`
  (`strategies.faults` kinds)."""
  w = outputs['weight']
  total = w.sum()
  losses = outputs['loss']
  out = {
      'loss': jnp.where(total > 0, jnp.sum(jnp.where(w > 0, losses, 0) * w) /
                        jnp.maximum(total, 1e-30), jnp.nan),
      'clients_dropped': jnp.sum((outputs['mask'] > 0) & (w == 0)),
      'client_losses': losses,
      'client_weights': w,
      'client_mask': outputs['mask'],
      'client_update_norms': outputs['norm'],
      'client_upload_errors': outputs['upload_error'],
      'client_nonfinite': outputs['nonfinite'],
  }
  if 'fault' in outputs:
    out['client_faults'] = outputs['fault']
  return out


def num_slots(clients_per_round: int, mesh: Mesh) -> int:
  """Client slots per round when clients are placed evenly: at least
  `clients_per_round`, a multiple of the mesh size."""
  return math.ceil(clients_per_round / mesh.size) * mesh.size
