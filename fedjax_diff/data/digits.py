"""UCI handwritten digits (8x8), embedded in scikit-learn: no download.

The 1,797 images of `sklearn.datasets.load_digits` (Alpaydin & Kaynak, UCI
"Optical Recognition of Handwritten Digits", 1998) have 17 grey levels
(0..16); they are mapped to uint8 with `round(v * 255 / 16)`.
"""

from typing import Optional

import numpy as np
from sklearn import datasets as sk_datasets

from fedjax_diff.data import dataset as dataset_lib

NAME = 'digits'
NUM_CLASSES = 10
NUM_EXAMPLES = 1797
IMAGE_SHAPE = (8, 8, 1)


def load(split: str,
         data_dir: Optional[str] = None,
         *,
         seed: int = 0,
         test_fraction: float = 0.1) -> dataset_lib.Dataset:
  """Loads the 8x8 digits as a `Dataset` of shape [N, 8, 8, 1].

  Args:
    split: 'train', 'test' (a stratified `test_fraction` of each class,
      chosen by a permutation seeded with `seed`) or 'all'.
    data_dir: unused; the data ships with scikit-learn. Accepted so that all
      loaders share one signature.
    seed: seed of the train/test permutation.
    test_fraction: fraction of each class in 'test'.

  Returns:
    The split, with uint8 images in 0..255 and int32 labels in 0..9, in the
    original example order.
  """
  del data_dir  # Unused: embedded data.
  bunch = sk_datasets.load_digits()
  values = np.asarray(bunch.images, dtype=np.float64)  # [N, 8, 8], 0..16.
  images = np.floor(values * 255.0 / 16.0 + 0.5).astype(np.uint8)[..., None]
  labels = np.asarray(bunch.target, dtype=np.int32)
  indices = dataset_lib.split_indices(labels, split, seed=seed,
                                      test_fraction=test_fraction)
  return dataset_lib.Dataset(images=images[indices], labels=labels[indices],
                             num_classes=NUM_CLASSES, name=NAME)
