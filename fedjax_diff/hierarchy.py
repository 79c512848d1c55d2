"""One round of a client → edge → cloud hierarchy, as one jitted program.

FedPhD (arXiv 2507.06449; the math and its equations are in
`fedjax_diff.strategies.hierarchical`). A call of the round function does, on
device and with no Python loop over clients or edges:

1. the round's clients choose their edges (`hierarchical.select_edges`,
   from their label distributions and the edges' Q, N);
2. each client gathers its edge's model θ_e (the edge models are stacked on
   a leading axis and replicated) and trains from it exactly as in the flat
   round (`rounds.make_client_fn`: local steps under `lax.scan`, then the
   upload path), giving Δ_k = θ_k − θ_e(k);
3. Δ_k is folded into per-edge weighted sums on its device
   (`hierarchical.accumulate_edge_sums`), reduced over the mesh (`psum`);
4. each edge with clients moves to θ_e + Σ_{k→e} n_k Δ_k / Σ_{k→e} n_k, the
   example-weighted mean of its clients' models; an edge without clients
   keeps its model; Q, N absorb the round's clients, n_e becomes the edge's
   example count if it had clients;
5. at a cloud round (r mod k = 0, and the last round if asked) the cloud
   mean Σ_e w_e θ_e with FedPhD's homogeneity-aware weights goes through the
   server optimizer as the pseudo-gradient θ − Σ_e w_e θ_e (`sgd(1.0)`:
   θ ← Σ_e w_e θ_e, FedPhD), every edge is reset to the new θ and Q, N are
   reset; at other rounds θ and the server optimizer state are unchanged;
6. the EMA of θ (the cloud model) is updated every round, as in the flat
   round, so its time constant counts rounds in both.

Clients run in the execution modes of `fedjax_diff.rounds` (vmap, map,
chunked) and are sharded over the mesh axis `clients`. Keys: client k trains
with the flat round's key `fold_in(fold_in(rng, r), k)`, and draws its edge
with `fold_in(fold_in(fold_in(rng, SELECT_KEY_TAG), r), k)`.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_diff import comm
from fedjax_diff import federation
from fedjax_diff import rounds
from fedjax_diff import state as state_lib
from fedjax_diff.diffusion import ema as ema_lib
from fedjax_diff.state import ServerState
from fedjax_diff.strategies import hierarchical
from fedjax_diff.strategies import upload as upload_lib

# Folded into the run's key to derive the edge-selection stream.
SELECT_KEY_TAG = 0x65646765


def selection_key(rng: jax.Array, round_idx) -> jax.Array:
  """The round's edge-selection key (client k folds in its id)."""
  return jax.random.fold_in(jax.random.fold_in(rng, SELECT_KEY_TAG),
                            round_idx)


def make_round_fn(*, loss_fn: rounds.LossFn,
                  client_optimizer: optax.GradientTransformationExtraArgs,
                  server_optimizer: optax.GradientTransformation,
                  mesh: Mesh, local_steps: int, batch_size: int,
                  hierarchy: hierarchical.HierarchyConfig,
                  num_classes: int, num_rounds: Optional[int] = None,
                  upload: Optional[upload_lib.UploadTransform] = None,
                  mode: str = 'vmap', chunk_size: Optional[int] = None,
                  ema_decay: float = 0.9999, random_flip: bool = False,
                  keep_client_optimizer_state: bool = False,
                  donate: bool = True):
  """Builds the jitted hierarchical round function.

  Args:
    loss_fn, client_optimizer, server_optimizer, mesh, local_steps,
      batch_size, upload, mode, chunk_size, ema_decay, random_flip,
      keep_client_optimizer_state, donate: as for `rounds.make_round_fn`.
    hierarchy: E, k, a, b, the selection method and its scale.
    num_classes: C of the label distributions Q, q (the dataset's classes).
    num_rounds: the run's length; with `hierarchy.final_cloud` its last
      round (num_rounds − 1) is also a cloud round.

  Returns:
    `round_fn(state, data, client_ids, client_mask) -> (state, metrics)`,
    as `rounds.make_round_fn`'s, with `state.edges` a
    `hierarchical.EdgeState` of E edges and C classes. metrics: `loss`,
    per slot `client_losses`, `client_weights`, `client_update_norms`,
    `client_edges` (and `client_upload_errors` with an upload transform),
    per edge `edge_weights` (this round's examples) and `cloud_weights`
    (eq. 5's w_e, whether or not this round is a cloud round), and `cloud`
    (1.0 at a cloud round).
  """
  mode = rounds.resolve_mode(mode, mesh.devices.flat[0].platform)
  if mode not in rounds.MODES:
    raise ValueError(f'Unknown execution mode {mode!r}; use one of '
                     f'{rounds.MODES}.')
  train = rounds.make_local_training(loss_fn, client_optimizer, local_steps,
                                     batch_size, random_flip)
  client_fn = rounds.make_client_fn(train, upload)
  clients = federation.CLIENTS
  num_edges = hierarchy.num_edges
  last = num_rounds if hierarchy.final_cloud else None

  def device_block(edge_params, images, labels, counts, keys, weights, edges,
                   client_states, round_idx):
    """The clients of one device, chunk by chunk, then the mesh reduction."""
    per_device = counts.shape[0]
    c = rounds.chunk_size_for(mode, per_device, chunk_size)
    # Replicated edge models must be varying before clients differentiate
    # from them (see rounds.make_round_fn's device_block).
    edge_params = rounds._as_varying(edge_params, clients)  # pylint: disable=protected-access
    chunked = jax.tree.map(
        lambda x: x.reshape((per_device // c, c) + x.shape[1:]),
        (images, labels, counts, keys, weights, edges, client_states))

    def one_client(edge, imgs, lbls, cnt, key, z):
      start = jax.tree.map(lambda p: p[edge], edge_params)
      return client_fn(start, imgs, lbls, cnt, key, z, round_idx)

    vmapped = jax.vmap(one_client)

    def body(acc, xs):
      imgs, lbls, cnts, ks, ws, es, zs = xs
      deltas, zs, losses, norms, errs = vmapped(es, imgs, lbls, cnts, ks, zs)
      acc = hierarchical.accumulate_edge_sums(acc, deltas, ws, es)
      return acc, (zs, losses, norms, errs)

    acc0 = rounds._as_varying(  # pylint: disable=protected-access
        (jax.tree.map(jnp.zeros_like, edge_params),
         jnp.zeros((num_edges,), jnp.float32)), clients)
    acc, per_client = jax.lax.scan(body, acc0, chunked)
    per_client = jax.tree.map(
        lambda x: x.reshape((per_device,) + x.shape[2:]), per_client)
    return (jax.lax.psum(acc, clients),) + per_client

  sharded_block = jax.shard_map(
      device_block, mesh=mesh,
      in_specs=(P(), P(clients), P(clients), P(clients), P(clients),
                P(clients), P(clients), P(clients), P()),
      out_specs=(P(), P(clients), P(clients), P(clients), P(clients)))
  client_sharding = state_lib.client_rows_sharding(mesh)

  def round_fn(state: ServerState, data: federation.ClientData,
               client_ids: jax.Array, client_mask: jax.Array):
    if client_ids.shape[0] % mesh.size:
      raise ValueError(
          f'{client_ids.shape[0]} client slots do not split over {mesh.size} '
          'devices; pad them with federation.round_slots.')
    check_edges(state.edges, state.params, num_edges, num_classes)
    rounds.check_client_states(
        state.client_states, upload, state.params, data.num_clients,
        client_optimizer if keep_client_optimizer_state else None)
    edge_state = state.edges
    round_key = jax.random.fold_in(state.rng, state.round)
    keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(client_ids)
    images = data.images[client_ids]
    labels = data.labels[client_ids]
    counts = jnp.where(client_mask > 0, data.counts[client_ids], 0)
    weights = counts.astype(jnp.float32)
    slot_states = jax.tree.map(lambda x: x[client_ids], state.client_states)

    # 1. Edge selection against the start-of-round Q, N.
    q = hierarchical.label_distributions(labels, counts, num_classes)
    edges = hierarchical.select_edges(
        selection_key(state.rng, state.round), edge_state.label_dist,
        edge_state.samples, q, weights, client_ids, client_mask,
        hierarchy.selection, hierarchy.select_scale)

    # 2-3. Clients train from their edges; per-edge sums over the mesh.
    (sums, totals), slot_states, losses, norms, errs = sharded_block(
        edge_state.params, images, labels, counts, keys, weights, edges,
        slot_states, state.round)
    rows = jnp.where(client_mask > 0, client_ids, data.num_clients)
    client_states = jax.tree.map(
        lambda full, new: jax.lax.with_sharding_constraint(
            full.at[rows].set(new, mode='drop'), client_sharding),
        state.client_states, slot_states)

    # 4. Edge means; edges without clients keep their model and n_e.
    has = totals > 0
    denom = jnp.maximum(totals, jnp.finfo(jnp.float32).tiny)

    def edge_mean(p, s):
      shape = (num_edges,) + (1,) * (p.ndim - 1)
      return jnp.where(has.reshape(shape),
                       p + s / denom.reshape(shape).astype(s.dtype), p)

    edge_params = jax.tree.map(edge_mean, edge_state.params, sums)
    edge_counts = jnp.where(has, totals, edge_state.counts)
    label_dist, samples = hierarchical.absorb_clients(
        edge_state.label_dist, edge_state.samples, q, weights, edges,
        client_mask)

    # 5. Cloud aggregation (selected, not branched: both sides are cheap
    # next to the clients' training).
    cloud = hierarchical.is_cloud_round(state.round, hierarchy.cloud_every,
                                        last)
    w = hierarchical.cloud_weights(edge_counts, label_dist, hierarchy.agg_a,
                                   hierarchy.agg_b)
    cloud_mean = jax.tree.map(
        lambda p: jnp.tensordot(w.astype(p.dtype), p, axes=1), edge_params)
    pseudo_grad = jax.tree.map(jnp.subtract, state.params, cloud_mean)
    updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state,
                                                 state.params)
    cloud_params = optax.apply_updates(state.params, updates)
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(cloud, x, y), a, b)
    params = pick(cloud_params, state.params)
    opt_state = pick(opt_state, state.opt_state)
    reset = hierarchical.init_edge_state(params, num_edges, num_classes)
    new_edges = edge_state.replace(
        params=pick(reset.params, edge_params),
        counts=edge_counts,
        label_dist=jnp.where(cloud, reset.label_dist, label_dist),
        samples=jnp.where(cloud, reset.samples, samples))

    new_state = state.replace(
        params=params,
        ema_params=ema_lib.ema_update(
            state.ema_params, params,
            rounds.ema_decay_at(ema_decay, state.round)),
        opt_state=opt_state,
        round=state.round + 1,
        client_states=client_states,
        edges=new_edges)
    total = jnp.maximum(weights.sum(), 1.0)
    metrics = {
        'loss': jnp.sum(jnp.where(weights > 0, losses, 0) * weights) / total,
        'client_losses': losses,
        'client_weights': weights,
        'client_update_norms': norms,
        'client_edges': edges,
        'edge_weights': totals,
        'cloud_weights': w,
        'cloud': cloud.astype(jnp.float32),
    }
    if upload is not None:
      metrics['client_upload_errors'] = errs
    return new_state, metrics

  return jax.jit(round_fn, donate_argnums=(0,) if donate else ())


def check_edges(edges, params, num_edges: int, num_classes: int) -> None:
  """Raises a ValueError unless `edges` is an EdgeState of `num_edges` copies
  of `params`' shapes and `num_classes` classes (checked at trace time)."""
  how = ('Build it with fedjax_diff.strategies.hierarchical.init_edge_state'
         f'(params, {num_edges}, {num_classes}) and pass it as '
         'init_server_state(..., edges=...).')
  if not isinstance(edges, hierarchical.EdgeState):
    raise ValueError(f'state.edges is {type(edges).__name__}, not an '
                     f'EdgeState: the hierarchical round needs one. {how}')
  want = jax.eval_shape(
      functools.partial(hierarchical.init_edge_state, num_edges=num_edges,
                        num_classes=num_classes), params)
  got_shapes = jax.tree.map(lambda x: tuple(x.shape), edges)
  want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
  if got_shapes != want_shapes:
    raise ValueError(f'state.edges has shapes {got_shapes}; expected '
                     f'{want_shapes} ({num_edges} edges, {num_classes} '
                     f'classes). {how}')


def init_edges(hierarchy: Optional[hierarchical.HierarchyConfig], params,
               num_classes: int):
  """`ServerState.edges` for a hierarchy (None = flat: None)."""
  if hierarchy is None:
    return None
  return hierarchical.init_edge_state(params, hierarchy.num_edges,
                                      num_classes)


def round_figures(metrics, param_shapes,
                  hierarchy: hierarchical.HierarchyConfig) -> dict:
  """A logged round's hierarchy figures: `cloud` (1 at a cloud round), per
  edge e `edge_clients_e`, `edge_examples_e` and `cloud_weight_e`, and that
  round's edge↔cloud bytes (`comm.edge_cloud_round_bytes`)."""
  cloud = bool(np.asarray(metrics['cloud']))
  edges = np.asarray(metrics['client_edges'])
  real = np.asarray(metrics['client_weights']) > 0
  out = {'cloud': int(cloud)}
  for e in range(hierarchy.num_edges):
    out[f'edge_clients_{e}'] = int(np.sum(real & (edges == e)))
    out[f'edge_examples_{e}'] = float(np.asarray(metrics['edge_weights'])[e])
    out[f'cloud_weight_{e}'] = float(np.asarray(metrics['cloud_weights'])[e])
  out.update(comm.edge_cloud_round_bytes(param_shapes, hierarchy.num_edges,
                                         cloud))
  return out


def summary_update(summary: dict, param_shapes,
                   hierarchy: hierarchical.HierarchyConfig,
                   num_rounds: int) -> dict:
  """`comm.run_summary` with the edge↔cloud links of `num_rounds` rounds."""
  clouds = hierarchical.num_cloud_rounds(num_rounds, hierarchy.cloud_every,
                                         hierarchy.final_cloud)
  return comm.with_edge_cloud_links(summary, param_shapes,
                                    hierarchy.num_edges, clouds)
