"""fedjax_diff.runtime: the multi-process arguments and the start-up lines."""

import jax
import pytest

from fedjax_diff import runtime


def test_one_process_by_default(monkeypatch):
  monkeypatch.setattr(runtime, '_cluster_detected', lambda: False)
  assert runtime.distributed_args() is None
  assert runtime.distributed_args(mode='off') is None


def test_explicit_flags_are_passed_through():
  assert runtime.distributed_args('localhost:1234', 2, 1) == dict(
      coordinator_address='localhost:1234', num_processes=2, process_id=1)
  assert runtime.distributed_args('localhost:1234', 2, 1, mode='off') is None


def test_cloud_tpu_is_left_to_jax(monkeypatch):
  monkeypatch.setattr(runtime, '_cluster_detected', lambda: True)
  assert runtime.distributed_args() == {}  # initialize() detects the rest.
  monkeypatch.setattr(runtime, '_cluster_detected', lambda: False)
  assert runtime.distributed_args(mode='on') == {}


def test_partial_flags_are_an_error():
  with pytest.raises(ValueError, match='all of --coordinator_address'):
    runtime.distributed_args('localhost:1234', None, 0)
  with pytest.raises(ValueError, match='use auto, on or off'):
    runtime.distributed_args(mode='yes')


def test_describe_names_backend_and_devices():
  line = runtime.describe()
  assert f'backend {jax.default_backend()}' in line
  assert f'{len(jax.devices())} devices' in line
  assert 'process 0 of 1' in line


@pytest.mark.parametrize('kind,command', [('gpu', ".[cuda12]"),
                                          ('tpu', ".[tpu]")])
def test_warns_when_an_accelerator_is_unused(monkeypatch, kind, command):
  monkeypatch.setattr(runtime, 'visible_accelerator', lambda: kind)
  monkeypatch.setenv('JAX_PLATFORMS', '')
  warning = runtime.accelerator_warning()
  assert kind.upper() in warning and command in warning
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # CPU asked for: no warning.
  assert runtime.accelerator_warning() is None
  monkeypatch.setenv('JAX_PLATFORMS', '')
  monkeypatch.setattr(runtime, 'visible_accelerator', lambda: None)
  assert runtime.accelerator_warning() is None
