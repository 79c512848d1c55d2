r"""FedDM-prox of the DDPM UNet on CelebA 64×64.

Reproduces: FedDM-prox (arXiv 2407.14730) on CelebA, at the size of
configs/celeba_fedavg.py (FedDM's and FedPhD's FedAvg baseline: 20 clients,
20% participation, one pseudo-class of Male×Young per client, DDIM's
CelebA-64 UNet), with every client minimising
F_k(θ) + (μ/2)·‖θ − θ_global‖² (FedProx, arXiv 1812.06127). μ = 0.01, as in
configs/mnist_prox.py (measured there to give a proximal gradient ≈ 10% of
the data gradient by the end of a round); here clients take 200 local steps
at a 10× smaller learning rate, so their drift and the term's weight are of
the same order. Not tuned on CelebA.

Command (CelebA prepared with `tfds build celeb_a --data_dir=DIR`):
  python launch/train.py --config=configs/celeba_prox.py \
      --workdir=workdirs/celeba_prox --config.data.data_dir=DIR

Expected runtime: as configs/celeba_fedavg.py (not measured yet; needs an
accelerator). Results: not measured yet.
"""

from configs import celeba_fedavg
from configs import mnist_prox


def get_config(arg=None):
  del arg
  config = celeba_fedavg.get_config()
  config.prox_mu = mnist_prox.PROX_MU
  return config
