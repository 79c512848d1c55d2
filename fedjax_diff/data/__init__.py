"""Datasets and their federated partitions.

`load_dataset(name, split)` returns an in-memory `Dataset`. A name resolves
without a central registry: if a module `fedjax_diff.data.<name>` defines
`load`, it is an embedded dataset that needs no download ('digits',
'mnist5k'); any other name is read from TensorFlow Datasets by
`fedjax_diff.data.tfds_source`, which must find it already prepared.
"""

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
    'Dataset',
    'DatasetNotPreparedError',
    'PARTITIONERS',
    'UnknownDatasetError',
    'dirichlet',
    'embedded_datasets',
    'format_histogram',
    'iid',
    'label_histogram',
    'load_dataset',
    'make_partition',
    'plot_histogram',
    'quantity_skew',
    'shards',
]
