"""Per-client label histograms of a partition: counts, a text table, a plot."""

import os
from typing import Optional, Sequence

from etils import epath
import matplotlib
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np


def label_histogram(labels, parts: Sequence[np.ndarray],
                    num_classes: int) -> np.ndarray:
  """Counts each class in each client's examples.

  Args:
    labels: int array [N] of class labels in [0, num_classes).
    parts: one array of example indices per client.
    num_classes: number of classes.

  Returns:
    int64 array [num_clients, num_classes]; entry (i, c) is the number of
    examples of class c held by client i.
  """
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes}).')
  hist = np.zeros((len(parts), num_classes), dtype=np.int64)
  for i, part in enumerate(parts):
    part = np.asarray(part, dtype=np.int64)
    hist[i] = np.bincount(labels[part], minlength=num_classes)
  return hist


def format_histogram(hist, class_names: Optional[Sequence[str]] = None) -> str:
  """An aligned text table: a row per client, a column per class, totals.

  Args:
    hist: int array [num_clients, num_classes], e.g. from `label_histogram`.
    class_names: optional column headers; class indices by default.

  Returns:
    The table, with a 'total' column (examples per client) and a final
    'total' row (examples per class), without a trailing newline.
  """
  hist = np.asarray(hist)
  if hist.ndim != 2:
    raise ValueError(f'hist must be [clients, classes], got {hist.shape}.')
  num_classes = hist.shape[1]
  if class_names is None:
    class_names = [str(c) for c in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f'Got {len(class_names)} class names for {num_classes} '
                     'classes.')
  header = ['client'] + [str(n) for n in class_names] + ['total']
  rows = [[str(i)] + [str(int(v)) for v in row] + [str(int(row.sum()))]
          for i, row in enumerate(hist)]
  rows.append(['total'] + [str(int(v)) for v in hist.sum(axis=0)] +
              [str(int(hist.sum()))])
  table = [header] + rows
  widths = [max(len(r[j]) for r in table) for j in range(len(header))]

  def fmt(row):
    first = row[0].ljust(widths[0])
    rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
    return '  '.join([first] + rest)

  rule = '-' * len(fmt(header))
  lines = [fmt(header), rule] + [fmt(r) for r in rows[:-1]]
  lines += [rule, fmt(rows[-1])]
  return '\n'.join(lines)


def plot_histogram(hist,
                   path: str,
                   *,
                   title: Optional[str] = None,
                   class_names: Optional[Sequence[str]] = None) -> str:
  """Writes a stacked bar chart of examples per client and class to a PNG.

  Uses matplotlib's Agg canvas directly (no pyplot), so it works without a
  display and leaves the global matplotlib backend alone.

  Args:
    hist: int array [num_clients, num_classes].
    path: output .png path; parent directories are created.
    title: figure title; a summary of the counts by default.
    class_names: legend labels; 'class <c>' by default.

  Returns:
    `path`.
  """
  hist = np.asarray(hist)
  if hist.ndim != 2:
    raise ValueError(f'hist must be [clients, classes], got {hist.shape}.')
  num_clients, num_classes = hist.shape
  if class_names is None:
    class_names = [f'class {c}' for c in range(num_classes)]
  if title is None:
    title = (f'Examples per client and class ({num_clients} clients, '
             f'{num_classes} classes, {int(hist.sum()):,} examples)')

  width = min(4.0 + 0.35 * num_clients, 30.0)
  fig = figure.Figure(figsize=(width, 5.0), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  colors = matplotlib.colormaps['tab20' if num_classes > 10 else 'tab10']
  x = np.arange(num_clients)
  bottom = np.zeros(num_clients)
  for c in range(num_classes):
    ax.bar(x, hist[:, c], bottom=bottom, width=0.8,
           color=colors(c % colors.N), label=str(class_names[c]))
    bottom += hist[:, c]
  ax.set_xlabel('client')
  ax.set_ylabel('number of examples')
  ax.set_title(title)
  step = max(1, int(np.ceil(num_clients / 40)))
  ax.set_xticks(x[::step])
  ax.set_xlim(-0.6, num_clients - 0.4)
  if num_classes <= 20:
    ax.legend(title='label', loc='upper left', bbox_to_anchor=(1.01, 1.0),
              fontsize='small')
  fig.tight_layout()
  path = epath.Path(path)  # a local file or gs://...
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    fig.savefig(f, format='png')
  path = os.fspath(path)
  return path
