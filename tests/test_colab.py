"""Runs colab/quickstart.ipynb as a user does: every cell, in order, in a real
Jupyter kernel (nbclient), on the CPU-tiny config. The install cell runs too;
FEDJAX_COLAB_SKIP_INSTALL=1 is what makes it a no-op here (the package under
test is already importable)."""

import json
import os
import re

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'colab', 'quickstart.ipynb')


def _text(cell) -> str:
  return ''.join(o.get('text', '') + ''.join(o.get('data', {}).get(
      'text/plain', '')) for o in cell.get('outputs', []))


def test_quickstart_notebook_runs_in_a_kernel(tmp_path, monkeypatch):
  workdir = tmp_path / 'workdir'
  # The kernel inherits this environment (and conftest's 8 CPU devices).
  monkeypatch.setenv('FEDJAX_COLAB_SKIP_INSTALL', '1')
  monkeypatch.setenv('FEDJAX_COLAB_TINY', '1')
  monkeypatch.setenv('FEDJAX_DIFF_REPO', ROOT)
  monkeypatch.setenv('FEDJAX_COLAB_WORKDIR', str(workdir))
  monkeypatch.setenv('PYTHONPATH', ROOT)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}
                          ).execute()  # raises CellExecutionError on failure
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count for c in code)  # every cell ran.
  assert 'installing:' not in _text(code[0])  # the no-op install cell.
  setup = _text(code[1])
  assert re.search(r'backend cpu, 8 devices', setup), setup
  train = _text(code[2])
  assert 'Devices: 8 x cpu' in train and '[round 2/2]' in train, train
  images = [o for c in code for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert len(images) >= 4  # histogram, curves, stored grid, new samples.
  assert os.listdir(workdir / 'samples')
  rounds = [json.loads(l)['round'] for l in
            (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert rounds == [1, 2]


def test_stored_outputs_are_from_a_run():
  """The notebook in the repository carries the outputs of a real run: the
  training log and the figures, with no cell left unexecuted or failed."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.execution_count for c in code[1:])
  assert not any(o.get('output_type') == 'error' for c in code
                 for o in c.outputs)
  assert re.search(r'\[round \d+/\d+\]', _text(code[2]))
  assert sum('image/png' in o.get('data', {}) for c in code
             for o in c.outputs) >= 4
