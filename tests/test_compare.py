"""launch/compare.py: the side-by-side table of finished runs."""

import json
import os

import pytest

import launch_scripts

compare = launch_scripts.load('compare')


def _workdir(tmp_path, name, losses, uplink, heldout, upload, ratio,
             cloud=0, **summary):
  path = tmp_path / name
  path.mkdir()
  with open(path / 'metrics.jsonl', 'w') as f:
    for i, loss in enumerate(losses):
      row = {'round': i + 1, 'loss': loss, 'uplink_bytes': uplink,
             'downlink_bytes': 1000, 'edge_cloud_uplink_bytes': cloud}
      if i == 1:
        row['heldout_loss'] = heldout
      f.write(json.dumps(row) + '\n')
  with open(path / 'summary.json', 'w') as f:
    json.dump({'upload': upload, 'uplink_compression_vs_fedavg_fp32': ratio,
               **summary}, f)
  return str(path)


def test_rows_sum_bytes_and_take_last_figures(tmp_path):
  a = _workdir(tmp_path, 'fedavg', [0.5, 0.3, 0.1], 1000, 0.2, 'fp32', 1.0)
  b = _workdir(tmp_path, 'quant4', [0.6, 0.4, 0.2], 250, 0.25, 'q4', 4.0,
               cloud=100)
  rows = [compare.run_row(p, ['heldout_loss', 'fid'], last=2) for p in (a, b)]
  assert rows[0]['rounds'] == 3
  assert rows[0]['loss'] == 0.1
  assert rows[0]['loss (last 2)'] == pytest.approx(0.2)
  assert rows[1]['heldout_loss'] == 0.25     # logged at round 2 only
  assert rows[1]['fid'] is None              # never logged
  assert rows[1]['uplink MiB'] == pytest.approx(750 / 2**20)
  assert rows[1]['total MiB'] == pytest.approx(4050 / 2**20)
  text = compare.table(rows)
  assert rows[1]['uplink / first'] == pytest.approx(0.25)
  lines = text.splitlines()
  assert len(lines) == 4 and lines[3].startswith('| quant4 |')
  assert '| q4 | 4.00 | 0.2500 |' in lines[3]


def test_finished_runs_take_bytes_from_the_summary(tmp_path):
  """summary.json also counts what no round logs (a one-time upload)."""
  a = _workdir(tmp_path, 'fedddpm', [0.5], 1000, 0.2, 'fp32', 1.0,
               total_uplink_bytes=5000, total_bytes=7000)
  row = compare.run_row(a, [], last=5)
  assert row['uplink MiB'] == pytest.approx(5000 / 2**20)
  assert row['total MiB'] == pytest.approx(7000 / 2**20)


def test_empty_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='no metrics.jsonl'):
    compare.run_row(str(tmp_path), [], last=5)
