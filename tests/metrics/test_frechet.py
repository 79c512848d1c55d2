"""FID: hand cases, an independent reference, and the order on real digits."""

import numpy as np
import pytest
import scipy.linalg

from fedjax_diff import data as data_lib
from fedjax_diff.metrics import frechet
from fedjax_diff.metrics import mnist_classifier


def _sqrtm_reference(mu1, s1, mu2, s2):
  """pytorch-fid's formula: scipy.linalg.sqrtm of Σ1Σ2, real part."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  d = mu1 - mu2
  return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_one_dimensional_hand_case():
  # N(0, 1) vs N(1, 4): 1² + 1 + 4 − 2·√4 = 2.
  a = frechet.GaussianStats(np.zeros(1), np.eye(1))
  b = frechet.GaussianStats(np.ones(1), 4 * np.eye(1))
  assert frechet.frechet_distance(a, b) == pytest.approx(2.0, abs=1e-12)


def test_matches_sqrtm_reference_and_is_symmetric():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 6))
  y = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5
  a, b = frechet.gaussian_stats(x), frechet.gaussian_stats(y)
  ref = _sqrtm_reference(a.mu, a.sigma, b.mu, b.sigma)
  assert frechet.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
  assert frechet.frechet_distance(b, a) == pytest.approx(ref, rel=1e-8)
  assert frechet.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_accumulator_equals_np_cov():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(257, 5)) * 3 + 100.0  # |μ| ≫ σ
  acc = frechet.StatsAccumulator()
  for s in range(0, 257, 50):
    acc.update(x[s:s + 50])
  st = acc.result()
  np.testing.assert_allclose(st.mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-9)
  assert st.count == 257


def test_singular_covariances_take_the_eigendecomposition_route():
  # Fewer samples than dimensions on both sides: no Cholesky factor exists.
  rng = np.random.default_rng(2)
  a = frechet.gaussian_stats(rng.normal(size=(4, 8)))
  b = frechet.gaussian_stats(rng.normal(size=(5, 8)) + 1.0)
  ref = _sqrtm_reference(a.mu, a.sigma, b.mu, b.sigma)
  assert frechet.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_mismatched_dimensions_raise():
  a = frechet.GaussianStats(np.zeros(2), np.eye(2))
  b = frechet.GaussianStats(np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match='same feature extractor'):
    frechet.frechet_distance(a, b)


@pytest.fixture(scope='module')
def digits_classifier(tmp_path_factory):
  return mnist_classifier.load_or_train(
      'digits', cache_dir=str(tmp_path_factory.mktemp('cache')), epochs=3,
      verbose=False)


def test_classifier_fid_order_on_real_digits(digits_classifier):
  """FID(set, itself) ≈ 0 < FID(disjoint halves) ≪ FID(0–4 vs 5–9)."""
  train = data_lib.load_dataset('digits', 'train')
  x = mnist_classifier.to_model_range(train.images)
  _, feats = digits_classifier.logits_and_features(x)
  perm = np.random.default_rng(0).permutation(len(feats))
  half_a, half_b = np.array_split(perm, 2)
  low = train.labels < 5
  stats = frechet.gaussian_stats
  self_fid = frechet.frechet_distance(stats(feats), stats(feats))
  halves = frechet.frechet_distance(stats(feats[half_a]),
                                    stats(feats[half_b]))
  classes = frechet.frechet_distance(stats(feats[low]), stats(feats[~low]))
  assert abs(self_fid) < 1e-6
  assert 0 < halves < classes / 10, (halves, classes)
