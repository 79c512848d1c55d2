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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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
    images: uint8 [num_clients, max_examples, H, W, C], zero beyond `counts`.
    labels: int32 [num_clients, max_examples], zero beyond `counts`.
    counts: int32 [num_clients], examples held by each client (0 = padding).
  """
  images: jax.Array
  labels: jax.Array
  counts: jax.Array

  @property
  def num_clients(self) -> int:
    return self.counts.shape[0]


def stack_clients(images: np.ndarray, labels: np.ndarray,
                  parts: Sequence[np.ndarray],
                  num_slots: Optional[int] = None) -> ClientData:
  """Stacks a partition into padded numpy arrays `[clients, max_n, ...]`.

  Args:
    images: uint8 [N, H, W, C] examples of the whole dataset.
    labels: int [N].
    parts: one index array per client (from `fedjax_diff.data.partition`).
    num_slots: total client rows; rows beyond `len(parts)` are empty padding
      clients (count 0). Defaults to `len(parts)`.

  Returns:
    A `ClientData` of numpy arrays.
  """
  num_slots = len(parts) if num_slots is None else num_slots
  if num_slots < len(parts):
    raise ValueError(f'num_slots={num_slots} < number of clients {len(parts)}.')
  empty = [i for i, p in enumerate(parts) if len(p) == 0]
  if empty:
    raise ValueError(f'Clients {empty} hold no examples; use a partition with '
                     'min_size >= 1 or fewer clients.')
  counts = np.array([len(p) for p in parts] + [0] * (num_slots - len(parts)),
                    np.int32)
  max_n = int(counts.max(initial=1))
  out_images = np.zeros((num_slots, max_n) + images.shape[1:], np.uint8)
  out_labels = np.zeros((num_slots, max_n), np.int32)
  for i, idx in enumerate(parts):
    out_images[i, :len(idx)] = images[idx]
    out_labels[i, :len(idx)] = labels[idx]
  return ClientData(images=out_images, labels=out_labels, counts=counts)


def shard_client_data(data: ClientData, mesh: Mesh) -> ClientData:
  """Pads the client axis to a multiple of the mesh size and shards it."""
  n = mesh.size
  slots = math.ceil(data.num_clients / n) * n
  pad = slots - data.num_clients

  def pad_and_put(x):
    x = np.asarray(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return jax.device_put(x, client_sharding(mesh))

  return jax.tree.map(pad_and_put, data)


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
