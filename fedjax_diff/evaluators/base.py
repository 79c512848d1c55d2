"""The evaluator contract.

An evaluator is built from one entry of `config.evaluators` (the entry's key
names its module in `fedjax_diff.evaluators`, which defines `Evaluator`), runs
on the server state every `every_rounds` rounds and at the last round, and
returns named figures that go to metrics.jsonl and TensorBoard.

An `Evaluator` declares its entry's fields in `FIELDS` (name → `Field`);
`parse(cfg, FIELDS, where)` checks an entry against them (unknown fields,
types, ranges, choices) and fills the defaults. The evaluator's constructor
and the config check before a run (`fedjax_diff.validation`) both use it.

Which model the evaluators judge is `config.eval_params` (`EvalContext.params`):
'ema' (default), the exponential moving average of the global parameters that
DDPM samples from (Ho et al. 2020, arXiv 2006.11239), or 'raw', the global
model itself, which FedPhD's code evaluates (arXiv 2507.06449).
"""

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Protocol

import ml_collections

from fedjax_diff.data import Dataset
from fedjax_diff.diffusion import NoiseSchedule
from fedjax_diff.state import ServerState


PARAMS = ('ema', 'raw')


def check_params(which: str) -> str:
  """`which` if it names the params evaluators may read, else a ValueError."""
  if which not in PARAMS:
    raise ValueError(f'config.eval_params must be one of {PARAMS} (the EMA '
                     f'or the raw global model), got {which!r}.')
  return which


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every evaluator may use, built once by the trainer."""
  eps_fn: Callable[..., Any]
  schedule: NoiseSchedule
  test_data: Dataset
  image_shape: tuple[int, int, int]
  num_classes: Optional[int]   # of the model's conditioning; None = uncond.
  workdir: str
  seed: int
  write_images: Callable[[int, Mapping[str, Any]], None]
  params: str = 'ema'   # which model is evaluated: 'ema' or 'raw'.

  def __post_init__(self):
    check_params(self.params)


def evaluated_params(state: ServerState, ctx: EvalContext):
  """The parameters the evaluators judge: `state.ema_params` or
  `state.params`, by `ctx.params`."""
  return state.ema_params if ctx.params == 'ema' else state.params


@dataclasses.dataclass(frozen=True)
class Field:
  """One field of an evaluator's entry.

  Attributes:
    default: its value when absent.
    kind: 'int', 'float', 'str', 'bool', or 'path' (a str or None).
    low: the smallest value allowed (numbers).
    choices: the values allowed (str).
    optional: None is allowed too.
  """
  default: Any
  kind: str
  low: Optional[float] = None
  choices: Optional[tuple[str, ...]] = None
  optional: bool = False


EVERY_ROUNDS = Field(10, 'int', low=0)


def parse(cfg, fields: Mapping[str, Field],
          where: str) -> ml_collections.ConfigDict:
  """`cfg` checked against `fields`, with every field present.

  Raises:
    ValueError: an unknown field, or a value of the wrong kind, below `low`
      or not among `choices` (the message names `where`.field).
  """
  cfg = cfg if cfg is not None else {}
  unknown = sorted(set(cfg.keys()) - set(fields))
  if unknown:
    raise ValueError(f'{where} has unknown fields {unknown}; the fields are '
                     f'{sorted(fields)}.')
  out = {}
  for name, field in fields.items():
    value = cfg.get(name, field.default)
    out[name] = _check(value, field, f'{where}.{name}')
  return ml_collections.ConfigDict(out)


def _check(value, field: Field, where: str):
  if value is None and (field.optional or field.kind == 'path' or
                        field.default is None):
    return None
  kind = field.kind
  if kind == 'bool':
    ok = isinstance(value, bool)
  elif kind == 'int':
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind == 'float':
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))
    value = float(value) if ok else value
  else:  # 'str' or 'path'
    ok = isinstance(value, str)
  if not ok:
    raise ValueError(f'{where} must be {_KINDS[kind]}, got {value!r}.')
  if field.low is not None and value < field.low:
    raise ValueError(f'{where} must be >= {field.low:g}, got {value!r}.')
  if field.choices is not None and value not in field.choices:
    raise ValueError(f'{where}={value!r}; use one of {field.choices}.')
  return value


_KINDS = {'bool': 'True or False', 'int': 'an int', 'float': 'a number',
          'str': 'a str', 'path': 'a path (str) or None'}


class Evaluator(Protocol):
  every_rounds: int
  FIELDS: Mapping[str, Field]

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    ...

  def __call__(self, state: ServerState, round_idx: int) -> dict[str, float]:
    ...


def is_due(evaluator: Evaluator, round_idx: int, last_round: int) -> bool:
  every = evaluator.every_rounds
  return round_idx == last_round or (every > 0 and round_idx % every == 0)
