"""launch/bench.py end to end on the test config (nothing about speed)."""

import json
import math
import os
import sys

from absl import flags
import pytest

import launch_scripts
import testlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_bench(argv, monkeypatch, capsys):
  bench = launch_scripts.load('bench')
  # The config flag finds its `--config.*` overrides in sys.argv.
  monkeypatch.setattr(sys, 'argv', argv)
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    bench.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  return capsys.readouterr().out


def _table_rows(stdout):
  """Data rows of the markdown table, as dicts of cells by header."""
  rows = [line for line in stdout.splitlines() if line.startswith('| ')]
  cells = [[c.strip() for c in line.strip('|').split('|')] for line in rows]
  return [dict(zip(cells[0], r)) for r in cells[1:]]


CONFIG = os.path.join(ROOT, 'configs', 'test.py')
# A smaller UNet than configs/test.py's, to compile in seconds.
SMALL = ['--config.model.ch_mult=(1,)', '--config.model.attn_resolutions=()']


@pytest.mark.py311  # the PyTorch peer (tests/conftest.py)
def test_bench_against_loop_central_and_torch(tmp_path, capsys, monkeypatch):
  pytest.importorskip('torch', reason=testlib.NO_TORCH)
  output = tmp_path / 'bench.json'
  # 3 clients on meshes of 2 and 1 devices: 2 and 3 slots per device, so
  # chunk size 4 is skipped on both (and costs no compilation).
  stdout = _run_bench(
      ['bench.py', f'--config={CONFIG}', *SMALL, '--devices=2,1',
       '--modes=vmap,chunked,loop,central', '--chunk_sizes=4', '--peer=torch',
       '--memory', '--repeats=2', '--rounds_warmup=0', f'--output={output}'],
      monkeypatch, capsys)
  rows = _table_rows(stdout)
  assert [r['mode'] for r in rows] == ['vmap', 'vmap', 'loop', 'central',
                                        'torch']
  assert [r['devices'] for r in rows] == ['2', '1', '1', '1', '1']
  for r in rows:
    throughput = float(r['client examples/s'].replace(',', ''))
    assert math.isfinite(throughput) and throughput > 0
    assert float(r['vs loop']) > 0 and float(r['vs torch']) > 0
    assert float(r['vs central']) > 0
  assert 'skipping chunk_size=4 on 2 device(s)' in stdout
  assert 'skipping chunk_size=4 on 1 device(s)' in stdout

  report = json.loads(output.read_text())
  header = report['header']
  assert header['devices'] == [2, 1] and header['param_count'] > 0
  assert header['slots_per_device'] == {'2': 2, '1': 3}
  assert header['config'].endswith('test.py')
  assert header['train_flops_per_example'] > 0
  cpu_peak = header['peak_flops']['float32']
  assert cpu_peak['flops'] > 0 and 'measured' in cpu_peak['source']
  vmap_on_1 = [r for r in report['results']
               if r['mode'] == 'vmap' and r['devices'] == 1]
  results = {r['mode']: r for r in report['results'] if r not in vmap_on_1}
  for r in [*results.values(), *vmap_on_1]:
    assert len(r['seconds']) == 2
    assert r['client_examples_per_second'] > 0 and r['compile_s'] >= 0
    assert r['tflops'] > 0 and 0 < r['mfu']
  assert results['loop']['speedup_vs_loop'] == pytest.approx(1.0)
  assert results['torch']['vs_torch'] == pytest.approx(1.0)
  assert results['central']['vs_central'] == pytest.approx(1.0)
  # The jitted round compiled once over its rounds; its memory per client
  # and the clients that fit are reported.
  assert results['vmap']['compilations'] == 1
  assert results['vmap']['bytes_per_client'] > 0
  assert results['vmap']['max_clients_per_device'] >= 2
  # The diffusers UNet with configs/test.py's widths, trained the same way:
  # its first-round loss is of the same order (different initialisation).
  assert results['torch']['torch_params'] > 0
  assert 0.2 < results['torch']['first_round_loss'] < 5.0
  # Both start from the same state and train the same clients with the same
  # keys: the loop does the same work as the jitted round.
  # The clients sharded over 2 devices or all on 1 do the same work too.
  for r in (results['vmap'], *vmap_on_1):
    assert r['first_round_loss'] == pytest.approx(
        results['loop']['first_round_loss'], rel=1e-4)


def test_bench_on_random_data_in_two_dtypes(capsys, monkeypatch):
  """The device-check path: no dataset is loaded, bf16 next to fp32."""
  stdout = _run_bench(
      ['bench.py', f'--config={CONFIG}', *SMALL, '--devices=1',
       '--random_data', '--image_shape=8,8,1', '--examples_per_client=8',
       '--modes=map', '--dtypes=float32,bfloat16', '--repeats=1',
       '--rounds_warmup=0'], monkeypatch, capsys)
  rows = _table_rows(stdout)
  assert [(r['mode'], r['dtype']) for r in rows] == [('map', 'float32'),
                                                      ('map', 'bfloat16')]
  losses = [float(r['first-round loss']) for r in rows]
  assert losses[0] == pytest.approx(losses[1], rel=0.05)
  assert 'on random data' in stdout


def test_device_check_script_on_cpu(tmp_path):
  """launch/device_check.sh end to end with tiny sizes: both bench runs
  write their tables and JSON."""
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, OUT=str(tmp_path), CONFIG='configs/test.py',
             IMAGE_SHAPE='8,8,1', CLIENTS='2', STEPS='1', BATCH='2',
             CHUNK='2', PYTHON=sys.executable,
             EXTRA=' '.join(SMALL) + ' --devices=1',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch',
                                              'device_check.sh')],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=1500, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  modes = json.loads((tmp_path / 'modes.json').read_text())
  got = sorted((r['mode'], r['dtype']) for r in modes['results'])
  assert got == sorted([('vmap', 'float32'), ('vmap', 'bfloat16'),
                        ('map', 'float32'), ('map', 'bfloat16'),
                        ('chunked', 'float32'), ('chunked', 'bfloat16'),
                        ('central', 'float32')])
  memory = json.loads((tmp_path / 'memory.json').read_text())
  assert memory['results'][0]['bytes_per_client'] > 0


def test_timed_rounds_are_interleaved_across_contenders():
  """Round r of every contender runs before round r + 1 of any, each on its
  own sequence of rounds, and every timed round is recorded."""
  bench = launch_scripts.load('bench')
  calls = []

  def contender(name):
    def run_round(r):
      calls.append((name, r))
      return None, 1.0
    return bench.Contender(name, run_round, {}, lambda: 1)

  contenders = [contender('a'), contender('b'), contender('c')]
  bench.time_interleaved(contenders, warmup=2, repeats=3)
  assert calls == [(n, r) for r in (2, 3, 4) for n in ('a', 'b', 'c')]
  for c in contenders:
    assert len(c.result['seconds']) == 3
    assert c.result['compilations'] == 1
