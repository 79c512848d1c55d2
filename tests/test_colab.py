"""Runs colab/quickstart.ipynb top to bottom on the CPU-tiny config."""

import json
import os

import matplotlib

matplotlib.use('Agg')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def notebook_code(path):
  """The notebook's code cells as one script, without shell/magic lines."""
  with open(path) as f:
    nb = json.load(f)
  lines = []
  for cell in nb['cells']:
    if cell['cell_type'] == 'code':
      lines += [l for l in ''.join(cell['source']).splitlines()
                if not l.lstrip().startswith(('!', '%'))]
  return '\n'.join(lines)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  workdir = tmp_path / 'workdir'
  monkeypatch.setenv('FEDJAX_COLAB_TINY', '1')
  monkeypatch.setenv('FEDJAX_DIFF_REPO', ROOT)
  monkeypatch.setenv('FEDJAX_COLAB_WORKDIR', str(workdir))
  namespace = {}
  exec(compile(notebook_code(os.path.join(ROOT, 'colab', 'quickstart.ipynb')),
               'quickstart.ipynb', 'exec'), namespace)
  assert int(namespace['state'].round) == 2
  assert namespace['images'].shape[0] == 16
  assert os.listdir(workdir / 'samples')
