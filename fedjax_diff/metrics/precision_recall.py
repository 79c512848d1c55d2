"""Improved precision and recall of generative models.

Kynkäänniemi et al. 2019 (arXiv 1904.06991), eqs. 1–3. Each set of feature
vectors Φ spans a manifold approximated by balls around its points, with the
radius of φ ∈ Φ the distance to its k-th nearest neighbour in Φ (itself
excluded):

    f(φ, Φ) = 1  if ∃ φ' ∈ Φ: ‖φ − φ'‖₂ ≤ ‖φ' − NN_k(φ', Φ)‖₂,  else 0,
    precision(Φ_r, Φ_g) = (1/|Φ_g|) Σ_{φ_g ∈ Φ_g} f(φ_g, Φ_r),
    recall(Φ_r, Φ_g)    = (1/|Φ_r|) Σ_{φ_r ∈ Φ_r} f(φ_r, Φ_g).

Precision is the share of generated samples that fall on the real manifold
(quality); recall is the share of real samples that fall on the generated one
(coverage). The paper uses k = 3. Distances are computed in jitted row
blocks, so memory is O(block · N).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _sq_dists(x, y):
  """‖x_i − y_j‖² for rows of x [B, D] and y [N, D], in float32."""
  d = (jnp.sum(x * x, 1)[:, None] + jnp.sum(y * y, 1)[None, :]
       - 2.0 * x @ y.T)
  return jnp.maximum(d, 0.0)


def _blocks(n: int, block: int):
  for start in range(0, n, block):
    yield start, min(start + block, n)


@functools.partial(jax.jit, static_argnames=('k',))
def _kth_block(x, ys, self_offset, k):
  d = _sq_dists(x, ys)
  # Exclude each point itself (its own row in ys) from its neighbours.
  rows = jnp.arange(x.shape[0])
  d = d.at[rows, rows + self_offset].set(jnp.inf)
  return -jax.lax.top_k(-d, k)[0][:, k - 1]


def knn_radii(features, k: int = 3, block: int = 1024) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row, [N]."""
  f = jnp.asarray(features, jnp.float32)
  n = f.shape[0]
  if not 1 <= k < n:
    raise ValueError(f'k-NN radii need 1 <= k < N; got k={k}, N={n}.')
  out = [_kth_block(f[s:e], f, s, k) for s, e in _blocks(n, block)]
  return np.asarray(jnp.concatenate(out))


@jax.jit
def _inside_block(x, ys, radii):
  return jnp.any(_sq_dists(x, ys) <= radii[None, :], axis=1)


def manifold_membership(queries, support, support_radii,
                        block: int = 1024) -> np.ndarray:
  """f(φ, Φ) of the module doc for each query row: bool [M]."""
  q = jnp.asarray(queries, jnp.float32)
  s = jnp.asarray(support, jnp.float32)
  r = jnp.asarray(support_radii, jnp.float32)
  out = [_inside_block(q[a:b], s, r) for a, b in _blocks(q.shape[0], block)]
  return np.asarray(jnp.concatenate(out))


def precision_recall(real, generated, k: int = 3,
                     block: int = 1024) -> dict[str, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1–3).

  Args:
    real: real feature vectors [N_r, D].
    generated: generated feature vectors [N_g, D].
    k: the neighbour whose distance is a point's radius (paper: 3).
    block: rows per jitted distance block.

  Returns:
    {'precision': ..., 'recall': ...}, each in [0, 1].
  """
  real = np.asarray(real)
  generated = np.asarray(generated)
  if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != \
      generated.shape[1]:
    raise ValueError(f'real and generated features must be [N, D] with the '
                     f'same D; got {real.shape} and {generated.shape}.')
  r_radii = knn_radii(real, k, block)
  g_radii = knn_radii(generated, k, block)
  precision = manifold_membership(generated, real, r_radii, block).mean()
  recall = manifold_membership(real, generated, g_radii, block).mean()
  return {'precision': float(precision), 'recall': float(recall)}
