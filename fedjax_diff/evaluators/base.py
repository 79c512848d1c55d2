"""The evaluator contract.

An evaluator is built from one entry of `config.evaluators` (the entry's key
names its module in `fedjax_diff.evaluators`, which defines `Evaluator`), runs
on the server state every `every_rounds` rounds and at the last round, and
returns named figures that go to metrics.jsonl and TensorBoard.

Which model the evaluators judge is `config.eval_params` (`EvalContext.params`):
'ema' (default), the exponential moving average of the global parameters that
DDPM samples from (Ho et al. 2020, arXiv 2006.11239), or 'raw', the global
model itself, which FedPhD's code evaluates (arXiv 2507.06449).
"""

import dataclasses
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


class Evaluator(Protocol):
  every_rounds: int

  def __init__(self, cfg: ml_collections.ConfigDict, ctx: EvalContext):
    ...

  def __call__(self, state: ServerState, round_idx: int) -> dict[str, float]:
    ...


def is_due(evaluator: Evaluator, round_idx: int, last_round: int) -> bool:
  every = evaluator.every_rounds
  return round_idx == last_round or (every > 0 and round_idx % every == 0)
