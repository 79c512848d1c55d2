r"""FedPhD on CIFAR-10 with the DDPM UNet (35.7M parameters before pruning).

Reproduces: FedPhD (arXiv 2507.06449; settings from its public code,
exp/fedphd/cifar10.sh) on CIFAR-10: 20 clients with 2 classes each (FedPhD's
grouped shards), 40% participation, 1 local epoch (2,500 examples / batch
128 ≈ 20 steps), Adam 2e-4 with 100-step warmup and clipping 1.0, 2 edge
servers, clients choosing their edge at random by homogeneity (s = 10000),
the cloud every 5 rounds with weights ReLU(n_e + 50000·SH(Q_e) + 0), and
structured pruning at ratio 0.2 before training by torch-pruning's rule as
FedPhD's code calls it (35,746,307 → 20,340,086 parameters, 6.05 → 3.42
GMACs: FedPhD's 20.34M; launch/prune_table.py). Everything else as
configs/cifar10_fedavg.py, its FedAvg baseline with equal budgets (2,000
rounds; FedPhD ran 10,000: --config.num_rounds=10000).

FedPhD's protocol (`mnist_fedphd.fedphd_protocol`, every variant): the
evaluators judge the raw global model, not its EMA; there is no extra cloud
aggregation at the end (the final global model is the last cloud round's,
as FedPhD's code returns); and the clients share one Adam and its warmup
(FedPhD's trainer carries one Adam from client to client; here the round's
clients train in parallel from the shared state, the warmup counts the
steps of FedPhD's sequential order, and the next state is the one a
sequential pass over their gradients leaves: fedjax_diff/algorithms/base.py
says how this departs from the sequential code).

The argument picks a variant as in configs/mnist_fedphd.py: 'both' (default),
'hierarchy', 'pruning', 'fedavg'.

Command (data prepared with `tfds build cifar10 --data_dir=DIR`):
  python launch/train.py --config=configs/cifar10_fedphd.py \
      --workdir=workdirs/cifar10_fedphd --config.data.data_dir=DIR

Expected runtime: not measured (needs an accelerator). Results: not measured.
"""

from configs import cifar10_fedavg
from configs import mnist_fedphd


def get_config(arg=None):
  config = cifar10_fedavg.get_config()
  config.hierarchy = mnist_fedphd.hierarchy_block(agg_a=50000,
                                                  select_scale=10000)
  mnist_fedphd.fedphd_protocol(config)
  config.pruning = mnist_fedphd.pruning_block(0.2)
  return mnist_fedphd.apply_variant(config, arg)
