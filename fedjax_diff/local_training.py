"""FedDDPM phase 1: every client trains its own diffusion model, all at once.

FedDDPM (arXiv 2503.06426) starts with each client training a diffusion model
on its local data alone until it is well trained, and uploading it once; the
server then samples an auxiliary dataset from these local models
(`fedjax_diff.auxiliary_data`). Client k minimises its local DDPM objective

    θ_k = argmin_θ E_{x0 ∈ D_k, t, ε} ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t, y)‖²

(Ho et al. 2020, arXiv 2006.11239, eq. 14), here approximated by `steps`
optimizer steps from a common initialisation θ_0 (a step budget: the
abstract leaves "well trained" open, and a fixed budget keeps every client in
one compiled program).

All clients train in one jitted program, like a round (`fedjax_diff.rounds`):
the clients are on a leading axis sharded over the mesh axis `clients` with
`shard_map`, and inside a device they run one after another (`mode='map'`,
`lax.map`) or all together (`mode='vmap'`). Each client's local steps are the
round's `rounds.make_local_training` under `lax.scan`, with `round=0`, so the
learning-rate warmup starts at the first step. Client k's key is
`fold_in(rng, k)`, so its model does not depend on its device or slot.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_diff import federation
from fedjax_diff import rounds

PyTree = Any
MODES = ('vmap', 'map')


def make_pretrain_fn(*, loss_fn: rounds.LossFn,
                     client_optimizer: optax.GradientTransformationExtraArgs,
                     mesh: Mesh, steps: int, batch_size: int,
                     mode: str = 'auto', random_flip: bool = False):
  """Builds the jitted phase-1 program.

  Args:
    loss_fn: `(params, x, labels, rng) -> scalar`, as for a round.
    client_optimizer: the optax chain each client trains with (fresh state
      per client; called with `global_params=θ_0` and `global_step=s`).
    mesh: a 1-D mesh with axis `clients` (`federation.client_mesh`).
    steps: local optimizer steps per client (the phase-1 budget).
    batch_size: local batch size.
    mode: 'map' (one client after another on a device: least memory, the
      fastest on CPU), 'vmap' (all of a device's clients together), or
      'auto' (`rounds.resolve_mode`; 'chunked' resolves to 'map').
    random_flip: random horizontal flips of local batches.

  Returns:
    `pretrain(init_params, data, rng) -> (client_params, losses)`: `data` a
    `federation.ClientData` whose client axis splits over the mesh
    (`federation.shard_client_data`), `client_params` the stacked
    `[num_clients, ...]` trained models (sharded over `clients`; padding
    clients train on nothing useful and are to be ignored), `losses` each
    client's mean training loss over its steps.
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f'Phase 1 needs steps >= 1 and batch_size >= 1; got '
                     f'steps={steps}, batch_size={batch_size}.')
  mode = rounds.resolve_mode(mode, mesh.devices.flat[0].platform)
  if mode == 'chunked':
    mode = 'map'
  if mode not in MODES:
    raise ValueError(f'Unknown phase-1 mode {mode!r}; use one of {MODES} or '
                     "'auto'.")
  train = rounds.make_local_training(loss_fn, client_optimizer, steps,
                                     batch_size, random_flip)
  clients = federation.CLIENTS

  def device_block(init_params, images, labels, counts, keys):
    # θ_0 arrives replicated; each client differentiates its own copy, so it
    # must be varying over the mesh axis (see rounds.device_block).
    init_params = rounds._as_varying(init_params, clients)  # pylint: disable=protected-access

    def one(xs):
      imgs, lbls, cnt, key = xs
      params, loss, _ = train(init_params, imgs, lbls, cnt, key,
                              jnp.zeros((), jnp.int32))
      return params, loss

    xs = (images, labels, counts, keys)
    if mode == 'vmap':
      return jax.vmap(lambda *a: one(a))(*xs)
    return jax.lax.map(one, xs)

  sharded = jax.shard_map(
      device_block, mesh=mesh,
      in_specs=(P(), P(clients), P(clients), P(clients), P(clients)),
      out_specs=(P(clients), P(clients)))

  def pretrain(init_params, data: federation.ClientData, rng: jax.Array):
    if data.num_clients % mesh.size:
      raise ValueError(
          f'{data.num_clients} clients do not split over {mesh.size} '
          'devices; pad them with federation.shard_client_data.')
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(
        jnp.arange(data.num_clients))
    return sharded(init_params, data.images, data.labels, data.counts, keys)

  return jax.jit(pretrain)
