"""Inception Score (Salimans et al. 2016, arXiv 1606.03498, sec. 4):

    IS = exp( E_x KL( p(y | x) ‖ p(y) ) ),   p(y) = E_x p(y | x),

with p(y | x) the softmax of the FID Inception's 1008 logits. As in the
paper's code, the N samples are cut into `splits` equal parts; the score is
the mean (and standard deviation) of the per-part scores.
"""

import numpy as np


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """(mean, std) of the IS over `splits` parts of `logits` [N, K]."""
  logits = np.asarray(logits, np.float64)
  n = logits.shape[0]
  if logits.ndim != 2 or not 1 <= splits <= n:
    raise ValueError(f'inception_score needs logits [N, K] and 1 <= splits '
                     f'<= N; got shape {logits.shape}, splits={splits}.')
  z = logits - logits.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  p = np.exp(logp)
  scores = []
  for part in np.array_split(np.arange(n), splits):
    py = p[part].mean(axis=0)
    kl = np.sum(p[part] * (logp[part] - np.log(py)[None]), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
