"""Metrics of generated images: FID, IS, precision/recall, class coverage.

One concept per module: `frechet` (FID from Gaussian statistics),
`inception` (the FID Inception-v3 in Flax and its weight converter),
`inception_score`, `precision_recall` (k-NN manifolds), `class_coverage`,
`mnist_classifier` (features and labels for MNIST-like data) and
`reference_stats` (cached statistics of real images). The functions named
like their module (`precision_recall.precision_recall`, ...) are reached
through the module.
"""

from fedjax_diff.metrics.class_coverage import class_histogram
from fedjax_diff.metrics.frechet import frechet_distance
from fedjax_diff.metrics.frechet import gaussian_stats
from fedjax_diff.metrics.frechet import GaussianStats
from fedjax_diff.metrics.frechet import StatsAccumulator

__all__ = [
    'GaussianStats', 'StatsAccumulator', 'class_histogram',
    'frechet_distance', 'gaussian_stats',
]
