r"""Federated latent diffusion on LSUN Church Outdoor 256×256 (FedDM's LDM
setting).

Reproduces: the LDM row of FedDM (arXiv 2407.14730): FedDM-vanilla (FedAvg)
of a latent UNet on LSUN church_outdoor (TFDS `lsun/church_outdoor`,
126,227 train images, resized to 256×256), FedDM-prox / FedDM-quant by the
usual overrides (`--config.prox_mu=0.01`, `--config.upload.quantize_bits=8`).

First stage: LDM's KL-f8 autoencoder (Rombach et al. 2022, arXiv
2112.10752), f = 8, c = 4: 256×256×3 → 32×32×4 latents. LDM's LSUN-Church
model is trained on it: CompVis/latent-diffusion
configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml (read from the copy in
github.com/dakshces/FourierImageDiffuse, commit 47ea963) has
`first_stage_config: ckpt_path models/first_stage_models/kl-f8/model.ckpt`,
ddconfig ch 128, ch_mult [1,2,4,4], num_res_blocks 2, z_channels 4,
attn_resolutions [], and `scale_by_std: True`. Download kl-f8.zip from the
LDM repository's model table (ommer-lab.com/files/latent-diffusion/) and
pass its model.ckpt as `--config.latent.autoencoder`; or train one here
with launch/train_autoencoder.py (config.autoencoder below is the same
architecture; L1 + KL only, see fedjax_diff/autoencoder_trainer.py).

Latent UNet (same yaml, unet_config): model_channels 192, channel_mult
[1,2,2,4,4] (32, 16, 8, 4, 2), num_res_blocks 2, attention at 32, 16, 8
and 4 (attention_resolutions [1,2,4,8] are downsampling rates), 1000 steps
of LDM's schedule linear in √β from 0.0015 to 0.0155 ('scaled_linear');
256.4M parameters in fedjax_diff's UNet on 32×32×4.
Documented departures, as fedjax_diff's UNet is DDPM's (models/unet.py):
single-head attention (LDM: num_heads 8), additive time embedding (LDM:
use_scale_shift_norm), conv up/downsampling (LDM: resblock_updown), and
the ε-loss in L2 (LDM's church model: loss_type l1). The latent scale s is
1/std of all training latents (LDM's scale_by_std computes it on the first
batch). Latents are encoded once from unflipped images, so there are no
random flips (LDM flips images before encoding each time).

Client setting (FedDM's, as configs/celeba_fedavg.py): 20 clients, 4 per
round, 200 local steps of batch 32, Adam 5e-5 (LDM's base_learning_rate,
unscaled: LDM multiplies it by its batch 96) with 100-step warmup and
clipping 1.0, EMA 0.9999. LSUN has no labels: IID split. Held out: TFDS's
validation split (300 images, LDM's LSUNChurchesValidation).

Commands (LSUN prepared as tfds_source.py's note says, in DIR):
  python launch/train.py --config=configs/lsun_church_ldm.py \
      --workdir=workdirs/lsun_church_ldm --config.data.data_dir=DIR \
      --config.latent.autoencoder=models/first_stage_models/kl-f8/model.ckpt

Expected runtime: not measured (needs an accelerator and the 2.3 GiB
dataset; encoding the 126k images once is ≈ 126k KL-f8 encoder passes).
Results: not measured.
"""

import ml_collections
from ml_collections import config_dict

from configs import mnist_ldm


def get_config(arg=None):
  del arg
  config = mnist_ldm.get_config()
  config.num_rounds = 2000
  config.data = ml_collections.ConfigDict(dict(
      name='lsun/church_outdoor', data_dir=config_dict.placeholder(str),
      image_size=256, random_flip=False, test_split='validation'))
  config.partition = ml_collections.ConfigDict(dict(
      method='iid', classes_per_client=1, layout='grouped', alpha=0.5,
      min_size=1))
  config.federation = ml_collections.ConfigDict(dict(
      num_clients=20, clients_per_round=4, local_steps=200, batch_size=32,
      mode='auto', chunk_size=0))
  # KL-f8 (see the docstring); training fields for launch/train_autoencoder.
  config.autoencoder = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
      num_groups=32, mid_attention=True,
      steps=100000, batch_size=16, learning_rate=4.5e-6 * 16,
      kl_weight=1e-6, reconstruction='l1', eval_every=5000,
      checkpoint_every=5000, num_reconstructions=8))
  config.latent = ml_collections.ConfigDict(dict(
      autoencoder='models/first_stage_models/kl-f8/model.ckpt',
      scale_factor=config_dict.placeholder(float), encode_batch_size=64,
      trust_pickle=False))
  config.model = ml_collections.ConfigDict(dict(
      ch=192, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
      attn_resolutions=(32, 16, 8, 4), dropout=0.0, num_groups=32,
      num_classes=config_dict.placeholder(int), conv_impl='auto',
      dtype='float32'))
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule='scaled_linear', num_timesteps=1000, beta_start=0.0015,
      beta_end=0.0155, cond_drop_prob=0.0))
  config.client_optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=5e-5, warmup_steps=100, grad_clip=1.0,
      keep_state=False, shared_state=False))
  config.ema_decay = 0.9999
  gen = dict(every_rounds=200, features='inception', num_samples=10000,
             num_steps=100, batch_size=100, inception_weights='')
  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=50, num_examples=300, batch_size=100),
      samples=dict(every_rounds=100, num_samples=16, method='ddim',
                   num_steps=100, eta=0.0),
      fid=dict(gen),
      precision_recall=dict(gen, k=3),
  ))
  config.log_every = 10
  config.checkpoint_every = 50
  return config
