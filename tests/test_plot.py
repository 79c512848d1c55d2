"""launch/plot.py: figures of several runs against round and bytes."""

import json
import os

import numpy as np
from PIL import Image
import pytest

import launch_scripts

plot = launch_scripts.load('plot')


def _workdir(path, uplink, rounds, log_every=1, with_eval=True):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for r in range(1, rounds + 1):
      row = {'round': r}
      if r % log_every == 0:
        row.update(loss=1.0 / r, uplink_bytes=uplink, downlink_bytes=uplink)
      if with_eval and r % 2 == 0:
        row.update(fid_classifier=100.0 / r, class_kl=0.5 / r,
                   classes_under_2pct=float(r < 4))
      if len(row) > 1:
        f.write(json.dumps(row) + '\n')
  return str(path)


def test_cumulative_uplink_counts_unlogged_rounds():
  rows = [{'round': 2, 'uplink_bytes': 10}, {'round': 3, 'fid_x': 1.0},
          {'round': 4, 'uplink_bytes': 10}]
  # Rounds 1–2 (20 bytes), eval-only row at 3 (20 so far), rounds 3–4 (40).
  assert plot.cumulative_uplink(rows) == {2: 20.0, 3: 20.0, 4: 40.0}


def test_plots_several_runs(tmp_path):
  a = _workdir(tmp_path / 'fedavg', uplink=4_000_000, rounds=6)
  b = _workdir(tmp_path / 'quant4', uplink=500_000, rounds=6, log_every=2)
  c = _workdir(tmp_path / 'noeval', uplink=1, rounds=3, with_eval=False)
  out = str(tmp_path / 'fig' / 'runs.png')
  lines = plot.plot_runs([a, b, c], out)
  # fid: 2 runs, class coverage: 2 runs × 2 keys, loss: 3, uplink: 3; per
  # row of panels, two rows.
  assert lines == 2 * (2 + 4 + 3 + 3)
  img = np.asarray(Image.open(out))
  assert img.ndim == 3 and img.shape[1] > img.shape[0] and img.std() > 0
  plot.main([a, '--out', str(tmp_path / 'one.png'), '--metrics',
             'fid,precision_recall'])
  assert os.path.exists(tmp_path / 'one.png')


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no metrics.jsonl'):
    plot.plot_runs([str(tmp_path)], str(tmp_path / 'x.png'))
  with pytest.raises(ValueError, match='labels'):
    plot.plot_runs([str(tmp_path)], str(tmp_path / 'x.png'), labels=['a', 'b'])
