"""Clipping client updates to an L2 norm: the sensitivity bound of DP-FedAvg.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv 1710.06963) bounds each client's influence on the
aggregate by clipping its whole update Δ_k (all parameters together) to an
L2 norm C before the server adds Gaussian noise to the sum:

    clip_C(Δ) = Δ · min(1, C / ‖Δ‖₂).

`clip` is that map as an upload transform (`strategies.upload`): the first
stage of the upload path, before quantization, so the quantizer encodes the
clipped update. Its clip norm is either fixed (`clip(C)`) or the round's C_r,
which the server broadcasts with the round (`clip()` reads
`UploadContext.clip_norm`), as adaptive clipping needs.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping", arXiv 1905.03871) moves C towards the γ-quantile of the
clients' update norms with a geometric step on the (noised) fraction b̄ of
the round's clients whose update was not clipped, ‖Δ_k‖ ≤ C_r:

    C_{r+1} = C_r · exp(−η_C · (b̄ − γ))                 (`adapt_clip_norm`).

The noise on b̄ and the accounting of both releases are in
`strategies.privacy`.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from fedjax_diff.strategies import upload as upload_lib

PyTree = Any


def global_norm(tree: PyTree) -> jax.Array:
  """‖tree‖₂ over all leaves together, in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def clip_scale(norm: jax.Array, clip_norm) -> jax.Array:
  """min(1, C / ‖Δ‖) as float32; exactly 1 when ‖Δ‖ ≤ C (also for Δ = 0
  and C = inf)."""
  norm = jnp.asarray(norm, jnp.float32)
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  return jnp.where(norm > clip_norm,
                   clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny),
                   jnp.ones_like(norm))


def clip_by_global_norm(tree: PyTree, clip_norm) -> tuple[PyTree, jax.Array]:
  """(clip_C(tree), ‖tree‖₂): every leaf scaled by min(1, C/‖tree‖₂), in
  float32, and cast back to its dtype; leaves are returned unchanged (bit
  for bit) when ‖tree‖ ≤ C."""
  norm = global_norm(tree)
  scale = clip_scale(norm, clip_norm)
  clipped = jax.tree.map(
      lambda x: jnp.where(scale < 1, (x.astype(jnp.float32) * scale
                                      ).astype(x.dtype), x), tree)
  return clipped, norm


def clip(clip_norm: Optional[float] = None) -> upload_lib.UploadTransform:
  """Clips a client's update to L2 norm C: Δ̂ = Δ · min(1, C/‖Δ‖₂).

  McMahan et al. 2018 (arXiv 1710.06963), the per-client clipping of
  DP-FedAvg: it bounds every client's contribution to the sum the server
  noises. Put it first in the upload chain (`chain(clip(C), quantizer)`):
  the message is whatever the following stages send (`rest`); clipping only
  changes values. Stateless; the key is ignored.

  Args:
    clip_norm: C > 0 (float('inf') is the identity); None reads the round's
      C_r from `UploadContext.clip_norm`, as the DP round broadcasts it
      (adaptive clipping, `strategies.privacy`).

  Raises:
    ValueError: clip_norm is not > 0.
  """
  if clip_norm is not None:
    clip_norm = float(clip_norm)
    if not clip_norm > 0:
      raise ValueError(f'clip: clip_norm must be > 0 (or None to read the '
                       f"round's clip norm), got {clip_norm!r}.")

  def apply(delta, z, key, ctx):
    del key
    c = clip_norm
    if c is None:
      c = getattr(ctx, 'clip_norm', None)
      if c is None:
        raise ValueError(
            'clip() without a clip norm reads the round\'s clip norm from '
            'UploadContext.clip_norm, which this round did not set: use '
            'clip(C), or run it in a round with config.dp (the DP round '
            'broadcasts C_r).')
    clipped, _ = clip_by_global_norm(delta, c)
    return clipped, z

  name = 'clip(C_r)' if clip_norm is None else f'clip({clip_norm:g})'
  return upload_lib.UploadTransform(
      init_client_state=lambda params: (), apply=apply,
      wire_bytes=lambda shapes, rest: rest(shapes), name=name)


def adapt_clip_norm(clip_norm, unclipped_fraction, target_quantile: float,
                    learning_rate: float) -> jax.Array:
  """Andrew et al. 2021 (arXiv 1905.03871), the geometric update:

      C' = C · exp(−η_C · (b̄ − γ)),

  with b̄ the round's fraction of clients whose update norm was ≤ C (after
  noise, clamped to [0, 1]), γ the target quantile and η_C the learning
  rate: C shrinks when more than a fraction γ of the updates fit under it,
  and grows otherwise.
  """
  b = jnp.clip(jnp.asarray(unclipped_fraction, jnp.float32), 0.0, 1.0)
  return (jnp.asarray(clip_norm, jnp.float32) *
          jnp.exp(-learning_rate * (b - target_quantile)))
