r"""CPU-tiny config for tests: embedded 8×8 digits, 4 clients, 2 rounds.

Command:
  python launch/train.py --config=configs/test.py --workdir=/tmp/fedjax_test

`configs/test.py:tiny` shrinks it further for tests that run it many times
(resume, faults): a 4-channel UNet without attention, one local step, no
evaluators, a checkpoint every round.

Expected runtime: well under a minute on a CPU (mostly compilation).
"""

import ml_collections
from ml_collections import config_dict

from configs import mnist_fedavg


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f"configs/test.py takes no argument or 'tiny'; got "
                     f'{arg!r}.')
  config = mnist_fedavg.get_config()
  config.num_rounds = 2
  config.data.name = 'digits'
  config.partition.method = 'shards'
  config.partition.classes_per_client = 5
  # 'map', not 'auto': tests measure other things than the mode, and each
  # 'auto' run would time every mode once per machine (tests/test_autotune.py
  # covers it).
  config.federation = ml_collections.ConfigDict(dict(
      num_clients=4, clients_per_round=3, local_steps=2, batch_size=4,
      mode='map', chunk_size=0))
  config.model = ml_collections.ConfigDict(dict(
      ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
      dropout=0.0, num_groups=4, num_classes=config_dict.placeholder(int),
      conv_impl='auto', dtype='float32'))
  config.diffusion.num_timesteps = 100
  config.client_optimizer.warmup_steps = 2
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=1, num_examples=32, batch_size=16),
      samples=dict(every_rounds=2, num_samples=16, method='ddim',
                   num_steps=5, eta=0.0),
  ))
  config.checkpoint_every = 1
  if arg == 'tiny':
    config.model.ch = 4
    config.model.num_groups = 2
    config.model.attn_resolutions = ()
    config.federation.local_steps = 1
    config.client_optimizer.warmup_steps = 0
    config.evaluators = ml_collections.ConfigDict()
  return config
