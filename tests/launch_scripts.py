"""Imports a script of launch/ as a module, for tests.

absl flags are global to a process: launch/bench.py and launch/evaluate.py both
define --config, so importing both into one test process would raise
DuplicateFlagError, and a flag one script marks required would fail the
parsing of another's argv. `load` drops the flags of the scripts loaded before
(and any it is about to define), so the flags in FLAGS are those of the script
loaded last. Tests drive earlier scripts through their functions only, and
`flags.FLAGS(argv)` only for the script they have just loaded.
"""

import importlib.util
import os
import re
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAG_NAME = re.compile(r"DEFINE_\w+\(\s*'(\w+)'")
_DEFINED = set()  # flags defined by the scripts loaded so far.


def load(script: str):
  """The module of launch/<script>.py (imported once per process)."""
  name = f'fedjax_diff_launch_{script}'
  if name in sys.modules:
    return sys.modules[name]
  path = os.path.join(ROOT, 'launch', f'{script}.py')
  with open(path) as f:
    names = set(_FLAG_NAME.findall(f.read()))
  for flag in sorted(_DEFINED | names):
    if flag in flags.FLAGS:
      delattr(flags.FLAGS, flag)
  _DEFINED.update(names)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module
