"""Test setup: 8 fake CPU devices, as on a small accelerator host."""

import os

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# Several tests compile the same programs (each trainer run compiles its round
# and evaluators again). A persistent compilation cache, shared by the test
# session, compiles each once; set FEDJAX_TEST_CACHE= to disable.
_cache = os.environ.get('FEDJAX_TEST_CACHE', '/tmp/fedjax_diff_test_jax_cache')
if _cache:
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _cache)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_configure(config):
  # CI (.ci/run) runs the whole suite on Python 3.12 with the newest jax, and
  # on Python 3.11 (jax 0.10.2, the tested minimum) only the tests marked
  # py311: those against the torch references, which are installed on 3.11
  # alone (setup.py), and the quickstart notebook end to end.
  config.addinivalue_line(
      'markers', 'py311: also run by CI on Python 3.11 (jax 0.10.2): the '
      'torch references and the quickstart notebook.')
