r"""Prints a side-by-side table of finished runs, one row per workdir.

  python launch/compare.py workdirs/mnist_fedavg workdirs/mnist_prox \
      workdirs/mnist_quant8 [--metrics=heldout_loss,fid] [--format=markdown]

Each row reads the workdir's metrics.jsonl and summary.json (the workdir
contract, `fedjax_diff.workdir`): rounds run, the last round's training loss
and the mean over the last `--last` logged rounds (one round's loss is noisy:
it is a minibatch estimate over random timesteps), the last value of every
figure named in `--metrics`, the run's total uplink and all-link bytes, and
the uplink's size relative to the first workdir (the baseline) and to FedAvg
in float32. Bytes come from summary.json when the run has finished (it also
counts one-time uploads and edge↔cloud links), else from the rounds logged.
"""

import math
import os
from typing import Any, Sequence

from absl import app
from absl import flags

from fedjax_diff import workdir as workdir_lib

_METRICS = flags.DEFINE_list(
    'metrics', ['heldout_loss'],
    'Evaluator figures to show (their last logged value).')
_LAST = flags.DEFINE_integer(
    'last', 5, 'Rounds over which the training loss is averaged.')
_FORMAT = flags.DEFINE_enum('format', 'markdown', ['markdown', 'tsv'],
                            'Table format.')


def last_value(rows: Sequence[dict[str, Any]], key: str):
  """The value of `key` in the last row that has it (None if none does)."""
  for row in reversed(rows):
    if key in row:
      return row[key]
  return None


def run_row(path: str, metrics: Sequence[str], last: int) -> dict[str, Any]:
  """One table row of the run in `path`."""
  rows = workdir_lib.read_metrics(path)
  if not rows:
    raise ValueError(f'{path} has no metrics.jsonl rows: is it a workdir of '
                     'a run that has started (launch/train.py --workdir)?')
  losses = [r['loss'] for r in rows if 'loss' in r]
  out = {
      'run': os.path.basename(os.path.normpath(path)),
      'rounds': rows[-1]['round'],
      'loss': losses[-1] if losses else None,
      f'loss (last {last})': (sum(losses[-last:]) / len(losses[-last:])
                              if losses else None),
  }
  for key in metrics:
    out[key] = last_value(rows, key)
  try:
    summary = workdir_lib.read_summary(path)
  except FileNotFoundError:
    summary = {}
  # summary.json (written at the end of a run) counts everything: one-time
  # uploads (FedDDPM) and the edge↔cloud links (FedPhD). A run still going
  # has none yet: then the per-round rows are summed.
  link_keys = ('uplink_bytes', 'downlink_bytes', 'edge_cloud_uplink_bytes',
               'edge_cloud_downlink_bytes')
  uplink = summary.get('total_uplink_bytes',
                       sum(r.get('uplink_bytes', 0) for r in rows))
  total = summary.get('total_bytes', sum(r.get(k, 0) for r in rows
                                         for k in link_keys))
  out['uplink MiB'] = uplink / 2**20
  out['total MiB'] = total / 2**20
  out['upload'] = summary.get('upload', '?')
  out['uplink ×fp32'] = summary.get('uplink_compression_vs_fedavg_fp32')
  return out


def format_value(v) -> str:
  if v is None:
    return '—'
  if isinstance(v, float):
    if math.isfinite(v) and v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
      return f'{v:.4g}'
    return f'{v:.4f}' if abs(v) < 1 else f'{v:.2f}'
  return str(v)


def table(rows: Sequence[dict[str, Any]], fmt: str = 'markdown') -> str:
  """Rows (dicts with the same keys) as a markdown or TSV table, with the
  uplink relative to the first row."""
  base = rows[0]['uplink MiB']
  for row in rows:
    row['uplink / first'] = row['uplink MiB'] / base if base else None
  keys = list(rows[0])
  cells = [[format_value(row.get(k)) for k in keys] for row in rows]
  if fmt == 'tsv':
    return '\n'.join('\t'.join(r) for r in [keys] + cells)
  lines = ['| ' + ' | '.join(keys) + ' |',
           '| ' + ' | '.join('---' for _ in keys) + ' |']
  lines += ['| ' + ' | '.join(r) + ' |' for r in cells]
  return '\n'.join(lines)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more workdirs.')
  rows = [run_row(p, _METRICS.value, _LAST.value) for p in paths]
  print(table(rows, _FORMAT.value))


if __name__ == '__main__':
  app.run(main)
