r"""Plots runs' figures against round and against cumulative uplink bytes.

  python launch/plot.py WORKDIR [WORKDIR ...] [--out=runs.png]
      [--metrics=fid,class_coverage,loss,uplink_bytes] [--labels=a,b]

One PNG with two rows of panels: each metric against the round (top) and
against the cumulative uplink bytes of the run so far (bottom), one line per
workdir (labelled by its directory name, or --labels). Metrics are keys of
metrics.jsonl; three names stand for groups: `fid` (every `fid_*` key),
`class_coverage` (classes under 2% of the samples, with the KL divergence on
a second axis), `precision_recall` (every `precision_*`/`recall_*` key).
A panel whose metric no run logged says so.

Cumulative bytes: each logged round's `uplink_bytes` is that round's traffic;
rounds between two logged rows (log_every > 1) count the later row's value
(summary.json holds the exact totals).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # pylint: disable=g-import-not-at-top
matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from fedjax_diff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

DEFAULT_METRICS = ('fid', 'class_coverage', 'loss', 'uplink_bytes')
_GROUPS = {
    'fid': lambda k: k.startswith('fid_'),
    'precision_recall': lambda k: k.startswith(('precision_', 'recall_')),
}


def cumulative_uplink(rows: list[dict]) -> dict[int, float]:
  """round → uplink bytes of rounds 1..round (see the module doc).

  A row without `uplink_bytes` (an evaluation at a round that was not
  logged) gets the total up to the previous logged round.
  """
  out, total, prev = {}, 0.0, 0
  for row in sorted(rows, key=lambda r: r['round']):
    r = row['round']
    if 'uplink_bytes' in row:
      total += float(row['uplink_bytes']) * (r - prev)
      prev = r
    out[r] = total
  return out


def _series(rows, key):
  pts = [(r['round'], r[key]) for r in rows if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def _keys_for(metric: str, rows_by_run) -> list[str]:
  if metric in _GROUPS:
    keys = {k for rows in rows_by_run for r in rows for k in r
            if _GROUPS[metric](k) and not k.endswith('_seconds')}
    return sorted(keys)
  if metric == 'class_coverage':
    return ['classes_under_2pct', 'class_kl']
  return [metric]


def plot_runs(workdirs, out: str, metrics=DEFAULT_METRICS, labels=None):
  """Draws the figure of the module doc to `out` (PNG). Returns the number
  of lines drawn."""
  if not workdirs:
    raise ValueError('give at least one workdir.')
  labels = list(labels or [os.path.basename(os.path.normpath(w))
                           for w in workdirs])
  if len(labels) != len(workdirs):
    raise ValueError(f'{len(labels)} labels for {len(workdirs)} workdirs.')
  rows_by_run = []
  for w in workdirs:
    rows = workdir_lib.read_metrics(w)
    if not rows:
      raise FileNotFoundError(f'{w} has no metrics.jsonl rows: is it a '
                              'training workdir (launch/train.py)?')
    rows_by_run.append(rows)
  fig, axes = plt.subplots(2, len(metrics), figsize=(4.2 * len(metrics), 7),
                           squeeze=False)
  lines = 0
  for col, metric in enumerate(metrics):
    keys = _keys_for(metric, rows_by_run)
    for row_idx, x_name in enumerate(('round', 'cumulative uplink (MiB)')):
      ax = axes[row_idx][col]
      ax2 = None
      drawn = False
      for run, (rows, label) in enumerate(zip(rows_by_run, labels)):
        color = f'C{run}'
        cum = cumulative_uplink(rows)
        for i, key in enumerate(keys):
          rounds, values = _series(rows, key)
          if not rounds:
            continue
          x = (rounds if row_idx == 0 else
               [cum[r] / 2**20 for r in rounds])
          target = ax
          style = '-o' if len(rounds) < 30 else '-'
          if metric == 'class_coverage' and key == 'class_kl':
            ax2 = ax2 or ax.twinx()
            target, style = ax2, '--s'
            ax2.set_ylabel('class KL (dashed)')
          elif i:
            style = ['--', ':', '-.'][i % 3] + ('o' if len(rounds) < 30 else '')
          suffix = f' {key}' if len(keys) > 1 else ''
          target.plot(x, values, style, color=color, markersize=3,
                      label=f'{label}{suffix}')
          drawn = True
          lines += 1
      ax.set_xlabel(x_name)
      ax.set_ylabel(('classes under 2%' if metric == 'class_coverage'
                     else metric))
      ax.grid(alpha=0.3)
      if drawn:
        handles, names = ax.get_legend_handles_labels()
        if ax2 is not None:
          h2, n2 = ax2.get_legend_handles_labels()
          handles, names = handles + h2, names + n2
        ax.legend(handles, names, fontsize=7)
      else:
        ax.text(0.5, 0.5, f'{metric}: not logged', ha='center',
                va='center', transform=ax.transAxes)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', default='runs.png')
  parser.add_argument('--metrics', default=','.join(DEFAULT_METRICS))
  parser.add_argument('--labels', default=None)
  args = parser.parse_args(argv)
  plot_runs(args.workdirs, args.out, tuple(args.metrics.split(',')),
            args.labels.split(',') if args.labels else None)
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
