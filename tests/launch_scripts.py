"""Imports a script of launch/ as a module, for tests.

absl flags are global to a process: launch/bench.py and launch/evaluate.py both
define --config, so importing both into one test process would raise
DuplicateFlagError, and a flag one script marks required would fail the
parsing of another's argv. `load` makes the script's flags the ones in FLAGS:
it drops those of the other scripts loaded in this process and puts back the
script's own (saved when it was first imported), so `flags.FLAGS(argv)` after
`load(script)` parses that script's command line whatever the tests of this
process loaded in between.
"""

import importlib.util
import os
import re
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAG_NAME = re.compile(r"DEFINE_\w+\(\s*'(\w+)'")
_FLAGS_OF = {}  # script -> {flag name: absl Flag} it defined.


def _names_in(script: str) -> set[str]:
  with open(os.path.join(ROOT, 'launch', f'{script}.py')) as f:
    return set(_FLAG_NAME.findall(f.read()))


def load(script: str):
  """The module of launch/<script>.py, its flags made the active ones."""
  name = f'fedjax_diff_launch_{script}'
  loaded = name in sys.modules
  mine = set(_FLAGS_OF[script]) if loaded else _names_in(script)
  others = set().union(*(set(f) for s, f in _FLAGS_OF.items() if s != script))
  for flag in sorted(others | mine):
    if flag in flags.FLAGS:
      delattr(flags.FLAGS, flag)
  if loaded:
    for flag, value in _FLAGS_OF[script].items():
      flags.FLAGS[flag] = value
    return sys.modules[name]
  path = os.path.join(ROOT, 'launch', f'{script}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  _FLAGS_OF[script] = {f: flags.FLAGS[f] for f in mine if f in flags.FLAGS}
  return module
