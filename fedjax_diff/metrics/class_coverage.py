"""Class coverage of generated samples, from a classifier's predictions.

A federation trained on non-IID clients may stop generating the classes that
few clients hold. With a classifier's predicted classes ŷ of N generated
samples, their histogram p_g(c) = #{ŷ = c} / N is compared with the real
class distribution p_r:

  * KL(p_g ‖ p_r) = Σ_c p_g(c) log(p_g(c) / p_r(c)) (nats; 0 when the
    proportions match, finite when a class is missing — the count below
    flags that);
  * the number of classes with p_g(c) < 2% (a "dropped" class; 10 balanced
    classes have 10% each);
  * the entropy of p_g, log C at most.

This is the mode-coverage measure of e.g. Srivastava et al. 2017 (VEEGAN,
arXiv 1705.07761) on a classifier's labels, with KL to the data's class
prior rather than to the uniform distribution.
"""

import numpy as np


def class_histogram(predictions, num_classes: int) -> np.ndarray:
  """Fractions of `predictions` (ints in [0, num_classes)) per class."""
  p = np.asarray(predictions).reshape(-1)
  if p.size == 0:
    raise ValueError('class_histogram needs at least one prediction.')
  if p.min() < 0 or p.max() >= num_classes:
    raise ValueError(f'predictions must lie in [0, {num_classes}); got '
                     f'[{p.min()}, {p.max()}].')
  return np.bincount(p, minlength=num_classes) / p.size


def class_coverage(predictions, real_distribution,
                   threshold: float = 0.02) -> dict[str, float]:
  """Coverage figures of the module doc.

  Args:
    predictions: predicted classes of generated samples, ints [N].
    real_distribution: the real class distribution p_r [C] (sums to 1, all
      entries > 0), e.g. `class_histogram(real_labels, C)`.
    threshold: a class with a smaller share of the samples counts as missed.

  Returns:
    {'class_kl': KL(p_g ‖ p_r), 'classes_under_2pct' (named for the default
    threshold): count, 'class_entropy': H(p_g), 'class_frac_<c>': p_g(c)}.
  """
  p_r = np.asarray(real_distribution, np.float64)
  if p_r.ndim != 1 or np.any(p_r <= 0) or not np.isclose(p_r.sum(), 1.0):
    raise ValueError('real_distribution must be a probability vector [C] '
                     f'with every entry > 0; got {p_r}.')
  p_g = class_histogram(predictions, p_r.shape[0])
  nz = p_g > 0
  kl = float(np.sum(p_g[nz] * np.log(p_g[nz] / p_r[nz])))
  entropy = float(-np.sum(p_g[nz] * np.log(p_g[nz])))
  out = {'class_kl': kl,
         'classes_under_2pct': float(np.sum(p_g < threshold)),
         'class_entropy': entropy}
  out.update({f'class_frac_{c}': float(v) for c, v in enumerate(p_g)})
  return out
