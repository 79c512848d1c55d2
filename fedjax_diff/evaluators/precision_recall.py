"""Improved precision and recall (Kynkäänniemi et al. 2019, arXiv
1904.06991) of the global EMA model's samples against the reference split,
on classifier or Inception features, with k-NN radii (k = 3 by default).

Precision: the share of samples on the real manifold (fidelity). Recall: the
share of real images on the samples' manifold (coverage). `num_real` real
images (default: as many as samples, as in the paper) are drawn once with a
fixed seed. Figures: `precision_<features>`, `recall_<features>`.
"""

import ml_collections
import numpy as np

from fedjax_diff.evaluators import _generative
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.metrics import precision_recall


class Evaluator:
  """Config: see evaluators/_generative.py, plus k and num_real."""

  FIELDS = {**_generative.FIELDS, 'k': base.Field(3, 'int', low=1),
            'num_real': base.Field(0, 'int', low=0)}

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    cfg = base.parse(cfg, self.FIELDS, 'config.evaluators.precision_recall')
    self.every_rounds = int(cfg.every_rounds)
    self._k = int(cfg.k)
    self._generator = _generative.Generator(cfg, ctx)
    self._features = _generative.features_from_config(cfg, ctx)
    real = _generative.reference_data(cfg, ctx)
    num_real = min(int(cfg.num_real) or
                   self._generator.num_samples, len(real))
    idx = np.random.default_rng(ctx.seed + 31).choice(
        len(real), num_real, replace=False)
    self._real = _generative.batched_features(self._features,
                                              real.images[np.sort(idx)])

  def __call__(self, state, round_idx):
    feats, _ = self._features.fn(self._generator(state, round_idx))
    out = precision_recall.precision_recall(self._real, feats, k=self._k)
    name = self._features.name
    return {f'precision_{name}': out['precision'],
            f'recall_{name}': out['recall']}
