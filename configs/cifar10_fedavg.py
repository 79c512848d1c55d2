r"""FedAvg (FedDM-vanilla) of the DDPM CIFAR-10 UNet (35.7M parameters).

Reproduces: the FedDM-vanilla / FedAvg baseline of FedDM (arXiv 2407.14730)
and FedPhD (arXiv 2507.06449) on CIFAR-10 with FedPhD's non-IID layout:
20 clients holding 2 classes each (clients 0–3 {0,5}, 4–7 {1,6}, ...), 40%
participation, 1 local epoch (2,500 examples / batch 128 ≈ 20 steps), Adam
2e-4 with 100-step warmup and clipping 1.0, DDPM's UNet (ch 128, multipliers
1,2,2,2, 2 blocks, attention at 16×16, dropout 0.1), random flips, EMA 0.9999.

Command (data prepared with `tfds build cifar10 --data_dir=DIR`):
  python launch/train.py --config=configs/cifar10_fedavg.py \
      --workdir=workdirs/cifar10_fedavg --config.data.data_dir=DIR

Expected runtime: not measured yet (needs an accelerator; one round is
8 clients × 20 steps × 128 images through a 35.7M UNet, ≈ 6 GFLOPs forward
per image). Results: not measured yet.
"""

import ml_collections
from ml_collections import config_dict

from configs import mnist_fedavg


def get_config(arg=None):
  del arg
  config = mnist_fedavg.get_config()
  config.num_rounds = 2000
  config.data = ml_collections.ConfigDict(dict(
      name='cifar10', data_dir=config_dict.placeholder(str), image_size=config_dict.placeholder(int), random_flip=True,
      test_split='test'))
  config.partition.method = 'shards'
  config.partition.classes_per_client = 2
  config.partition.layout = 'grouped'
  config.federation = ml_collections.ConfigDict(dict(
      num_clients=20, clients_per_round=8, local_steps=20, batch_size=128,
      mode='auto', chunk_size=0))
  config.model = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
      dropout=0.1, num_groups=32, num_classes=config_dict.placeholder(int),
      conv_impl='auto', dtype='float32'))
  config.client_optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=2e-4, warmup_steps=100, grad_clip=1.0,
      keep_state=False, shared_state=False))
  config.ema_decay = 0.9999
  gen = dict(every_rounds=200, features='inception', num_samples=10000,
             num_steps=100, batch_size=250, inception_weights='')
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=50, num_examples=2000, batch_size=250),
      samples=dict(every_rounds=100, num_samples=64, method='ddim',
                   num_steps=100, eta=0.0),
      # FID and IS with the FID Inception-v3 (pytorch-fid's weights,
      # downloaded to the cache dir or read from inception_weights=PATH),
      # against the train split's statistics (computed once, cached; or a
      # published .npz via stats_file=PATH), and improved precision/recall
      # on the same features; all on one draw of 10k DDIM samples.
      fid=dict(gen),
      precision_recall=dict(gen, k=3),
      inception_score=dict(gen, splits=10),
  ))
  config.log_every = 10
  config.checkpoint_every = 50
  return config
