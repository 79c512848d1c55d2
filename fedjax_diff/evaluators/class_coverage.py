"""Class coverage of the global EMA model's samples: the histogram of the
digit classifier's predicted classes, its KL divergence from the reference
split's class distribution, and the number of classes under 2% of the
samples (see fedjax_diff/metrics/class_coverage.py for the definitions).

Figures: class_kl, classes_under_2pct, class_entropy, class_frac_<c>, and
classifier_accuracy (the classifier's test accuracy, to read them by). For
a class-conditional model (samples asked for classes 0, 1, …, C−1, 0, …)
also conditional_accuracy: the share of samples classified as the class
they were asked for.
"""

import numpy as np

import ml_collections

from fedjax_diff.evaluators import _generative
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.metrics import class_coverage


class Evaluator:
  """Config: see evaluators/_generative.py (features is always the
  classifier's)."""

  FIELDS = _generative.FIELDS

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    cfg = base.parse(cfg, self.FIELDS, 'config.evaluators.class_coverage')
    self.every_rounds = int(cfg.every_rounds)
    self._generator = _generative.Generator(cfg, ctx)
    self._features = _generative.classifier_features(cfg, ctx)
    clf = self._features.classifier
    real = _generative.reference_data(cfg, ctx)
    self._real_dist = class_coverage.class_histogram(real.labels,
                                                     clf.num_classes)
    self._accuracy = clf.accuracy

  def __call__(self, state, round_idx):
    _, logits = self._features.fn(self._generator(state, round_idx))
    out = class_coverage.class_coverage(logits.argmax(1), self._real_dist)
    out['classifier_accuracy'] = self._accuracy
    labels = self._generator.labels
    if labels is not None:
      asked = labels[:len(logits)]
      out['conditional_accuracy'] = float(np.mean(logits.argmax(1) == asked))
    return out
