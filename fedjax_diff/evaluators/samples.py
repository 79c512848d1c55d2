"""Sample grids from the evaluated global model (`config.eval_params`: the
EMA by default, or the raw model), written as PNG to samples/.

Sampling uses DDIM (Song et al. 2021, arXiv 2010.02502) with `num_steps`
steps and η = `eta`, or DDPM ancestral sampling with method='ddpm'. A
class-conditional model draws classes 0, 1, ..., C−1, 0, ... in order (one
class per grid row when num_samples is a multiple of C), with classifier-free
guidance scale `guidance_scale` (1.0 = the plain conditional model).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff import image_grid
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.diffusion import sample
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.evaluators.base import evaluated_params


class Evaluator:
  """Config: every_rounds, num_samples, method, num_steps, eta,
  guidance_scale."""

  FIELDS = {'every_rounds': base.EVERY_ROUNDS,
            'num_samples': base.Field(64, 'int', low=1),
            'method': base.Field('ddim', 'str', choices=('ddim', 'ddpm')),
            'num_steps': base.Field(50, 'int', low=1),
            'eta': base.Field(0.0, 'float', low=0.0),
            'guidance_scale': base.Field(1.0, 'float')}

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    cfg = base.parse(cfg, self.FIELDS, 'config.evaluators.samples')
    self.every_rounds = int(cfg.every_rounds)
    self._ctx = ctx
    self.num_samples = int(cfg.num_samples)
    shape = (self.num_samples,) + tuple(ctx.image_shape)
    labels = None
    guidance = None
    nrow = None
    if ctx.num_classes is not None:
      labels = jnp.arange(self.num_samples) % ctx.num_classes
      scale = float(cfg.guidance_scale)
      guidance = None if scale == 1.0 else scale
      nrow = ctx.num_classes if self.num_samples % ctx.num_classes == 0 else None
    self._nrow = nrow
    method = cfg.method
    num_steps = int(cfg.num_steps)
    eta = float(cfg.eta)

    def draw(params, key):
      return sample(ctx.eps_fn, params, ctx.schedule, key, shape,
                    method=method, num_steps=num_steps, eta=eta,
                    labels=labels, guidance_scale=guidance,
                    null_label=ctx.num_classes)

    self._draw = jax.jit(draw)
    self._key = jax.random.PRNGKey(ctx.seed + 104729)

  def __call__(self, state, round_idx):
    # The same noise every time: grids of successive rounds are comparable.
    images = np.asarray(self._draw(evaluated_params(state, self._ctx),
                                   self._key))
    if workdir_lib.is_writer():
      path = os.path.join(workdir_lib.samples_dir(self._ctx.workdir),
                          f'round_{round_idx:06d}.png')
      image_grid.save_grid(images, path, nrow=self._nrow)
      grid = image_grid.make_grid(images, nrow=self._nrow)
      self._ctx.write_images(round_idx, {'samples': grid[None]})
    return {}
