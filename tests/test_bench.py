"""launch/bench.py end to end on the test config (nothing about speed)."""

import json
import math
import os
import sys

from absl import flags
import pytest

import launch_scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
  """Imports launch/bench.py once (it defines absl flags)."""
  return launch_scripts.load('bench')


def _table_rows(stdout):
  """Data rows of the markdown table, as lists of cells."""
  rows = [line for line in stdout.splitlines() if line.startswith('| ')]
  cells = [[c.strip() for c in line.strip('|').split('|')] for line in rows]
  return cells[0], cells[1:]


def test_bench_main_table_and_json(tmp_path, capsys, monkeypatch):
  bench = _load_bench()
  output = tmp_path / 'bench.json'
  argv = [
      'bench.py', f'--config={os.path.join(ROOT, "configs", "test.py")}',
      # A smaller UNet than configs/test.py's, to compile in seconds.
      '--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()',
      # 3 clients on 2 devices: 4 slots, 2 per device, so chunk size 3 is
      # skipped (and costs no compilation).
      '--devices=2', '--modes=vmap,chunked,loop', '--chunk_sizes=3',
      '--repeats=1', '--rounds_warmup=0', f'--output={output}']
  # The config flag finds its `--config.*` overrides in sys.argv.
  monkeypatch.setattr(sys, 'argv', argv)
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    bench.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  stdout = capsys.readouterr().out

  header, rows = _table_rows(stdout)
  assert header[:8] == ['mode', 'chunk', 'devices', 'clients/round',
                        'compile s', 's/round', 'client examples/s',
                        'speedup vs loop']
  assert [r[0] for r in rows] == ['vmap', 'loop']
  assert [r[2] for r in rows] == ['2', '1']
  for r in rows:
    throughput = float(r[6].replace(',', ''))
    assert math.isfinite(throughput) and throughput > 0
  assert 'skipping chunk_size=3' in stdout

  report = json.loads(output.read_text())
  assert report['header']['devices'] == 2
  assert report['header']['param_count'] > 0
  assert report['header']['config'].endswith('test.py')
  assert len(report['skipped']) == 1
  results = {r['mode']: r for r in report['results']}
  assert sorted(results) == ['loop', 'vmap']
  for r in results.values():
    assert len(r['seconds']) == 1
    assert math.isfinite(r['client_examples_per_second'])
    assert r['client_examples_per_second'] > 0
    assert r['compile_s'] > 0
    assert r['speedup_vs_loop'] > 0
  assert results['loop']['speedup_vs_loop'] == pytest.approx(1.0)
  # Both start from the same state and train the same clients with the same
  # keys: the baseline does the same work as the jitted round.
  assert results['vmap']['first_round_loss'] == pytest.approx(
      results['loop']['first_round_loss'], rel=1e-4)
