r"""FedAvg (FedDM-vanilla) of a DDPM UNet on CelebA 64×64.

Reproduces: the FedAvg baseline on CelebA of FedDM (arXiv 2407.14730) and
FedPhD (arXiv 2507.06449): 20 clients, 20% participation, batch 32, Adam
2e-5 with 100-step warmup and clipping 1.0. Non-IID by FedPhD's 4
pseudo-classes from the Male and Young attributes (label = Male + 2·Young),
each client holding one class. UNet of DDIM's CelebA-64 model (ch 128,
multipliers 1,2,2,2,4, 2 blocks, attention at 16×16, dropout 0.1).

Command (CelebA prepared with `tfds build celeb_a --data_dir=DIR`):
  python launch/train.py --config=configs/celeba_fedavg.py \
      --workdir=workdirs/celeba_fedavg --config.data.data_dir=DIR

Expected runtime: not measured yet (needs an accelerator). Results: not
measured yet.
"""

import ml_collections
from ml_collections import config_dict

from configs import mnist_fedavg


def get_config(arg=None):
  del arg
  config = mnist_fedavg.get_config()
  config.num_rounds = 2000
  config.data = ml_collections.ConfigDict(dict(
      name='celeb_a', data_dir=config_dict.placeholder(str), image_size=64, random_flip=True,
      test_split='test', attribute_labels=('Male', 'Young')))
  config.partition.method = 'shards'
  config.partition.classes_per_client = 1
  config.partition.layout = 'grouped'
  config.federation = ml_collections.ConfigDict(dict(
      num_clients=20, clients_per_round=4, local_steps=200, batch_size=32,
      mode='auto', chunk_size=0))
  config.model = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2,
      attn_resolutions=(16,), dropout=0.1, num_groups=32, num_classes=config_dict.placeholder(int),
      conv_impl='auto', dtype='float32'))
  config.client_optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=2e-5, warmup_steps=100, grad_clip=1.0,
      keep_state=False, shared_state=False))
  config.ema_decay = 0.9999
  gen = dict(every_rounds=200, features='inception', num_samples=10000,
             num_steps=100, batch_size=200, inception_weights='')
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=50, num_examples=2000, batch_size=200),
      samples=dict(every_rounds=100, num_samples=64, method='ddim',
                   num_steps=100, eta=0.0),
      # FID with the FID Inception-v3 (pytorch-fid's weights,
      # downloaded to the cache dir or read from inception_weights=PATH),
      # against the train split's statistics (computed once, cached; or a
      # published .npz via stats_file=PATH), and improved precision/recall
      # on the same features; all on one draw of 10k DDIM samples.
      fid=dict(gen),
      precision_recall=dict(gen, k=3),
  ))
  config.log_every = 10
  config.checkpoint_every = 50
  return config
