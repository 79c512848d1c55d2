"""FedDDPM's server step: optimizing the global model on the auxiliary data.

FedDDPM (arXiv 2503.06426) corrects the drift of FedAvg under non-IID data
from the server side: after each aggregation, the server optimizes the global
model θ on an auxiliary dataset D_aux that it sampled from the clients'
phase-1 models (`fedjax_diff.auxiliary_data`), for S steps of its own
optimizer:

    θ ← θ − opt_s(∇_θ L_aux(θ)),  s = 1..S,
    L_aux(θ) = E_{(x0, y) ∈ D_aux, t, ε} ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, y)‖²

(the DDPM loss, Ho et al. 2020, arXiv 2006.11239, eq. 14, with the run's
classifier-free label dropout). The server trains like a client whose data is
D_aux: `client.make_local_training` under `lax.scan`, batches drawn by index
from the on-device uint8 set, one epoch at a time without replacement. Its
optax optimizer (`server_aux_optimizer`) starts fresh at every server step, as
a client's does every round; the abstract is silent on this, and a fresh
state carries nothing across rounds that would need checkpointing.

The EMA of the global parameters was updated by the round from the
aggregated θ_agg. Replacing θ_agg by the corrected θ' in that update gives

    ema' = d·ema_prev + (1 − d)·θ' = ema + (1 − d)·(θ' − θ_agg),

with d the decay the round used (`diffusion.ema.ema_decay_at(decay, round − 1)`),
which `make_server_update` applies so that the EMA sees the corrected model.

Keys: server step of round r (1-based, after r rounds) uses
`fold_in(fold_in(state.rng, SERVER_AUX_KEY_TAG), r)`, so a resumed run draws
the same batches.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fedjax_diff import client
from fedjax_diff import optimizers
from fedjax_diff.diffusion import diffusion_loss
from fedjax_diff.diffusion import ema as ema_lib
from fedjax_diff.state import ServerState

PyTree = Any
SERVER_AUX_KEY_TAG = 0x5E7A  # Separates server-step keys from client keys.


def server_aux_optimizer(cfg: ml_collections.ConfigDict
                         ) -> optax.GradientTransformation:
  """The server's optimizer on the auxiliary data.

  Fields: `name` ('adam' or 'sgd'), `learning_rate` (> 0), `grad_clip`
  (global norm; 0 disables), optional `b1`, `b2`, `momentum` (in [0, 1)).
  None: Adam at 1e-3.

  Raises:
    ValueError: an unknown name or a field out of range.
  """
  cfg = cfg if cfg is not None else {}
  where = 'config.fedddpm.server_optimizer'
  chain = []
  clip = optimizers.number_field(cfg, 'grad_clip', where, 0.0, low=0.0)
  if clip:
    chain.append(optax.clip_by_global_norm(clip))
  name = cfg.get('name', 'adam')
  lr = optimizers.number_field(cfg, 'learning_rate', where, 1e-3, low=0.0,
                               low_open=True)
  if name == 'adam':
    chain.append(optax.adam(
        lr, b1=optimizers.number_field(cfg, 'b1', where, 0.9, low=0.0,
                                       high=1.0),
        b2=optimizers.number_field(cfg, 'b2', where, 0.999, low=0.0,
                                   high=1.0)))
  elif name == 'sgd':
    momentum = optimizers.number_field(cfg, 'momentum', where, 0.0, low=0.0,
                                       high=1.0)
    chain.append(optax.sgd(lr, momentum=momentum or None))
  else:
    raise ValueError(f"Unknown server_aux optimizer {name!r} "
                     "(config.fedddpm.server_optimizer.name); use 'adam' or "
                     "'sgd'.")
  return optax.chain(*chain)


def make_server_update(*, loss_fn: client.LossFn,
                       optimizer: optax.GradientTransformation,
                       num_steps: int, batch_size: int, ema_decay: float,
                       donate: bool = True) -> Callable:
  """Builds the jitted server step on the auxiliary data.

  Args:
    loss_fn: `(params, x, labels, rng) -> scalar`, the clients' loss.
    optimizer: from `server_aux_optimizer`.
    num_steps: S, optimizer steps per call.
    batch_size: auxiliary examples per step.
    ema_decay: the round's EMA decay (for the EMA correction above).
    donate: donate the input state's buffers.

  Returns:
    `update(state, images, labels) -> (state, mean_loss)`: `state` just after
    a round (its `round` counts that round), `images` uint8 `[N, H, W, C]`
    and `labels` int32 `[N]` the auxiliary training set on device.
  """
  if num_steps < 1 or batch_size < 1:
    raise ValueError(f'The server step needs num_steps >= 1 and batch_size '
                     f'>= 1; got {num_steps}, {batch_size}.')
  # optax.chain accepts (and ignores) the extra arguments a client optimizer
  # gets, so the server trains with the round's local-training loop.
  train = client.make_local_training(loss_fn, optax.chain(optimizer),
                                     num_steps, batch_size, False)

  def update(state: ServerState, images: jax.Array, labels: jax.Array):
    key = jax.random.fold_in(
        jax.random.fold_in(state.rng, SERVER_AUX_KEY_TAG), state.round)
    count = jnp.asarray(images.shape[0], jnp.int32)
    params, loss, _ = train(state.params, images, labels, count, key,
                            jnp.zeros((), jnp.int32))
    d = ema_lib.ema_decay_at(ema_decay, state.round - 1)
    ema = jax.tree.map(lambda e, new, old: e + (1.0 - d) * (new - old),
                       state.ema_params, params, state.params)
    return state.replace(params=params, ema_params=ema), loss

  return jax.jit(update, donate_argnums=(0,) if donate else ())


def make_aux_loss(*, eps_fn, schedule, images, labels, conditional: bool,
                  seed: int, batch_size: int = 100) -> Callable:
  """The DDPM loss of a model on a fixed set (e.g. the held-out slice of the
  auxiliary data), with fixed timesteps and noise so that values are
  comparable from round to round: `loss(params) -> scalar` (jitted).
  Evaluated without label dropout, as `evaluators.denoising_loss` does."""
  n = int(images.shape[0])
  if n < 1:
    raise ValueError('make_aux_loss needs at least one example; raise '
                     'config.fedddpm.heldout_fraction or the auxiliary size.')
  batch = min(batch_size, n)
  num_batches = n // batch
  used = num_batches * batch
  imgs = jnp.asarray(images[:used]).reshape(
      (num_batches, batch) + tuple(images.shape[1:]))
  lbls = jnp.asarray(labels[:used]).reshape(num_batches, batch)
  key = jax.random.PRNGKey(seed)

  def loss(params):
    def one(i):
      return diffusion_loss(eps_fn, params, schedule,
                            client.to_float_images(imgs[i]),
                            jax.random.fold_in(key, i),
                            labels=lbls[i] if conditional else None,
                            train=False)
    return jax.lax.map(one, jnp.arange(num_batches)).mean()

  return jax.jit(loss)
