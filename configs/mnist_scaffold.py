r"""SCAFFOLD on the quickstart's federation: embedded MNIST, 2-class shards.

Reproduces: SCAFFOLD (Karimireddy et al. 2020, arXiv 1910.06378, option II)
against FedAvg at equal rounds on configs/mnist_fedavg.py's data, partition,
UNet, optimizers and budget: only `config.algorithm` differs. Clients keep
their Adam state as in the quickstart; the correction −η·(c − c_k) is added
to Adam's update, last in the client chain, so the control variates estimate
mean optimizer directions (see fedjax_diff/algorithms/scaffold.py for this
departure from the paper's SGD and why). Each client keeps c_k (one model of
float32 per client) and SCAFFOLD sends twice FedAvg's bytes.

Command:
  python launch/train.py --config=configs/mnist_scaffold.py \
      --workdir=workdirs/mnist_scaffold

Expected runtime and results: see README, "SCAFFOLD against FedAvg".
"""

from configs import mnist_fedavg


def get_config(arg=None):
  del arg
  config = mnist_fedavg.get_config()
  config.algorithm = 'scaffold'
  return config
