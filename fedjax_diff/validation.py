"""One check of a whole run's config, before anything is written.

`check_config(config)` runs every component's own parser on its block (the
same functions that build the component; nothing is parsed twice) and the
checks that span blocks; `check_data(config, ...)` adds those that need the
loaded data (a batch larger than every client's data, an image size the
UNet cannot halve). The trainer calls both before it touches the workdir,
so a refused config leaves no file behind. Every failure is a
`errors.ConfigError` whose message says what is wrong, where (the config
field) and how to fix it; `launch/train.py` prints it and exits with 2.

The blocks and their parsers:

    config (num_rounds, seed, ema_decay,   algorithms.base.Settings, through
      federation, faults, algorithm,         the algorithm's check_config
      client_optimizer.keep_state/           (config.dp:
      shared_state, dp)                        privacy.Settings.from_config)
    config.log_every, checkpoint_every     `run_settings` (here)
    config.client_optimizer, prox_mu,      optimizers.client_optimizer with
      group_lasso                            strategies.build.client_transforms
    config.server_optimizer                optimizers.server_optimizer
    config.upload                          strategies.build.upload_settings
    config.pruning                         pruning_schedule.config_from
    config.model                           models.unet_from_config, check_config
    config.diffusion                       diffusion.schedule_from_config,
                                             losses.cond_drop_prob_from_config,
                                             losses.min_snr_gamma_from_config
    config.data, config.partition          data.config_from,
                                             data.partition_from_config
    config.evaluators, eval_params         evaluators.check_config,
                                             evaluators.check_params
"""

import contextlib
import dataclasses
from typing import Optional

import ml_collections
import numpy as np

from fedjax_diff import algorithms
from fedjax_diff import components
from fedjax_diff import data as data_lib
from fedjax_diff import evaluators as evaluators_lib
from fedjax_diff import models
from fedjax_diff import optimizers
from fedjax_diff.diffusion import losses
from fedjax_diff.diffusion import schedules
from fedjax_diff.errors import ConfigError
from fedjax_diff.strategies import build as strategies_build
from fedjax_diff.strategies import pruning_schedule


@contextlib.contextmanager
def user_errors(where: str):
  """Turns a ValueError/TypeError raised by a parser of `where` into a
  ConfigError (prefixed with `where` unless the message names it)."""
  try:
    yield
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    msg = str(e).strip("'\"") if isinstance(e, KeyError) else str(e)
    if 'config.' not in msg:
      msg = f'{where}: {msg}'
    raise ConfigError(msg) from None


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The trainer loop's own fields."""
  log_every: int
  checkpoint_every: int


def run_settings(config: ml_collections.ConfigDict) -> RunSettings:
  """`config.log_every` (>= 1) and `config.checkpoint_every` (>= 0; 0 saves
  only at the end), parsed and checked.

  Raises:
    ValueError: a field of the wrong type or out of range.
  """
  out = {}
  for name, low, hint in (('log_every', 1, 'log every round: 1'),
                          ('checkpoint_every', 0, '0 saves only at the end')):
    value = config.get(name, low)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'config.{name} must be an int >= {low} ({hint}), '
                       f'got {value!r}.')
    out[name] = value
  return RunSettings(**out)


def check_config(config: ml_collections.ConfigDict,
                 num_devices: Optional[int] = None) -> None:
  """Checks every block of `config` with its component's parser.

  Args:
    config: the run's config.
    num_devices: the mesh size (for a 'chunked' chunk_size); None skips
      that check.

  Raises:
    ConfigError: the first problem found, with its field and a fix.
  """
  with user_errors('config.algorithm'):
    name = config.get('algorithm', 'fedavg')
    algorithm = components.resolve(algorithms, name, 'Algorithm',
                                   'config.algorithm', exclude=('base',))
  with user_errors('config'):
    algorithm.check_config(config, num_devices)
  with user_errors('config'):
    run_settings(config)
  with user_errors('config.client_optimizer'):
    optimizers.client_optimizer(
        config.client_optimizer,
        extra=strategies_build.client_transforms(config))
  with user_errors('config.server_optimizer'):
    optimizers.server_optimizer(config.server_optimizer)
  with user_errors('config.upload'):
    strategies_build.upload_settings(config)
  with user_errors('config.pruning'):
    pruning_schedule.config_from(config)
  with user_errors('config.model'):
    models.unet_from_config(config.model).check_config()
  with user_errors('config.diffusion'):
    schedules.schedule_from_config(config.diffusion)
    losses.cond_drop_prob_from_config(config)
    losses.min_snr_gamma_from_config(config)
  with user_errors('config.data'):
    data_lib.config_from(config.get('data'))
  with user_errors('config.partition'):
    data_lib.partition_from_config(config.get('partition'))
  with user_errors('config.evaluators'):
    evaluators_lib.check_config(config.get('evaluators'))
  with user_errors('config.eval_params'):
    evaluators_lib.check_params(config.get('eval_params', 'ema'))


def check_data(config: ml_collections.ConfigDict, counts: np.ndarray,
               image_shape: tuple[int, ...]) -> None:
  """The checks that need the data: `counts`, each client's examples, and
  the images' (H, W, C).

  Raises:
    ConfigError: a batch larger than every client's data, or images the
      UNet's levels cannot halve (`UNet.check_input_shape`).
  """
  batch = int(config.federation.batch_size)
  counts = np.asarray(counts)
  if batch > counts.max():
    raise ConfigError(
        f'config.federation.batch_size={batch} is larger than every '
        f"client's data (the largest client holds {int(counts.max())} "
        f'examples, the smallest {int(counts.min())}): a batch would repeat '
        f'examples. Use batch_size <= {int(counts.max())}, or fewer clients '
        '(config.federation.num_clients).')
  with user_errors('config.model'):
    models.unet_from_config(config.model).check_input_shape(
        (1,) + tuple(image_shape))
