"""Aggregators: how the server combines the clients' contributions.

An aggregator works in two stages, so that no device ever holds a copy of
the model per client and it runs inside `shard_map` (`fedjax_diff.engine`):

1. on each device, `accumulate` folds chunks of that device's clients into a
   running accumulator (a weighted sum, per-edge sums, ...);
2. `finalize` reduces the accumulators over the mesh axis (`psum`) and turns
   them into the aggregate, with a key that is the same on every device (for
   server-side noise, e.g. DP-FedAvg's).

The round's weights come from the aggregator: client k of a round weighs
`weight(n_k)` (FedAvg: its example count n_k; DP: 1 each), times 0 for
padding slots and for clients a fault-isolation transform dropped.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class Aggregator(NamedTuple):
  """Two-stage aggregation of client contributions.

  Attributes:
    weight: `count -> w`, a client's weight from its example count (a
      float32 scalar).
    init: `shapes -> acc`, an empty accumulator for contributions of the
      given shapes (a tree of `jax.ShapeDtypeStruct`s of ONE client's).
    accumulate: `(acc, contributions, weights) -> acc`; `contributions` is a
      chunk of clients' contributions stacked on axis 0 and `weights` their
      float32 weights `[c]` (0 for padding clients, whose contributions must
      not leak in, even if NaN).
    finalize: `(acc, axis_name, key) -> aggregate`, called inside
      `shard_map`; reduces over `axis_name`. `key` is replicated.
  """
  weight: Callable[[jax.Array], jax.Array]
  init: Callable[[PyTree], PyTree]
  accumulate: Callable[[PyTree, PyTree, jax.Array], PyTree]
  finalize: Callable[[PyTree, str, jax.Array], PyTree]


def by_examples(count) -> jax.Array:
  """FedAvg's client weight: its example count n_k."""
  return jnp.asarray(count, jnp.float32)


def zeros_like_shapes(shapes: PyTree) -> PyTree:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def weighted_sum(deltas, weights):
  """Σ_k w_k Δ_k over axis 0; entries with w_k == 0 contribute exactly 0."""
  keep = weights > 0

  def leaf_sum(d):
    mask = keep.reshape((-1,) + (1,) * (d.ndim - 1))
    d = jnp.where(mask, d, 0)
    return jnp.tensordot(weights.astype(d.dtype), d, axes=1)

  return jax.tree.map(leaf_sum, deltas)


def weighted_mean(weight: Callable[[jax.Array], jax.Array] = by_examples
                  ) -> Aggregator:
  """The weighted mean of client updates (FedAvg / FedDM-vanilla).

  McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
  from Decentralized Data" (arXiv 1602.05629):

      Δ̄ = Σ_k w_k Δ_k / Σ_k w_k,   w_k = n_k (by default),

  with Δ_k = θ_k − θ_global. A round where every client weighs 0 gives
  Δ̄ = 0 (the model is unchanged). `finalize` returns `(Δ̄, Σ_k w_k)`.
  """

  def init(shapes):
    return (zeros_like_shapes(shapes), jnp.zeros((), jnp.float32))

  def accumulate(acc, deltas, weights):
    total, weight_sum = acc
    chunk = weighted_sum(deltas, weights)
    return (jax.tree.map(jnp.add, total, chunk), weight_sum + weights.sum())

  def finalize(acc, axis_name, key):
    del key
    total, weight_sum = jax.lax.psum(acc, axis_name)
    denom = jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda t: t / denom.astype(t.dtype), total), weight_sum

  return Aggregator(weight, init, accumulate, finalize)
