"""What one client does in a round: local training, then its upload.

Local training (`make_local_training`) is `local_steps` optimizer steps
under `lax.scan` on batches drawn by index from the client's own on-device
uint8 data:

    θ ← θ + opt(∇_θ L(θ; x_s, y_s, ξ_s)),   s = 0..S−1,   θ_0 = start,

where batch s is positions [s·B, (s+1)·B) (mod n_k) of a random permutation
of the client's n_k examples (`epoch_order`), so every example is seen once
per local epoch (sampling without replacement), and L is the diffusion loss
with its own noise key ξ_s.

`make_client_update` follows it with the upload path: Δ_k = θ_k − start goes
through the upload transform (`strategies.upload`; FedAvg: none) into the Δ̂_k
the server receives.

Keys: the engine gives client k the key `fold_in(fold_in(rng, round), k)`
(its global id, never its slot). Local training splits it as
`order_key, train_key = split(key)`; step s uses `fold_in(train_key, s)`
split into (flip, loss) keys. The upload key is
`fold_in(key, upload.UPLOAD_KEY_TAG)`.

Rows: what a client keeps from one round it takes part in to the next is a
dict of named rows (`ServerState.client_states`): `'optimizer'` when clients
keep their optimizer state (DiLoCo-style, `keep_optimizer_state`),
`'upload'` for the upload path's state (error-feedback residuals), and
whatever an algorithm adds (SCAFFOLD's control variate). A client may
instead start from an optimizer state it is handed (`opt_state`: one state
shared by the round's clients, `algorithms.base`), and report the state it
ends with (`ClientUpdate.opt_state`).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_diff.strategies import clipping
from fedjax_diff.strategies import upload as upload_lib

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]

# Keys of a client's rows owned by the components of this module.
OPTIMIZER = 'optimizer'
UPLOAD = 'upload'


def to_float_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] → float32 [−1, 1], the range the diffusion model sees;
  float data (latents of latent diffusion) are already in the model's space
  and pass through."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(jnp.float32)
  return images.astype(jnp.float32) / 127.5 - 1.0


def epoch_order(key: jax.Array, count: jax.Array, max_n: int) -> jax.Array:
  """A random permutation of `[0, count)` followed by the padding indices.

  The scores `uniform(key, (max_n,))` of the valid positions are sorted
  (padding positions score 2, after every valid one). Batches are read
  cyclically from it, so a client sees each of its examples once per local
  epoch (sampling without replacement).
  """
  scores = jax.random.uniform(key, (max_n,))
  scores = jnp.where(jnp.arange(max_n) < count, scores, 2.0)
  return jnp.argsort(scores)


def client_batch(images, labels, order, count, step, batch_size, key,
                 random_flip: bool):
  """The `step`-th local batch of one client, as float images and labels:
  positions `(step·B + j) mod count` of `order`, flipped with probability
  1/2 per image when `random_flip`."""
  pos = (step * batch_size + jnp.arange(batch_size)) % jnp.maximum(count, 1)
  idx = order[pos]
  x = to_float_images(images[idx])
  if random_flip:
    flip = jax.random.bernoulli(key, 0.5, (batch_size,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return x, labels[idx]


def upload_key(client_key: jax.Array) -> jax.Array:
  """A client's upload key: `fold_in(client_key, upload.UPLOAD_KEY_TAG)`."""
  return jax.random.fold_in(client_key, upload_lib.UPLOAD_KEY_TAG)


def make_local_training(loss_fn: LossFn,
                        client_optimizer: optax.GradientTransformationExtraArgs,
                        local_steps: int, batch_size: int,
                        random_flip: bool = False):
  """Local training of one client: `local_steps` steps under `lax.scan`.

  Returns `train(start_params, images, labels, count, key, round,
  opt_state=None, extra_args=None, step_offset=None, num_steps=None) ->
  (params, mean_loss, opt_state)`, with `images` the client's uint8
  `[max_n, H, W, C]`. The optimizer is called as `update(grads, state,
  params, global_params=start_params, global_step=o + s, **extra_args)` with
  o = `step_offset`, by default round·local_steps (the schedule counts a
  client's own steps); it starts from `opt_state` when given (a client that
  keeps its optimizer state across rounds, or a shared one), else from a
  fresh `init` (FedAvg). `num_steps` (a traced int, ≤ local_steps; a
  straggler, `strategies.faults`) stops the client after its first
  `num_steps` steps: the scan still has `local_steps` iterations (one
  program for every client), but steps s ≥ num_steps leave the parameters
  and the optimizer state as they are, and the mean loss is over the steps
  run. Keys: see the module docstring.
  """

  def train(start_params, images, labels, count, key, round_idx,
            opt_state=None, extra_args=None, step_offset=None,
            num_steps=None):
    order_key, train_key = jax.random.split(key)
    order = epoch_order(order_key, count, images.shape[0])
    if opt_state is None:
      opt_state = client_optimizer.init(start_params)
    extra_args = extra_args or {}
    offset = round_idx * local_steps if step_offset is None else step_offset

    def step(carry, s):
      params, opt_state = carry
      flip_key, loss_key = jax.random.split(jax.random.fold_in(train_key, s))
      x, y = client_batch(images, labels, order, count, s, batch_size,
                          flip_key, random_flip)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y, loss_key)
      updates, new_opt_state = client_optimizer.update(
          grads, opt_state, params, global_params=start_params,
          global_step=offset + s, **extra_args)
      new = (optax.apply_updates(params, updates), new_opt_state)
      if num_steps is not None:
        active = s < num_steps
        new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new,
                           (params, opt_state))
        loss = jnp.where(active, loss, 0.0)
      return new, loss

    (params, opt_state), losses = jax.lax.scan(
        step, (start_params, opt_state), jnp.arange(local_steps))
    if num_steps is None:
      return params, losses.mean(), opt_state
    return (params, losses.sum() / jnp.maximum(num_steps, 1).astype(
        losses.dtype), opt_state)

  return train


class LocalData(NamedTuple):
  """One client's own data, as the engine hands it over (no client axis)."""
  images: jax.Array   # uint8 [max_n, H, W, C]
  labels: jax.Array   # int32 [max_n]
  count: jax.Array    # int32 scalar


class ClientUpdate(NamedTuple):
  """What `make_client_update`'s function returns for one client.

  Attributes:
    update: Δ̂_k, what the server receives (Δ_k without an upload path).
    params: θ_k after local training.
    rows: the client's rows after this round.
    loss: mean local training loss.
    norm: ‖Δ_k‖, the client's drift from its start.
    upload_error: ‖Δ̂_k − Δ_k‖ (0 without an upload path).
    opt_state: the client optimizer's state after the last local step.
    steps: the local steps it ran (int32) when capped by `num_steps`;
      None: all `local_steps`.
  """
  update: PyTree
  params: PyTree
  rows: dict
  loss: jax.Array
  norm: jax.Array
  upload_error: jax.Array
  opt_state: Any = None
  steps: Any = None


def make_client_update(train, upload: Optional[upload_lib.UploadTransform]):
  """One client of a round: local training from `start`, then the upload.

  Args:
    train: from `make_local_training`.
    upload: the upload transform, or None (Δ is sent as is).

  Returns:
    `client_update(start, data: LocalData, key, rows, round,
    extra_args=None, opt_state=None, step_offset=None, clip_norm=None,
    num_steps=None) -> ClientUpdate`.
    Training starts from `opt_state` when given, else from the client's
    own optimizer state when `rows` holds it (`OPTIMIZER`; the state after
    the last local step then replaces it), else from a fresh one; the
    upload's state (`UPLOAD`) is carried likewise. `step_offset`: see
    `make_local_training`. `clip_norm` is the round's clip norm the server
    broadcasts (DP, `strategies.privacy`), handed to the upload path as
    `UploadContext.clip_norm`. `num_steps`: a straggler's step count (see
    `make_local_training`).
  """

  def client_update(start, data: LocalData, key, rows, round_idx,
                    extra_args=None, opt_state=None, step_offset=None,
                    clip_norm=None, num_steps=None):
    if opt_state is None:
      opt_state = rows.get(OPTIMIZER)
    params, loss, opt_state = train(start, data.images, data.labels,
                                    data.count, key, round_idx, opt_state,
                                    extra_args, step_offset, num_steps)
    steps = None if num_steps is None else jnp.asarray(num_steps, jnp.int32)
    rows = dict(rows)
    if OPTIMIZER in rows:
      rows[OPTIMIZER] = opt_state
    delta = jax.tree.map(jnp.subtract, params, start)
    norm = clipping.global_norm(delta)
    if upload is None:
      return ClientUpdate(delta, params, rows, loss, norm,
                          jnp.zeros_like(norm), opt_state, steps)
    ctx = upload_lib.UploadContext(global_params=start, params=params,
                                   labels=data.labels, count=data.count,
                                   round=round_idx, clip_norm=clip_norm)
    # A stateless upload keeps no rows: its (leafless) state is rebuilt here.
    z = rows.get(UPLOAD)
    if z is None:
      z = upload.init_client_state(params)
    delta_hat, z = upload.apply(delta, z, upload_key(key), ctx)
    if UPLOAD in rows:
      rows[UPLOAD] = z
    err = clipping.global_norm(
        jax.tree.map(jnp.subtract, delta_hat, delta))
    return ClientUpdate(delta_hat, params, rows, loss, norm, err, opt_state,
                        steps)

  return client_update


def initial_rows(params: PyTree, *, upload=None, client_optimizer=None,
                 extra: Optional[Callable[[PyTree], dict]] = None) -> dict:
  """One client's rows before its first round.

  `'upload'` when the upload path keeps state, `'optimizer'` when clients
  keep their optimizer state (`client_optimizer` given, and its state has
  leaves), and the entries of
  `extra(params)` (an algorithm's own rows). `{}` for FedAvg.
  """
  rows = {}
  if upload is not None:
    z = upload.init_client_state(params)
    if jax.tree.leaves(z):
      rows[UPLOAD] = z
  if client_optimizer is not None:
    # A stateless chain (plain SGD without warmup) has nothing to keep.
    z = client_optimizer.init(params)
    if jax.tree.leaves(z):
      rows[OPTIMIZER] = z
  if extra is not None:
    rows.update(extra(params))
  return rows
