"""Exact communication accounting: bytes on the wire per message.

A message is serialized as the concatenation of its leaves' raw bytes in a
fixed order (both ends know the shapes and dtypes from the model config), so a
float32 tree of P parameters costs exactly 4·P bytes. Strategies that change
what is sent (quantized or masked updates) report their own message sizes
with the same convention.
"""

from typing import Any

import jax
import numpy as np

PyTree = Any


def tree_bytes(tree: PyTree) -> int:
  """Bytes of a pytree of arrays (or ShapeDtypeStructs) sent uncompressed."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def fedavg_round_bytes(params: PyTree, num_clients: int) -> dict[str, int]:
  """One FedAvg round: θ down to each client, Δ up from each (float32).

  Returns:
    {'downlink_bytes', 'uplink_bytes'} for all `num_clients` clients.
  """
  per_message = tree_bytes(params)
  return {'downlink_bytes': num_clients * per_message,
          'uplink_bytes': num_clients * per_message}
