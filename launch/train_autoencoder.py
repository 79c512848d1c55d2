r"""Trains the KL autoencoder (first stage) of a latent diffusion config.

  python launch/train_autoencoder.py --config=configs/mnist_ldm.py \
      --workdir=workdirs/mnist_ae

Reads `config.autoencoder` (architecture and training), `config.data` and
`config.seed`; writes orbax checkpoints, metrics.jsonl and reconstruction
PNGs to DIR (see fedjax_diff/autoencoder_trainer.py). Running the same
command again resumes. The latent diffusion run then reads DIR through
`--config.latent.autoencoder=DIR`.
"""

import os
import sys

# Make `configs` and `fedjax_diff` importable when run from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file with an `autoencoder` block.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'metrics and reconstructions; reused to '
                               'resume.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  from fedjax_diff import autoencoder_trainer  # pylint: disable=g-import-not-at-top
  autoencoder_trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
