"""Fréchet distance between Gaussians fitted to features (FID).

Heusel et al. 2017 (arXiv 1706.08500), eq. 6: for features of real images
with mean μ_r and covariance Σ_r and of generated images with μ_g, Σ_g,

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}).

With a Cholesky factor Σ_r = L Lᵀ, Σ_r Σ_g is similar to the symmetric PSD
matrix A = Lᵀ Σ_g L, so Tr((Σ_r Σ_g)^{1/2}) = Σ_i √λ_i(A): one Cholesky and
one eigenvalue-only symmetric solve in float64, with no complex parts to
drop (pytorch-fid's `scipy.linalg.sqrtm` route gives the same value up to
its round-off). When neither covariance is positive definite (fewer samples
than dimensions), A = Σ_r^{1/2} Σ_g Σ_r^{1/2} with an eigendecomposition.

Statistics follow pytorch-fid: the mean and the unbiased (N − 1) covariance.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianStats:
  """Mean `mu` [D] and covariance `sigma` [D, D] of features, float64."""
  mu: np.ndarray
  sigma: np.ndarray
  count: int = 0

  def __post_init__(self):
    mu = np.asarray(self.mu, np.float64)
    sigma = np.asarray(self.sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise ValueError(f'GaussianStats needs mu of shape [D] and sigma of '
                       f'shape [D, D]; got {mu.shape} and {sigma.shape}.')
    object.__setattr__(self, 'mu', mu)
    object.__setattr__(self, 'sigma', sigma)


class StatsAccumulator:
  """Streams feature batches into their mean and unbiased covariance.

  Sums Σx and Σxxᵀ are kept in float64 around a shift (the first batch's
  mean), which keeps the covariance accurate when |μ| ≫ σ.
  """

  def __init__(self):
    self._n = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features) -> None:
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
      raise ValueError(f'features must be [N, D]; got shape {f.shape}.')
    if self._shift is None:
      self._shift = f.mean(axis=0)
      d = f.shape[1]
      self._sum = np.zeros(d)
      self._outer = np.zeros((d, d))
    elif f.shape[1] != self._shift.shape[0]:
      raise ValueError(f'feature dimension changed from '
                       f'{self._shift.shape[0]} to {f.shape[1]}.')
    c = f - self._shift
    self._sum += c.sum(axis=0)
    self._outer += c.T @ c
    self._n += f.shape[0]

  def result(self) -> GaussianStats:
    if self._n < 2:
      raise ValueError(f'need at least 2 feature vectors for a covariance; '
                       f'got {self._n}.')
    mean_c = self._sum / self._n
    sigma = (self._outer - self._n * np.outer(mean_c, mean_c)) / (self._n - 1)
    return GaussianStats(mu=self._shift + mean_c, sigma=(sigma + sigma.T) / 2,
                         count=self._n)


def gaussian_stats(features) -> GaussianStats:
  """Mean and unbiased covariance of features [N, D] (np.cov convention)."""
  acc = StatsAccumulator()
  acc.update(features)
  return acc.result()


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
  """FID between two Gaussians (Heusel et al. 2017, eq. 6); see module doc."""
  if a.mu.shape != b.mu.shape:
    raise ValueError(f'feature dimensions differ: {a.mu.shape[0]} and '
                     f'{b.mu.shape[0]}; both statistics must come from the '
                     'same feature extractor.')
  for name, st in (('first', a), ('second', b)):
    if not (np.all(np.isfinite(st.mu)) and np.all(np.isfinite(st.sigma))):
      raise ValueError(f'the {name} statistics hold NaN or inf: the features '
                       'they come from are not finite (diverged samples or '
                       'a broken feature extractor).')
  inner = None
  for x, y in ((a.sigma, b.sigma), (b.sigma, a.sigma)):
    try:
      chol = np.linalg.cholesky(x)
    except np.linalg.LinAlgError:
      continue
    inner = chol.T @ y @ chol
    break
  if inner is None:
    root_a = _psd_sqrt(a.sigma)
    inner = root_a @ b.sigma @ root_a
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = a.mu - b.mu
  fid = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean
  return float(max(fid, 0.0))
