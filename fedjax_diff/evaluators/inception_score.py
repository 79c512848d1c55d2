"""Inception Score (Salimans et al. 2016, arXiv 1606.03498) of the global
EMA model's samples, with the FID Inception-v3's 1008-way softmax:

    IS = exp(E_x KL(p(y | x) ‖ p(y))),

the mean and standard deviation over `splits` parts (10, as the paper).
Figures: inception_score, inception_score_std. Config: see
evaluators/_generative.py, plus splits.
"""

import ml_collections

from fedjax_diff.evaluators import _generative
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.metrics import inception_score


class Evaluator:

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    self.every_rounds = int(cfg.get('every_rounds', 10))
    self._splits = int(cfg.get('splits', 10))
    self._generator = _generative.Generator(cfg, ctx)
    self._features = _generative.inception_features(cfg, ctx)

  def __call__(self, state, round_idx):
    _, logits = self._features.fn(self._generator(state, round_idx))
    mean, std = inception_score.inception_score(logits, self._splits)
    return {'inception_score': mean, 'inception_score_std': std}
