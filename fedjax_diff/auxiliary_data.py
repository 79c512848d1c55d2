"""FedDDPM's auxiliary dataset, sampled by the server from the clients' models.

After phase 1 (`algorithms.fedddpm.make_phase1`) the server holds every client's
model θ_k and draws an auxiliary dataset from them (FedDDPM,
arXiv 2503.06426):

* class-conditional models (class-balanced): each class c gets `per_class`
  samples, split over the clients that hold c in proportion to how many
  examples of c they hold, n_{k,c} / Σ_j n_{j,c} (largest remainder). Client
  k's model draws x ~ p_θk(x | c) with classifier-free guidance (Ho &
  Salimans 2022, arXiv 2207.12598); the samples keep their label c. A class
  that no client holds cannot be generated and gets none (`allocate` says so);
* unconditional models: `total` samples split over clients in proportion to
  their data sizes n_k / Σ_j n_j; the samples have no labels (−1).

Sampling is DDIM (Song et al. 2021, arXiv 2010.02502) with a configurable
number of steps, η and guidance scale. It is one jitted program on the client engine
(`fedjax_diff.engine`), like a round: the stacked client models are sharded
over the mesh axis `clients`, each device runs its clients one after another
('map', CPU) or together ('vmap'), and each client draws its samples in
batches of `batch_size` under `lax.map`. Every client draws the same number
M of samples (the largest allocation, rounded up to the batch); the draws
beyond a client's allocation are dropped.

Images are stored as uint8 like the real data (the server trains on them the
same way), with their labels and the id of the client whose model drew them.
"""

import dataclasses
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedjax_diff import engine
from fedjax_diff.diffusion import sample as sample_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AuxiliaryData:
  """The auxiliary dataset.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N]; −1 when the models are unconditional.
    sources: int32 [N], the client whose model drew each image.
  """
  images: np.ndarray
  labels: np.ndarray
  sources: np.ndarray

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def take(self, idx: np.ndarray) -> 'AuxiliaryData':
    return AuxiliaryData(self.images[idx], self.labels[idx],
                         self.sources[idx])

  def save(self, path: str) -> None:
    """Writes an .npz atomically (a crash never leaves half a file)."""
    tmp = path + '.tmp.npz'
    np.savez(tmp, images=self.images, labels=self.labels,
             sources=self.sources)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> 'AuxiliaryData':
    with np.load(path) as f:
      return cls(images=f['images'], labels=f['labels'], sources=f['sources'])


def client_label_counts(labels: np.ndarray, counts: np.ndarray,
                        num_classes: int) -> np.ndarray:
  """Examples per client and class, `[K, C]`, from stacked client data."""
  labels = np.asarray(labels)
  counts = np.asarray(counts)
  out = np.zeros((labels.shape[0], num_classes), np.int64)
  for k in range(labels.shape[0]):
    out[k] = np.bincount(labels[k, :counts[k]], minlength=num_classes)[
        :num_classes]
  return out


def split_proportional(total: int, weights: np.ndarray) -> np.ndarray:
  """Integers summing to `total`, proportional to `weights` (largest
  remainder method; ties go to the lower index)."""
  weights = np.asarray(weights, np.float64)
  if total < 0 or np.any(weights < 0):
    raise ValueError(f'split_proportional needs total >= 0 and weights >= 0; '
                     f'got total={total}, weights={weights}.')
  if weights.sum() <= 0:
    if total:
      raise ValueError(f'Cannot split {total} samples over zero weights.')
    return np.zeros(weights.shape, np.int64)
  exact = total * weights / weights.sum()
  out = np.floor(exact).astype(np.int64)
  rest = total - int(out.sum())
  order = np.argsort(-(exact - out), kind='stable')
  out[order[:rest]] += 1
  return out


def allocate(label_counts: np.ndarray, *, conditional: bool,
             per_class: int = 0, total: int = 0) -> list[np.ndarray]:
  """The labels each client's model is to draw.

  Args:
    label_counts: `[K, C]` examples per client and class
      (`client_label_counts`); rows of zeros are padding clients.
    conditional: class-balanced allocation (labels) or by data size (−1).
    per_class: samples per class, when conditional.
    total: samples in all, when unconditional.

  Returns:
    K int32 arrays of labels (−1: unconditional), one per client.

  Raises:
    ValueError: no sample would be drawn, or the size is not given.
  """
  label_counts = np.asarray(label_counts, np.int64)
  k, c = label_counts.shape
  if conditional:
    if per_class < 1:
      raise ValueError('A class-conditional auxiliary set needs per_class '
                       f'>= 1 (config.fedddpm.aux_per_class); got {per_class}.')
    per_client = [[] for _ in range(k)]
    for cls in range(c):
      split = split_proportional(per_class, label_counts[:, cls]) if (
          label_counts[:, cls].sum()) else np.zeros(k, np.int64)
      for i in range(k):
        per_client[i].extend([cls] * int(split[i]))
    out = [np.asarray(p, np.int32) for p in per_client]
  else:
    if total < 1:
      raise ValueError('An unconditional auxiliary set needs total >= 1 '
                       f'(config.fedddpm.aux_size); got {total}.')
    split = split_proportional(total, label_counts.sum(axis=1))
    out = [np.full(int(n), -1, np.int32) for n in split]
  if not sum(len(o) for o in out):
    raise ValueError('The auxiliary set would be empty: no client holds '
                     'any example.')
  return out


def plan(allocation: list[np.ndarray], batch_size: int
         ) -> tuple[np.ndarray, np.ndarray]:
  """Pads per-client label lists to one `[K, M]` array and a validity mask,
  M the largest allocation rounded up to a multiple of `batch_size`."""
  m = max(len(a) for a in allocation)
  m = max(batch_size, math.ceil(m / batch_size) * batch_size)
  labels = np.zeros((len(allocation), m), np.int32)
  mask = np.zeros((len(allocation), m), bool)
  for i, a in enumerate(allocation):
    labels[i, :len(a)] = np.maximum(a, 0)
    mask[i, :len(a)] = True
  return labels, mask


def make_sampler(*, eps_fn, schedule, mesh: Mesh,
                 image_shape: tuple[int, ...], batch_size: int,
                 num_steps: int, eta: float = 0.0,
                 num_classes: Optional[int] = None,
                 guidance_scale: float = 1.0, mode: str = 'auto'):
  """Builds the jitted sampler over stacked client models (on the engine).

  Args:
    eps_fn, schedule: the model's noise predictor and schedule.
    mesh: the client mesh.
    image_shape: (H, W, C).
    batch_size: samples per batched DDIM call.
    num_steps, eta: DDIM steps and η.
    num_classes: C of a class-conditional model (null label = C), or None.
    guidance_scale: classifier-free guidance w (1.0: plain conditional).
    mode: 'map', 'vmap' or 'auto' (as for a round; 'chunked' → 'map').

  Returns:
    `draw(client_params, labels, rng) -> float32 [K, M, H, W, C]`, with
    `client_params` stacked `[K, ...]` and sharded like the clients and
    `labels` int32 `[K, M]` (`plan`), M a multiple of `batch_size`. Client
    k's draws use `fold_in(rng, k)`, batch b of them `fold_in(·, b)`.
  """
  mode = engine.resolve_mode(mode, mesh.devices.flat[0].platform)
  mode = 'map' if mode == 'chunked' else mode
  conditional = num_classes is not None
  guidance = None if (not conditional or guidance_scale == 1.0) else float(
      guidance_scale)
  shape = (batch_size,) + tuple(image_shape)

  def one_client(shared, slot, data_row, rows):
    del shared, data_row
    params, labels, key = slot
    batches = labels.reshape(-1, batch_size)

    def one_batch(xs):
      b, lbl = xs
      return sample_lib(eps_fn, params, schedule, jax.random.fold_in(key, b),
                        shape, method='ddim', num_steps=num_steps, eta=eta,
                        labels=lbl if conditional else None,
                        guidance_scale=guidance,
                        null_label=num_classes if conditional else None)

    out = jax.lax.map(one_batch, (jnp.arange(batches.shape[0]), batches))
    return engine.ClientResult(None, rows,
                               out.reshape((-1,) + tuple(image_shape)))

  run = engine.for_each_client(one_client, mesh=mesh, mode=mode)

  def draw(client_params, labels, rng):
    if labels.shape[1] % batch_size:
      raise ValueError(f'{labels.shape[1]} samples per client are not a '
                       f'multiple of the sampling batch {batch_size}.')
    k = labels.shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))
    ones = jnp.ones((k,), jnp.float32)
    _, images, _, _ = run(None, (client_params, labels, keys), None, {},
                       jnp.zeros((k,), jnp.int32), ones, rng)
    return images

  return jax.jit(draw)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[−1, 1] floats → uint8 pixels (the inverse of `client.to_float_images`
  up to rounding)."""
  return np.clip(np.rint((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def sample_auxiliary(draw, client_params, allocation: list[np.ndarray],
                     batch_size: int, rng: jax.Array) -> AuxiliaryData:
  """Draws the auxiliary set: `draw` from `make_sampler`, `allocation` from
  `allocate` (one entry per row of `client_params`)."""
  labels, mask = plan(allocation, batch_size)
  images = np.asarray(draw(client_params, jnp.asarray(labels), rng))
  keep = mask.reshape(-1)
  uncond = all(bool(np.all(a < 0)) for a in allocation)
  flat_labels = labels.reshape(-1)[keep]
  return AuxiliaryData(
      images=to_uint8(images.reshape((-1,) + images.shape[2:])[keep]),
      labels=(np.full_like(flat_labels, -1) if uncond else flat_labels),
      sources=np.repeat(np.arange(labels.shape[0], dtype=np.int32),
                        labels.shape[1])[keep])


def split_heldout(aux: AuxiliaryData, fraction: float, seed: int
                  ) -> tuple[AuxiliaryData, AuxiliaryData]:
  """(train, held-out) parts of the auxiliary set, by a seeded permutation
  (stratified by label, so both parts stay class-balanced)."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'The held-out fraction must be in [0, 1); got '
                     f'{fraction}.')
  rng = np.random.default_rng(seed)
  held, train = [], []
  for lbl in np.unique(aux.labels):
    idx = np.flatnonzero(aux.labels == lbl)
    idx = idx[rng.permutation(len(idx))]
    n = int(round(fraction * len(idx)))
    held.append(idx[:n])
    train.append(idx[n:])
  return (aux.take(np.sort(np.concatenate(train))),
          aux.take(np.sort(np.concatenate(held))))
