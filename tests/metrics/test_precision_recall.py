"""Improved precision/recall: hand cases and a plain Python reference."""

import numpy as np
import pytest

from fedjax_diff.metrics import precision_recall as pr


def test_one_dimensional_hand_case():
  # Real {0, 1, 2, 3}, k = 1: every radius is 1. Generated {0.5, 10}:
  # 0.5 lies in the real balls, 10 does not → precision 1/2. Generated
  # radii (k = 1) are both 9.5, so every real point lies in 0.5's ball →
  # recall 1.
  real = np.array([[0.], [1.], [2.], [3.]])
  gen = np.array([[0.5], [10.]])
  out = pr.precision_recall(real, gen, k=1)
  assert out == {'precision': 0.5, 'recall': 1.0}


def test_disjoint_clusters_have_zero_precision_and_recall():
  real = np.array([[0., 0.], [0., 1.], [1., 0.], [1., 1.]])
  gen = real + 100.0
  assert pr.precision_recall(real, gen, k=2) == {'precision': 0.0,
                                                  'recall': 0.0}


def _reference(real, gen, k):
  def radii(s):
    return [sorted(np.sum((s - p) ** 2, 1))[k] for p in s]  # [0] is itself

  def inside(q, s, r):
    return np.mean([any(np.sum((p - s[j]) ** 2) <= r[j]
                        for j in range(len(s))) for p in q])

  return inside(gen, real, radii(real)), inside(real, gen, radii(gen))


def test_matches_python_loop_reference_with_blocks():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(60, 3))
  gen = rng.normal(size=(45, 3)) * 0.7 + 1.0
  p, r = _reference(real, gen, k=3)
  out = pr.precision_recall(real, gen, k=3, block=16)
  assert out['precision'] == pytest.approx(p)
  assert out['recall'] == pytest.approx(r)
  assert 0 < out['precision'] < 1 and 0 < out['recall'] < 1


def test_bad_k_raises():
  with pytest.raises(ValueError, match='1 <= k < N'):
    pr.knn_radii(np.zeros((3, 2)), k=3)
