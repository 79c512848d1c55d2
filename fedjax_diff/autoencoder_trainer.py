"""Trains the KL autoencoder of latent diffusion (launch/train_autoencoder.py).

Objective, per batch of B images x ∈ [−1, 1]^{H×W×C} (LDM, arXiv
2112.10752, Sec. 3.1 and Appendix G, without its perceptual and adversarial
terms):

    L = 1/(B·D) Σ_b [ ρ(x_b − D(z_b)) + β · KL(q(z | x_b) ‖ N(0, I)) ],
    z_b = μ(x_b) + σ(x_b) ⊙ n,  n ~ N(0, I),

with D = H·W·C pixels, ρ = |·| ('l1', LDM's pixel term) or (·)² ('l2'),
summed over pixels, and β = `kl_weight` (LDM's KL-f* models: 1e-6). LDM sums
the same terms over pixels and divides by B only; dividing by D as well
changes nothing but Adam's ε, and keeps the printed loss a per-pixel figure.

No LPIPS and no patch-GAN: LPIPS needs VGG-16 weights pretrained on
ImageNet (not part of this project and not downloadable here), and LDM's
discriminator only starts after 50k steps (`disc_start: 50001`), beyond any
run on this machine. Both sharpen texture at 256²; on small images the L1
reconstruction is already close to the data (the reconstruction PNGs show
it), and what latent diffusion inherits from the first stage is measured
here as the test split's reconstruction L1 and PSNR.

The workdir follows `fedjax_diff.workdir`: config.json (only the fields
this stage reads: seed, data, autoencoder), orbax checkpoints of {params,
opt_state, step} (running again resumes; `latent.load_autoencoder` reads
the params), metrics.jsonl, and reconstructions/step_NNNNNN.png (rows of
test originals above their reconstructions).

Config block `config.autoencoder` (with `config.data` and `config.seed`):
the architecture in LDM's ddconfig terms (`models.autoencoder.from_config`)
and the training fields of `TrainConfig`.
"""

import dataclasses
import os
import time
from typing import Callable

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedjax_diff import image_grid
from fedjax_diff import progress as progress_lib
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.models import autoencoder as ae_lib

RECONSTRUCTION = ('l1', 'l2')
# The fields of a run's config that this stage reads (and checks on resume).
STAGE_FIELDS = ('seed', 'data', 'autoencoder')
# Fields that may change when a run resumes: how long and how verbosely it
# goes, not what it trains.
RESUMABLE = ('autoencoder.steps', 'autoencoder.eval_every',
             'autoencoder.checkpoint_every', 'autoencoder.num_reconstructions')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training fields of `config.autoencoder`."""
  steps: int
  batch_size: int
  learning_rate: float
  kl_weight: float
  reconstruction: str
  eval_every: int
  checkpoint_every: int
  num_reconstructions: int

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> 'TrainConfig':
    out = cls(steps=int(cfg.get('steps', 2000)),
              batch_size=int(cfg.get('batch_size', 64)),
              learning_rate=float(cfg.get('learning_rate', 1e-3)),
              kl_weight=float(cfg.get('kl_weight', 1e-6)),
              reconstruction=str(cfg.get('reconstruction', 'l1')),
              eval_every=int(cfg.get('eval_every', 500)),
              checkpoint_every=int(cfg.get('checkpoint_every', 500)),
              num_reconstructions=int(cfg.get('num_reconstructions', 16)))
    if out.reconstruction not in RECONSTRUCTION:
      raise ValueError(f'config.autoencoder.reconstruction='
                       f'{out.reconstruction!r}; use one of {RECONSTRUCTION}.')
    if out.steps < 1 or out.batch_size < 1 or out.kl_weight < 0:
      raise ValueError('config.autoencoder needs steps >= 1, batch_size >= 1 '
                       f'and kl_weight >= 0; got {out.steps}, '
                       f'{out.batch_size}, {out.kl_weight}.')
    return out


def stage_config(config: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  """The part of a run's config this stage reads (its config.json)."""
  if 'autoencoder' not in config:
    raise ValueError('The config has no `autoencoder` block: it says which '
                     'autoencoder launch/train_autoencoder.py trains (see '
                     'configs/mnist_ldm.py).')
  return ml_collections.ConfigDict({k: config[k] for k in STAGE_FIELDS})


def make_loss_fn(model: ae_lib.AutoencoderKL, kl_weight: float,
                 reconstruction: str) -> Callable:
  """`loss(params, x, rng) -> (L, (reconstruction term, KL))`, per pixel
  (see the module docstring)."""

  def loss_fn(params, x, rng):
    x_hat, mean, logvar = model.apply({'params': params}, x, rng)
    d = x - x_hat
    rec = jnp.abs(d) if reconstruction == 'l1' else jnp.square(d)
    pixels = np.prod(x.shape[1:])
    rec = jnp.mean(rec)
    kl = jnp.mean(ae_lib.kl_divergence(mean, logvar)) / pixels
    return rec + kl_weight * kl, (rec, kl)

  return loss_fn


def batch_indices(num_examples: int, batch_size: int, seed: int,
                  step: int) -> np.ndarray:
  """Batch `step`: positions [s·B, (s+1)·B) of an epoch's permutation,
  seeded by (seed, epoch) so that a resumed run draws the same batches."""
  per_epoch = max(1, num_examples // batch_size)
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[i * batch_size:(i + 1) * batch_size]


def to_float(images: np.ndarray) -> np.ndarray:
  return np.asarray(images, np.float32) / 127.5 - 1.0


def psnr(x: np.ndarray, y: np.ndarray) -> float:
  """Peak signal-to-noise ratio of images in [−1, 1] (peak-to-peak 2)."""
  mse = float(np.mean(np.square(np.clip(x, -1, 1) - np.clip(y, -1, 1))))
  return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def train(config: ml_collections.ConfigDict, workdir: str, *,
          log: Callable[[str], None] = print):
  """Trains (or resumes) the autoencoder of `config.autoencoder` on
  `config.data`'s train split. Returns (model, params)."""
  from fedjax_diff import trainer  # pylint: disable=g-import-not-at-top
  stage = stage_config(config)
  tc = TrainConfig.from_config(config.autoencoder)
  train_set, test_set = trainer.load_data(config.data)
  image_shape = tuple(train_set.images.shape[1:])
  model = ae_lib.from_config(config.autoencoder,
                             in_channels=image_shape[-1])
  ae_lib.latent_shape(model, image_shape)   # H, W divisible by f.
  workdir_lib.check_and_write_config(workdir, stage, RESUMABLE)
  seed = int(config.seed)
  params = jax.jit(lambda k: ae_lib.init_params(model, k, image_shape))(
      jax.random.key(seed, impl='rbg'))
  optimizer = optax.adam(tc.learning_rate)
  state = {'params': params, 'opt_state': optimizer.init(params),
           'step': jnp.zeros((), jnp.int32)}
  manager = workdir_lib.checkpoint_manager(workdir)
  state, restored = workdir_lib.restore_checkpoint(manager, state)
  start = int(state['step'])
  if restored is not None:
    log(f'Resumed from {workdir}/checkpoints at step {start}.')
    workdir_lib.truncate_metrics(workdir, start)
  log(f'Autoencoder: f = {model.downsampling_factor}, latents '
      f'{ae_lib.latent_shape(model, image_shape)} of images {image_shape}, '
      f'{sum(x.size for x in jax.tree.leaves(params)):,} parameters; '
      f'{tc.reconstruction} + {tc.kl_weight:g}·KL, {tc.steps} steps of '
      f'{tc.batch_size}.')
  loss_fn = make_loss_fn(model, tc.kl_weight, tc.reconstruction)
  key = jax.random.key(seed + 1)

  @jax.jit
  def step_fn(state, x):
    rng = jax.random.fold_in(key, state['step'])
    (loss, (rec, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], x, rng)
    updates, opt_state = optimizer.update(grads, state['opt_state'],
                                          state['params'])
    return {'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state, 'step': state['step'] + 1}, {
                'loss': loss, 'reconstruction': rec, 'kl': kl}

  n_rec = min(tc.num_reconstructions, len(test_set))
  test_x = to_float(test_set.images[:max(n_rec, min(len(test_set), 500))])
  reconstruct = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])
  metrics_log = workdir_lib.MetricsLog(workdir)
  progress = progress_lib.Progress(tc.steps, start, what='step', unit='step')
  for step in range(start, tc.steps):
    idx = batch_indices(len(train_set), tc.batch_size, seed, step)
    state, m = step_fn(state, jnp.asarray(to_float(train_set.images[idx])))
    done = step + 1
    row = {}
    if done % 50 == 0 or done == tc.steps or done == start + 1:
      row = {k: float(v) for k, v in m.items()}
      if not np.isfinite(row['loss']):
        raise FloatingPointError(
            f'Autoencoder loss is {row["loss"]} at step {done}; lower '
            'config.autoencoder.learning_rate.')
      progress.update(done, f'loss {row["loss"]:.4f} (rec '
                      f'{row["reconstruction"]:.4f}, KL/pixel '
                      f'{row["kl"]:.3g})')
    if done == tc.steps or (tc.eval_every > 0 and done % tc.eval_every == 0):
      t = time.perf_counter()
      out = np.concatenate([
          np.asarray(reconstruct(state['params'], test_x[s:s + 250]))
          for s in range(0, len(test_x), 250)])
      row['test_l1'] = float(np.mean(np.abs(np.clip(out, -1, 1) - test_x)))
      row['test_psnr'] = psnr(out, test_x)
      log(f'  test reconstruction at step {done}: L1 {row["test_l1"]:.4f}, '
          f'PSNR {row["test_psnr"]:.2f} dB ({time.perf_counter() - t:.1f}s)')
      if workdir_lib.is_writer() and n_rec:
        pairs = np.concatenate([test_x[:n_rec], np.clip(out[:n_rec], -1, 1)])
        path = epath.Path(workdir) / 'reconstructions' / f'step_{done:06d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid.save_grid(pairs, os.fspath(path), nrow=n_rec)
    if row:
      metrics_log.write(done, row)
    if done == tc.steps or (tc.checkpoint_every > 0 and
                            done % tc.checkpoint_every == 0):
      workdir_lib.save_checkpoint(manager, done, state)
  metrics_log.close()
  manager.close()
  return model, state['params']
