"""End to end on configs/test.py with config.dp: ε per round in
metrics.jsonl, the ledger in summary.json, a resume that would change σ,
and launch/audit.py on the workdir."""

import json
import os

import dp_accounting
from dp_accounting import rdp
from absl import flags
import ml_collections
import pytest

from configs import test as test_config
from fedjax_diff import trainer
from fedjax_diff import workdir as workdir_lib

import launch_scripts

audit = launch_scripts.load('audit')

TARGET, DELTA = 20.0, 1e-3


def _config(num_rounds=3):
  config = test_config.get_config()  # digits, 4 clients, 3 a round
  config.num_rounds = num_rounds
  config.dp = ml_collections.ConfigDict(dict(
      enabled=True, clip_norm=0.5, noise_multiplier=None,
      target_epsilon=TARGET, delta=DELTA, accountant='rdp',
      adaptive=dict(enabled=True, target_quantile=0.5, learning_rate=0.2,
                    count_stddev=1.0)))
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=1, num_examples=32, batch_size=16)))
  return config


@pytest.fixture(scope='module')
def dp_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('dp'))
  trainer.train_and_evaluate(_config(), workdir)
  return workdir


def _rdp_epsilon(sigma, q, rounds):
  acc = rdp.RdpAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma)), rounds)
  return acc.get_epsilon(DELTA)


def test_metrics_hold_epsilon_after_every_round(dp_run):
  rows = workdir_lib.read_metrics(dp_run)
  assert [r['round'] for r in rows] == [1, 2, 3]
  sigma = rows[0]['dp_noise_multiplier']
  q = 3 / 4
  for r in rows:
    assert r['dp_delta'] == DELTA and r['dp_noise_multiplier'] == sigma
    assert r['dp_epsilon'] == pytest.approx(
        _rdp_epsilon(sigma, q, r['round']), rel=1e-9)
    assert r['dp_clients'] >= 0 and 'dp_unclipped_fraction' in r
  # σ was calibrated to the target for the run's 3 rounds.
  assert 0.99 * TARGET <= rows[-1]['dp_epsilon'] <= TARGET
  summary = workdir_lib.read_summary(dp_run)
  assert summary['dp_epsilon'] == pytest.approx(rows[-1]['dp_epsilon'])
  assert summary['total_uplink_bytes'] == sum(r['uplink_bytes'] for r in rows)
  assert summary['uplink_compression_vs_fedavg_fp32'] == pytest.approx(1.0)
  # Adaptive clipping moved the clip norm from C_0 = 0.5.
  assert rows[-1]['dp_clip_norm'] != pytest.approx(0.5)


def test_resume_that_would_change_sigma_is_refused(dp_run):
  """num_rounds may change on resume, but with target_epsilon it changes σ:
  the restored state's σ is checked before any round runs."""
  with pytest.raises(ValueError, match='resume with the original num_rounds'):
    trainer.train_and_evaluate(_config(num_rounds=5), dp_run)


def test_audit_prints_the_table_and_writes_json(dp_run, capsys):
  out = audit.audit(dp_run, num_members=24, num_nonmembers=24,
                    num_samples=8, sample_steps=2, bootstrap=50,
                    batch_size=16)
  table = capsys.readouterr().out
  assert '| loss threshold (ε-error) |' in table
  assert '| SecMI t-error |' in table
  assert 'near-copies' in table
  with open(os.path.join(dp_run, 'audit_round_000003.json')) as f:
    saved = json.load(f)
  for name in ('loss threshold (ε-error)', 'SecMI t-error'):
    a = saved['attacks'][name]
    assert 0 <= a['auc_low'] <= a['auc'] <= a['auc_high'] <= 1
    assert a['members'] == a['nonmembers'] == 24
  assert saved['memorization']['num_samples'] == 8
  assert saved['table'] == out['table']
  # The script's entry point: `python launch/audit.py WORKDIR`. Tests of this
  # process may have loaded other scripts since: make audit's flags current.
  launch_scripts.load('audit')
  flags.FLAGS(['audit.py', dp_run, '--num_members=8', '--num_nonmembers=8',
               '--num_samples=0', '--bootstrap=20'])
  audit.main(['audit.py', dp_run])
  assert '| SecMI t-error |' in capsys.readouterr().out
  with pytest.raises(Exception, match='Usage'):
    audit.main(['audit.py'])


def test_members_follow_the_class_mix_of_the_nonmembers():
  import numpy as np  # pylint: disable=g-import-not-at-top
  labels = np.repeat(np.arange(3), [50, 30, 20])
  pool = np.arange(100)[::2]  # 25 of class 0, 15 of class 1, 10 of class 2
  non = np.array([0, 1, 1, 2, 2, 2] * 3)
  got = audit.matched_members(pool, labels, non, 12, np.random.default_rng(0))
  assert np.bincount(labels[got], minlength=3).tolist() == [2, 4, 6]
  assert set(got) <= set(pool) and len(set(got)) == 12
  # A class the pool runs short of gives what it has.
  got = audit.matched_members(pool, labels, non, 60, np.random.default_rng(0))
  assert np.bincount(labels[got], minlength=3).tolist() == [10, 15, 10]
