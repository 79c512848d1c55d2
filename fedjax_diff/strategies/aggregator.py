"""The aggregation contract used by the round.

Aggregation happens in two stages so that it needs no per-client copy of the
model on any device and works under `shard_map`:

1. on each device, `accumulate` folds chunks of that device's clients into a
   running accumulator (a weighted sum, or per-edge sums for hierarchies);
2. `finalize` reduces the accumulators over the mesh axis (`psum`) and turns
   them into the aggregate update.
"""

from typing import Any, Callable, NamedTuple

import jax

PyTree = Any


class Aggregator(NamedTuple):
  """Two-stage aggregation of client updates.

  Attributes:
    init: `params -> acc`, an empty accumulator (zeros).
    accumulate: `(acc, deltas, weights) -> acc`; `deltas` is a chunk of client
      updates stacked on axis 0 and `weights` their float32 weights `[c]`
      (0 for padding clients, whose deltas must not leak in, even if NaN).
    finalize: `(acc, axis_name) -> aggregate`, called inside `shard_map`;
      reduces over `axis_name` and returns the aggregated update Δ̄.
  """
  init: Callable[[PyTree], PyTree]
  accumulate: Callable[[PyTree, PyTree, jax.Array], PyTree]
  finalize: Callable[[PyTree, str], PyTree]
