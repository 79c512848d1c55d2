"""FID of the global EMA model's samples (Heusel et al. 2017, arXiv
1706.08500), on classifier or Inception features:

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})

with real statistics (μ_r, Σ_r) of the reference split, computed once and
cached (or read from a published `.npz`: stats_file), and (μ_g, Σ_g) of
`num_samples` DDIM samples. Figure: `fid_<features>`. Config: see
evaluators/_generative.py, plus stats_file.
"""

import ml_collections

from fedjax_diff.evaluators import _generative
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.metrics import frechet
from fedjax_diff.metrics import reference_stats


class Evaluator:

  FIELDS = {**_generative.FIELDS, 'stats_file': base.Field(None, 'path')}

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    cfg = base.parse(cfg, self.FIELDS, 'config.evaluators.fid')
    self.every_rounds = int(cfg.every_rounds)
    self._generator = _generative.Generator(cfg, ctx)
    self._features = _generative.features_from_config(cfg, ctx)
    split = str(cfg.reference_split)

    def compute():
      real = _generative.reference_data(cfg, ctx)
      return frechet.gaussian_stats(
          _generative.batched_features(self._features, real.images))

    self._real = reference_stats.reference_stats(
        ctx.test_data.name, split, self._features.key, compute,
        _generative.cache_dir(cfg), cfg.stats_file, verbose=True)

  def __call__(self, state, round_idx):
    images = self._generator(state, round_idx)
    feats, _ = self._features.fn(images)
    fid = frechet.frechet_distance(self._real, frechet.gaussian_stats(feats))
    return {f'fid_{self._features.name}': fid}
