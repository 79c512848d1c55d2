"""The client engine: slot layout, no image crossing devices, one shard_map,
and the independent sampler against the engine's local batches."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import testlib as lib
from fedjax_diff import client as client_lib
from fedjax_diff import federation

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'fedjax_diff')
COLLECTIVE = re.compile(
    r'=\s*\S.*?\b(all-gather|all-to-all|collective-permute|all-reduce|'
    r'reduce-scatter)(-start)?\(')


def collectives(hlo_text: str) -> list[str]:
  """The collective instructions of a compiled program's HLO."""
  return [line.strip() for line in hlo_text.splitlines()
          if COLLECTIVE.search(line)]


# --- The independent sampler. ---


@pytest.mark.parametrize('count,max_n,batch', [(7, 9, 3), (8, 8, 4),
                                               (1, 5, 2)])
def test_independent_sampler_is_without_replacement(count, max_n, batch):
  """Over one epoch every example is drawn once, and epochs repeat the same
  order (the documented cyclic read of one permutation)."""
  key = jax.random.PRNGKey(count)
  steps = -(-count // batch) * 2
  drawn = np.concatenate([lib.batch_indices(key, count, max_n, s, batch)
                          for s in range(steps)])
  epoch = drawn[:count]
  assert sorted(epoch.tolist()) == list(range(count))
  np.testing.assert_array_equal(drawn[count:2 * count], epoch)
  assert drawn.max() < count  # never a padding position.


@pytest.mark.parametrize('seed', range(4))
def test_local_batches_match_the_independent_sampler(seed):
  rng = np.random.default_rng(seed)
  max_n = int(rng.integers(3, 20))
  count = int(rng.integers(1, max_n + 1))
  images = rng.integers(0, 256, (max_n, 2, 2, 1), dtype=np.uint8)
  labels = np.arange(max_n, dtype=np.int32)
  key = jax.random.PRNGKey(seed)
  order = client_lib.epoch_order(key, count, max_n)
  for step in range(5):
    _, y = client_lib.client_batch(images, labels, order, count, step, 3,
                                   None, random_flip=False)
    np.testing.assert_array_equal(
        np.asarray(y), lib.batch_indices(key, count, max_n, step, 3))


# --- Slots and placement. ---


def test_round_slots_put_each_client_on_its_device():
  ids, mask = federation.round_slots(np.array([13, 0, 1, 6, 15]), 4, 16)
  # 4 rows per device; device 0 holds 0 and 1, device 1 holds 6, device 3
  # holds 13 and 15: 2 slots per device (the default min(K, rows) = 4 would
  # fit any round, the tightest bound is asked below).
  assert len(ids) == 4 * 4
  real = ids[mask > 0]
  assert sorted(real.tolist()) == [0, 1, 6, 13, 15]
  per_device = ids.reshape(4, -1)
  for d in range(4):
    assert np.all(per_device[d] // 4 == d)
  ids, mask = federation.round_slots(np.array([13, 0, 1, 6, 15]), 4, 16, 2)
  np.testing.assert_array_equal(ids, [0, 1, 6, 4, 8, 8, 13, 15])
  np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0, 1, 1])
  assert federation.max_slots_per_device([[0, 1, 2], [4, 8]], 16, 4) == 3
  with pytest.raises(ValueError, match='holds 3 of the round'):
    federation.round_slots(np.array([0, 1, 2]), 4, 16, 2)
  with pytest.raises(ValueError, match='distinct'):
    federation.round_slots(np.array([1, 1]), 1, 4)
  with pytest.raises(ValueError, match='do not split'):
    federation.round_slots(np.array([1]), 3, 4)


def test_no_client_image_crosses_devices():
  """The compiled FedAvg round on 8 devices moves only the aggregate: its
  only collective is one all-reduce of float32 sums, none reads the uint8
  images. The same check sees the gather of a naive layout, so it can
  fail."""
  data = lib.make_data()
  algorithm, sharded = lib.make_algorithm(data, 8)
  state = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(0))
  slots = federation.round_slots(np.array([0, 2, 3, 5, 9, 10, 14]), 8, 16)
  text = algorithm.make_round().lower(state, sharded, *slots).compile(
      ).as_text()
  found = collectives(text)
  assert found and all('all-reduce' in c for c in found)
  assert not any('u8[' in c for c in found)

  # The naive layout: gather the round's images by id, then shard the slots.
  mesh = algorithm.run.mesh

  @jax.jit
  def naive(images, ids):
    out = images[ids]
    return jax.lax.with_sharding_constraint(
        out, NamedSharding(mesh, P(federation.CLIENTS)))

  ids = jnp.asarray(np.array([15, 14, 13, 12, 3, 2, 1, 0], np.int32))
  text = naive.lower(sharded.images, ids).compile().as_text()
  assert any('u8[' in c for c in collectives(text))


def test_exactly_one_module_calls_shard_map():
  callers = []
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        with open(path) as f:
          if re.search(r'\bshard_map\(', f.read()):
            callers.append(os.path.relpath(path, PACKAGE))
  assert callers == ['engine.py']
