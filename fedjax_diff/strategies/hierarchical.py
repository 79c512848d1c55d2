"""FedPhD's hierarchy: edge servers between clients and the cloud.

FedPhD (Long et al. 2025, "FedPhD: Federated Pruning with Hierarchical
Learning of Diffusion Models", arXiv 2507.06449) puts E edge servers between
the clients and the cloud and makes both the client→edge assignment and the
cloud aggregation aware of label heterogeneity. This module holds the math,
as pure jnp functions of small arrays and the edges' aggregator;
`fedjax_diff.algorithms.fedphd` runs it inside the jitted round.

Homogeneity score of a label distribution q over C classes, with P the
uniform distribution (P_c = 1/C):

    SH(q) = 2 − ‖P − q‖₂.                                          (1)

Edge e carries Q_e, the label distribution of the examples its clients held
since the last cloud aggregation, and N_e, their number. Client n, with label
distribution q_n and n_n examples, scores every edge by the distribution the
edge would have with it,

    q̃_e = (Q_e·N_e + q_n·n_n) / (N_e + n_n),                       (2)
    p_e ∝ max(s·SH(q̃_e) − N_e, 0) + 1e-8,   s = 10000,            (3)

and draws its edge from p ('fedphd'). Every client of a round scores the
edges against the Q, N of the start of the round; Q, N then absorb the
round's clients (an exact merge of label counts):

    Q_e ← (Q_e·N_e + Σ_{n→e} q_n·n_n) / (N_e + Σ_{n→e} n_n),
    N_e ← N_e + Σ_{n→e} n_n.                                        (4)

Baselines: 'greedy' (clients in slot order take argmax_e of (3), each
choice updating Q, N at once, so identical clients spread out; no
randomness) and 'random' (uniform over edges).

Each edge's model is the example-weighted mean of the models of that round's
clients on it; an edge with no clients keeps its model. Every k rounds
(round r with r mod k = 0, counting from 0; FedPhD: k = 5) the cloud takes

    θ = Σ_e w_e θ_e,   w_e = ReLU(n_e + a·SH(Q_e) + b) / Σ_e' ReLU(·)   (5)

with n_e the examples of the edge's last round with clients (1 before any),
a = 50000 (CIFAR-10) or 20000 (CelebA) and b = 0, then resets every edge to
θ and Q_e to P, N_e to 0 (n_e is kept).

Read from FedPhD's public code (github EricLoong/fed_phd,
standalone/fedphd_ddim/{fedphd_api,client}.py): Q starts uniform, N at 0,
n_e at 1.
"""

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp

from fedjax_diff.strategies.aggregator import Aggregator
from fedjax_diff.strategies.aggregator import by_examples

PyTree = Any

SELECTIONS = ('fedphd', 'greedy', 'random')
# FedPhD's edge-selection scale s in (3) and its probability floor.
SELECT_SCALE = 10000.0
SELECT_EPS = 1e-8


def homogeneity_score(q: jax.Array) -> jax.Array:
  """SH(q) = 2 − ‖P − q‖₂ over the last axis, P uniform (eq. 1)."""
  q = jnp.asarray(q, jnp.float32)
  uniform = 1.0 / q.shape[-1]
  return 2.0 - jnp.sqrt(jnp.sum(jnp.square(uniform - q), axis=-1))


def merge_distribution(dist, count, q, n):
  """(dist·count + q·n) / (count + n) (eq. 2); `dist` where the sum is 0.

  Broadcasts: dist [..., C], count [...], q [..., C], n [...].
  """
  count = jnp.asarray(count, jnp.float32)
  n = jnp.asarray(n, jnp.float32)
  total = count + n
  merged = ((dist * count[..., None] + q * n[..., None]) /
            jnp.maximum(total, 1e-30)[..., None])
  return jnp.where(total[..., None] > 0, merged, dist)


def edge_scores(dist, count, q, n, scale: float = SELECT_SCALE):
  """max(s·SH(q̃_e) − N_e, 0) + 1e-8 for every edge (eq. 3, unnormalised).

  Args:
    dist: Q, [E, C] the edges' label distributions.
    count: N, [E] their example counts since the last cloud aggregation.
    q: [C] the client's label distribution.
    n: its example count.
    scale: s.
  """
  merged = merge_distribution(dist, count, q[None], jnp.broadcast_to(
      jnp.asarray(n, jnp.float32), count.shape))
  score = scale * homogeneity_score(merged) - jnp.asarray(count, jnp.float32)
  return jnp.maximum(score, 0.0) + SELECT_EPS


def selection_probabilities(dist, count, q, n, scale: float = SELECT_SCALE):
  """p_e of eq. (3), normalised over the edges."""
  scores = edge_scores(dist, count, q, n, scale)
  return scores / scores.sum()


def absorb_clients(dist, count, q, n, edges, mask=None):
  """Q, N after the round's clients joined their edges (eq. 4).

  Args:
    dist: Q [E, C]; count: N [E].
    q: [K, C] the clients' label distributions; n: [K] their counts.
    edges: int [K] their edges.
    mask: [K], 0 for padding slots (they add nothing); None = all real.

  Returns:
    (Q', N'); an edge that gained no examples keeps its Q.
  """
  num_edges = dist.shape[0]
  n = jnp.asarray(n, jnp.float32)
  if mask is not None:
    n = jnp.where(mask > 0, n, 0.0)
  onehot = (edges[:, None] == jnp.arange(num_edges)[None]).astype(jnp.float32)
  added = onehot.T @ n                                     # [E]
  added_labels = onehot.T @ (q * n[:, None])               # [E, C]
  count = jnp.asarray(count, jnp.float32)
  total = count + added
  merged = ((dist * count[:, None] + added_labels) /
            jnp.maximum(total, 1e-30)[:, None])
  return jnp.where(added[:, None] > 0, merged, dist), total


def select_edges(key: jax.Array, dist, count, q, n, client_ids, mask,
                 method: str = 'fedphd', scale: float = SELECT_SCALE):
  """Every client's edge for this round.

  Args:
    key: the round's selection key; client k draws with
      `fold_in(key, client_ids[k])`, so its draw does not depend on its slot.
    dist, count: Q [E, C] and N [E] at the start of the round.
    q: [K, C] the clients' label distributions; n: [K] their counts.
    client_ids: int [K] global ids.
    mask: [K], 0 for padding slots (they get some edge and weigh 0).
    method: 'fedphd' (draw from eq. 3 against the start-of-round Q, N),
      'greedy' (argmax of eq. 3 in slot order, Q, N updated after each
      client) or 'random' (uniform).
    scale: s of eq. (3).

  Returns:
    int32 [K] edge indices.
  """
  num_edges = dist.shape[0]
  if method == 'fedphd':
    def draw(cid, qk, nk):
      p = selection_probabilities(dist, count, qk, nk, scale)
      return jax.random.choice(jax.random.fold_in(key, cid), num_edges, p=p)
    return jax.vmap(draw)(client_ids, q, n).astype(jnp.int32)
  if method == 'random':
    return jax.vmap(lambda cid: jax.random.randint(
        jax.random.fold_in(key, cid), (), 0, num_edges))(client_ids).astype(
            jnp.int32)
  if method == 'greedy':
    def step(carry, xs):
      d, c = carry
      qk, nk, mk = xs
      e = jnp.argmax(edge_scores(d, c, qk, nk, scale)).astype(jnp.int32)
      d, c = absorb_clients(d, c, qk[None], nk[None], e[None], mk[None])
      return (d, c), e
    _, edges = jax.lax.scan(step, (jnp.asarray(dist, jnp.float32),
                                   jnp.asarray(count, jnp.float32)),
                            (q, jnp.asarray(n, jnp.float32), mask))
    return edges
  raise ValueError(f'Unknown edge selection {method!r}; use one of '
                   f'{SELECTIONS}.')


def cloud_weights(edge_counts, dist, a: float, b: float = 0.0):
  """Normalised w_e = ReLU(n_e + a·SH(Q_e) + b) of eq. (5).

  If every ReLU is 0 (possible only with b < 0) the edges weigh equally,
  where FedPhD's code would divide by zero.
  """
  raw = jnp.maximum(jnp.asarray(edge_counts, jnp.float32) +
                    a * homogeneity_score(dist) + b, 0.0)
  total = raw.sum()
  return jnp.where(total > 0, raw / jnp.maximum(total, 1e-30),
                   jnp.full_like(raw, 1.0 / raw.shape[0]))


def is_cloud_round(round_idx, cloud_every: int,
                   num_rounds: Optional[int] = None):
  """Round r (0-based) ends with a cloud aggregation: r mod k = 0, or, if
  `num_rounds` is given, r is the run's last round (so the final global
  model includes the last rounds' training)."""
  cloud = round_idx % cloud_every == 0
  if num_rounds is not None:
    cloud = cloud | (round_idx == num_rounds - 1)
  return cloud


def label_distributions(labels, counts, num_classes: int):
  """[K, C] label distributions of clients' padded labels [K, max_n] (rows
  of clients with count 0 are 0)."""
  valid = jnp.arange(labels.shape[1])[None] < counts[:, None]
  hist = jnp.sum(jax.nn.one_hot(labels, num_classes) * valid[..., None],
                 axis=1)
  return hist / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)


def edge_sums(num_edges: int,
              weight: Callable[[jax.Array], jax.Array] = by_examples
              ) -> Aggregator:
  """Per-edge weighted sums of the clients' updates, the edges' aggregator.

  A client contributes `(Δ_k, e_k)`, its update and its edge. `finalize`
  returns `(sums, totals)`: a tree with leading axis E of
  Σ_{k→e} w_k Δ_k, and [E] of Σ_{k→e} w_k, reduced over the mesh. Clients
  with w_k = 0 (padding) add exactly 0, even if their Δ is not finite.
  """

  def init(shapes):
    delta_shapes, _ = shapes
    return (jax.tree.map(lambda s: jnp.zeros((num_edges,) + s.shape, s.dtype),
                         delta_shapes),
            jnp.zeros((num_edges,), jnp.float32))

  def accumulate(acc, contributions, weights):
    sums, totals = acc
    deltas, edges = contributions
    keep = weights > 0
    w = jnp.where(keep[:, None] & (edges[:, None] == jnp.arange(num_edges)),
                  weights[:, None], 0.0)                     # [c, E]

    def leaf(s, d):
      d = jnp.where(keep.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0)
      return s + jnp.tensordot(w.T.astype(d.dtype), d, axes=1)

    return jax.tree.map(leaf, sums, deltas), totals + w.sum(0)

  def finalize(acc, axis_name, key):
    del key
    return jax.lax.psum(acc, axis_name)

  return Aggregator(weight, init, accumulate, finalize)


@flax.struct.dataclass
class EdgeState:
  """The edges' part of the server state (replicated on every device).

  Attributes:
    params: the E edge models, stacked on a leading axis.
    counts: n_e [E] float32, examples of each edge's last round with
      clients (1 before any: FedPhD's initial value).
    label_dist: Q [E, C], label distribution since the last cloud round.
    samples: N [E] float32, examples since the last cloud round.
  """
  params: PyTree
  counts: jax.Array
  label_dist: jax.Array
  samples: jax.Array


def init_edge_state(params: PyTree, num_edges: int,
                    num_classes: int) -> EdgeState:
  """Every edge starts from `params`, Q uniform, N = 0, n_e = 1."""
  if num_edges < 1 or num_classes < 1:
    raise ValueError(f'Need num_edges >= 1 and num_classes >= 1; got '
                     f'{num_edges} and {num_classes}.')
  return EdgeState(
      params=jax.tree.map(
          lambda p: jnp.broadcast_to(p, (num_edges,) + p.shape), params),
      counts=jnp.ones((num_edges,), jnp.float32),
      label_dist=jnp.full((num_edges, num_classes), 1.0 / num_classes,
                          jnp.float32),
      samples=jnp.zeros((num_edges,), jnp.float32))


@dataclasses.dataclass(frozen=True)
class HierarchyConfig:
  """The static settings of a hierarchy (`config.hierarchy`).

  Attributes:
    num_edges: E.
    cloud_every: k; the cloud aggregates at rounds r with r mod k = 0.
    agg_a, agg_b: a, b of eq. (5).
    selection: 'fedphd' | 'greedy' | 'random'.
    select_scale: s of eq. (3).
    final_cloud: also aggregate at the run's last round.
  """
  num_edges: int = 2
  cloud_every: int = 5
  agg_a: float = 50000.0
  agg_b: float = 0.0
  selection: str = 'fedphd'
  select_scale: float = SELECT_SCALE
  final_cloud: bool = True

  def __post_init__(self):
    if not (isinstance(self.num_edges, int) and self.num_edges >= 1):
      raise ValueError(f'hierarchy.num_edges must be an int >= 1, got '
                       f'{self.num_edges!r}.')
    if not (isinstance(self.cloud_every, int) and self.cloud_every >= 1):
      raise ValueError(f'hierarchy.cloud_every must be an int >= 1 (FedPhD: '
                       f'5), got {self.cloud_every!r}.')
    if self.selection not in SELECTIONS:
      raise ValueError(f'hierarchy.selection={self.selection!r}; use one of '
                       f'{SELECTIONS}.')
    if not self.select_scale > 0:
      raise ValueError(f'hierarchy.select_scale must be > 0 (FedPhD: '
                       f'{SELECT_SCALE:g}), got {self.select_scale!r}.')
    if not isinstance(self.final_cloud, bool):
      raise ValueError(f'hierarchy.final_cloud must be True or False, got '
                       f'{self.final_cloud!r}.')


def config_from(config) -> Optional[HierarchyConfig]:
  """The HierarchyConfig of `config.hierarchy`; None (flat FedAvg) when the
  block is absent, None, or has num_edges = 0."""
  cfg = config.get('hierarchy')
  if cfg is None or not cfg.get('num_edges', 0):
    return None
  fields = {f.name for f in dataclasses.fields(HierarchyConfig)}
  unknown = sorted(set(cfg.keys()) - fields)
  if unknown:
    raise ValueError(f'config.hierarchy has unknown fields {unknown}; the '
                     f'fields are {sorted(fields)}.')
  kwargs = dict(cfg)
  for name in ('agg_a', 'agg_b', 'select_scale'):
    if name in kwargs:
      value = kwargs[name]
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f'config.hierarchy.{name} must be a number, got '
                         f'{value!r}.')
      kwargs[name] = float(value)
  return HierarchyConfig(**kwargs)


def num_cloud_rounds(num_rounds: int, cloud_every: int,
                     final_cloud: bool = False) -> int:
  """Cloud rounds among rounds 0..num_rounds−1 (`is_cloud_round`)."""
  if num_rounds <= 0:
    return 0
  count = (num_rounds - 1) // cloud_every + 1
  if final_cloud and (num_rounds - 1) % cloud_every:
    count += 1
  return count
