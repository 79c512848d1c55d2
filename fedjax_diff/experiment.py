"""An experiment's parts from its config: the model, its loss, and the `Run`.

What the trainer, the benchmark and the device check share, with no data
loading, workdir or summary writers in it (so it runs where only jax, flax
and optax are installed):

* `init_model(config, image_shape)`: the UNet of `config.model` and its
  initial parameters;
* `make_loss_fn(eps_fn, schedule, config)`: the local training loss, the
  DDPM ε-loss with the config's classifier-free label dropout;
* `make_run(config, ...)`: the `algorithms.Run` an algorithm is built from
  (loss, client optimizer with the client transforms first, server
  optimizer, upload path).
"""

from typing import Any, Callable, Optional

import jax
import ml_collections

from fedjax_diff import algorithms
from fedjax_diff import federation
from fedjax_diff import models
from fedjax_diff import optimizers
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import schedule_from_config
from fedjax_diff.diffusion.losses import cond_drop_prob_from_config
from fedjax_diff.diffusion.losses import min_snr_gamma_from_config
from fedjax_diff.strategies import build as strategies_build

PyTree = Any


def init_model(config: ml_collections.ConfigDict, image_shape):
  """(UNet of `config.model`, its initial parameters from `config.seed`).

  Initialised under jit with an 'rbg' key: XLA compiles the threefry hash of
  every parameter's initializer slowly on CPU (minutes for a CIFAR UNet).
  Only initialisation uses it; training keys stay threefry, whose streams do
  not depend on sharding.
  """
  model = models.unet_from_config(config.model)
  params = jax.jit(lambda k: models.init_params(model, k, image_shape))(
      jax.random.key(int(config.seed), impl='rbg'))
  return model, params


def schedule_of(config: ml_collections.ConfigDict):
  """The noise schedule of `config.diffusion` (`schedule`, `num_timesteps`,
  and `beta_start` / `beta_end` where given, e.g. LDM's)."""
  return schedule_from_config(config.diffusion)


def make_loss_fn(eps_fn, schedule, config: ml_collections.ConfigDict):
  """The local training loss `(params, x, labels, rng) -> scalar`."""
  num_classes = config.model.get('num_classes')
  drop = cond_drop_prob_from_config(config)
  gamma = min_snr_gamma_from_config(config)

  def loss_fn(params, x, labels, rng):
    return diffusion_loss(
        eps_fn, params, schedule, x, rng,
        labels=labels if num_classes is not None else None,
        null_label=num_classes, cond_drop_prob=drop, min_snr_gamma=gamma,
        train=True)

  return loss_fn


def make_run(config: ml_collections.ConfigDict, *, model, params: PyTree,
             data: federation.ClientData, num_clients: int, num_classes: int,
             image_shape, mesh, workdir: str = '',
             log: Callable[[str], None] = print,
             latent=None) -> algorithms.Run:
  """The `algorithms.Run` of a config for `model` (possibly pruned) and
  `data` (sharded over `mesh`); `image_shape` is the shape of what the
  model sees (latents under `latent`, a `fedjax_diff.latent.LatentSpace`)."""
  schedule = schedule_of(config)
  eps_fn = models.make_eps_fn(model)
  return algorithms.Run(
      config=config, workdir=workdir, mesh=mesh, data=data,
      num_clients=int(num_clients), num_classes=int(num_classes),
      image_shape=tuple(image_shape), eps_fn=eps_fn, schedule=schedule,
      loss_fn=make_loss_fn(eps_fn, schedule, config),
      client_optimizer=optimizers.client_optimizer(
          config.client_optimizer,
          extra=strategies_build.client_transforms(config)),
      server_optimizer=optimizers.server_optimizer(config.server_optimizer),
      upload=strategies_build.upload_from_config(
          config, eps_fn=eps_fn, schedule=schedule, image_shape=image_shape,
          num_classes=config.model.get('num_classes')),
      # Shapes and dtypes only (the arrays may be donated to the first
      # round): what communication accounting needs.
      param_shapes=jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
      model=model, log=log, latent=latent)


def model_flops_per_example(run: algorithms.Run) -> Optional[float]:
  """Training FLOPs of one example: 3 forward passes' worth (forward, and
  a backward of twice its cost) × 2 FLOPs per MAC of the forward pass
  (`models.macs`); None for a model the counter does not know."""
  if not isinstance(run.model, models.UNet):
    return None
  from fedjax_diff.models import macs  # pylint: disable=g-import-not-at-top
  return 6.0 * macs.unet_macs(run.model, run.image_shape, run.param_shapes)
