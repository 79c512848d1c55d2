"""The vectorized hierarchical round against a plain Python loop over clients
and edges (FedPhD, arXiv 2507.06449)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_diff import federation
from fedjax_diff import hierarchy
from fedjax_diff import optimizers
from fedjax_diff import rounds
from fedjax_diff.state import init_server_state
from fedjax_diff.strategies import hierarchical

LOCAL_STEPS = 2
BATCH = 4
EMA = 0.9
NUM_CLASSES = 4
SERVER_OPT = optax.sgd(1.0, momentum=0.9)


class TinyDenoiser(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Conv(x.shape[-1], (3, 3))(h)


MODEL = TinyDenoiser()


def loss_fn(params, x, labels, rng):
  noise = jax.random.normal(rng, x.shape)
  pred = MODEL.apply({'params': params}, x + 0.5 * noise)
  scale = 1.0 + 0.1 * labels.astype(jnp.float32)[:, None, None, None]
  return jnp.mean(scale * (pred - noise) ** 2)


def make_data(num_clients=10, seed=0):
  """Clients with 1 or 2 of 4 classes and 3..12 examples."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(3, 13, size=num_clients)
  images, labels = [], []
  for k, n in enumerate(counts):
    classes = [k % NUM_CLASSES, (k // 2) % NUM_CLASSES][:1 + k % 2]
    labels.append(rng.choice(classes, size=n).astype(np.int32))
    images.append(rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8))
  bounds = np.cumsum(counts)[:-1]
  parts = np.split(np.arange(counts.sum()), bounds)
  return federation.stack_clients(np.concatenate(images),
                                  np.concatenate(labels), parts)


def client_opt():
  return optimizers.client_optimizer(ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=5e-2, momentum=0.9, warmup_steps=3,
      grad_clip=1.0)))


def init_state(num_edges):
  params = MODEL.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)))['params']
  return init_server_state(
      params, SERVER_OPT, jax.random.PRNGKey(42),
      edges=hierarchical.init_edge_state(params, num_edges, NUM_CLASSES))


def make_config(**kw):
  base = dict(num_edges=3, cloud_every=2, agg_a=5.0, agg_b=-1.0,
              selection='greedy', select_scale=20.0, final_cloud=False)
  base.update(kw)
  return hierarchical.HierarchyConfig(**base)


# --- The reference: FedPhD's loops, written out with numpy. ---


def sh(q):
  return 2.0 - np.sqrt(sum((1.0 / len(q) - qc) ** 2 for qc in q))


def merge(dist, count, q, n):
  return [(dist[c] * count + q[c] * n) / (count + n) for c in range(len(q))]


def train_client(global_params, data, cid, round_key, round_idx):
  opt = client_opt()
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  key = jax.random.fold_in(round_key, int(cid))
  order_key, train_key = jax.random.split(key)
  count = int(data.counts[cid])
  images = jnp.asarray(data.images[cid])
  labels = jnp.asarray(data.labels[cid])
  order = rounds.epoch_order(order_key, count, images.shape[0])
  params, opt_state = global_params, opt.init(global_params)
  losses = []
  for s in range(LOCAL_STEPS):
    flip_key, loss_key = jax.random.split(jax.random.fold_in(train_key, s))
    x, y = rounds.client_batch(images, labels, order, count, s, BATCH,
                               flip_key, random_flip=False)
    loss, grads = grad_fn(params, x, y, loss_key)
    updates, opt_state = opt.update(grads, opt_state, params,
                                    global_params=global_params,
                                    global_step=round_idx * LOCAL_STEPS + s)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  return params, np.mean(losses)


def reference_run(data, rounds_ids, cfg, drawn_edges=None):
  """Rounds of FedPhD as loops over clients and edges.

  With cfg.selection == 'greedy' the reference chooses edges itself;
  otherwise it takes the edges `drawn_edges[r]` the round drew.
  """
  state = init_state(cfg.num_edges)
  params = jax.tree.map(np.asarray, state.params)
  ema = params
  opt_state = state.opt_state
  num_e = cfg.num_edges
  edge_models = [params] * num_e
  edge_n = [1.0] * num_e
  dist = [[1.0 / NUM_CLASSES] * NUM_CLASSES for _ in range(num_e)]
  samples = [0.0] * num_e
  edges_log = []
  for r, ids in enumerate(rounds_ids):
    round_key = jax.random.fold_in(state.rng, r)
    qs, ns = [], []
    for cid in ids:
      n = int(data.counts[cid])
      hist = np.bincount(data.labels[cid][:n], minlength=NUM_CLASSES)
      qs.append(list(hist / n))
      ns.append(n)
    # Edge selection.
    if cfg.selection == 'greedy':
      d, c = [list(x) for x in dist], list(samples)
      chosen = []
      for q, n in zip(qs, ns):
        scores = [max(cfg.select_scale * sh(merge(d[e], c[e], q, n)) - c[e],
                      0.0) + 1e-8 for e in range(num_e)]
        e = int(np.argmax(scores))
        d[e] = merge(d[e], c[e], q, n)
        c[e] += n
        chosen.append(e)
    else:
      chosen = [int(e) for e in drawn_edges[r][:len(ids)]]
    edges_log.append(chosen)
    # Clients train from their edge's model; edges average them.
    locals_ = [[] for _ in range(num_e)]
    for cid, e, q, n in zip(ids, chosen, qs, ns):
      p, _ = train_client(jax.tree.map(jnp.asarray, edge_models[e]), data,
                          cid, round_key, r)
      locals_[e].append((n, jax.tree.map(np.asarray, p)))
      dist[e] = merge(dist[e], samples[e], q, n)
      samples[e] += n
    for e in range(num_e):
      if locals_[e]:
        total = sum(n for n, _ in locals_[e])
        base = edge_models[e]
        edge_models[e] = jax.tree.map(
            lambda b, *ps: (b.astype(np.float64) + sum(
                n * (p.astype(np.float64) - b) for (n, _), p in
                zip(locals_[e], ps)) / total).astype(np.float32),
            base, *[p for _, p in locals_[e]])
        edge_n[e] = float(total)
    # The cloud, every k rounds.
    if r % cfg.cloud_every == 0:
      raw = [max(edge_n[e] + cfg.agg_a * sh(dist[e]) + cfg.agg_b, 0.0)
             for e in range(num_e)]
      w = [x / sum(raw) for x in raw]
      mean = jax.tree.map(lambda *ps: sum(
          wi * p.astype(np.float64) for wi, p in zip(w, ps)), *edge_models)
      grad = jax.tree.map(lambda p, m: jnp.asarray(p - m, jnp.float32),
                          params, mean)
      updates, opt_state = SERVER_OPT.update(grad, opt_state, params)
      params = jax.tree.map(np.asarray, optax.apply_updates(params, updates))
      edge_models = [params] * num_e
      dist = [[1.0 / NUM_CLASSES] * NUM_CLASSES for _ in range(num_e)]
      samples = [0.0] * num_e
    decay = min(EMA, (1 + r) / (10 + r))
    ema = jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, ema, params)
  return dict(params=params, ema=ema, edge_models=edge_models,
              edge_n=edge_n, dist=dist, samples=samples, edges=edges_log)


def run(data, rounds_ids, cfg, num_devices=1, mode='map', chunk_size=None):
  mesh = federation.client_mesh(jax.devices()[:num_devices])
  round_fn = hierarchy.make_round_fn(
      loss_fn=loss_fn, client_optimizer=client_opt(),
      server_optimizer=SERVER_OPT, mesh=mesh, local_steps=LOCAL_STEPS,
      batch_size=BATCH, hierarchy=cfg, num_classes=NUM_CLASSES, mode=mode,
      chunk_size=chunk_size, ema_decay=EMA)
  sharded = federation.shard_client_data(data, mesh)
  state = federation.replicate(init_state(cfg.num_edges), mesh)
  all_metrics = []
  for ids in rounds_ids:
    slot_ids, mask = federation.round_slots(np.asarray(ids, np.int32),
                                            num_devices)
    state, metrics = round_fn(state, sharded, slot_ids, mask)
    all_metrics.append(jax.tree.map(np.asarray, metrics))
  return state, all_metrics, round_fn


def assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


ROUND_IDS = [[0, 1, 2, 3, 5, 7], [1, 2, 4, 6, 8, 9], [0, 3, 4, 5, 8, 9],
             [2, 3, 6, 7, 8, 9]]


@pytest.fixture(scope='module')
def greedy_reference():
  data = make_data()
  return data, reference_run(data, ROUND_IDS[:3], make_config())


@pytest.mark.parametrize('mode,num_devices,chunk_size', [
    ('map', 1, None), ('chunked', 8, 1)])
def test_round_matches_python_loop(greedy_reference, mode, num_devices,
                                   chunk_size):
  """Three rounds, 3 edges, cloud at rounds 0 and 2 (k = 2), greedy
  selection: every model, statistic and assignment as the loops say."""
  data, ref = greedy_reference
  cfg = make_config()
  state, metrics, round_fn = run(data, ROUND_IDS[:3], cfg, num_devices, mode,
                                 chunk_size)
  assert [m['cloud'] for m in metrics] == [1.0, 0.0, 1.0]
  for m, want in zip(metrics, ref['edges']):
    np.testing.assert_array_equal(m['client_edges'][:len(want)], want)
  # The assignments spread over the edges and the model moved.
  assert len({e for es in ref['edges'] for e in es}) == 3
  moved = sum(float(np.abs(np.asarray(p) - np.asarray(q)).sum()) for p, q in
              zip(jax.tree.leaves(state.params),
                  jax.tree.leaves(init_state(3).params)))
  assert moved > 1e-3
  assert_trees_close(state.params, ref['params'])
  assert_trees_close(state.ema_params, ref['ema'])
  for e in range(3):
    assert_trees_close(jax.tree.map(lambda p: p[e], state.edges.params),
                       ref['edge_models'][e])
  np.testing.assert_allclose(state.edges.counts, ref['edge_n'])
  np.testing.assert_allclose(state.edges.label_dist, ref['dist'], rtol=1e-6)
  np.testing.assert_allclose(state.edges.samples, ref['samples'])
  assert round_fn._cache_size() == 1


def test_fedphd_selection_round_matches_python_loop():
  """FedPhD's random selection on 8 devices (vmap): the loops take the
  round's draws and get the same models."""
  data = make_data()
  cfg = make_config(selection='fedphd', cloud_every=2, num_edges=2)
  ids = ROUND_IDS[:3]
  state, metrics, _ = run(data, ids, cfg, num_devices=8, mode='vmap')
  drawn = [m['client_edges'] for m in metrics]
  # Both edges are drawn (the comparison covers more than one edge).
  assert len({int(e) for d in drawn for e in d[:6]}) == 2
  ref = reference_run(data, ids, cfg, drawn_edges=drawn)
  assert_trees_close(state.params, ref['params'])
  for e in range(2):
    assert_trees_close(jax.tree.map(lambda p: p[e], state.edges.params),
                       ref['edge_models'][e])
  np.testing.assert_allclose(state.edges.label_dist, ref['dist'], rtol=1e-6)


def test_edge_without_clients_keeps_its_model():
  """4 edges, 2 clients per round: in a round without the cloud, the edges
  no client chose keep their model and n_e exactly."""
  data = make_data()
  cfg = make_config(num_edges=4, cloud_every=10)
  mesh = federation.client_mesh(jax.devices()[:1])
  round_fn = hierarchy.make_round_fn(
      loss_fn=loss_fn, client_optimizer=client_opt(),
      server_optimizer=SERVER_OPT, mesh=mesh, local_steps=LOCAL_STEPS,
      batch_size=BATCH, hierarchy=cfg, num_classes=NUM_CLASSES, mode='map',
      donate=False)
  state = init_state(4)
  state, _ = round_fn(state, data, np.array([0, 1], np.int32),
                      np.ones(2, np.float32))  # round 0: cloud.
  before = state
  after, metrics = round_fn(state, data, np.array([2, 3], np.int32),
                            np.ones(2, np.float32))
  assert float(metrics['cloud']) == 0.0
  used = set(np.asarray(metrics['client_edges']).tolist())
  unused = sorted(set(range(4)) - used)
  assert unused and used
  for e in range(4):
    b = jax.tree.leaves(jax.tree.map(lambda p: p[e], before.edges.params))
    a = jax.tree.leaves(jax.tree.map(lambda p: p[e], after.edges.params))
    same = all(np.array_equal(x, y) for x, y in zip(a, b))
    assert same == (e in unused)
  np.testing.assert_array_equal(np.asarray(after.edges.counts)[unused],
                                np.asarray(before.edges.counts)[unused])
  # No cloud: the global model and the server optimizer did not move.
  for x, y in zip(jax.tree.leaves((after.params, after.opt_state)),
                  jax.tree.leaves((before.params, before.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cloud_rounds_and_weights():
  """Cloud at r mod k = 0 and at the last round with final_cloud; with
  sgd(1.0) the new global model is Σ w_e θ_e with eq. (5)'s weights, and
  every edge is reset to it."""
  data = make_data()
  cfg = make_config(num_edges=2, cloud_every=2, agg_a=3.0, agg_b=0.5,
                    final_cloud=True)
  mesh = federation.client_mesh(jax.devices()[:1])
  sgd = optax.sgd(1.0)
  round_fn = hierarchy.make_round_fn(
      loss_fn=loss_fn, client_optimizer=client_opt(), server_optimizer=sgd,
      mesh=mesh, local_steps=LOCAL_STEPS, batch_size=BATCH, hierarchy=cfg,
      num_classes=NUM_CLASSES, num_rounds=4, mode='map', donate=False)
  params = MODEL.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)))['params']
  state = init_server_state(
      params, sgd, jax.random.PRNGKey(0),
      edges=hierarchical.init_edge_state(params, 2, NUM_CLASSES))
  clouds = []
  for r, ids in enumerate(ROUND_IDS):
    prev = state
    state, m = round_fn(state, data, np.asarray(ids, np.int32),
                        np.ones(len(ids), np.float32))
    clouds.append(float(m['cloud']))
    if not m['cloud']:
      continue
    # Recompute the edges' pre-reset models from the round's own records:
    # the edge models before the round plus the clients' mean update.
    edges = np.asarray(m['client_edges'])
    n = np.asarray(m['client_weights'], np.float64)
    counts = np.where(m['edge_weights'] > 0, m['edge_weights'],
                      prev.edges.counts)
    q = np.stack([np.bincount(data.labels[c][:data.counts[c]],
                              minlength=NUM_CLASSES) / data.counts[c]
                  for c in ids])
    dist = []
    for e in range(2):
      sel = edges == e
      tot = prev.edges.samples[e] + n[sel].sum()
      dist.append((prev.edges.label_dist[e] * prev.edges.samples[e] +
                   (q[sel] * n[sel, None]).sum(0)) / tot if n[sel].sum() else
                  prev.edges.label_dist[e])
    raw = [max(counts[e] + 3.0 * sh(dist[e]) + 0.5, 0) for e in range(2)]
    np.testing.assert_allclose(m['cloud_weights'],
                               np.array(raw) / sum(raw), rtol=1e-5)
    for e in range(2):
      assert_trees_close(jax.tree.map(lambda p: p[e], state.edges.params),
                         state.params, rtol=0, atol=0)
    np.testing.assert_array_equal(state.edges.samples, 0)
    np.testing.assert_allclose(state.edges.label_dist, 1 / NUM_CLASSES)
  assert clouds == [1.0, 0.0, 1.0, 1.0]  # rounds 0, 2 and the last, 3.


def test_missing_edges_error():
  data = make_data()
  mesh = federation.client_mesh(jax.devices()[:1])
  round_fn = hierarchy.make_round_fn(
      loss_fn=loss_fn, client_optimizer=client_opt(),
      server_optimizer=SERVER_OPT, mesh=mesh, local_steps=1,
      batch_size=BATCH, hierarchy=make_config(), num_classes=NUM_CLASSES,
      mode='map', donate=False)
  params = MODEL.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)))['params']
  flat = init_server_state(params, SERVER_OPT, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='init_edge_state'):
    round_fn(flat, data, np.array([0], np.int32), np.ones(1, np.float32))
  wrong = flat.replace(edges=hierarchical.init_edge_state(params, 2,
                                                          NUM_CLASSES))
  with pytest.raises(ValueError, match='3 edges'):
    round_fn(wrong, data, np.array([0], np.int32), np.ones(1, np.float32))


def test_trainer_hierarchy_bytes_and_resume(tmp_path):
  """configs/test.py with 2 edges, cloud every 2 rounds and at the last
  (round 2 of 3): per-link bytes in metrics.jsonl and summary.json, the
  edges checkpointed, and a resume of the last round bit for bit."""
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from configs import mnist_fedphd  # pylint: disable=g-import-not-at-top
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from fedjax_diff import trainer  # pylint: disable=g-import-not-at-top
  from fedjax_diff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = test_config.get_config()
  config.num_rounds = 3
  # One level, no attention: the smallest UNet, to compile fast.
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.federation.local_steps = 1
  config.hierarchy = mnist_fedphd.hierarchy_block(agg_a=100, select_scale=40)
  config.hierarchy.cloud_every = 2
  config.evaluators = ml_collections.ConfigDict()
  workdir = str(tmp_path / 'hier')
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.round) == 3
  assert jax.tree.leaves(state.edges.params)[0].shape[0] == 2
  param_bytes = sum(p.size * 4 for p in jax.tree.leaves(state.params))
  rows = workdir_lib.read_metrics(workdir)
  assert [r['cloud'] for r in rows] == [1, 0, 1]
  for row in rows:
    assert row['uplink_bytes'] == row['downlink_bytes'] == 3 * param_bytes
    assert row['edge_cloud_uplink_bytes'] == row['cloud'] * 2 * param_bytes
    assert row['edge_clients_0'] + row['edge_clients_1'] == 3
    assert row['cloud_weight_0'] + row['cloud_weight_1'] == pytest.approx(1)
  summary = workdir_lib.read_summary(workdir)
  assert summary['cloud_rounds'] == 2
  assert summary['client_edge_bytes'] == 3 * 2 * 3 * param_bytes
  assert summary['cloud_link_bytes'] == 2 * 2 * 2 * param_bytes
  assert summary['total_bytes'] == (18 + 8) * param_bytes
  assert summary['fedavg_fp32_cloud_link_bytes'] == 18 * param_bytes
  # After the final cloud round every edge holds the global model.
  for e in range(2):
    for a, b in zip(jax.tree.leaves(state.params),
                    jax.tree.leaves(jax.tree.map(lambda p: p[e],
                                                 state.edges.params))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  resumed_dir = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, 'checkpoints', '3'))
  resumed = trainer.train_and_evaluate(config, resumed_dir)
  leaves = jax.tree.leaves(state)
  assert len(leaves) == len(jax.tree.leaves(resumed))
  for a, b in zip(leaves, jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fedphd_configs():
  """FedPhD's settings, and variants that differ only in their blocks."""
  from configs import celeba_fedphd  # pylint: disable=g-import-not-at-top
  from configs import cifar10_fedphd  # pylint: disable=g-import-not-at-top
  from configs import mnist_fedphd  # pylint: disable=g-import-not-at-top
  cifar = cifar10_fedphd.get_config()
  assert (cifar.federation.num_clients, cifar.federation.clients_per_round,
          cifar.federation.batch_size) == (20, 8, 128)
  assert cifar.client_optimizer.learning_rate == 2e-4
  assert (cifar.hierarchy.num_edges, cifar.hierarchy.cloud_every,
          cifar.hierarchy.agg_a, cifar.hierarchy.agg_b) == (2, 5, 50000, 0)
  assert cifar.pruning.ratio == 0.2
  celeba = celeba_fedphd.get_config()
  assert (celeba.federation.num_clients, celeba.federation.clients_per_round,
          celeba.federation.batch_size) == (20, 4, 32)
  assert celeba.client_optimizer.learning_rate == 2e-5
  assert celeba.hierarchy.agg_a == 20000 and celeba.pruning.ratio == 0.4
  assert celeba.partition.classes_per_client == 1
  assert tuple(celeba.data.attribute_labels) == ('Male', 'Young')
  for module in (mnist_fedphd, cifar10_fedphd, celeba_fedphd):
    both = module.get_config()
    assert hierarchical.config_from(both).selection == 'fedphd'
    assert hierarchical.config_from(module.get_config('pruning')) is None
    assert module.get_config('hierarchy').pruning is None
    flat = module.get_config('fedavg')
    assert flat.hierarchy is None and flat.pruning is None
    rest = {k for k in both.keys() if k not in ('hierarchy', 'pruning')}
    for k in rest:
      assert both[k] == flat[k], k
  with pytest.raises(ValueError, match='variant'):
    mnist_fedphd.get_config('flat')
