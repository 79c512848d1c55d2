"""Inception Score (Salimans et al. 2016, arXiv 1606.03498) of the global
EMA model's samples, with the FID Inception-v3's 1008-way softmax:

    IS = exp(E_x KL(p(y | x) ‖ p(y))),

the mean and standard deviation over `splits` parts (10, as the paper).
Figures: inception_score, inception_score_std. Config: see
evaluators/_generative.py, plus splits.
"""

import ml_collections

from fedjax_diff.evaluators import _generative
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.metrics import inception_score


class Evaluator:

  FIELDS = {**_generative.FIELDS, 'splits': base.Field(10, 'int', low=1)}

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    cfg = base.parse(cfg, self.FIELDS, 'config.evaluators.inception_score')
    self.every_rounds = int(cfg.every_rounds)
    self._splits = int(cfg.splits)
    self._generator = _generative.Generator(cfg, ctx)
    self._features = _generative.inception_features(cfg, ctx)

  def __call__(self, state, round_idx):
    _, logits = self._features.fn(self._generator(state, round_idx))
    mean, std = inception_score.inception_score(logits, self._splits)
    return {'inception_score': mean, 'inception_score_std': std}
