"""The auxiliary set: allocation (size, class balance) and the vectorized
sampler against per-client calls of the DDIM sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff import auxiliary_data as aux_lib
from fedjax_diff import federation
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.diffusion import sample

import fedddpm_testlib as lib

SCHEDULE = make_schedule('linear', 100)


def test_split_proportional_hand_cases():
  np.testing.assert_array_equal(aux_lib.split_proportional(10, [1, 1]), [5, 5])
  # 7·(3, 1)/4 = (5.25, 1.75): floors (5, 1), the larger remainder gets +1.
  np.testing.assert_array_equal(aux_lib.split_proportional(7, [3, 1]), [5, 2])
  np.testing.assert_array_equal(aux_lib.split_proportional(3, [0, 2, 0]),
                                [0, 3, 0])
  with pytest.raises(ValueError, match='zero weights'):
    aux_lib.split_proportional(3, [0, 0])


def test_class_balanced_allocation():
  # Grouped shards: clients 0–1 hold {0, 2}, 2–3 {1, 3}; client 1 holds three
  # times client 0's examples of class 0; class 4 is held by no one.
  counts = np.array([[10, 0, 5, 0, 0],
                     [30, 0, 5, 0, 0],
                     [0, 8, 0, 8, 0],
                     [0, 8, 0, 8, 0],
                     [0, 0, 0, 0, 0]])  # a padding client
  alloc = aux_lib.allocate(counts, conditional=True, per_class=8)
  per = np.array([np.bincount(a, minlength=5) for a in alloc])
  np.testing.assert_array_equal(per.sum(axis=0), [8, 8, 8, 8, 0])
  np.testing.assert_array_equal(per[:, 0], [2, 6, 0, 0, 0])
  np.testing.assert_array_equal(per[:, 2], [4, 4, 0, 0, 0])
  assert len(alloc[4]) == 0
  # Nobody draws a class it does not hold.
  assert np.all(per[counts == 0] == 0)


def test_unconditional_allocation_by_data_size():
  counts = np.array([[30, 0], [10, 0], [0, 20]])
  alloc = aux_lib.allocate(counts, conditional=False, total=12)
  assert [len(a) for a in alloc] == [6, 2, 4]
  assert all(np.all(a == -1) for a in alloc)
  with pytest.raises(ValueError, match='aux_size'):
    aux_lib.allocate(counts, conditional=False, total=0)


def test_sampler_matches_per_client_ddim_and_set_is_balanced():
  mesh = federation.client_mesh()
  data = federation.shard_client_data(lib.make_data(num_clients=5), mesh)
  k = data.num_clients
  # Every client has its own model: perturb the shared init per client.
  base = lib.init_params()
  stacked = jax.tree.map(
      lambda x: jnp.stack([x + 0.05 * i for i in range(k)]), base)
  counts = aux_lib.client_label_counts(np.asarray(data.labels),
                                       np.asarray(data.counts),
                                       lib.NUM_CLASSES)
  alloc = aux_lib.allocate(counts, conditional=True, per_class=5)
  batch = 2
  draw = aux_lib.make_sampler(
      eps_fn=lib.eps_fn, schedule=SCHEDULE, mesh=mesh, image_shape=(8, 8, 1),
      batch_size=batch, num_steps=4, num_classes=lib.NUM_CLASSES,
      guidance_scale=2.0, mode='map')
  rng = jax.random.PRNGKey(3)
  labels, mask = aux_lib.plan(alloc, batch)
  images = np.asarray(draw(stacked, jnp.asarray(labels), rng))
  assert images.shape == labels.shape + (8, 8, 1)
  # Reference: the DDIM sampler, client by client and batch by batch.
  ref = jax.jit(lambda p, key, lbl: sample(
      lib.eps_fn, p, SCHEDULE, key, (batch, 8, 8, 1), method='ddim',
      num_steps=4, labels=lbl, guidance_scale=2.0,
      null_label=lib.NUM_CLASSES))
  for c in range(k):
    params = jax.tree.map(lambda x: x[c], stacked)
    key = jax.random.fold_in(rng, c)
    for b in range(labels.shape[1] // batch):
      want = ref(params, jax.random.fold_in(key, b),
                 jnp.asarray(labels[c, b * batch:(b + 1) * batch]))
      np.testing.assert_allclose(images[c, b * batch:(b + 1) * batch],
                                 np.asarray(want), rtol=1e-5, atol=1e-5)
  aux = aux_lib.sample_auxiliary(draw, stacked, alloc, batch, rng)
  assert len(aux) == 5 * lib.NUM_CLASSES
  assert aux.images.dtype == np.uint8 and aux.images.shape[1:] == (8, 8, 1)
  np.testing.assert_array_equal(np.bincount(aux.labels), [5] * lib.NUM_CLASSES)
  # Each image comes from a client that holds its class.
  assert np.all(counts[aux.sources, aux.labels] > 0)
  # The held-out split (40% of 5 = 2 per class) keeps every class.
  train, held = aux_lib.split_heldout(aux, 0.4, seed=0)
  np.testing.assert_array_equal(np.bincount(held.labels), [2] * 4)
  np.testing.assert_array_equal(np.bincount(train.labels), [3] * 4)


def test_cache_round_trip(tmp_path):
  aux = aux_lib.AuxiliaryData(
      images=np.arange(2 * 4, dtype=np.uint8).reshape(2, 2, 2, 1),
      labels=np.array([0, 1], np.int32), sources=np.array([3, 4], np.int32))
  path = str(tmp_path / 'aux.npz')
  aux.save(path)
  back = aux_lib.AuxiliaryData.load(path)
  for a, b in zip((aux.images, aux.labels, aux.sources),
                  (back.images, back.labels, back.sources)):
    np.testing.assert_array_equal(a, b)
