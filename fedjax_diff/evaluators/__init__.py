"""Evaluators: named figures of the server state, picked by config.

`config.evaluators` maps a module name in this package to that evaluator's
config; adding an evaluator is adding a module that defines `Evaluator`.
"""

import importlib

import ml_collections

from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.evaluators.base import Evaluator
from fedjax_diff.evaluators.base import is_due


def build_evaluators(cfg: ml_collections.ConfigDict,
                     ctx: EvalContext) -> dict[str, Evaluator]:
  """Builds every evaluator named in `cfg` (a mapping name → its config)."""
  out = {}
  for name, entry in (cfg or {}).items():
    try:
      module = importlib.import_module(f'fedjax_diff.evaluators.{name}')
    except ModuleNotFoundError as e:
      if e.name != f'fedjax_diff.evaluators.{name}':
        raise
      raise ValueError(
          f'config.evaluators.{name}: no module fedjax_diff/evaluators/'
          f'{name}.py. Each key of config.evaluators names an evaluator '
          'module that defines `Evaluator`.') from None
    out[name] = module.Evaluator(entry, ctx)
  return out


__all__ = ['EvalContext', 'Evaluator', 'build_evaluators', 'is_due']
