"""fedjax_diff.host_devices: how many CPU devices a run asks for."""

import os
import subprocess
import sys

import pytest

from fedjax_diff import host_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_is_one_device_per_core_at_most_one_per_client(monkeypatch):
  monkeypatch.setattr(host_devices, 'physical_cores', lambda: 4)
  assert host_devices.resolve('auto', 10) == 4
  assert host_devices.resolve('auto', 3) == 3
  assert host_devices.resolve('auto', 0) == 1
  assert host_devices.resolve('2', 10) == 2
  assert host_devices.resolve(6, 1) == 6


@pytest.mark.parametrize('bad', ['0', '-1', 'two', ''])
def test_bad_counts_are_refused(bad):
  with pytest.raises(ValueError, match=f'--cpu_devices={bad}: use'):
    host_devices.resolve(bad, 10)


def test_a_count_in_xla_flags_is_kept(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false '
                     '--xla_force_host_platform_device_count=5')
  assert host_devices.count_from_xla_flags() == 5
  # The tests' process already has its backend: nothing is reconfigured.
  assert host_devices.configure('auto', 10) == 5
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  assert host_devices.count_from_xla_flags() is None


def test_a_fresh_process_gets_the_devices_it_asks_for():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run(
      [sys.executable, '-c',
       'from fedjax_diff import host_devices; import jax; '
       'n = host_devices.configure(3, 10); '
       'print(n, len(jax.devices()), jax.devices()[0].platform)'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=True)
  assert proc.stdout.split() == ['3', '3', 'cpu']


def test_clients_per_round_of_a_config_or_1():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(
      {'federation': {'clients_per_round': 7}})
  assert host_devices.clients_per_round(config) == 7
  config = ml_collections.ConfigDict(
      {'federation': {'clients_per_round': 'many'}})
  assert host_devices.clients_per_round(config) == 1
  assert host_devices.clients_per_round(ml_collections.ConfigDict()) == 1
