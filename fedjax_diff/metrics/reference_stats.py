"""Reference statistics of real images, computed once and cached.

FID compares generated features with the mean μ and covariance Σ of real
features (Heusel et al. 2017, arXiv 1706.08500). These are computed once per
(dataset, split, feature extractor) and cached as `.npz` files with arrays
`mu` [D] and `sigma` [D, D] — the layout of the statistics files that
pytorch-fid (`--save-stats`) and the original TTUR code publish, which
`load_stats` reads as well.
"""

import os
import re
from typing import Callable, Optional

import jax
import numpy as np

from fedjax_diff.metrics import frechet


def load_stats(path: str) -> frechet.GaussianStats:
  """Reads `mu` and `sigma` from an `.npz` file (ours, pytorch-fid's, or
  TTUR's published statistics)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no statistics file {path}.')
  with np.load(path) as f:
    missing = [k for k in ('mu', 'sigma') if k not in f.files]
    if missing:
      raise ValueError(f'{path} has arrays {f.files}; FID statistics need '
                       f'"mu" and "sigma" (missing {missing}).')
    count = int(f['count']) if 'count' in f.files else 0
    return frechet.GaussianStats(mu=f['mu'], sigma=f['sigma'], count=count)


def save_stats(path: str, stats: frechet.GaussianStats) -> None:
  """Writes `mu`, `sigma` (and `count`) to `path` atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'
  np.savez(tmp, mu=stats.mu, sigma=stats.sigma, count=stats.count)
  os.replace(tmp, path)


def cache_path(cache_dir: str, dataset: str, split: str,
               extractor: str) -> str:
  """<cache_dir>/fid_stats/<dataset>_<split>_<extractor>.npz (names made
  file-safe)."""
  safe = lambda s: re.sub(r'[^A-Za-z0-9_.-]+', '-', str(s))
  return os.path.join(cache_dir, 'fid_stats',
                      f'{safe(dataset)}_{safe(split)}_{safe(extractor)}.npz')


def cached_stats(path: str, compute: Callable[[], frechet.GaussianStats],
                 verbose: bool = False) -> frechet.GaussianStats:
  """The statistics in `path`, or `compute()` saved there first."""
  if os.path.exists(path):
    return load_stats(path)
  stats = compute()
  if jax.process_index() == 0:
    save_stats(path, stats)
    if verbose:
      print(f'Saved reference statistics of {stats.count} images to {path}',
            flush=True)
  return stats


def reference_stats(dataset: str, split: str, extractor: str,
                    compute: Callable[[], frechet.GaussianStats],
                    cache_dir: str, stats_file: Optional[str] = None,
                    verbose: bool = False) -> frechet.GaussianStats:
  """Statistics from `stats_file` when given (a published `.npz`), else the
  cached ones of (dataset, split, extractor), computed on first use."""
  if stats_file:
    return load_stats(stats_file)
  return cached_stats(cache_path(cache_dir, dataset, split, extractor),
                      compute, verbose)
