"""FedPhD: clients → edge servers → cloud, homogeneity-aware.

Long et al. 2025, "FedPhD: Federated Pruning with Hierarchical Learning of
Diffusion Models" (arXiv 2507.06449); the equations are in
`fedjax_diff.strategies.hierarchical`. Round r, on device and with no Python
loop over clients or edges:

1. the round's clients choose their edges (`hierarchical.select_edges`,
   eq. 3, from their label distributions q_n and the edges' Q, N);
2. client k trains from its edge's model θ_e(k) (the engine's per-client
   start: the E edge models are broadcast, each client indexes its own) and
   uploads Δ_k = U(θ_k − θ_e(k));
3. the edges' aggregator (`hierarchical.edge_sums`) gives Σ_{k→e} n_k Δ_k
   and Σ_{k→e} n_k;
4. each edge with clients moves to θ_e + Σ_{k→e} n_k Δ_k / Σ_{k→e} n_k;
   an edge without clients keeps its model; Q, N absorb the round's clients
   (eq. 4), n_e becomes the edge's example count if it had clients;
5. at a cloud round (r mod k = 0, and the last round if
   `hierarchy.final_cloud`) the server optimizer takes the pseudo-gradient
   θ − Σ_e w_e θ_e with the homogeneity-aware weights of eq. 5 (`sgd(1.0)`:
   θ ← Σ_e w_e θ_e), every edge is reset to the new θ and Q, N are reset; at
   other rounds θ and the server optimizer state are unchanged;
6. the EMA of θ (the cloud model) is updated every round, as in FedAvg.

A client left out of the round (`strategies.faults`: a non-finite upload,
an injected fault) adds nothing to its edge's model nor to its Q, N; a round
that keeps no client changes nothing, so a cloud aggregation due then waits
for the next cloud round.
With `config.client_optimizer.shared_state` the clients share one
optimizer state, FedPhD's code's one Adam (see `algorithms.base`), in the
order of its loops: edge by edge, clients by id within an edge.

Keys: client k trains with FedAvg's key `fold_in(fold_in(rng, r), k)` and
draws its edge with `fold_in(fold_in(fold_in(rng, SELECT_KEY_TAG), r), k)`.
Its server-side state (`ServerState.algorithm`) is a
`hierarchical.EdgeState`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_diff import comm
from fedjax_diff import engine
from fedjax_diff import state as state_lib
from fedjax_diff.algorithms import base
from fedjax_diff.strategies import hierarchical

# Folded into the run's key to derive the edge-selection stream ('edge').
SELECT_KEY_TAG = 0x65646765


def selection_key(rng: jax.Array, round_idx) -> jax.Array:
  """The round's edge-selection key (client k folds in its id)."""
  return jax.random.fold_in(jax.random.fold_in(rng, SELECT_KEY_TAG),
                            round_idx)


class Algorithm(base.Algorithm):
  """FedPhD's hierarchy with the settings of `config.hierarchy`."""

  name = 'fedphd'
  dp_unsound = (
      "edge selection (eq. 3) and the cloud's homogeneity-aware weights "
      "(eq. 5) are computed from each client's label distribution and "
      'example count, which no clipping bounds and no noise covers, and '
      'edges average updates by example count.')

  def __init__(self, run: base.Run):
    super().__init__(run)
    self.hierarchy = hierarchy_from(run.config)
    self.num_classes = int(run.num_classes)
    self.aggregator = hierarchical.edge_sums(self.hierarchy.num_edges)

  @classmethod
  def check_config(cls, config, num_devices=None):
    super().check_config(config, num_devices)
    hierarchy_from(config)

  def init(self, params):
    return hierarchical.init_edge_state(params, self.hierarchy.num_edges,
                                        self.num_classes)

  def round_step(self):
    hier = self.hierarchy
    num_edges, num_classes = hier.num_edges, self.num_classes
    last = self.num_rounds if hier.final_cloud else None
    server_opt = self.run.server_optimizer

    def start(shared, edge):
      edge_params, _ = shared
      return jax.tree.map(lambda p: p[edge], edge_params)

    def contribution(update, shared, edge, rows):
      del shared
      return (update.update, edge), rows

    run_clients = self.client_round(self.client_fn(start, contribution),
                                    self.aggregator)

    def round_fn(state: state_lib.ServerState, data, client_ids, client_mask):
      edge_state = state.algorithm
      check_edges(edge_state, state.params, num_edges, num_classes)
      # 1. Edge selection against the start-of-round Q, N.
      q = hierarchical.label_distributions(data.labels, data.counts,
                                           num_classes)[client_ids]
      counts = jnp.where(client_mask > 0, data.counts[client_ids], 0)
      edges = hierarchical.select_edges(
          selection_key(state.rng, state.round), edge_state.label_dist,
          edge_state.samples, q, counts.astype(jnp.float32), client_ids,
          client_mask, hier.selection, hier.select_scale)

      # 2-3. Clients train from their edges; per-edge sums over the mesh.
      (sums, totals), outputs, rows = run_clients(
          state, data, client_ids, client_mask,
          shared=(edge_state.params, state.round), slot_inputs=edges)

      # 4. Edge means; edges without clients keep their model and n_e.
      has = totals > 0
      denom = jnp.maximum(totals, jnp.finfo(jnp.float32).tiny)

      def edge_mean(p, s):
        shape = (num_edges,) + (1,) * (p.ndim - 1)
        return jnp.where(has.reshape(shape),
                         p + s / denom.reshape(shape).astype(s.dtype), p)

      edge_params = jax.tree.map(edge_mean, edge_state.params, sums)
      edge_counts = jnp.where(has, totals, edge_state.counts)
      # Only the clients kept in the round (not dropped: strategies.faults)
      # join their edges' Q, N.
      label_dist, samples = hierarchical.absorb_clients(
          edge_state.label_dist, edge_state.samples, q, counts, edges,
          (outputs['weight'] > 0).astype(jnp.float32))

      # 5. Cloud aggregation (selected, not branched: both sides are cheap
      # next to the clients' training).
      cloud = hierarchical.is_cloud_round(state.round, hier.cloud_every,
                                          last)
      w = hierarchical.cloud_weights(edge_counts, label_dist, hier.agg_a,
                                     hier.agg_b)
      cloud_mean = jax.tree.map(
          lambda p: jnp.tensordot(w.astype(p.dtype), p, axes=1), edge_params)
      pseudo_grad = jax.tree.map(jnp.subtract, state.params, cloud_mean)
      updates, opt_state = server_opt.update(pseudo_grad, state.opt_state,
                                             state.params)
      cloud_params = optax.apply_updates(state.params, updates)
      pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(cloud, x, y), a,
                                       b)
      params = pick(cloud_params, state.params)
      opt_state = pick(opt_state, state.opt_state)
      reset = hierarchical.init_edge_state(params, num_edges, num_classes)
      new_edges = edge_state.replace(
          params=pick(reset.params, edge_params),
          counts=edge_counts,
          label_dist=jnp.where(cloud, reset.label_dist, label_dist),
          samples=jnp.where(cloud, reset.samples, samples))

      metrics = engine.client_metrics(outputs)
      metrics.update({
          'client_edges': edges,
          'edge_weights': totals,
          'cloud_weights': w,
          'cloud': cloud.astype(jnp.float32),
      })
      return (state_lib.advance(state, params, opt_state, self.ema_decay,
                                client_states=rows, algorithm=new_edges,
                                **self.shared_state_update(outputs)),
              metrics)

    return round_fn

  def client_order(self, client_ids, client_mask, slot_inputs):
    """FedPhD's loops train the clients of edge 0 (by id), then edge 1's,
    ...: the order of its one optimizer (`shared_state`)."""
    return base.order_positions(client_ids, client_mask, groups=slot_inputs)

  def is_cloud_round(self, round_idx: int) -> bool:
    last = self.num_rounds if self.hierarchy.final_cloud else None
    return bool(hierarchical.is_cloud_round(round_idx,
                                            self.hierarchy.cloud_every, last))

  def round_bytes(self, round_idx):
    """The clients' links (FedAvg's messages, to their edges) and, at a cloud
    round, E float32 models each way between the edges and the cloud."""
    out = super().round_bytes(round_idx)
    out.update(comm.edge_cloud_round_bytes(
        self.run.param_shapes, self.hierarchy.num_edges,
        self.is_cloud_round(round_idx)))
    return out

  def round_figures(self, metrics, round_idx):
    """Adds `cloud` (1 at a cloud round) and, per edge e,
    `edge_clients_e`, `edge_examples_e` and `cloud_weight_e`."""
    out = super().round_figures(metrics, round_idx)
    edges = np.asarray(metrics['client_edges'])
    real = np.asarray(metrics['client_weights']) > 0
    out['cloud'] = int(bool(np.asarray(metrics['cloud'])))
    for e in range(self.hierarchy.num_edges):
      out[f'edge_clients_{e}'] = int(np.sum(real & (edges == e)))
      out[f'edge_examples_{e}'] = float(np.asarray(metrics['edge_weights'])[e])
      out[f'cloud_weight_{e}'] = float(np.asarray(metrics['cloud_weights'])[e])
    return out

  def summary(self, num_rounds, state=None):
    """`comm.run_summary` of the client↔edge links plus the edge↔cloud
    links of the run's cloud rounds."""
    hier = self.hierarchy
    clouds = hierarchical.num_cloud_rounds(num_rounds, hier.cloud_every,
                                           hier.final_cloud)
    return comm.with_edge_cloud_links(super().summary(num_rounds, state),
                                      self.run.param_shapes, hier.num_edges,
                                      clouds)

  def format_summary(self, summary):
    return (comm.format_summary(summary) + '\n' +
            comm.format_edge_cloud(summary))

  def describe(self):
    hier = self.hierarchy
    return (super().describe() + f' {hier.num_edges} edges, cloud every '
            f'{hier.cloud_every} rounds, {hier.selection} edge selection.')


def hierarchy_from(config) -> hierarchical.HierarchyConfig:
  """`config.hierarchy` (`hierarchical.config_from`), which FedPhD needs,
  with at most as many edges as the federation has clients.

  Raises:
    ValueError: no hierarchy, or more edges than clients.
  """
  hier = hierarchical.config_from(config)
  if hier is None:
    raise ValueError(
        "config.algorithm='fedphd' needs a config.hierarchy block with "
        'num_edges >= 1 (see configs/mnist_fedphd.py); for flat FedAvg '
        "use config.algorithm='fedavg'.")
  num_clients = config.federation.num_clients
  if hier.num_edges > num_clients:
    raise ValueError(
        f'config.hierarchy.num_edges={hier.num_edges} is more edges than the '
        f'federation has clients (config.federation.num_clients='
        f'{num_clients}): some edges could never have a client. Use '
        f'num_edges <= {num_clients} (FedPhD: 2).')
  return hier


def check_edges(edges, params, num_edges: int, num_classes: int) -> None:
  """Raises a ValueError unless `edges` is an EdgeState of `num_edges` copies
  of `params`' shapes and `num_classes` classes (checked at trace time)."""
  how = ('Build the state with the algorithm\'s initial_state (its init is '
         f'hierarchical.init_edge_state(params, {num_edges}, {num_classes})).')
  if not isinstance(edges, hierarchical.EdgeState):
    raise ValueError(f'state.algorithm is {type(edges).__name__}, not an '
                     f'EdgeState: the FedPhD round needs one. {how}')
  want = jax.eval_shape(
      functools.partial(hierarchical.init_edge_state, num_edges=num_edges,
                        num_classes=num_classes), params)
  got_shapes = jax.tree.map(lambda x: tuple(x.shape), edges)
  want_shapes = jax.tree.map(lambda x: tuple(x.shape), want)
  if got_shapes != want_shapes:
    raise ValueError(f'state.algorithm has shapes {got_shapes}; expected '
                     f'{want_shapes} ({num_edges} edges, {num_classes} '
                     f'classes). {how}')
