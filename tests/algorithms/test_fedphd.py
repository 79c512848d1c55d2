"""FedPhD's hierarchy on the engine against a plain Python loop over clients
and edges (arXiv 2507.06449), built on the test library's client loop."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import testlib as lib
from fedjax_diff import algorithms
from fedjax_diff import federation
from fedjax_diff.strategies import hierarchical

NUM_CLASSES = lib.NUM_CLASSES
NUM_CLIENTS = 10
# The documented tag of the edge-selection stream (algorithms/fedphd.py):
# client k of round r draws with fold_in(fold_in(fold_in(rng, TAG), r), k).
SELECT_KEY_TAG = 0x65646765
ROUND_IDS = [[0, 1, 2, 3, 5, 7], [1, 2, 4, 6, 8, 9], [0, 3, 4, 5, 8, 9],
             [2, 3, 6, 7, 8, 9]]


def client_classes(k):
  """Client k holds 1 or 2 of the 4 classes."""
  return [k % NUM_CLASSES, (k // 2) % NUM_CLASSES][:1 + k % 2]


def make_data():
  return lib.make_data(NUM_CLIENTS, classes=client_classes)


def hierarchy(**kw):
  base = dict(num_edges=3, cloud_every=2, agg_a=5.0, agg_b=-1.0,
              selection='greedy', select_scale=20.0, final_cloud=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def make_fedphd(data, num_devices=1, mode='map', chunk_size=None, **kw):
  """(algorithm, sharded data): FedPhD with `hierarchy(**kw)` under test."""
  return lib.make_algorithm(
      data, num_devices, name='fedphd',
      **{'hierarchy': hierarchy(**kw), 'federation.mode': mode,
         'federation.chunk_size': chunk_size or 0,
         'federation.num_clients': NUM_CLIENTS,
         'federation.clients_per_round': len(ROUND_IDS[0])})


def slots(ids, algorithm, sharded):
  return federation.round_slots(np.asarray(ids), algorithm.run.mesh.size,
                                sharded.num_clients)


def client_edges(metrics, ids, algorithm, sharded):
  """The round's edge of each of its clients `ids`, from the per-slot
  metrics (slots are laid out by device, padding in between)."""
  slot_ids, mask = slots(ids, algorithm, sharded)
  edges = dict(zip(slot_ids[mask > 0].tolist(),
                   np.asarray(metrics['client_edges'])[mask > 0].tolist()))
  assert sorted(edges) == sorted(ids)
  return [edges[cid] for cid in ids]


# --- The reference: FedPhD's loops, written out with numpy. ---


def sh(q):
  return 2.0 - np.sqrt(sum((1.0 / len(q) - qc) ** 2 for qc in q))


def merge(dist, count, q, n):
  return [(dist[c] * count + q[c] * n) / (count + n) for c in range(len(q))]


def ema_only(state):
  """A round without the cloud: θ and the server optimizer stay, the EMA
  moves towards θ with its documented warmup."""
  r = int(state.round)
  decay = min(lib.EMA, (1 + r) / (10 + r))
  return state.replace(
      ema_params=jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                              state.ema_params, state.params),
      round=state.round + 1)


def draw_edge(rng, r, cid, dist, samples, q, n, cfg):
  """FedPhD's draw (eq. 3) of client `cid` in round `r` with the documented
  selection key, against the start-of-round Q, N."""
  scores = np.array([max(cfg.select_scale * sh(merge(dist[e], samples[e], q,
                                                     n)) - samples[e], 0.0) +
                     1e-8 for e in range(cfg.num_edges)], np.float64)
  key = jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(rng, SELECT_KEY_TAG), r), cid)
  return int(jax.random.choice(key, cfg.num_edges,
                               p=np.asarray(scores / scores.sum(),
                                            np.float32)))


def reference_run(data, rounds_ids, cfg, shared_state=False):
  """Rounds of FedPhD as loops over clients and edges; clients train with
  `testlib.train_client` from their edge's model. With `shared_state`, from
  one optimizer state x_r shared by the round's clients, the schedule
  counting the steps of FedPhD's loop order (edge, then id), and x_{r+1} =
  one optimizer's state after all their gradients in that order."""
  state = lib.reference_state()
  opt = lib.client_opt()
  shared = opt.init(state.params)
  num_e = cfg.num_edges
  edge_models = [jax.tree.map(np.asarray, state.params)] * num_e
  edge_n = [1.0] * num_e
  dist = [[1.0 / NUM_CLASSES] * NUM_CLASSES for _ in range(num_e)]
  samples = [0.0] * num_e
  edges_log = []
  for r, ids in enumerate(rounds_ids):
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
      assert cfg.selection == 'fedphd'
      chosen = [draw_edge(state.rng, r, cid, dist, samples, q, n, cfg)
                for cid, q, n in zip(ids, qs, ns)]
    edges_log.append(chosen)
    # Clients train from their edge's model; edges average them.
    locals_ = [[] for _ in range(num_e)]
    order = sorted(zip(chosen, ids))
    grads = {}
    for cid, e, q, n in zip(ids, chosen, qs, ns):
      extra = {}
      if shared_state:
        grads[cid] = []
        extra = dict(opt_state=shared, grads_log=grads[cid], step_offset=(
            r * len(ids) + order.index((e, cid))) * lib.LOCAL_STEPS)
      p, _, _ = lib.train_client(
          jax.tree.map(jnp.asarray, edge_models[e]), data.images[cid],
          data.labels[cid], n, lib.client_key(state.rng, r, cid), r,
          **extra)
      locals_[e].append((n, jax.tree.map(np.asarray, p)))
      dist[e] = merge(dist[e], samples[e], q, n)
      samples[e] += n
    if shared_state:
      shared = lib.sequential_state(
          opt, shared, [g for _, cid in order for g in grads[cid]],
          state.params)
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
      grad = jax.tree.map(lambda p, m: np.asarray(p, np.float64) - m,
                          state.params, mean)
      state = lib.server_step(state, grad)
      edge_models = [jax.tree.map(np.asarray, state.params)] * num_e
      dist = [[1.0 / NUM_CLASSES] * NUM_CLASSES for _ in range(num_e)]
      samples = [0.0] * num_e
    else:
      state = ema_only(state)
  return dict(params=state.params, ema=state.ema_params,
              edge_models=edge_models, edge_n=edge_n, dist=dist,
              samples=samples, edges=edges_log, shared=shared)


@pytest.fixture(scope='module')
def greedy_reference():
  data = make_data()
  cfg = hierarchical.config_from(ml_collections.ConfigDict(
      dict(hierarchy=hierarchy())))
  return data, reference_run(data, ROUND_IDS[:3], cfg)


def test_data_has_the_class_sets():
  """Client k's labels come from its 1 or 2 classes (as the edges' Q, N and
  the selection below rely on)."""
  data = make_data()
  assert data.num_clients == NUM_CLIENTS
  for k in range(NUM_CLIENTS):
    n = int(data.counts[k])
    assert set(data.labels[k][:n].tolist()) <= set(client_classes(k))


@pytest.mark.parametrize('mode,num_devices,chunk_size', [
    ('map', 1, None), ('chunked', 8, 1)])
def test_round_matches_python_loop(greedy_reference, mode, num_devices,
                                   chunk_size):
  """Three rounds, 3 edges, cloud at rounds 0 and 2 (k = 2), greedy
  selection: every model, statistic and assignment as the loops say."""
  data, ref = greedy_reference
  algorithm, sharded = make_fedphd(data, num_devices, mode, chunk_size)
  state, metrics, round_fn = lib.run_rounds(algorithm, sharded, ROUND_IDS[:3])
  assert [float(m['cloud']) for m in metrics] == [1.0, 0.0, 1.0]
  for m, ids, want in zip(metrics, ROUND_IDS, ref['edges']):
    assert client_edges(m, ids, algorithm, sharded) == want
  # The assignments spread over the edges and the model moved.
  assert len({e for es in ref['edges'] for e in es}) == 3
  assert lib.tree_distance(state.params, lib.init_params()) > 1e-3
  lib.assert_trees_close(state.params, ref['params'])
  lib.assert_trees_close(state.ema_params, ref['ema'])
  edges = state.algorithm
  assert isinstance(edges, hierarchical.EdgeState)
  for e in range(3):
    lib.assert_trees_close(jax.tree.map(lambda p, e=e: p[e], edges.params),
                           ref['edge_models'][e])
  np.testing.assert_allclose(edges.counts, ref['edge_n'])
  np.testing.assert_allclose(edges.label_dist, ref['dist'], rtol=1e-6)
  np.testing.assert_allclose(edges.samples, ref['samples'])
  assert round_fn._cache_size() == 1


def test_fedphd_selection_round_matches_python_loop():
  """FedPhD's random selection on 8 devices (vmap): the loops draw the same
  edges with the documented selection key and get the same models."""
  data = make_data()
  algorithm, sharded = make_fedphd(data, 8, 'vmap', selection='fedphd',
                                   cloud_every=2, num_edges=2)
  ids = ROUND_IDS[:3]
  state, metrics, _ = lib.run_rounds(algorithm, sharded, ids)
  drawn = [client_edges(m, r_ids, algorithm, sharded)
           for m, r_ids in zip(metrics, ids)]
  # Both edges are drawn (the comparison covers more than one edge).
  assert len({e for d in drawn for e in d}) == 2
  ref = reference_run(data, ids, algorithm.hierarchy)
  assert ref['edges'] == drawn
  lib.assert_trees_close(state.params, ref['params'])
  for e in range(2):
    lib.assert_trees_close(
        jax.tree.map(lambda p, e=e: p[e], state.algorithm.params),
        ref['edge_models'][e])
  np.testing.assert_allclose(state.algorithm.label_dist, ref['dist'],
                             rtol=1e-6)


def test_shared_optimizer_state_in_fedphds_loop_order():
  """One client optimizer state shared by the clients (FedPhD's code's one
  optimizer): clients ordered edge by edge, by id within an edge, on 8
  devices against the loops."""
  data = make_data()
  ids = ROUND_IDS[:3]
  algorithm, sharded = lib.make_algorithm(
      data, 8, name='fedphd',
      **{'hierarchy': hierarchy(), 'federation.mode': 'vmap',
         'federation.num_clients': NUM_CLIENTS,
         'federation.clients_per_round': len(ids[0]),
         'client_optimizer.shared_state': True})
  state, metrics, _ = lib.run_rounds(algorithm, sharded, ids)
  ref = reference_run(data, ids, algorithm.hierarchy, shared_state=True)
  drawn = [client_edges(m, r_ids, algorithm, sharded)
           for m, r_ids in zip(metrics, ids)]
  assert ref['edges'] == drawn
  # The order is not the ids' order in some round (edges interleave).
  assert any(sorted(zip(e, i)) != sorted(zip(e, i), key=lambda t: t[1])
             for e, i in zip(drawn, ids))
  lib.assert_trees_close(state.params, ref['params'])
  for e in range(3):
    lib.assert_trees_close(
        jax.tree.map(lambda p, e=e: p[e], state.algorithm.params),
        ref['edge_models'][e])
  lib.assert_trees_close(state.client_opt_state, ref['shared'], rtol=1e-4,
                         atol=1e-6)


def test_edge_without_clients_keeps_its_model():
  """4 edges, 2 clients per round: in a round without the cloud, the edges
  no client chose keep their model and n_e exactly."""
  data = make_data()
  algorithm, sharded = make_fedphd(data, 1, 'map', num_edges=4,
                                   cloud_every=10)
  round_fn = algorithm.make_round(donate=False)
  state = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(42))
  state, _ = round_fn(state, sharded,
                      *slots([0, 1], algorithm, sharded))  # round 0: cloud.
  before = state
  after, metrics = round_fn(state, sharded,
                            *slots([2, 3], algorithm, sharded))
  assert float(metrics['cloud']) == 0.0
  used = set(client_edges(metrics, [2, 3], algorithm, sharded))
  unused = sorted(set(range(4)) - used)
  assert unused and used
  for e in range(4):
    b = jax.tree.leaves(jax.tree.map(lambda p, e=e: p[e],
                                     before.algorithm.params))
    a = jax.tree.leaves(jax.tree.map(lambda p, e=e: p[e],
                                     after.algorithm.params))
    same = all(np.array_equal(x, y) for x, y in zip(a, b))
    assert same == (e in unused)
  np.testing.assert_array_equal(np.asarray(after.algorithm.counts)[unused],
                                np.asarray(before.algorithm.counts)[unused])
  # No cloud: the global model and the server optimizer did not move.
  for x, y in zip(jax.tree.leaves((after.params, after.opt_state)),
                  jax.tree.leaves((before.params, before.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cloud_rounds_and_weights():
  """Cloud at r mod k = 0 and at the last round with final_cloud; with
  sgd(1.0) the new global model is Σ w_e θ_e with eq. (5)'s weights, and
  every edge is reset to it."""
  data = make_data()
  built, sharded = make_fedphd(data, 1, 'map', num_edges=2, cloud_every=2,
                               agg_a=3.0, agg_b=0.5, final_cloud=True)
  assert built.num_rounds == 4
  algorithm = algorithms.build('fedphd', dataclasses.replace(
      built.run, server_optimizer=optax.sgd(1.0)))
  round_fn = algorithm.make_round(donate=False)
  state = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(0))
  clouds = []
  for ids in ROUND_IDS:
    prev = state
    slot_ids, mask = slots(ids, algorithm, sharded)
    state, m = round_fn(state, sharded, slot_ids, mask)
    clouds.append(float(m['cloud']))
    if not m['cloud']:
      continue
    # Recompute the edges' statistics from the round's own records: the
    # edges' Q, N before the round plus the round's clients.
    edges = np.asarray(m['client_edges'])
    n = np.asarray(m['client_weights'], np.float64)
    pe = prev.algorithm
    counts = np.where(m['edge_weights'] > 0, m['edge_weights'], pe.counts)
    q = np.stack([np.bincount(data.labels[c][:data.counts[c]],
                              minlength=NUM_CLASSES) / data.counts[c]
                  for c in slot_ids])
    dist = []
    for e in range(2):
      sel = (edges == e) & (mask > 0)
      tot = pe.samples[e] + n[sel].sum()
      dist.append((pe.label_dist[e] * pe.samples[e] +
                   (q[sel] * n[sel, None]).sum(0)) / tot if n[sel].sum() else
                  pe.label_dist[e])
    raw = [max(counts[e] + 3.0 * sh(dist[e]) + 0.5, 0) for e in range(2)]
    np.testing.assert_allclose(m['cloud_weights'],
                               np.array(raw) / sum(raw), rtol=1e-5)
    for e in range(2):
      lib.assert_trees_close(
          jax.tree.map(lambda p, e=e: p[e], state.algorithm.params),
          state.params, rtol=0, atol=0)
    np.testing.assert_array_equal(state.algorithm.samples, 0)
    np.testing.assert_allclose(state.algorithm.label_dist, 1 / NUM_CLASSES)
  assert clouds == [1.0, 0.0, 1.0, 1.0]  # rounds 0, 2 and the last, 3.


def test_missing_edges_error():
  data = make_data()
  algorithm, sharded = make_fedphd(data, 1, 'map')
  round_fn = algorithm.make_round(donate=False)
  flat = lib.reference_state()  # no edges: state.algorithm == {}.
  ids, mask = slots([0], algorithm, sharded)
  with pytest.raises(ValueError, match='init_edge_state'):
    round_fn(flat, sharded, ids, mask)
  wrong = flat.replace(algorithm=hierarchical.init_edge_state(
      lib.init_params(), 2, NUM_CLASSES))
  with pytest.raises(ValueError, match='3 edges'):
    round_fn(wrong, sharded, ids, mask)
  # FedPhD without a hierarchy block is refused when built.
  with pytest.raises(ValueError, match='config.hierarchy'):
    lib.make_algorithm(data, 1, name='fedphd')


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
  config.algorithm = 'fedphd'
  config.hierarchy = mnist_fedphd.hierarchy_block(agg_a=100, select_scale=40)
  config.hierarchy.cloud_every = 2
  config.evaluators = ml_collections.ConfigDict()
  workdir = str(tmp_path / 'hier')
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.round) == 3
  assert isinstance(state.algorithm, hierarchical.EdgeState)
  assert jax.tree.leaves(state.algorithm.params)[0].shape[0] == 2
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
                    jax.tree.leaves(jax.tree.map(lambda p, e=e: p[e],
                                                 state.algorithm.params))):
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
  """FedPhD's settings, and variants that differ only in their blocks and
  the algorithm they name."""
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
    assert both.algorithm == 'fedphd'
    assert hierarchical.config_from(both).selection == 'fedphd'
    pruning = module.get_config('pruning')
    assert pruning.algorithm == 'fedavg'
    assert hierarchical.config_from(pruning) is None
    assert pruning.pruning == both.pruning
    hier = module.get_config('hierarchy')
    assert hier.algorithm == 'fedphd' and hier.pruning is None
    assert hierarchical.config_from(hier) == hierarchical.config_from(both)
    flat = module.get_config('fedavg')
    assert flat.algorithm == 'fedavg'
    assert flat.hierarchy is None and flat.pruning is None
    rest = {k for k in both.keys()
            if k not in ('hierarchy', 'pruning', 'algorithm')}
    assert rest == {k for k in flat.keys()
                    if k not in ('hierarchy', 'pruning', 'algorithm')}
    for k in rest:
      assert both[k] == flat[k], k
  with pytest.raises(ValueError, match='variant'):
    mnist_fedphd.get_config('flat')
