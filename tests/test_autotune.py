"""federation.mode='auto' by measurement (nothing about speed is asserted)."""

import json

import numpy as np
import pytest

import testlib as lib
from fedjax_diff import autotune


def test_candidates():
  assert autotune.candidates(1) == [('map', None)]
  assert autotune.candidates(7) == [('vmap', None), ('map', None)]
  assert autotune.candidates(12) == [('vmap', None), ('map', None),
                                     ('chunked', 6)]


def _run(num_devices=1, mode='auto'):
  algorithm, _ = lib.make_algorithm(lib.make_data(), num_devices,
                                    **{'federation.mode': mode})
  return algorithm.run


def test_choose_measures_picks_the_fastest_and_caches(tmp_path, monkeypatch):
  run = _run()
  ids = np.array([0, 3, 5, 6, 9, 10])
  calls = []

  def fake_measure(run, algorithm, params, client_ids, modes, **kw):
    del run, algorithm, params, client_ids, kw
    calls.extend(modes)
    per_step = {'vmap': 3.0, 'map': 2.0, 'chunked': 1.0}
    return [dict(mode=m, chunk_size=c, compile_s=0.0,
                 seconds_per_step=per_step[m]) for m, c in modes]

  monkeypatch.setattr(autotune, 'measure', fake_measure)
  monkeypatch.setattr(autotune, 'machine_busy', lambda: None)
  lines = []
  choice = autotune.choose(run, 'fedavg', lib.init_params(), ids, 6,
                           cache=str(tmp_path), log=lines.append)
  assert choice == ('chunked', 3)
  assert calls == [('vmap', None), ('map', None), ('chunked', 3)]
  assert any('| chunked | 3 |' in line for line in lines)
  with open(tmp_path / 'autotune.json') as f:
    cached = json.load(f)
  assert [v['mode'] for v in cached.values()] == ['chunked']
  # Cached: no measurement the second time, the same answer.
  calls.clear()
  assert autotune.choose(run, 'fedavg', lib.init_params(), ids, 6,
                         cache=str(tmp_path), log=lines.append) == choice
  assert calls == [] and 'cached' in lines[-1]
  # Another shape of the problem (slots per device) is measured anew.
  autotune.choose(run, 'fedavg', lib.init_params(), ids, 4,
                  cache=str(tmp_path), log=lines.append)
  assert calls == [('vmap', None), ('map', None), ('chunked', 2)]


def test_measure_and_resolve_for_real(tmp_path):
  """One real measurement per mode on the tiny model: a result for each,
  and `resolve` returns a run whose config names the chosen mode."""
  run = _run(num_devices=2)
  ids = np.array([0, 1, 8, 9])
  results = autotune.measure(run, 'fedavg', lib.init_params(), ids,
                             [('vmap', None), ('map', None)], local_steps=1,
                             repeats=1)
  assert [r['mode'] for r in results] == ['vmap', 'map']
  assert all(r['seconds_per_step'] > 0 and r['compile_s'] > 0
             for r in results)
  resolved = autotune.resolve(run, 'fedavg', lib.init_params(), ids, 2,
                              cache=str(tmp_path), local_steps=1, repeats=1,
                              log=lambda msg: None)
  assert resolved.config.federation.mode in ('vmap', 'map')
  assert run.config.federation.mode == 'auto'  # the input is not changed.


def test_a_choice_measured_under_load_is_not_cached(tmp_path, monkeypatch):
  run = _run()
  ids = np.array([0, 3, 5, 6, 9, 10])
  monkeypatch.setattr(autotune, 'measure', lambda *a, **k: [
      dict(mode='vmap', chunk_size=None, compile_s=0.0, seconds_per_step=1.),
      dict(mode='map', chunk_size=None, compile_s=0.0, seconds_per_step=2.)])
  monkeypatch.setattr(autotune.os, 'getloadavg', lambda: (9.0, 9.0, 9.0))
  monkeypatch.setattr(autotune.os, 'cpu_count', lambda: 2)
  assert autotune.machine_busy() == 'load average 9.0 on 2 core(s)'
  lines = []
  assert autotune.choose(run, 'fedavg', lib.init_params(), ids, 2,
                         cache=str(tmp_path), log=lines.append) == ('vmap',
                                                                    None)
  assert 'not cached, measured under other work' in lines[-1]
  assert not (tmp_path / 'autotune.json').exists()
  monkeypatch.setattr(autotune.os, 'getloadavg', lambda: (0.5, 0.5, 0.5))
  assert autotune.machine_busy() is None


def test_resolve_keeps_an_explicit_mode_and_checks_it():
  run = _run(mode='map')
  assert autotune.resolve(run, 'fedavg', None, None, 2) is run
  run.config.federation.mode = 'pmapp'
  with pytest.raises(ValueError, match='Unknown execution mode'):
    autotune.resolve(run, 'fedavg', None, None, 2)
