"""Evaluators: named figures of the server state, picked by config.

`config.evaluators` maps a module name in this package to that evaluator's
config; adding an evaluator is adding a module that defines `Evaluator`.
"""

import sys

import ml_collections

from fedjax_diff import components
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import check_params
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.evaluators.base import evaluated_params
from fedjax_diff.evaluators.base import Evaluator
from fedjax_diff.evaluators.base import is_due


def _resolve(name: str):
  return components.resolve(sys.modules[__name__], name, 'Evaluator',
                            f'config.evaluators.{name}', exclude=('base',))


def build_evaluators(cfg: ml_collections.ConfigDict,
                     ctx: EvalContext) -> dict[str, Evaluator]:
  """Builds every evaluator named in `cfg` (a mapping name → its config)."""
  return {name: _resolve(name)(entry, ctx)
          for name, entry in (cfg or {}).items()}


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Resolves every evaluator named in `cfg` and parses its entry against
  its `FIELDS` (`base.parse`), building nothing.

  Raises:
    ValueError: an unknown evaluator (the valid names are listed) or an
      invalid field of an entry.
  """
  for name, entry in (cfg or {}).items():
    base.parse(entry, _resolve(name).FIELDS, f'config.evaluators.{name}')


__all__ = ['EvalContext', 'Evaluator', 'build_evaluators', 'check_config',
           'check_params', 'evaluated_params', 'is_due']
