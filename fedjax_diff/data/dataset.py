"""The in-memory image dataset type shared by all loaders and partitioners."""

import dataclasses
from typing import Optional

import numpy as np

# Split names understood by the embedded (no-download) datasets.
SPLITS = ('train', 'test', 'all')


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset has not been downloaded and prepared in its data_dir."""


class UnknownDatasetError(ValueError):
  """No embedded dataset and no TFDS dataset has the requested name."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A labelled image dataset held in host memory.

  Equality is identity (`eq=False`): comparing arrays element-wise has no
  single truth value, and datasets are not meant to be compared or hashed by
  content.

  Attributes:
    images: uint8 array [N, H, W, C] with values in 0..255.
    labels: int32 array [N] with values in [0, num_classes). Unlabelled
      datasets (CelebA, LSUN) use all zeros and `num_classes == 1`.
    num_classes: number of label classes.
    name: dataset name, e.g. 'digits' or 'cifar10'.
    attributes: optional per-example side information, each array [N] (for
      CelebA the 40 boolean face attributes, keyed by attribute name).
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  attributes: Optional[dict[str, np.ndarray]] = None

  def __post_init__(self):
    prefix = f'Dataset {self.name!r}'
    if not isinstance(self.name, str):
      raise TypeError(f'Dataset name must be a str, got {type(self.name)}.')
    if not isinstance(self.images, np.ndarray):
      raise TypeError(f'{prefix}: images must be a numpy array, got '
                      f'{type(self.images).__name__}.')
    if self.images.dtype != np.uint8:
      raise TypeError(f'{prefix}: images must have dtype uint8, got '
                      f'{self.images.dtype}.')
    if self.images.ndim != 4:
      raise ValueError(f'{prefix}: images must have shape [N, H, W, C], got '
                       f'shape {self.images.shape}.')
    if not isinstance(self.labels, np.ndarray):
      raise TypeError(f'{prefix}: labels must be a numpy array, got '
                      f'{type(self.labels).__name__}.')
    if self.labels.dtype != np.int32:
      raise TypeError(f'{prefix}: labels must have dtype int32, got '
                      f'{self.labels.dtype}.')
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(f'{prefix}: labels must have shape [N] = '
                       f'[{self.images.shape[0]}], got {self.labels.shape}.')
    if (isinstance(self.num_classes, bool) or
        not isinstance(self.num_classes, (int, np.integer)) or
        self.num_classes < 1):
      raise ValueError(f'{prefix}: num_classes must be a positive int, got '
                       f'{self.num_classes!r}.')
    if self.labels.size:
      lo, hi = int(self.labels.min()), int(self.labels.max())
      if lo < 0 or hi >= self.num_classes:
        raise ValueError(f'{prefix}: labels must lie in [0, '
                         f'{self.num_classes}), got range [{lo}, {hi}].')
    if self.attributes is not None:
      if not isinstance(self.attributes, dict):
        raise TypeError(f'{prefix}: attributes must be a dict of arrays or '
                        f'None, got {type(self.attributes).__name__}.')
      for key, value in self.attributes.items():
        if not isinstance(value, np.ndarray):
          raise TypeError(f'{prefix}: attribute {key!r} must be a numpy '
                          f'array, got {type(value).__name__}.')
        if value.shape != self.labels.shape:
          raise ValueError(f'{prefix}: attribute {key!r} must have shape [N] '
                           f'= {self.labels.shape}, got {value.shape}.')

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """The [H, W, C] shape of one image."""
    return tuple(self.images.shape[1:])

  def subset(self, indices) -> 'Dataset':
    """Returns the examples at `indices` (integer indices or a boolean mask).

    Args:
      indices: 1-D integer array of example indices (order kept, repeats
        allowed) or a boolean mask of length N.

    Returns:
      A new `Dataset` with the same name and number of classes.
    """
    indices = np.asarray(indices)
    if indices.dtype == bool:
      if indices.shape != (len(self),):
        raise ValueError(f'A boolean mask must have shape ({len(self)},), '
                         f'got {indices.shape}.')
      indices = np.flatnonzero(indices)
    elif indices.size == 0:
      indices = indices.astype(np.int64)
    elif not np.issubdtype(indices.dtype, np.integer):
      raise TypeError(f'indices must be integers or a boolean mask, got '
                      f'dtype {indices.dtype}.')
    if indices.ndim != 1:
      raise ValueError(f'indices must be 1-D, got shape {indices.shape}.')
    if indices.size and (indices.min() < -len(self) or
                         indices.max() >= len(self)):
      raise IndexError(f'indices out of range for a dataset of {len(self)} '
                       'examples.')
    attributes = None
    if self.attributes is not None:
      attributes = {k: v[indices] for k, v in self.attributes.items()}
    return Dataset(images=self.images[indices], labels=self.labels[indices],
                   num_classes=self.num_classes, name=self.name,
                   attributes=attributes)


def split_indices(labels: np.ndarray, split: str, *, seed: int,
                  test_fraction: float) -> np.ndarray:
  """Indices of a deterministic stratified train/test split.

  Each class's indices are permuted with `np.random.default_rng(seed)` and
  the first `round(n_class * test_fraction)` go to 'test', the rest to
  'train'. The same seed always gives the same split, and the two splits are
  disjoint and together cover every example.

  Args:
    labels: int array [N].
    split: 'train', 'test' or 'all'.
    seed: seed of the permutation.
    test_fraction: fraction of each class held out for 'test', in (0, 1).

  Returns:
    Sorted int64 indices of the split.
  """
  labels = np.asarray(labels)
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')
  if split == 'all':
    return np.arange(labels.shape[0], dtype=np.int64)
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  rng = np.random.default_rng(seed)
  is_test = np.zeros(labels.shape[0], dtype=bool)
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    is_test[members[:int(round(members.size * test_fraction))]] = True
  chosen = is_test if split == 'test' else ~is_test
  return np.flatnonzero(chosen).astype(np.int64)
