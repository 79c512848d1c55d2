"""Datasets and their federated partitions.

`load_dataset(name, split)` returns an in-memory `Dataset`. A name resolves
without a central registry: if a module `fedjax_diff.data.<name>` defines
`load`, it is an embedded dataset that needs no download ('digits',
'mnist5k'); any other name is read from TensorFlow Datasets by
`fedjax_diff.data.tfds_source`, which must find it already prepared.
"""

import dataclasses
import importlib
import importlib.util
import pkgutil
import types
from typing import Optional

from fedjax_diff.data.dataset import Dataset
from fedjax_diff.data.dataset import DatasetNotPreparedError
from fedjax_diff.data.dataset import UnknownDatasetError
from fedjax_diff.data.histogram import format_histogram
from fedjax_diff.data.histogram import label_histogram
from fedjax_diff.data.histogram import plot_histogram
from fedjax_diff.data.partition import dirichlet
from fedjax_diff.data.partition import iid
from fedjax_diff.data.partition import make_partition
from fedjax_diff.data.partition import partition_from_config
from fedjax_diff.data.partition import PARTITIONERS
from fedjax_diff.data.partition import quantity_skew
from fedjax_diff.data.partition import shards

# Modules of this package that define `load` but are not one dataset.
_NOT_DATASETS = frozenset({'tfds_source'})


def _embedded_module(name: str) -> Optional[types.ModuleType]:
  """The module `fedjax_diff.data.<name>` if it defines `load`, else None."""
  if (not name.isidentifier() or name.startswith('_') or
      name in _NOT_DATASETS):
    return None
  full_name = f'{__name__}.{name}'
  if importlib.util.find_spec(full_name) is None:
    return None
  module = importlib.import_module(full_name)
  return module if callable(getattr(module, 'load', None)) else None


def embedded_datasets() -> list[str]:
  """Names of the datasets shipped inside the package (no download)."""
  return sorted(info.name for info in pkgutil.iter_modules(__path__)
                if _embedded_module(info.name) is not None)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data`, parsed and checked.

  Attributes:
    name: an embedded dataset or a TFDS name.
    data_dir: TFDS data directory (None: TFDS's default).
    image_size: resize TFDS images to this size (None: native); embedded
      datasets have one size.
    random_flip: random horizontal flips of local batches.
    test_split: the split evaluators test on.
    attribute_labels: relabel by these binary attributes (CelebA), or ().
  """
  name: str
  data_dir: Optional[str] = None
  image_size: Optional[int] = None
  random_flip: bool = False
  test_split: str = 'test'
  attribute_labels: tuple[str, ...] = ()

  @property
  def load_kwargs(self) -> dict:
    """Keyword arguments of `load_dataset` beyond name, split, data_dir."""
    return {'image_size': self.image_size} if self.image_size else {}


def config_from(cfg) -> DataConfig:
  """Parses `config.data` (without loading anything).

  Raises:
    ValueError: a field of the wrong type or out of range, or an
      image_size on an embedded dataset (whose images have one size).
  """
  if cfg is None or not cfg.get('name'):
    raise ValueError('config.data.name is missing: name a dataset '
                     f'(embedded: {", ".join(embedded_datasets())}; or a '
                     'TFDS name such as cifar10).')
  name = cfg.name
  if not isinstance(name, str):
    raise ValueError(f'config.data.name must be a str, got {name!r}.')
  size = cfg.get('image_size')
  if size is not None and (isinstance(size, bool) or
                           not isinstance(size, int) or size < 1):
    raise ValueError(f'config.data.image_size must be None or an int >= 1, '
                     f'got {size!r}.')
  module = _embedded_module(name)
  if size and module is not None:
    native = getattr(module, 'IMAGE_SHAPE', None)
    if native is None or tuple(native[:2]) != (size, size):
      raise ValueError(
          f'config.data.image_size={size}, but {name!r} is an embedded '
          f'dataset whose images are {native[0]}x{native[1]} and are not '
          'resized: remove the image_size override (or set it to None), or '
          'use a TFDS dataset.' if native else
          f'config.data.image_size={size}, but {name!r} is an embedded '
          'dataset whose images are not resized: remove the override.')
  flip = cfg.get('random_flip', False)
  if not isinstance(flip, bool):
    raise ValueError(f'config.data.random_flip must be True or False, got '
                     f'{flip!r}.')
  data_dir = cfg.get('data_dir')
  if data_dir is not None and not isinstance(data_dir, str):
    raise ValueError(f'config.data.data_dir must be a path or None, got '
                     f'{data_dir!r}.')
  split = cfg.get('test_split', 'test')
  if not isinstance(split, str) or not split:
    raise ValueError(f'config.data.test_split must be a split name, got '
                     f'{split!r}.')
  attrs = cfg.get('attribute_labels') or ()
  if isinstance(attrs, str) or not all(isinstance(a, str) for a in attrs):
    raise ValueError('config.data.attribute_labels must be a tuple of '
                     f"attribute names, e.g. ('Male', 'Young'), got {attrs!r}.")
  return DataConfig(name=name, data_dir=data_dir, image_size=size or None,
                    random_flip=flip, test_split=split,
                    attribute_labels=tuple(attrs))


def load_dataset(name: str,
                 split: str = 'train',
                 data_dir: Optional[str] = None,
                 **kwargs) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: an embedded dataset ('digits', 'mnist5k') or a TFDS name such as
      'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'celeb_a',
      'lsun/church_outdoor'.
    split: 'train', 'test' or 'all' for embedded datasets; a TFDS split
      string otherwise.
    data_dir: TFDS data directory (ignored by embedded datasets).
    **kwargs: passed to the loader, e.g. seed / test_fraction for embedded
      datasets, image_size for TFDS ones.

  Returns:
    The `Dataset`.

  Raises:
    UnknownDatasetError: neither an embedded nor a TFDS dataset.
    DatasetNotPreparedError: a TFDS dataset not prepared in data_dir.
  """
  module = _embedded_module(name)
  if module is not None:
    return module.load(split, data_dir, **kwargs)
  # Imported on demand: it pulls in TensorFlow.
  from fedjax_diff.data import tfds_source  # pylint: disable=g-import-not-at-top
  try:
    return tfds_source.load(name, split, data_dir, **kwargs)
  except UnknownDatasetError as e:
    raise UnknownDatasetError(
        f'Unknown dataset {name!r}. Embedded datasets (no download): '
        f'{", ".join(embedded_datasets())}. Any TFDS image dataset name is '
        'also accepted (prepared in data_dir); these have tuned '
        f'preprocessing: {", ".join(tfds_source.SUPPORTED_NAMES)}.') from e


__all__ = [
    'DataConfig',
    'Dataset',
    'DatasetNotPreparedError',
    'PARTITIONERS',
    'UnknownDatasetError',
    'config_from',
    'dirichlet',
    'embedded_datasets',
    'format_histogram',
    'iid',
    'label_histogram',
    'load_dataset',
    'make_partition',
    'partition_from_config',
    'plot_histogram',
    'quantity_skew',
    'shards',
]
