"""FedAvg: the example-weighted mean of client updates.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (arXiv 1602.05629); FedDM-vanilla (arXiv 2407.14730) is
FedAvg of diffusion UNets:

    Δ̄ = Σ_k n_k Δ_k / Σ_k n_k,   Δ_k = θ_k − θ_global,

with n_k the example count of client k (0 for padding clients). The server
then applies Δ̄ through its optimizer (`sgd(1.0)` gives θ ← θ + Δ̄).
"""

import jax
import jax.numpy as jnp

from fedjax_diff.strategies.aggregator import Aggregator


def weighted_sum(deltas, weights):
  """Σ_k w_k Δ_k over axis 0; entries with w_k == 0 contribute exactly 0."""
  keep = weights > 0

  def leaf_sum(d):
    mask = keep.reshape((-1,) + (1,) * (d.ndim - 1))
    d = jnp.where(mask, d, 0)
    return jnp.tensordot(weights.astype(d.dtype), d, axes=1)

  return jax.tree.map(leaf_sum, deltas)


def fedavg() -> Aggregator:
  """The weighted-mean aggregator (FedAvg / FedDM-vanilla)."""

  def init(params):
    return (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))

  def accumulate(acc, deltas, weights):
    total, weight = acc
    chunk = weighted_sum(deltas, weights)
    return (jax.tree.map(jnp.add, total, chunk), weight + weights.sum())

  def finalize(acc, axis_name):
    total, weight = jax.lax.psum(acc, axis_name)
    # A round where every sampled client is empty leaves the model unchanged.
    denom = jnp.maximum(weight, jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda t: t / denom.astype(t.dtype), total)

  return Aggregator(init, accumulate, finalize)
