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
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff import image_grid
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.evaluators.base import evaluated_params
from fedjax_diff.evaluators.base import make_drawer


class Evaluator:
  """Config: every_rounds, num_samples, method, num_steps, eta,
  guidance_scale."""

  FIELDS = {'every_rounds': base.EVERY_ROUNDS,
            'num_samples': base.Field(64, 'int', low=1),
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
    self._labels = None
    self._nrow = None
    if ctx.num_classes is not None:
      self._labels = jnp.arange(self.num_samples) % ctx.num_classes
      if self.num_samples % ctx.num_classes == 0:
        self._nrow = ctx.num_classes
    self._draw = make_drawer(
        ctx, self.num_samples, method=str(cfg.method),
        num_steps=int(cfg.num_steps), eta=float(cfg.eta),
        guidance_scale=float(cfg.guidance_scale))
    self._key = jax.random.PRNGKey(ctx.seed + 104729)

  def __call__(self, state, round_idx):
    # The same noise every time: grids of successive rounds are comparable.
    images = np.asarray(self._draw(evaluated_params(state, self._ctx),
                                   self._key, self._labels))
    if workdir_lib.is_writer():
      path = os.path.join(workdir_lib.samples_dir(self._ctx.workdir),
                          f'round_{round_idx:06d}.png')
      image_grid.save_grid(images, path, nrow=self._nrow)
      grid = image_grid.make_grid(images, nrow=self._nrow)
      self._ctx.write_images(round_idx, {'samples': grid[None]})
    return {}
