"""Test setup: 8 fake CPU devices, as on a small accelerator host."""

import os

import pytest

import slow_tier

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# Several tests compile the same programs (each trainer run compiles its round
# and evaluators again). A persistent compilation cache, shared by the test
# session, compiles each once; set FEDJAX_TEST_CACHE= to disable.
# Each pytest-xdist worker gets its own folder: JAX's cache writes an entry
# in place (jax/_src/lru_cache.py, no lock without eviction), so a worker
# could read an entry another is still writing. That is the likely cause of
# the "Fatal Python error: Aborted" seen in an eager op of
# tests/test_resilience.py with one folder shared by both workers.
_cache = os.environ.get('FEDJAX_TEST_CACHE', '/tmp/fedjax_diff_test_jax_cache')
if _cache:
  _cache = os.path.join(_cache, os.environ.get('PYTEST_XDIST_WORKER', 'main'))
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _cache)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
  """`-n N` distributes by module (xdist's loadscope), not test by test.

  A module's tests then share one worker, so its module-scoped fixtures
  (end-to-end runs, compiled rounds) run once instead of once per worker,
  and its tests reuse the programs the module compiled. Measured on the
  fast tier (Python 3.12, jax 0.12, 2 cores, fresh compilation cache):
  tests/test_trainer.py's end-to-end fixture ran on both workers under
  xdist's default per-test distribution. By module the tier took 611 s on
  a clean clone; per test, 820 s in a CI run (its 3.11 install alongside).
  Modules go out in collection order (see pytest_collection_modifyitems).
  `--dist=...` given on the command line is kept.
  """
  if getattr(config.option, 'numprocesses', None) and (
      config.option.dist == 'no'):
    config.option.dist = 'loadscope'
    # In collection order, which pytest_collection_modifyitems sets.
    config.option.loadscopereorder = False


def pytest_configure(config):
  # CI (.ci/run) runs each test once: on Python 3.12 with the newest jax the
  # README's command, where the tests marked py311 skip themselves (torch is
  # installed on 3.11 alone, setup.py), and on Python 3.11 (jax 0.10.2, the
  # tested minimum) those marked py311, the tests against the torch
  # references.
  config.addinivalue_line(
      'markers', 'py311: run by CI on Python 3.11 (jax 0.10.2) only: the '
      'torch references.')


# The slow tier (tests/slow_tests.txt, written by tests/slow_tier.py from a
# full run's durations): skipped unless pytest is given --slow, so that the
# README's test command, which CI runs, stays within CI's time on 2 cores.
def pytest_addoption(parser):
  parser.addoption('--slow', action='store_true',
                   help='also run the slow tier (tests/slow_tests.txt)')


def pytest_collection_modifyitems(config, items):
  # The fast tier's minute-long tests (slow_tier.KEEP) come first, so that
  # under `-n 2` their modules are handed out first and each runs beside the
  # rest: ordering modules by their number of tests, xdist started the
  # one-test multi-host module at 95% of the fast tier, alone at the end.
  items.sort(key=lambda item: not item.nodeid.startswith(slow_tier.KEEP))
  if config.getoption('--slow'):
    return
  slow = slow_tier.read()
  skip = pytest.mark.skip(
      reason='slow tier (tests/slow_tests.txt): run with --slow')
  for item in items:
    if item.nodeid in slow:
      item.add_marker(skip)
