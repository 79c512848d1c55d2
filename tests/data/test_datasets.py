"""Tests of the Dataset type, the embedded datasets and load_dataset."""

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from fedjax_diff import data
from fedjax_diff.data import dataset as dataset_lib
from fedjax_diff.data import digits
from fedjax_diff.data import mnist5k


def _tiny(n=6, **kwargs):
  args = dict(images=np.zeros((n, 4, 4, 1), np.uint8),
              labels=np.arange(n, dtype=np.int32) % 3, num_classes=3,
              name='tiny')
  args.update(kwargs)
  return dataset_lib.Dataset(**args)


class TestDataset:

  def test_len_and_subset(self):
    attrs = {'flag': np.arange(6) % 2 == 0}
    ds = _tiny(attributes=attrs)
    assert len(ds) == 6
    sub = ds.subset([4, 1])
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.labels, [1, 1])
    np.testing.assert_array_equal(sub.attributes['flag'], [True, False])
    assert sub.name == 'tiny' and sub.num_classes == 3
    masked = ds.subset(ds.labels == 0)
    np.testing.assert_array_equal(masked.labels, [0, 0])
    assert len(ds.subset(np.array([], np.int64))) == 0

  @pytest.mark.parametrize('kwargs,error,match', [
      (dict(images=np.zeros((6, 4, 4, 1), np.float32)), TypeError, 'uint8'),
      (dict(images=np.zeros((6, 4, 4), np.uint8)), ValueError, r'\[N, H, W'),
      (dict(labels=np.zeros(6, np.int64)), TypeError, 'int32'),
      (dict(labels=np.zeros(5, np.int32)), ValueError, 'shape'),
      (dict(labels=np.full(6, 3, np.int32)), ValueError, r'\[0, 3\)'),
      (dict(num_classes=0), ValueError, 'num_classes'),
      (dict(attributes={'a': np.zeros(5, bool)}), ValueError, "'a'"),
  ])
  def test_validation(self, kwargs, error, match):
    with pytest.raises(error, match=match):
      _tiny(**kwargs)

  def test_subset_errors(self):
    ds = _tiny()
    with pytest.raises(IndexError):
      ds.subset([6])
    with pytest.raises(ValueError):
      ds.subset(np.ones(5, bool))


@pytest.mark.parametrize('module,total,shape', [
    (digits, 1797, (8, 8, 1)),
    (mnist5k, 5000, (28, 28, 1)),
])
class TestEmbedded:

  def test_splits(self, module, total, shape):
    full = module.load('all')
    train = module.load('train')
    test = module.load('test')
    assert len(full) == total
    assert len(train) + len(test) == total
    assert 0.08 * total < len(test) < 0.12 * total
    for ds in (full, train, test):
      assert ds.images.shape[1:] == shape
      assert ds.images.dtype == np.uint8
      assert ds.labels.dtype == np.int32
      assert ds.num_classes == 10
      assert ds.name == module.NAME
    assert full.images.max() == 255 and full.images.min() == 0
    assert set(np.unique(full.labels)) == set(range(10))
    # Stratified: every class is in both splits.
    assert set(np.unique(test.labels)) == set(range(10))

  def test_split_deterministic_and_disjoint(self, module, total, shape):
    labels = module.load('all').labels
    train = dataset_lib.split_indices(labels, 'train', seed=0,
                                      test_fraction=0.1)
    test = dataset_lib.split_indices(labels, 'test', seed=0,
                                     test_fraction=0.1)
    assert not np.intersect1d(train, test).size
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(total))
    again = module.load('test', seed=0)
    np.testing.assert_array_equal(again.images, module.load('test').images)
    other = dataset_lib.split_indices(labels, 'test', seed=1,
                                      test_fraction=0.1)
    assert not np.array_equal(test, other)

  def test_bad_split(self, module, total, shape):
    with pytest.raises(ValueError, match='split'):
      module.load('validation')


def test_digits_values():
  raw = sk_datasets.load_digits().images
  ds = digits.load('all')
  np.testing.assert_array_equal(ds.images[..., 0],
                                np.round(raw * 255 / 16).astype(np.uint8))
  assert set(np.unique(ds.images)) <= {round(v * 255 / 16) for v in range(17)}


def test_load_dataset_embedded():
  ds = data.load_dataset('digits', 'test', seed=3, test_fraction=0.2)
  assert len(ds) == len(digits.load('test', seed=3, test_fraction=0.2))
  assert data.embedded_datasets() == ['digits', 'mnist5k']


def test_load_dataset_unknown():
  with pytest.raises(data.UnknownDatasetError) as info:
    data.load_dataset('no_such_dataset_xyz')
  message = str(info.value)
  assert 'no_such_dataset_xyz' in message
  assert 'digits' in message and 'mnist5k' in message
  assert 'TFDS' in message
  assert isinstance(info.value, ValueError)
