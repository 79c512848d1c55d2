"""Client data placement (federation.place_clients) against a plain stack."""

import jax
import numpy as np
import pytest

from fedjax_diff import federation


def _plain_stack(images, labels, parts, rows):
  """The stacked layout written out by hand: client k's examples in order,
  zeros beyond its count and for the padding rows."""
  max_n = max(len(p) for p in parts)
  out_images = np.zeros((rows, max_n) + images.shape[1:], np.uint8)
  out_labels = np.zeros((rows, max_n), np.int32)
  counts = np.zeros(rows, np.int32)
  for k, p in enumerate(parts):
    for j, i in enumerate(p):
      out_images[k, j] = images[i]
      out_labels[k, j] = labels[i]
    counts[k] = len(p)
  return out_images, out_labels, counts


@pytest.mark.parametrize('devices', [1, 4, 8])
def test_place_clients_equals_plain_stack(devices):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (60, 3, 2, 1), dtype=np.uint8)
  labels = rng.integers(0, 5, 60).astype(np.int32)
  # Unequal sizes, shuffled and reversed indices, a client of one example.
  perm = rng.permutation(60)
  parts = [perm[:7], perm[7:20][::-1], perm[20:21], perm[21:45], perm[45:]]
  mesh = federation.client_mesh(jax.devices()[:devices])
  rows = -(-len(parts) // devices) * devices
  want = _plain_stack(images, labels, parts, rows)
  placed = federation.place_clients(images, labels, parts, mesh)
  stacked = federation.shard_client_data(
      federation.stack_clients(images, labels, parts), mesh)
  for data in (placed, stacked):
    for got, ref in zip((data.images, data.labels, data.counts), want):
      assert got.sharding == federation.client_sharding(mesh)
      assert got.dtype == ref.dtype
      np.testing.assert_array_equal(np.asarray(got), ref)


def test_place_clients_refuses_an_empty_client():
  images = np.zeros((4, 2, 2, 1), np.uint8)
  labels = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match=r'Clients \[1\] hold no examples'):
    federation.place_clients(images, labels, [np.arange(4), np.array([], int)],
                             federation.client_mesh(jax.devices()[:2]))


def test_to_host_reads_local_arrays():
  mesh = federation.client_mesh(jax.devices()[:4])
  x = jax.device_put(np.arange(8.0), federation.client_sharding(mesh))
  got = federation.to_host({'a': x, 'b': 3.0})
  np.testing.assert_array_equal(got['a'], np.arange(8.0))
  assert isinstance(got['a'], np.ndarray) and float(got['b']) == 3.0
