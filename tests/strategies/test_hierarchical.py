"""FedPhD's homogeneity score, edge selection and cloud weights against hand
computations (arXiv 2507.06449)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fedjax_diff import engine
from fedjax_diff import federation
from fedjax_diff.strategies import hierarchical


def test_homogeneity_score_of_cifar10_clients():
  # 2 of 10 classes: ‖P − q‖² = 2·0.4² + 8·0.1² = 0.4, SH = 2 − √0.4.
  two = np.zeros(10)
  two[[3, 7]] = 0.5
  np.testing.assert_allclose(hierarchical.homogeneity_score(two), 1.368,
                             atol=5e-4)
  # 1 class: ‖P − q‖² = 0.9² + 9·0.1² = 0.9, SH = 2 − √0.9.
  one = np.zeros(10)
  one[4] = 1.0
  np.testing.assert_allclose(hierarchical.homogeneity_score(one), 1.051,
                             atol=5e-4)
  np.testing.assert_allclose(hierarchical.homogeneity_score(np.full(10, .1)),
                             2.0, atol=1e-6)
  # Batched over leading axes.
  np.testing.assert_allclose(
      hierarchical.homogeneity_score(np.stack([two, one])),
      [2 - math.sqrt(0.4), 2 - math.sqrt(0.9)], rtol=1e-6)


def test_selection_probabilities_by_hand():
  """Two classes, two edges, s = 1000; a client with 100 examples of class 1.

  Edge 0 (Q = [1, 0], N = 100): q̃ = [0.5, 0.5], SH = 2, score 2000 − 100.
  Edge 1 (Q = [.5, .5], N = 300): q̃ = [0.375, 0.625], ‖P − q̃‖ = 0.125·√2,
  SH = 1.823223, score 1823.2233 − 300 = 1523.2233.
  """
  dist = jnp.array([[1.0, 0.0], [0.5, 0.5]])
  count = jnp.array([100.0, 300.0])
  q = jnp.array([0.0, 1.0])
  p = hierarchical.selection_probabilities(dist, count, q, 100.0, 1000.0)
  want = np.array([1900.0, 1523.2233]) / 3423.2233
  np.testing.assert_allclose(p, want, rtol=1e-6)
  # Both edges past s·SH: only the 1e-8 floor is left, so p is uniform.
  p = hierarchical.selection_probabilities(dist, jnp.array([5e4, 6e4]), q,
                                           100.0, 1000.0)
  np.testing.assert_allclose(p, [0.5, 0.5], rtol=1e-6)
  # An empty edge (N = 0) scores the client's own distribution.
  p = hierarchical.selection_probabilities(
      jnp.array([[0.5, 0.5], [0.5, 0.5]]), jnp.array([0.0, 100.0]), q, 100.0,
      1000.0)
  sh_alone = 2 - math.sqrt(0.5)          # q = [0, 1]: ‖P − q‖ = √0.5
  np.testing.assert_allclose(
      p, np.array([1000 * sh_alone, 1000 * (2 - math.sqrt(0.125)) - 100]) /
      (1000 * sh_alone + 1000 * (2 - math.sqrt(0.125)) - 100), rtol=1e-6)


def test_fedphd_draws_follow_the_probabilities():
  """2,000 identical clients draw from p of the hand case: the frequency of
  edge 0 is within 4 standard deviations (0.044) of p_0 = 0.555034."""
  k = 2000
  dist = jnp.array([[1.0, 0.0], [0.5, 0.5]])
  count = jnp.array([100.0, 300.0])
  q = jnp.tile(jnp.array([[0.0, 1.0]]), (k, 1))
  n = jnp.full((k,), 100.0)
  ids = jnp.arange(k)
  edges = hierarchical.select_edges(jax.random.PRNGKey(3), dist, count, q, n,
                                    ids, jnp.ones(k), 'fedphd', 1000.0)
  p0 = 1900.0 / 3423.2233
  freq = float(np.mean(np.asarray(edges) == 0))
  assert abs(freq - p0) < 4 * math.sqrt(p0 * (1 - p0) / k)
  # A client's draw depends on its id, not its slot.
  again = hierarchical.select_edges(jax.random.PRNGKey(3), dist, count,
                                    q[:5], n[:5], ids[:5][::-1], jnp.ones(5),
                                    'fedphd', 1000.0)
  np.testing.assert_array_equal(np.asarray(again)[::-1],
                                np.asarray(edges)[:5])
  # The uniform baseline.
  uni = hierarchical.select_edges(jax.random.PRNGKey(3), dist, count, q, n,
                                  ids, jnp.ones(k), 'random')
  assert abs(float(np.mean(np.asarray(uni) == 0)) - 0.5) < 4 * math.sqrt(
      0.25 / k)


def test_greedy_selection_by_hand():
  """s = 10, Q uniform and N = 0 at the start, clients of 10 examples with
  classes 0, 0, 1, 1. Client 0: both edges score 10·(2 − √0.5) → edge 0.
  Client 1: edge 0 scores 12.93 − 10, edge 1 12.93 → edge 1. Client 2:
  both score 10·2 − 10 → edge 0 (first). Client 3: edge 0 has Q = [2/3,
  1/3], N = 20 and scores 10·1.9214 − 20 < 0; edge 1 scores 20 − 10 →
  edge 1."""
  q = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  edges = hierarchical.select_edges(
      jax.random.PRNGKey(0), jnp.full((2, 2), 0.5), jnp.zeros(2), q,
      jnp.full(4, 10.0), jnp.arange(4), jnp.ones(4), 'greedy', 10.0)
  np.testing.assert_array_equal(edges, [0, 1, 0, 1])
  # A padding slot (mask 0) changes nobody's choice.
  edges = hierarchical.select_edges(
      jax.random.PRNGKey(0), jnp.full((2, 2), 0.5), jnp.zeros(2),
      jnp.concatenate([q[:1], q[:1], q[1:]]), jnp.full(5, 10.0),
      jnp.arange(5), jnp.array([1.0, 0.0, 1.0, 1.0, 1.0]), 'greedy', 10.0)
  np.testing.assert_array_equal(np.asarray(edges)[[0, 2, 3, 4]],
                                [0, 1, 0, 1])


def test_absorb_clients_equals_sequential_merges():
  """Eq. (4) at once equals FedPhD's one-client-at-a-time merges."""
  rng = np.random.default_rng(0)
  dist = rng.dirichlet(np.ones(5), size=3)
  count = np.array([0.0, 40.0, 7.0])
  q = rng.dirichlet(np.ones(5), size=6)
  n = rng.integers(1, 50, size=6).astype(np.float64)
  edges = np.array([1, 1, 0, 1, 0, 1])
  mask = np.array([1, 1, 1, 1, 1, 0.0])
  d, c = dist.copy(), count.copy()
  for qk, nk, e, m in zip(q, n, edges, mask):
    if m:
      d[e] = (d[e] * c[e] + qk * nk) / (c[e] + nk)
      c[e] += nk
  got_d, got_c = hierarchical.absorb_clients(
      jnp.asarray(dist, jnp.float32), jnp.asarray(count, jnp.float32),
      jnp.asarray(q, jnp.float32), jnp.asarray(n, jnp.float32),
      jnp.asarray(edges), jnp.asarray(mask))
  np.testing.assert_allclose(got_d, d, rtol=1e-5)
  np.testing.assert_allclose(got_c, c)
  np.testing.assert_array_equal(got_d[2], np.float32(dist[2]))  # no clients


def test_cloud_weights_by_hand():
  """n = [100, 300], Q = [[1, 0], [.5, .5]], a = 1000, b = −50:
  ReLU(100 + 1000·(2 − √0.5) − 50) = 1342.8932, ReLU(300 + 2000 − 50) =
  2250."""
  w = hierarchical.cloud_weights(jnp.array([100.0, 300.0]),
                                 jnp.array([[1.0, 0.0], [0.5, 0.5]]),
                                 1000.0, -50.0)
  np.testing.assert_allclose(w, np.array([1342.8932, 2250.0]) / 3592.8932,
                             rtol=1e-6)
  # A negative ReLU argument weighs 0; all zero falls back to equal weights.
  w = hierarchical.cloud_weights(jnp.array([1.0, 300.0]),
                                 jnp.array([[1.0, 0.0], [0.5, 0.5]]), 1.0,
                                 -200.0)
  np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-7)
  w = hierarchical.cloud_weights(jnp.array([1.0, 3.0]),
                                 jnp.array([[1.0, 0.0], [0.5, 0.5]]), 1.0,
                                 -1e6)
  np.testing.assert_allclose(w, [0.5, 0.5])


def test_cloud_rounds():
  r = jnp.arange(13)
  np.testing.assert_array_equal(
      np.nonzero(np.asarray(hierarchical.is_cloud_round(r, 5)))[0],
      [0, 5, 10])
  np.testing.assert_array_equal(
      np.nonzero(np.asarray(hierarchical.is_cloud_round(r, 5, 12)))[0],
      [0, 5, 10, 11])


def test_label_distributions_ignore_padding():
  labels = jnp.array([[0, 2, 2, 9], [1, 1, 0, 0], [3, 3, 3, 3]])
  counts = jnp.array([3, 2, 0])
  q = hierarchical.label_distributions(labels, counts, 4)
  np.testing.assert_allclose(q, [[1 / 3, 0, 2 / 3, 0], [0, 1, 0, 0],
                                 [0, 0, 0, 0]], rtol=1e-6)


def test_edge_sums_drop_padding():
  """The edges' aggregator: Σ_{k→e} w_k Δ_k and Σ_{k→e} w_k per edge, the
  padding client (weight 0, non-finite Δ) adding exactly 0; folded in one
  chunk or two, then reduced by `finalize` inside a 1-device shard_map."""
  agg = hierarchical.edge_sums(3)
  np.testing.assert_allclose(agg.weight(jnp.int32(7)), 7.0)  # by examples
  deltas = {'w': jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, jnp.inf]])}
  edges = jnp.array([2, 2, 0])
  weights = jnp.array([2.0, 1.0, 0.0])
  one = jax.eval_shape(lambda: (jax.tree.map(lambda d: d[0], deltas),
                                edges[0]))
  mesh = federation.client_mesh(jax.devices()[:1])

  def device(deltas, edges, weights, key):
    acc = engine.as_varying(agg.init(one))
    in_one = agg.accumulate(acc, (deltas, edges), weights)
    in_two = acc
    for part in (slice(0, 2), slice(2, 3)):
      in_two = agg.accumulate(
          in_two, jax.tree.map(lambda x: x[part], (deltas, edges)),
          weights[part])
    return (agg.finalize(in_one, federation.CLIENTS, key),
            agg.finalize(in_two, federation.CLIENTS, key))

  clients = P(federation.CLIENTS)
  run = jax.jit(jax.shard_map(device, mesh=mesh,
                              in_specs=(clients, clients, clients, P()),
                              out_specs=(P(), P())))
  for sums, totals in run(deltas, edges, weights, jax.random.PRNGKey(0)):
    np.testing.assert_allclose(sums['w'], [[0, 0], [0, 0], [5, 8]])
    np.testing.assert_allclose(totals, [0, 0, 3])


def test_config_from_and_errors():
  assert hierarchical.config_from(ml_collections.ConfigDict()) is None
  assert hierarchical.config_from(
      ml_collections.ConfigDict(dict(hierarchy=None))) is None
  cfg = hierarchical.config_from(ml_collections.ConfigDict(dict(
      hierarchy=dict(num_edges=2, cloud_every=5, agg_a=50000, agg_b=0))))
  assert cfg.num_edges == 2 and cfg.agg_a == 50000.0
  with pytest.raises(ValueError, match='unknown fields'):
    hierarchical.config_from(ml_collections.ConfigDict(dict(
        hierarchy=dict(num_edges=2, edges_every=5))))
  with pytest.raises(ValueError, match='selection'):
    hierarchical.HierarchyConfig(selection='best')
  with pytest.raises(ValueError, match='cloud_every'):
    hierarchical.HierarchyConfig(cloud_every=0)
  with pytest.raises(ValueError, match='Unknown edge selection'):
    hierarchical.select_edges(jax.random.PRNGKey(0), jnp.ones((2, 2)),
                              jnp.zeros(2), jnp.ones((1, 2)), jnp.ones(1),
                              jnp.zeros(1, jnp.int32), jnp.ones(1), 'best')
