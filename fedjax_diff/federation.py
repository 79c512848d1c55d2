"""Clients on a leading axis: stacking, padding, sampling and the client mesh.

Every per-client pytree in fedjax_diff has the clients on axis 0, and that axis
is sharded over the 1-D device mesh axis `clients` (as in google/drjax's
placements). A round works on a fixed number of client *slots*, a multiple of
the device count; slots beyond the sampled clients are padding and weigh 0.
"""

import math
from typing import Optional, Sequence

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fedjax_diff import runtime

CLIENTS = 'clients'


def client_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis `clients` over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (CLIENTS,), devices=devices,
                       axis_types=(AxisType.Auto,))


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a per-client array: axis 0 split over `clients`."""
  return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Places a pytree (e.g. the server state) on every device of `mesh`.

  Do this once before the first round: the round returns its state with this
  sharding, and an input placed the same way is not compiled for again.
  """
  return jax.device_put(tree, replicated(mesh))


@flax.struct.dataclass
class ClientData:
  """The whole federation's training data, stacked on a leading client axis.

  Attributes:
    images: [num_clients, max_examples, H, W, C], zero beyond `counts`:
      uint8 pixels, or float32 latents (latent diffusion,
      `fedjax_diff.latent`).
    labels: int32 [num_clients, max_examples], zero beyond `counts`.
    counts: int32 [num_clients], examples held by each client (0 = padding).
  """
  images: jax.Array
  labels: jax.Array
  counts: jax.Array

  @property
  def num_clients(self) -> int:
    return self.counts.shape[0]


def _client_counts(parts: Sequence[np.ndarray], num_slots: int) -> np.ndarray:
  """int32 [num_slots]: each client's example count, 0 for padding rows."""
  if num_slots < len(parts):
    raise ValueError(f'num_slots={num_slots} < number of clients {len(parts)}.')
  empty = [i for i, p in enumerate(parts) if len(p) == 0]
  if empty:
    raise ValueError(f'Clients {empty} hold no examples; use a partition with '
                     'min_size >= 1 or fewer clients.')
  return np.array([len(p) for p in parts] + [0] * (num_slots - len(parts)),
                  np.int32)


def _gather_rows(source: np.ndarray, parts: Sequence[np.ndarray],
                 start: int, stop: int, max_n: int, dtype) -> np.ndarray:
  """Client rows [start, stop) of `source` stacked and zero-padded:
  [stop - start, max_n, ...]. Each client's examples are gathered straight
  into the output (`np.take(..., out=)`), with no intermediate copy."""
  out = np.zeros((stop - start, max_n) + source.shape[1:], dtype)
  for i in range(start, min(stop, len(parts))):
    idx = np.asarray(parts[i])
    np.take(source, idx, axis=0, out=out[i - start, :len(idx)])
  return out


def _put_blocks(shape, sharding: NamedSharding, block) -> jax.Array:
  """A global array of `shape` whose shard at `index` is `block(index)`,
  made and put on its device one device at a time (so the host never holds
  more than one block that is not yet on a device), for this process's
  devices only."""
  arrays = [jax.device_put(block(index), device) for device, index in
            sharding.addressable_devices_indices_map(shape).items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def stack_clients(images: np.ndarray, labels: np.ndarray,
                  parts: Sequence[np.ndarray],
                  num_slots: Optional[int] = None) -> ClientData:
  """Stacks a partition into padded numpy arrays `[clients, max_n, ...]`.

  Args:
    images: [N, H, W, C] examples of the whole dataset (uint8 pixels or
      float32 latents; the dtype is kept).
    labels: int [N].
    parts: one index array per client (from `fedjax_diff.data.partition`).
    num_slots: total client rows; rows beyond `len(parts)` are empty padding
      clients (count 0). Defaults to `len(parts)`.

  Returns:
    A `ClientData` of numpy arrays.
  """
  num_slots = len(parts) if num_slots is None else num_slots
  counts = _client_counts(parts, num_slots)
  max_n = int(counts.max(initial=1))
  return ClientData(
      images=_gather_rows(images, parts, 0, num_slots, max_n,
                          images.dtype),
      labels=_gather_rows(np.asarray(labels, np.int32), parts, 0, num_slots,
                          max_n, np.int32),
      counts=counts)


def shard_client_data(data: ClientData, mesh: Mesh) -> ClientData:
  """Pads the client axis to a multiple of the mesh size and shards it.

  Each device's block is put on its device from a view of `data` (the
  padding rows are zeros made per block), so the stacked arrays are not
  copied whole on the host."""
  n = mesh.size
  slots = math.ceil(data.num_clients / n) * n
  sharding = client_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    shape = (slots,) + x.shape[1:]

    def block(index):
      rows = index[0]
      start, stop = rows.start or 0, slots if rows.stop is None else rows.stop
      if stop <= x.shape[0]:
        return x[start:stop]
      out = np.zeros((stop - start,) + x.shape[1:], x.dtype)
      out[:max(0, x.shape[0] - start)] = x[start:]
      return out

    return _put_blocks(shape, sharding, block)

  return jax.tree.map(put, data)


def place_clients(images: np.ndarray, labels: np.ndarray,
                  parts: Sequence[np.ndarray], mesh: Mesh) -> ClientData:
  """The partition stacked and sharded over `mesh`, as
  `shard_client_data(stack_clients(...), mesh)` gives, built per device.

  Each process stacks only the client rows its own devices hold (on a
  multi-host mesh, a host never builds another host's clients), one
  device's block at a time: the host holds the split plus one block beyond
  what is on the devices.

  Args:
    images: [N, H, W, C] examples of the whole dataset (uint8 pixels or
      float32 latents; the dtype is kept).
    labels: int [N].
    parts: one index array per client.
    mesh: the client mesh; rows are padded to a multiple of its size.

  Returns:
    A `ClientData` of global arrays sharded over the clients axis.
  """
  n = mesh.size
  num_rows = math.ceil(len(parts) / n) * n
  counts = _client_counts(parts, num_rows)
  max_n = int(counts.max(initial=1))
  sharding = client_sharding(mesh)
  image_shape = (num_rows, max_n) + tuple(images.shape[1:])

  def rows(index):
    r = index[0]
    return r.start or 0, num_rows if r.stop is None else r.stop

  labels = np.asarray(labels, np.int32)
  out_images = _put_blocks(image_shape, sharding, lambda index: _gather_rows(
      images, parts, *rows(index), max_n, images.dtype))
  out_labels = _put_blocks((num_rows, max_n), sharding, lambda index: (
      _gather_rows(labels, parts, *rows(index), max_n, np.int32)))
  out_counts = _put_blocks((num_rows,), sharding,
                           lambda index: counts[index])
  return ClientData(images=out_images, labels=out_labels, counts=out_counts)


def to_host(tree):
  """numpy values of a pytree of arrays, as every process sees them.

  An array sharded over devices of several processes (per-client metrics
  on a multi-host mesh) is gathered from all of them
  (`multihost_utils.process_allgather`): a collective, so every process
  must call this at the same point. Other arrays are read locally.
  """
  def spans_processes(x):
    return (isinstance(x, jax.Array) and not x.is_fully_addressable and
            not x.is_fully_replicated)

  if any(spans_processes(x) for x in jax.tree.leaves(tree)):
    runtime.barrier('to_host')  # all processes at the gather (see barrier).
  return jax.tree.map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
      if spans_processes(x) else np.asarray(x), tree)


def sample_clients(num_clients: int, clients_per_round: int, seed: int,
                   round_idx: int) -> np.ndarray:
  """Clients taking part in round `round_idx`, without replacement.

  Deterministic from `(seed, round_idx)` alone, so a resumed run samples the
  same clients as an uninterrupted one.
  """
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f'clients_per_round={clients_per_round} must be in '
                     f'[1, num_clients={num_clients}].')
  if clients_per_round == num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_idx])
  ids = rng.choice(num_clients, clients_per_round, replace=False)
  return np.sort(ids).astype(np.int32)


# Mixed into the seed of Poisson sampling ('pois'), apart from
# `sample_clients`' stream.
POISSON_TAG = 0x706F6973


def poisson_sample_clients(num_clients: int, rate: float, seed: int,
                           round_idx: int) -> np.ndarray:
  """Poisson sampling: each client takes part in round `round_idx`
  independently with probability `rate` (DP-FedAvg, arXiv 1710.06963).

  Client k is in when u_k < rate, with u = `default_rng([seed, POISSON_TAG,
  round_idx]).random(num_clients)`: deterministic from (seed, round), so a
  resumed run samples the same clients. The cohort's size is
  Binomial(num_clients, rate) and may be 0. Returns the sorted int32 ids.
  """
  if not 0 < rate <= 1:
    raise ValueError(f'Poisson sampling rate must be in (0, 1], got {rate}.')
  rng = np.random.default_rng([seed, POISSON_TAG, round_idx])
  return np.flatnonzero(rng.random(num_clients) < rate).astype(np.int32)


def rows_per_device(num_rows: int, num_devices: int) -> int:
  """Client rows each device holds: the rows are split over the mesh in
  contiguous blocks (`shard_client_data` pads them to a multiple)."""
  if num_rows % num_devices:
    raise ValueError(f'{num_rows} client rows do not split over {num_devices} '
                     'devices; pad them with federation.shard_client_data.')
  return num_rows // num_devices


def device_counts(client_ids: np.ndarray, num_rows: int,
                  num_devices: int) -> np.ndarray:
  """How many of `client_ids` live on each device ([num_devices])."""
  per = rows_per_device(num_rows, num_devices)
  return np.bincount(np.asarray(client_ids) // per, minlength=num_devices)


def round_slots(client_ids: np.ndarray, num_devices: int, num_rows: int,
                slots_per_device: Optional[int] = None):
  """Lays a round's clients out in slots, each on the device holding its data.

  Device d holds rows [d·R, (d+1)·R) of the client data (R = num_rows /
  num_devices), and its block of `slots_per_device` slots takes the round's
  clients among them, in increasing id order, then padding slots (mask 0,
  pointing at the device's first row). So a client trains where its images
  are: no image crosses devices.

  Args:
    client_ids: the round's distinct global client ids.
    num_devices: the mesh size.
    num_rows: `ClientData.num_clients` of the sharded data (padding
      included).
    slots_per_device: S; default min(len(client_ids), R), the most any
      device can need, so that every round of a run has the same slots (one
      compilation). A smaller S (e.g. `max_slots_per_device` over the run's
      rounds) saves padding work.

  Returns:
    (ids, mask): int32 ids `[num_devices · S]` and a float32 mask, 1 for
    real clients.
  """
  client_ids = np.sort(np.asarray(client_ids, np.int64))
  per = rows_per_device(num_rows, num_devices)
  if len(np.unique(client_ids)) != len(client_ids):
    raise ValueError(f'A round\'s clients must be distinct; got {client_ids}.')
  if len(client_ids) and not 0 <= client_ids[0] <= client_ids[-1] < num_rows:
    raise ValueError(f'Client ids must be in [0, {num_rows}); got '
                     f'{client_ids}.')
  if slots_per_device is None:
    slots_per_device = min(len(client_ids), per)
  counts = device_counts(client_ids, num_rows, num_devices)
  if counts.max(initial=0) > slots_per_device:
    raise ValueError(
        f'Device {int(counts.argmax())} holds {int(counts.max())} of the '
        f"round's clients but has only {slots_per_device} slots; raise "
        'slots_per_device (see federation.max_slots_per_device).')
  slots_per_device = max(int(slots_per_device), 1)
  ids = np.repeat(np.arange(num_devices) * per, slots_per_device).reshape(
      num_devices, slots_per_device)
  mask = np.zeros((num_devices, slots_per_device), np.float32)
  for d in range(num_devices):
    mine = client_ids[client_ids // per == d]
    ids[d, :len(mine)] = mine
    mask[d, :len(mine)] = 1.0
  return ids.reshape(-1).astype(np.int32), mask.reshape(-1)


def max_slots_per_device(rounds_client_ids, num_rows: int,
                         num_devices: int) -> int:
  """The most clients any device holds in any of the given rounds: the
  smallest `slots_per_device` that fits them all."""
  return max([int(device_counts(ids, num_rows, num_devices).max(initial=0))
              for ids in rounds_client_ids] + [1])
