"""Tests of the client partitioners."""

import numpy as np
import pytest

from fedjax_diff.data import partition


def _balanced(num_classes=10, per_class=100):
  return np.repeat(np.arange(num_classes), per_class).astype(np.int32)


def _skewed_labels(seed=0, n=1500, num_classes=10):
  return np.random.default_rng(seed).integers(0, num_classes, n)


def _assert_partition(parts, n, num_clients):
  assert len(parts) == num_clients
  for p in parts:
    assert p.dtype == np.int64
    assert np.all(np.diff(p) > 0)  # Sorted and unique.
  everything = np.concatenate(parts)
  assert everything.size == n  # Disjoint ...
  np.testing.assert_array_equal(np.sort(everything), np.arange(n))  # covering.


CASES = [
    ('iid', {}),
    ('dirichlet', {'alpha': 0.3}),
    ('shards', {'classes_per_client': 2}),
    ('shards', {'classes_per_client': 2, 'layout': 'random'}),
    ('quantity_skew', {'alpha': 0.5}),
]


@pytest.mark.parametrize('method,kwargs', CASES)
def test_disjoint_covering_deterministic(method, kwargs):
  labels = _balanced()
  parts = partition.make_partition(labels, method, 20, seed=7, **kwargs)
  _assert_partition(parts, labels.size, 20)
  again = partition.make_partition(labels, method, 20, seed=7, **kwargs)
  for a, b in zip(parts, again):
    np.testing.assert_array_equal(a, b)
  other = partition.make_partition(labels, method, 20, seed=8, **kwargs)
  assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize('method,kwargs', [c for c in CASES
                                            if c[0] != 'shards'])
def test_unbalanced_labels(method, kwargs):
  labels = _skewed_labels()
  parts = partition.make_partition(labels, method, 13, seed=0, **kwargs)
  _assert_partition(parts, labels.size, 13)


def test_iid_sizes():
  parts = partition.iid(np.zeros(103, np.int32), 10, seed=0)
  assert sorted({p.size for p in parts}) == [10, 11]


def test_shards_grouped_layout():
  labels = _balanced(10, 40)
  parts = partition.shards(labels, 20, 2, seed=0, layout='grouped')
  _assert_partition(parts, labels.size, 20)
  for client, p in enumerate(parts):
    g = client // 4
    assert set(np.unique(labels[p])) == {g, g + 5}, client
    # Each class's 40 examples are split evenly among the 4 clients.
    np.testing.assert_array_equal(np.bincount(labels[p], minlength=10)[
        [g, g + 5]], [10, 10])


def test_shards_grouped_three_classes():
  labels = _balanced(9, 12)
  parts = partition.shards(labels, 6, 3, seed=1)
  for client, p in enumerate(parts):
    g = client // 2
    assert set(np.unique(labels[p])) == {g, g + 3, g + 6}


def test_shards_grouped_errors():
  with pytest.raises(ValueError, match='multiple of the number of class'):
    partition.shards(_balanced(), 7, 2, seed=0)
  with pytest.raises(ValueError, match='divide'):
    partition.shards(_balanced(), 9, 3, seed=0)
  with pytest.raises(ValueError, match='layout'):
    partition.shards(_balanced(), 10, 2, seed=0, layout='bogus')


@pytest.mark.parametrize('labels', [_balanced(), _skewed_labels(3)])
def test_shards_random(labels):
  parts = partition.shards(labels, 20, 2, seed=0, layout='random')
  _assert_partition(parts, labels.size, 20)
  for p in parts:
    assert 1 <= np.unique(labels[p]).size <= 2
  # Shuffled assignment: not the grouped layout.
  classes = [tuple(np.unique(labels[p])) for p in parts]
  assert len(set(classes)) > 5


def _mean_entropy(labels, parts, num_classes=10):
  out = []
  for p in parts:
    q = np.bincount(labels[p], minlength=num_classes) / p.size
    q = q[q > 0]
    out.append(-(q * np.log(q)).sum())
  return float(np.mean(out))


def test_dirichlet_alpha_controls_skew():
  labels = _balanced(10, 200)
  small = partition.dirichlet(labels, 10, alpha=0.05, seed=0)
  large = partition.dirichlet(labels, 10, alpha=100.0, seed=0)
  h_small = _mean_entropy(labels, small)
  h_large = _mean_entropy(labels, large)
  assert h_large > 0.95 * np.log(10)  # Close to uniform.
  assert h_small < 0.6 * h_large


def test_dirichlet_min_size():
  labels = _balanced(10, 50)
  parts = partition.dirichlet(labels, 20, alpha=0.5, seed=0, min_size=5)
  assert min(p.size for p in parts) >= 5
  with pytest.raises(ValueError, match='min_size'):
    partition.dirichlet(labels, 20, alpha=1e-3, seed=0, min_size=24)


def test_quantity_skew():
  labels = _balanced()
  parts = partition.quantity_skew(labels, 10, seed=0, alpha=0.5, min_size=3)
  sizes = np.array([p.size for p in parts])
  assert sizes.sum() == labels.size
  assert sizes.min() >= 3
  assert sizes.max() > 2 * sizes.min()
  assert sizes.std() > 20


def test_make_partition_unknown():
  with pytest.raises(ValueError) as info:
    partition.make_partition(_balanced(), 'bogus', 10, seed=0)
  for name in ('iid', 'dirichlet', 'shards', 'quantity_skew', 'bogus'):
    assert name in str(info.value)


def test_too_many_clients():
  with pytest.raises(ValueError, match='clients'):
    partition.iid(np.zeros(5, np.int32), 6, seed=0)
