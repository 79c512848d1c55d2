"""Class coverage on constructed sets, and the Inception Score's cases."""

import numpy as np
import pytest

from fedjax_diff.metrics import class_coverage as cc
from fedjax_diff.metrics import inception_score as is_lib


def test_constructed_set():
  # 100 samples over 4 classes: 50 of 0, 49 of 1, 1 of 2, none of 3;
  # the real distribution is uniform.
  preds = np.array([0] * 50 + [1] * 49 + [2])
  out = cc.class_coverage(preds, np.full(4, 0.25))
  p = np.array([0.5, 0.49, 0.01])
  assert out['class_kl'] == pytest.approx(np.sum(p * np.log(p / 0.25)))
  assert out['classes_under_2pct'] == 2  # class 2 (1%) and class 3 (0%)
  assert out['class_entropy'] == pytest.approx(-np.sum(p * np.log(p)))
  assert [out[f'class_frac_{c}'] for c in range(4)] == [0.5, 0.49, 0.01, 0]


def test_matching_distribution_has_zero_kl():
  real = np.array([0.1, 0.2, 0.3, 0.4])
  preds = np.repeat(np.arange(4), [10, 20, 30, 40])
  out = cc.class_coverage(preds, real)
  assert out['class_kl'] == pytest.approx(0.0, abs=1e-12)
  assert out['classes_under_2pct'] == 0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r'\[0, 3\)'):
    cc.class_histogram([0, 3], 3)
  with pytest.raises(ValueError, match='probability vector'):
    cc.class_coverage([0], np.array([1.0, 0.0]))


def test_inception_score_extremes():
  k = 8
  # Confident and spread evenly over k classes: IS = k.
  confident = np.full((4 * k, k), -1e4)
  confident[np.arange(4 * k), np.arange(4 * k) % k] = 0.0
  assert is_lib.inception_score(confident, splits=4)[0] == pytest.approx(k)
  # Every sample the same distribution: IS = 1.
  same = np.tile(np.random.default_rng(0).normal(size=(1, k)), (20, 1))
  mean, std = is_lib.inception_score(same, splits=2)
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)
