"""Federated algorithms, one module each, resolved by `config.algorithm`.

A module `fedjax_diff.algorithms.<name>` that defines `Algorithm` (a
subclass of `base.Algorithm`) is the algorithm `<name>`: adding one is
adding a file (see scaffold.py for a worked example).
"""

import sys

from fedjax_diff import components
from fedjax_diff.algorithms.base import Algorithm
from fedjax_diff.algorithms.base import Run


def build(name: str, run: Run) -> Algorithm:
  """The algorithm named `name` (`config.algorithm`), built for `run`."""
  cls = components.resolve(sys.modules[__name__], name, 'Algorithm',
                           'config.algorithm', exclude=('base',))
  return cls(run)


def names() -> list[str]:
  """The algorithms this package defines."""
  return components.names(sys.modules[__name__], 'Algorithm',
                          exclude=('base',))


__all__ = ['Algorithm', 'Run', 'build', 'names']
