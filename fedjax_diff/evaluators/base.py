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

Every evaluator that samples draws through `make_drawer`: the sampler in
the model's space, then, in latent diffusion (`EvalContext.latent`), the
first stage's decoder, so that every figure is of images.
"""

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Protocol

import jax
import ml_collections

from fedjax_diff.data import Dataset
from fedjax_diff.diffusion import NoiseSchedule
from fedjax_diff.diffusion import sample
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
  image_shape: tuple[int, int, int]   # of the images evaluators judge.
  num_classes: Optional[int]   # of the model's conditioning; None = uncond.
  workdir: str
  seed: int
  write_images: Callable[[int, Mapping[str, Any]], None]
  params: str = 'ema'   # which model is evaluated: 'ema' or 'raw'.
  # The first stage of latent diffusion (`fedjax_diff.latent.LatentSpace`):
  # the model samples latents, decoded into images; None: pixel space.
  latent: Any = None

  def __post_init__(self):
    check_params(self.params)

  @property
  def sample_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of what the model samples: images or latents."""
    return tuple(self.image_shape if self.latent is None else
                 self.latent.shape)


_DRAWERS: dict = {}


def make_drawer(ctx: EvalContext, batch: int, *, method: str = 'ddim',
                num_steps: int = 50, eta: float = 0.0,
                guidance_scale: Optional[float] = None) -> Callable:
  """A jitted `draw(params, key, labels) -> images [batch, H, W, C]` in
  [−1, 1]: the sampler (`diffusion.sample`) from x_T ~ N(0, I) of the
  model's shape, then the decoder of `ctx.latent` if any. Latents are not
  clipped to [−1, 1] while sampling (LDM's `clip_denoised=False`); pixels
  are. One compiled drawer per distinct setting, shared by evaluators.
  `labels` is None for an unconditional model.
  """
  guidance = (None if guidance_scale in (None, 1.0) or ctx.num_classes is None
              else float(guidance_scale))
  shape = (int(batch),) + ctx.sample_shape
  key = (id(ctx.eps_fn), id(ctx.schedule), id(ctx.latent), shape, method,
         int(num_steps), float(eta), guidance, ctx.num_classes)
  if key not in _DRAWERS:
    latent = ctx.latent

    def draw(params, decoder_params, rng, labels):
      x = sample(ctx.eps_fn, params, ctx.schedule, rng, shape, method=method,
                 num_steps=num_steps, eta=eta, labels=labels,
                 guidance_scale=guidance, null_label=ctx.num_classes,
                 clip_denoised=latent is None)
      return x if latent is None else latent.decode(x, decoder_params)

    # The autoencoder's parameters are an argument, not constants baked
    # into the compiled program (84M of them for LDM's KL-f8).
    jitted = jax.jit(draw)
    first_stage = None if latent is None else latent.params
    _DRAWERS[key] = lambda params, rng, labels: jitted(params, first_stage,
                                                       rng, labels)
  return _DRAWERS[key]


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
