"""DP-FedAvg (FedAvg / SCAFFOLD under config.dp) on the engine, against the
test library's plain loop (`testlib.dp_fedavg_round`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import testlib as lib
from fedjax_diff import comm
from fedjax_diff import federation
from fedjax_diff.strategies import build
from fedjax_diff.strategies import quantize as q_lib

ROUND_IDS = [np.array([0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 15]),
             np.array([1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15]),
             np.array([3, 8])]
SIGMA = 0.5
M = 12  # clients_per_round: the expected cohort, the divisor.


def make_dp(data, num_devices=1, name='fedavg', **dp):
  config = lib.tiny_config(dp=lib.dp_config(**dp))
  config.federation.mode = 'vmap' if num_devices > 1 else 'map'
  return lib.make_algorithm(data, num_devices, name=name, config=config,
                            upload=build.upload_from_config(config))


@pytest.fixture(scope='module')
def data():
  return lib.make_data()


@pytest.mark.parametrize('num_devices', [1, 8])
def test_dp_round_matches_python_loop(data, num_devices):
  """Fixed clip norm 0.1 (most, not all, updates are clipped: the norms
  are about 0.16), σ = 0.5, three rounds (the last with 2 clients)."""
  clip = 0.1
  algorithm, sharded = make_dp(data, num_devices, clip_norm=clip,
                               noise_multiplier=SIGMA)
  state, metrics, round_fn = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  assert round_fn._cache_size() == 1
  ref = lib.reference_state()
  for ids in ROUND_IDS:
    ref, _, _ = lib.dp_fedavg_round(ref, data, ids, clip_norm=clip,
                                    noise_multiplier=SIGMA,
                                    expected_cohort=M)
  lib.assert_trees_close(state.params, ref.params)
  lib.assert_trees_close(state.ema_params, ref.ema_params)
  assert lib.tree_distance(state.params, lib.init_params()) > 1e-3
  # Equal weights: every real client weighs 1, padding 0.
  for m, ids in zip(metrics, ROUND_IDS):
    w = m['client_weights']
    assert sorted(w[w > 0].tolist()) == [1.0] * len(ids)
    assert float(m['dp_clip_norm']) == pytest.approx(clip)


def test_dp_round_without_noise_is_the_mean_of_clipped_updates(data):
  """σ = 0 and a clip norm no update reaches: the round is FedAvg with
  equal weights and the expected cohort as divisor, i.e. (n̄/m)× FedAvg's
  step when every client holds as many examples — checked against the
  loop with σ = 0."""
  algorithm, sharded = make_dp(data, 1, clip_norm=100.0, noise_multiplier=0.0)
  state, _, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS[:1])
  ref, _, _ = lib.dp_fedavg_round(lib.reference_state(), data, ROUND_IDS[0],
                                  clip_norm=100.0, noise_multiplier=0.0,
                                  expected_cohort=M)
  lib.assert_trees_close(state.params, ref.params)


def test_adaptive_clipping_matches_python_loop(data):
  """Adaptive clipping from C_0 = 0.16, near the clients' update norms (a
  mix of clipped and unclipped clients): the clip norm of every round, the
  noised fraction and the model follow the loop."""
  c0, sigma_b = 0.16, 2.0
  algorithm, sharded = make_dp(data, 8, clip_norm=c0, noise_multiplier=SIGMA,
                               adaptive=True, count_stddev=sigma_b)
  state, metrics, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS)
  ref, c = lib.reference_state(), c0
  for ids, m in zip(ROUND_IDS, metrics):
    assert float(m['dp_clip_norm']) == pytest.approx(c, rel=1e-6)
    ref, c, frac = lib.dp_fedavg_round(
        ref, data, ids, clip_norm=c, noise_multiplier=SIGMA,
        expected_cohort=M, count_stddev=sigma_b)
    assert float(m['dp_unclipped_fraction']) == pytest.approx(frac, abs=1e-5)
  lib.assert_trees_close(state.params, ref.params)
  assert float(state.algorithm['dp']['clip_norm']) == pytest.approx(
      c, rel=1e-5)
  assert c != pytest.approx(c0, rel=1e-3)
  clipped = [float(np.mean(m['client_update_norms'][m['client_weights'] > 0]
                           > float(m['dp_clip_norm']))) for m in metrics[:2]]
  assert any(0 < f < 1 for f in clipped)


def test_dp_with_quantized_upload_matches_python_loop(data):
  """FedDM-quant under DP: the upload path is clip → int4 stochastic
  quantizer (stage keys fold_in(upload_key, i)); the quantized update,
  which may exceed C, is clipped again by the server."""
  config = lib.tiny_config(dp=lib.dp_config(clip_norm=0.1,
                                            noise_multiplier=SIGMA))
  config.upload = dict(quantize_bits=4, granularity='per_channel',
                       rounding='stochastic', scale_method='minmax',
                       error_feedback=False)
  upload = build.upload_from_config(config)
  assert upload.name.startswith('clip(0.1) -> int4')
  algorithm, sharded = lib.make_algorithm(data, 1, config=config,
                                          upload=upload)
  state, _, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS[:2])
  cfg = q_lib.QuantizationConfig(bits=4, granularity='per_channel',
                                 rounding='stochastic')

  def upload_fn(cid, clipped, key, params):
    del cid, params
    round_key, _ = jax.random.split(jax.random.fold_in(key, 1))
    return q_lib.quantize_dequantize(clipped, cfg, round_key)

  ref = lib.reference_state()
  for ids in ROUND_IDS[:2]:
    ref, _, _ = lib.dp_fedavg_round(ref, data, ids, clip_norm=0.1,
                                    noise_multiplier=SIGMA,
                                    expected_cohort=M, upload_fn=upload_fn)
  lib.assert_trees_close(state.params, ref.params)


def test_dp_with_prox_runs_the_proximal_chain(data):
  """FedDM-prox composes: the client chain keeps its proximal transform
  (the loop trains with the same optimizer)."""
  from fedjax_diff.strategies import proximal  # pylint: disable=g-import-not-at-top
  opt = lib.client_opt(extra=[proximal.proximal(0.5)])
  config = lib.tiny_config(dp=lib.dp_config(clip_norm=0.1,
                                            noise_multiplier=SIGMA))
  algorithm, sharded = lib.make_algorithm(
      data, 1, config=config, optimizer=opt,
      upload=build.upload_from_config(config))
  state, _, _ = lib.run_rounds(algorithm, sharded, ROUND_IDS[:1])
  ref, _, _ = lib.dp_fedavg_round(lib.reference_state(), data, ROUND_IDS[0],
                                  clip_norm=0.1, noise_multiplier=SIGMA,
                                  expected_cohort=M, optimizer=opt)
  lib.assert_trees_close(state.params, ref.params)


def test_scaffold_under_dp_derives_c_from_the_private_aggregate(data):
  """SCAFFOLD's first round under DP moves x as DP-FedAvg does (c = c_k =
  0), uploads no Δc, and sets c = (m/N)·(−c − Δx/Σ_s η_s) = −(m/N)·Δx/Σ_s
  η_s from the noised Δx; a client that took part keeps c_k = −Δy_k/Σ_s η_s
  of its own unclipped update."""
  ids = ROUND_IDS[:1]
  out = {}
  for name in ('scaffold', 'fedavg'):
    algorithm, sharded = make_dp(data, 1, name=name, clip_norm=0.1,
                                 noise_multiplier=SIGMA)
    out[name], _, _ = lib.run_rounds(algorithm, sharded, ids)
  scaffold = out['scaffold']
  lib.assert_trees_close(scaffold.params, out['fedavg'].params, rtol=1e-6,
                         atol=1e-7)
  # testlib's server optimizer (SGD, momentum 0.9) moves x by Δx at round 0.
  dx = lib.delta64(scaffold.params, lib.init_params())
  lr_sum = sum(5e-2 * min(1.0, (s + 1.0) / 4) for s in range(lib.LOCAL_STEPS))
  want_c = jax.tree.map(lambda d: -(M / 16) * d / lr_sum, dx)
  lib.assert_trees_close(scaffold.algorithm['c'], want_c, atol=1e-6)
  rows = scaffold.client_states['scaffold']
  cid = int(ids[0][0])
  params, _, _ = lib.train_client(
      lib.init_params(), data.images[cid], data.labels[cid],
      int(data.counts[cid]), lib.client_key(jax.random.PRNGKey(42), 0, cid),
      0)
  want_ck = jax.tree.map(lambda d: -d / lr_sum,
                         lib.delta64(params, lib.init_params()))
  lib.assert_trees_close(jax.tree.map(lambda x: x[cid], rows), want_ck,
                         atol=1e-5)
  absent = 1  # not in ROUND_IDS[0]
  assert not any(np.any(np.asarray(x[absent]))
                 for x in jax.tree.leaves(rows))
  # Under DP the uplink is FedAvg's: c goes down, Δc does not come up.
  algorithm, _ = make_dp(data, 1, name='scaffold', clip_norm=0.1,
                         noise_multiplier=SIGMA)
  k = algorithm.cohort_size(0)
  size = comm.tree_bytes(lib.init_params())
  assert algorithm.round_bytes(0) == {'uplink_bytes': k * size,
                                      'downlink_bytes': 2 * k * size}


@pytest.mark.parametrize('name,match', [('fedphd', 'edge selection'),
                                        ('fedddpm', 'auxiliary set')])
def test_unsound_algorithms_refuse_dp(data, name, match):
  config = lib.tiny_config(dp=lib.dp_config())
  with pytest.raises(ValueError, match=f"config.dp is not supported with "
                     f"config.algorithm='{name}'.*{match}"):
    lib.make_algorithm(data, 1, name=name, config=config)


def test_poisson_cohorts_fit_one_compiled_round(data):
  """The algorithm samples Poisson cohorts of varying size; its slots fit
  the largest cohort of the run on every device, so every round runs in
  one compilation, and the traffic is that of each round's cohort."""
  config = lib.tiny_config(dp=lib.dp_config(), **{'num_rounds': 6,
                                                  'federation.mode': 'vmap'})
  config.federation.clients_per_round = 6
  algorithm, sharded = lib.make_algorithm(
      data, 8, config=config, upload=build.upload_from_config(config))
  cohorts = [algorithm.sample_clients(r) for r in range(6)]
  assert len({len(c) for c in cohorts}) > 1
  bound = algorithm.slots_per_device
  assert bound == federation.max_slots_per_device(cohorts, 16, 8)
  round_fn = algorithm.make_round()
  state = algorithm.initial_state(lib.init_params(), jax.random.PRNGKey(0))
  size = comm.tree_bytes(lib.init_params())
  for r in range(6):
    ids, mask = algorithm.slots(r)
    assert ids.shape == (8 * bound,)
    assert sorted(ids[mask > 0].tolist()) == cohorts[r].tolist()
    state, metrics = round_fn(state, sharded, ids, mask)
    figures = algorithm.round_figures(jax.device_get(metrics), r)
    assert figures['dp_clients'] == len(cohorts[r])
    assert figures['uplink_bytes'] == len(cohorts[r]) * size
  assert round_fn._cache_size() == 1
  summary = algorithm.summary(6)
  total = sum(len(c) for c in cohorts)
  assert summary['total_uplink_bytes'] == total * size
  assert summary['dp_sampled_clients'] == total
  assert summary['dp_epsilon'] == pytest.approx(
      algorithm.privacy.epsilon(6))
