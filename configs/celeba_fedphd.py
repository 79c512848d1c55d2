r"""FedPhD on CelebA 64×64 (4 pseudo-classes from Male and Young).

Reproduces: FedPhD (arXiv 2507.06449; settings from its public code,
exp/fedphd/celeba.sh) on CelebA: 20 clients each holding one of the 4
pseudo-classes (label = Male + 2·Young), 20% participation, batch 32, Adam
2e-5 with 100-step warmup and clipping 1.0, 2 edge servers, clients choosing
their edge at random by homogeneity (s = 10000), the cloud every 5 rounds with
weights ReLU(n_e + 20000·SH(Q_e) + 0), and structured pruning at ratio 0.4
before training by torch-pruning's rule, FedPhD's (this UNet: 78,700,803 →
23,045,212 parameters; the CIFAR-10 UNet at 0.4: 9,259,190). Everything else
as configs/celeba_fedavg.py, its FedAvg baseline with equal budgets (2,000
rounds; FedPhD ran 5,000: --config.num_rounds=5000). FedPhD's script also
accumulates gradients over 2 batches (effective batch 64), which this
library does not do, and its UNet for CelebA is diffusers' with
FedPhD's CIFAR-10 widths (4 levels), not this 5-level one.

FedPhD's protocol, as configs/cifar10_fedphd.py: the raw global model is
evaluated, no extra cloud aggregation at the end, one client Adam shared by
the clients (fedjax_diff/algorithms/base.py).

The argument picks a variant as in configs/mnist_fedphd.py: 'both' (default),
'hierarchy', 'pruning', 'fedavg'.

Command (CelebA prepared with `tfds build celeb_a --data_dir=DIR`):
  python launch/train.py --config=configs/celeba_fedphd.py \
      --workdir=workdirs/celeba_fedphd --config.data.data_dir=DIR

Expected runtime: not measured (needs an accelerator). Results: not measured.
"""

from configs import celeba_fedavg
from configs import mnist_fedphd


def get_config(arg=None):
  config = celeba_fedavg.get_config()
  config.hierarchy = mnist_fedphd.hierarchy_block(agg_a=20000,
                                                  select_scale=10000)
  mnist_fedphd.fedphd_protocol(config)
  config.pruning = mnist_fedphd.pruning_block(0.4)
  return mnist_fedphd.apply_variant(config, arg)
