"""Sample grids from the evaluated global model (`config.eval_params`: the
EMA by default, or the raw model), written as PNG to samples/.

Sampling uses DDIM (Song et al. 2021, arXiv 2010.02502) with `num_steps`
steps and η = `eta`, DDPM ancestral sampling with method='ddpm', or
deterministic DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) with
`num_steps` steps and method='dpm_solver++' (η ignored). A
class-conditional model draws classes 0, 1, ..., C−1, 0, ... in order (one
class per grid row when num_samples is a multiple of C), with classifier-free
guidance scale `guidance_scale` (1.0 = the plain conditional model). In
latent diffusion the samples are decoded latents (`base.make_drawer`).

The grid is drawn by `_generative.Generator`, in batches of `batch_size`
(default 250, at most num_samples): with the sampler settings and batch size
of the fid, precision_recall or class_coverage entry it shows the first
num_samples of their samples, drawn once.
"""

import os

import ml_collections

from fedjax_diff import image_grid
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.evaluators import _generative
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext


class Evaluator:
  """Config: every_rounds, num_samples, batch_size, method, num_steps, eta,
  guidance_scale."""

  FIELDS = {'every_rounds': base.EVERY_ROUNDS,
            'num_samples': base.Field(64, 'int', low=1),
            'batch_size': _generative.FIELDS['batch_size'],
            'method': base.Field('ddim', 'str',
                                 choices=('ddim', 'ddpm', 'dpm_solver++')),
            'num_steps': base.Field(50, 'int', low=1),
            'eta': base.Field(0.0, 'float', low=0.0),
            'guidance_scale': base.Field(1.0, 'float')}

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    cfg = base.parse(cfg, self.FIELDS, 'config.evaluators.samples')
    self.every_rounds = int(cfg.every_rounds)
    self._ctx = ctx
    self.num_samples = int(cfg.num_samples)
    self._nrow = None
    if ctx.num_classes is not None and self.num_samples % ctx.num_classes == 0:
      self._nrow = ctx.num_classes
    self._generator = _generative.Generator(cfg, ctx)

  def __call__(self, state, round_idx):
    # The same noise every time: grids of successive rounds are comparable.
    images = self._generator(state, round_idx)
    if workdir_lib.is_writer():
      path = os.path.join(workdir_lib.samples_dir(self._ctx.workdir),
                          f'round_{round_idx:06d}.png')
      image_grid.save_grid(images, path, nrow=self._nrow)
      grid = image_grid.make_grid(images, nrow=self._nrow)
      self._ctx.write_images(round_idx, {'samples': grid[None]})
    return {}
