r"""Federated latent diffusion on embedded MNIST: FedDM's LDM setting at CPU
scale.

Reproduces: the latent-diffusion row of FedDM (arXiv 2407.14730) in
miniature. Stage 1 trains an f = 4 KL autoencoder (LDM, arXiv 2112.10752:
28×28×1 digits → 7×7×3 latents, KL-f4's latent channels) on mnist5k's
4,500 train images; stage 2 runs FedAvg (FedDM-vanilla) of a latent UNet
over the clients of configs/mnist_fedavg.py (10 clients, 2 digit classes
each), on latents encoded once per client before training. Sampling and
every evaluator (held-out ε-loss on encoded test latents, sample grids,
classifier FID, precision/recall, class coverage) decode through the
autoencoder; communication counts the latent UNet only.

Commands (README "Latent diffusion"):
  python launch/train_autoencoder.py --config=configs/mnist_ldm.py \
      --workdir=workdirs/mnist_ae
  python launch/train.py --config=configs/mnist_ldm.py \
      --workdir=workdirs/mnist_ldm

`config.latent.autoencoder` names the first stage (default
workdirs/mnist_ae, the first command's workdir; also a diffusers
AutoencoderKL directory or an LDM / diffusers weight file). FedDM-prox and
FedDM-quant compose as with any config: `--config.prox_mu=0.01`,
`--config.upload.quantize_bits=8`.

Runtime and results (README "Latent diffusion on embedded MNIST"; 2-core
CPU shared with other jobs): autoencoder 20 min, test reconstruction L1
0.039 / PSNR 24.3 dB; latent run 25.5 min, round 10: held-out latent
ε-loss 0.0416, classifier FID 145.5, precision 0.466, recall 0.448.
"""

import ml_collections
from ml_collections import config_dict

from configs import mnist_fedavg


def get_config(arg=None):
  del arg
  config = mnist_fedavg.get_config()
  # Stage 1 (launch/train_autoencoder.py): LDM's AutoencoderKL in its
  # ddconfig terms; widths ch·ch_mult = (16, 32, 32), f = 2^(3−1) = 4, and
  # z_channels = 3 as LDM's KL-f4 (its table's f=4, c=3 first stage).
  # GroupNorm over 8 groups (LDM: 32, for widths ≥ 128). Training: L1 +
  # 1e-6·KL (LDM's kl_weight), no LPIPS/GAN (autoencoder_trainer.py says
  # why), Adam at 1e-3 (LDM: 4.5e-6 × batch × GPUs for 256² images; a
  # small model on 28² digits trains in minutes at 1e-3).
  config.autoencoder = ml_collections.ConfigDict(dict(
      ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3,
      num_groups=8, mid_attention=True,
      steps=500, batch_size=32, learning_rate=1e-3, kl_weight=1e-6,
      reconstruction='l1', eval_every=500, checkpoint_every=500,
      num_reconstructions=16))
  # Stage 2: which first stage the UNet's data come from, and the latent
  # scale s (the UNet sees s·z; None: 1/std of the encoded training
  # latents, LDM's scale_by_std, or the scale the checkpoint states).
  config.latent = ml_collections.ConfigDict(dict(
      autoencoder='workdirs/mnist_ae', scale_factor=config_dict.placeholder(
          float), encode_batch_size=500, trust_pickle=False))
  # The latent UNet on 7×7×3: one resolution level (7 does not halve), two
  # residual blocks with self-attention at 7×7.
  config.model = ml_collections.ConfigDict(dict(
      ch=64, ch_mult=(1,), num_res_blocks=2, attn_resolutions=(7,),
      dropout=0.0, num_groups=8, num_classes=config_dict.placeholder(int),
      conv_impl='auto', dtype='float32'))
  config.num_rounds = 10
  # 'map', the mode 'auto' picks on CPU, without timing every mode first.
  config.federation.mode = 'map'
  evals = config.evaluators
  evals.samples.every_rounds = 10
  evals.samples.num_steps = 100
  for name in ('fid', 'precision_recall', 'class_coverage'):
    evals[name].every_rounds = 10
  return config
