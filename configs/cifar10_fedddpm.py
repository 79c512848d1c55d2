r"""FedDDPM / FedDDPM+ of a class-conditional DDPM UNet on CIFAR-10.

Reproduces: FedDDPM and FedDDPM+ (arXiv 2503.06426, from its abstract) at the
papers' scale, with the FedAvg setting of configs/cifar10_fedavg.py: 20
clients holding 2 classes each (grouped shards: clients 0–3 {0,5}, 4–7
{1,6}, ...), 40% participation, 1 local epoch (20 steps of batch 128), Adam
2e-4, DDPM's 35.7M UNet, plus a class embedding of 11 entries (null = 10)
and classifier-free guidance training (label dropout 0.1, Ho & Salimans
2022, arXiv 2207.12598).

`get_config(arg)`: arg None or 'fedddpm' (FedDDPM), 'plus' (FedDDPM+) or
'fedavg' (the same model and data without the server step).

Choices the abstract leaves open, and ours (the MNIST rationale is in
configs/mnist_fedddpm.py):

* phase 1: 2,000 steps of batch 128 per client (≈ 100 epochs of its 2,500
  images; a budget, not a plateau rule), from the global θ_0, with the
  clients' optimizer; each uploads its 143 MB model once;
* auxiliary set: 500 images per class (5,000, a tenth of CIFAR-10's training
  set), class-balanced over the 4 clients holding each class, DDIM 50 steps,
  η = 0, guidance w = 2; 10% per class held out;
* FedDDPM: 20 server steps of batch 128 after each aggregation, Adam 1e-4
  clipped at 1.0, fresh every round (2,000 rounds: 40,000 server steps);
* FedDDPM+: the held-out auxiliary loss over windows of 20 rounds, a
  correction of 2,000 steps when it improves by less than 1%, at most 3.

Command (data prepared with `tfds build cifar10 --data_dir=DIR`):
  python launch/train.py --config=configs/cifar10_fedddpm.py:plus \
      --workdir=workdirs/cifar10_fedddpm_plus --config.data.data_dir=DIR

Expected runtime: not measured (needs an accelerator; phase 1 alone is
20 × 2,000 steps of batch 128, the cost of 250 rounds). Results: not
measured yet.
"""

from configs import cifar10_fedavg
from configs import mnist_fedddpm

ARGS = (None, '', 'fedddpm', 'plus', 'fedavg')


def apply_fedddpm(config, arg, *, aux_per_class: int):
  """Sets the class-conditional model and `config.fedddpm` for `arg`."""
  if arg not in ARGS:
    raise ValueError(f"Unknown FedDDPM variant {arg!r}; use 'fedddpm', "
                     "'plus' or 'fedavg'.")
  config.model.num_classes = config.model.get('num_classes') or 10
  config.diffusion.cond_drop_prob = 0.1
  config.algorithm = 'fedavg' if arg == 'fedavg' else 'fedddpm'
  config.fedddpm = mnist_fedddpm.fedddpm_fields(
      plus=arg == 'plus',
      pretrain_steps=2000, pretrain_batch_size=0,
      aux_per_class=aux_per_class, aux_sample_steps=50, aux_sample_batch=100,
      guidance_scale=2.0, heldout_fraction=0.1,
      server_steps=20, server_batch_size=128,
      server_optimizer=dict(name='adam', learning_rate=1e-4, grad_clip=1.0),
      plus_window=20, plus_threshold=0.01, correction_steps=2000,
      plus_max_corrections=3)
  config.evaluators.samples.guidance_scale = 2.0
  return config


def get_config(arg=None):
  return apply_fedddpm(cifar10_fedavg.get_config(), arg, aux_per_class=500)
