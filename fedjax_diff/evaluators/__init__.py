"""Evaluators: named figures of the server state, picked by config.

`config.evaluators` maps a module name in this package to that evaluator's
config; adding an evaluator is adding a module that defines `Evaluator`.
"""

import sys

import ml_collections

from fedjax_diff import components
from fedjax_diff.evaluators.base import check_params
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.evaluators.base import evaluated_params
from fedjax_diff.evaluators.base import Evaluator
from fedjax_diff.evaluators.base import is_due


def build_evaluators(cfg: ml_collections.ConfigDict,
                     ctx: EvalContext) -> dict[str, Evaluator]:
  """Builds every evaluator named in `cfg` (a mapping name → its config)."""
  package = sys.modules[__name__]
  return {name: components.resolve(package, name, 'Evaluator',
                                    f'config.evaluators.{name}',
                                    exclude=('base',))(entry, ctx)
          for name, entry in (cfg or {}).items()}


__all__ = ['EvalContext', 'Evaluator', 'build_evaluators', 'check_params',
           'evaluated_params', 'is_due']
