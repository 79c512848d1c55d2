"""Tests of the label histograms."""

import numpy as np
from PIL import Image

from fedjax_diff.data import histogram


def test_label_histogram_by_hand():
  labels = np.array([0, 1, 1, 2, 2, 2, 0])
  parts = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6])]
  hist = histogram.label_histogram(labels, parts, num_classes=4)
  np.testing.assert_array_equal(hist, [[1, 2, 0, 0],
                                       [0, 0, 2, 0],
                                       [1, 0, 1, 0]])
  assert np.issubdtype(hist.dtype, np.integer)


def test_format_histogram():
  hist = np.array([[1, 20, 0], [300, 0, 4]])
  text = histogram.format_histogram(hist)
  lines = text.splitlines()
  assert lines[0].split() == ['client', '0', '1', '2', 'total']
  assert lines[2].split() == ['0', '1', '20', '0', '21']
  assert lines[3].split() == ['1', '300', '0', '4', '304']
  assert lines[-1].split() == ['total', '301', '20', '4', '325']
  # Aligned: all rows except rules have the same width.
  widths = {len(l) for l in lines}
  assert len(widths) == 1
  named = histogram.format_histogram(hist, class_names=['a', 'b', 'c'])
  assert named.splitlines()[0].split() == ['client', 'a', 'b', 'c', 'total']


def test_plot_histogram(tmp_path):
  hist = np.random.default_rng(0).integers(0, 50, (12, 10))
  path = str(tmp_path / 'sub' / 'hist.png')
  assert histogram.plot_histogram(hist, path) == path
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.size[0] > 200 and image.size[1] > 200
