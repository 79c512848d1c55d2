"""Components resolved by name: a config key names a module of a package.

`config.algorithm = 'scaffold'` resolves `fedjax_diff.algorithms.
scaffold`, `config.evaluators.fid` resolves `fedjax_diff.evaluators.fid`:
adding a component is adding a module; there is no table to edit. A name
that resolves to nothing is an error that lists the valid names.
"""

import importlib
import pkgutil
import types


def names(package: types.ModuleType, attr: str,
          exclude: tuple[str, ...] = ()) -> list[str]:
  """Modules of `package` (not starting with '_', not in `exclude`) that
  define `attr`."""
  out = []
  for info in pkgutil.iter_modules(package.__path__):
    if info.name.startswith('_') or info.name in exclude:
      continue
    module = importlib.import_module(f'{package.__name__}.{info.name}')
    if hasattr(module, attr):
      out.append(info.name)
  return sorted(out)


def resolve(package: types.ModuleType, name: str, attr: str, where: str,
            exclude: tuple[str, ...] = ()):
  """`package.<name>.<attr>`, or a ValueError naming the valid names.

  Args:
    package: e.g. `fedjax_diff.algorithms`.
    name: the module name from the config.
    attr: what the module must define (e.g. 'Algorithm').
    where: the config field, for the message (e.g. 'config.algorithm').
    exclude: modules of `package` that are not components (e.g. 'base').
  """
  module = None
  if (isinstance(name, str) and name.isidentifier() and
      not name.startswith('_') and name not in exclude):
    full = f'{package.__name__}.{name}'
    try:
      module = importlib.import_module(full)
    except ModuleNotFoundError as e:
      if e.name != full:
        raise
  if module is None or not hasattr(module, attr):
    raise ValueError(
        f'{where}={name!r} names no module of {package.__name__} that defines '
        f'`{attr}`; the valid names are {names(package, attr, exclude)}.')
  return getattr(module, attr)
