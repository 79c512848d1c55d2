r"""Trains a federation of diffusion models.

  python launch/train.py --config=configs/mnist_fedavg.py --workdir=DIR
  python launch/train.py --config=configs/test.py --config.num_rounds=5 ...

`--config.x=y` overrides any config field; `--config=file.py:arg` passes
`arg` to the config's get_config. Running the same command again resumes
from the latest checkpoint in DIR (a local folder or `gs://...`).

Several processes (hosts of a pod, or processes on one machine) run the same
command, each with its id; jax.distributed.initialize joins them:

  python launch/train.py ... --coordinator_address=HOST0:1234 \
      --num_processes=2 --process_id=0   # and =1 on the other
  python launch/train.py ...             # Cloud TPU pod: detected by jax

Only process 0 prints and writes metrics, samples and summaries; all write
their shards of the checkpoints (Orbax).

Exit codes: 0 done; 2 the command line or config cannot be run (one
message says what, where and how to fix it; nothing was written to DIR); 3
training diverged (the message names the last finite checkpoint in DIR).
Any other error is a bug and prints its traceback.
"""

import os
import sys

# Make `configs` and `fedjax_diff` importable when run from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedjax_diff import host_devices

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'metrics and samples; reused to resume.')
_JAX_CACHE = flags.DEFINE_string(
    'jax_cache_dir', os.path.join('~', '.cache', 'fedjax_diff', 'jax'),
    'Persistent XLA compilation cache: a second run of the same config (or a '
    'resume) skips compiling the round and the evaluators. Empty disables it.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process runs: host:port of process '
    "0's coordinator (with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-process runs: how many processes.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, "Multi-process runs: this process's id.")
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'jax.distributed.initialize: auto = when the three flags above are given '
    'or jax detects a cluster (Cloud TPU pod, SLURM); on = always (jax '
    'detects what is not given); off = never.')
_CPU_DEVICES = flags.DEFINE_string('cpu_devices', 'auto',
                                   host_devices.FLAG_HELP)
flags.mark_flags_as_required(['config', 'workdir'])


USAGE_EXIT = 2


def fail(message: str, code: int = USAGE_EXIT) -> None:
  """Prints `message` as one error, without a traceback, and exits."""
  print(f'train.py: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def _without_traceback(text: str) -> str:
  """The message of an error whose text embeds a traceback (config_flags
  puts the config file's own error in its message): its last line."""
  if 'Traceback (most recent call last)' not in text:
    return text
  head = text.split('\n', 1)[0].rstrip(': ')
  last = [line for line in text.splitlines() if line.strip()][-1]
  return f'{head}: {last.strip()}'


def parse_flags(argv):
  """absl's flag parsing, with every problem of the command line (a bad or
  missing flag, a config file that does not load, an override of a field
  that does not exist) reported as a user error: one message, exit 2."""
  usage = ('\nUsage: python launch/train.py --config=configs/NAME.py '
           '--workdir=DIR [--config.field=value ...] (--helpshort for the '
           'flags).')
  try:
    args = flags.FLAGS(argv)
    # config_flags defers a config file's loading error to the first read.
    config = _CONFIG.value
    if config is not None:
      config.get('seed')
  except flags.Error as e:
    fail(_without_traceback(str(e)) + usage)
  except (KeyError, AttributeError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = str(e.args[0] if e.args else e)
    key, _, hint = text.partition('\n')
    key = key.strip('"\'')
    named = [a.split('=', 1)[0] for a in argv[1:]
             if a.startswith('--config.') and key in a.split('=', 1)[0]]
    fail(f'{named[0] if named else "an override"} names no field of the '
         f'config ({key!r} does not exist).{" " + hint if hint else ""} '
         'Overrides are --config.<field>=<value> for a field of the config '
         'file (configs/mnist_fedavg.py documents every field).' + usage)
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f'--config: {lines[-1] if lines else e}; name a config file, e.g. '
         '--config=configs/mnist_fedavg.py.' + usage)
  return args


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; every option is a flag, e.g. '
         '--config.num_rounds=5.')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  # Orbax and clu log every save and metric at INFO; fedjax_diff prints its
  # own progress lines. Pass --verbosity=0 to see them all.
  if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  # TF is used for data and summaries only: keep it off accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  try:
    host_devices.configure(_CPU_DEVICES.value,
                           host_devices.clients_per_round(_CONFIG.value))
  except ValueError as e:
    fail(str(e))
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_diff import runtime  # pylint: disable=g-import-not-at-top
  distributed = runtime.distributed_args(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      _DISTRIBUTED.value)
  if distributed is not None:
    jax.distributed.initialize(**distributed)
  if jax.process_index() == 0:
    print(runtime.describe(), flush=True)
    warning = runtime.accelerator_warning()
    if warning:
      print(warning, file=sys.stderr, flush=True)
  if _JAX_CACHE.value:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(_JAX_CACHE.value))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  # pylint: disable=g-import-not-at-top
  from fedjax_diff import errors
  from fedjax_diff import trainer
  # pylint: enable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as e:
    fail(str(e), e.exit_code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
