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

  def fake_measure(run, algorithm, params, client_ids, mode, chunk_size,
                   **kw):
    del run, algorithm, params, client_ids, kw
    calls.append((mode, chunk_size))
    per_step = {'vmap': 3.0, 'map': 2.0, 'chunked': 1.0}[mode]
    return dict(mode=mode, chunk_size=chunk_size, compile_s=0.0,
                seconds_per_step=per_step)

  monkeypatch.setattr(autotune, 'measure', fake_measure)
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
  result = autotune.measure(run, 'fedavg', lib.init_params(), ids, 'vmap',
                            None, local_steps=1, repeats=1)
  assert result['mode'] == 'vmap' and result['seconds_per_step'] > 0
  resolved = autotune.resolve(run, 'fedavg', lib.init_params(), ids, 2,
                              cache=str(tmp_path), local_steps=1, repeats=1,
                              log=lambda msg: None)
  assert resolved.config.federation.mode in ('vmap', 'map')
  assert run.config.federation.mode == 'auto'  # the input is not changed.


def test_resolve_keeps_an_explicit_mode_and_checks_it():
  run = _run(mode='map')
  assert autotune.resolve(run, 'fedavg', None, None, 2) is run
  run.config.federation.mode = 'pmapp'
  with pytest.raises(ValueError, match='Unknown execution mode'):
    autotune.resolve(run, 'fedavg', None, None, 2)
