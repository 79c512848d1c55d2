"""Latent diffusion: the first stage's latent space, a federated round on
latents against testlib's plain loop, the autoencoder trainer (with resume),
and a run through the trainer with FedDM-prox and FedDM-quant whose
evaluators decode through the autoencoder and whose communication counts
the UNet only."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import testlib
from configs import test as test_config
from fedjax_diff import autoencoder_trainer
from fedjax_diff import comm
from fedjax_diff import federation
from fedjax_diff import latent as latent_lib
from fedjax_diff import trainer
from fedjax_diff import workdir as workdir_lib
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.diffusion import sample
from fedjax_diff.evaluators import base as eval_base
from fedjax_diff.models import autoencoder as ae_lib

# f = 2 on 8×8 images: 4×4×1 latents, so testlib's one-channel denoiser
# trains on them unchanged.
TINY_AE = ae_lib.AutoencoderKL(widths=(4, 4), num_res_blocks=1,
                               latent_channels=1, in_channels=1, num_groups=2)


def _tiny_space(scale=None):
  params = ae_lib.init_params(TINY_AE, jax.random.key(3), (8, 8, 1))
  return latent_lib.LatentSpace(model=TINY_AE, params=params,
                                scale=1.0 if scale is None else scale,
                                shift=0.0, image_shape=(8, 8, 1),
                                encode_batch_size=16)


def test_latent_space_encodes_the_scaled_posterior_mean_and_decodes():
  space = _tiny_space(scale=2.5)
  images = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 1), np.uint8)
  z = space.encode_images(images)    # 3 batches of 16, the last padded.
  mean, _ = TINY_AE.apply({'params': space.params},
                          jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
                          method=ae_lib.AutoencoderKL.encode)
  assert z.dtype == np.float32 and z.shape == (37, 4, 4, 1)
  np.testing.assert_allclose(z, 2.5 * np.asarray(mean), rtol=1e-5, atol=1e-6)
  x = space.decode(jnp.asarray(z))
  want = TINY_AE.apply({'params': space.params}, mean,
                       method=ae_lib.AutoencoderKL.decode)
  np.testing.assert_allclose(x, np.clip(want, -1, 1), rtol=1e-4, atol=1e-5)
  assert space.shape == (4, 4, 1)


def test_latent_round_matches_the_plain_loop():
  """Clients hold latents encoded once; the engine's FedAvg round on them
  (two devices) equals testlib's plain loop over the same latents."""
  pixels = testlib.make_data(num_clients=8, seed=5)
  counts = np.asarray(pixels.counts)
  parts, flat, labels = [], [], []
  for k, n in enumerate(counts):
    parts.append(np.arange(sum(counts[:k]), sum(counts[:k]) + n))
    flat.append(pixels.images[k, :n])
    labels.append(pixels.labels[k, :n])
  space = _tiny_space()
  latents = space.encode_images(np.concatenate(flat))
  scale = 1.0 / float(np.std(latents))
  data = federation.stack_clients(latents * scale, np.concatenate(labels),
                                  parts)
  assert data.images.dtype == np.float32
  assert data.images.shape[2:] == (4, 4, 1)   # latent-shaped, not 8×8.
  algorithm, sharded = testlib.make_algorithm(
      data, 2, **{'federation.num_clients': 8,
                  'federation.clients_per_round': 5})
  ids = [np.array([0, 2, 3, 6, 7]), np.array([1, 2, 4, 5, 6])]
  state, metrics, _ = testlib.run_rounds(algorithm, sharded, ids)
  ref = testlib.reference_state()
  for r, round_ids in enumerate(ids):
    ref, loss = testlib.fedavg_round(ref, data, round_ids)
    np.testing.assert_allclose(metrics[r]['loss'], loss, rtol=1e-4)
  testlib.assert_trees_close(state.params, ref.params)
  assert testlib.tree_distance(state.params, testlib.init_params()) > 1e-3


def test_drawer_decodes_samples_without_clipping_latents():
  space = _tiny_space(scale=4.0)   # latents beyond [−1, 1] survive.
  test = ml_collections.ConfigDict(dict(images=np.zeros((2, 8, 8, 1))))
  ctx = eval_base.EvalContext(
      eps_fn=testlib.eps_fn, schedule=make_schedule('linear', 50),
      test_data=test, image_shape=(8, 8, 1),
      num_classes=None, workdir='', seed=0, write_images=lambda *a: None,
      latent=space)
  assert ctx.sample_shape == (4, 4, 1)
  draw = eval_base.make_drawer(ctx, 3, num_steps=5)
  params = testlib.init_params()
  key = jax.random.PRNGKey(1)
  images = draw(params, key, None)
  latents = sample(
      testlib.eps_fn, params, ctx.schedule, key, (3, 4, 4, 1),
      method='ddim', num_steps=5, clip_denoised=False)
  assert float(jnp.max(jnp.abs(latents))) > 1.0
  assert images.shape == (3, 8, 8, 1)
  np.testing.assert_allclose(images, space.decode(latents), atol=1e-5)


def _ae_config(tmp, steps):
  config = test_config.get_config()
  config.autoencoder = ml_collections.ConfigDict(dict(
      ch=4, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, num_groups=2,
      mid_attention=True, steps=steps, batch_size=8, learning_rate=1e-3,
      kl_weight=1e-6, reconstruction='l1', eval_every=2, checkpoint_every=2,
      num_reconstructions=4))
  config.latent = ml_collections.ConfigDict(dict(
      autoencoder=str(tmp / 'ae'), scale_factor=None, encode_batch_size=256,
      trust_pickle=False))
  return config


def test_autoencoder_trainer_resumes_and_feeds_a_latent_run(tmp_path):
  """train_autoencoder: 3 steps, then resumed to 4 (checkpoints, metrics,
  PNGs); then a latent run of the trainer with FedDM-prox and 8-bit
  FedDM-quant on it."""
  log = []
  config = _ae_config(tmp_path, 3)
  autoencoder_trainer.train(config, str(tmp_path / 'ae'), log=log.append)
  config = _ae_config(tmp_path, 4)
  model, params = autoencoder_trainer.train(config, str(tmp_path / 'ae'),
                                            log=log.append)
  assert any('Resumed' in line and 'step 3' in line for line in log)
  rows = workdir_lib.read_metrics(str(tmp_path / 'ae'))
  assert [r['round'] for r in rows if 'test_l1' in r] == [2, 3, 4]
  assert os.path.exists(tmp_path / 'ae' / 'reconstructions' /
                        'step_000004.png')
  # What the latent run reads back is the trained model of the last step.
  loaded_model, loaded, _, _, _ = latent_lib.load_autoencoder(
      str(tmp_path / 'ae'))
  assert ae_lib.architecture(loaded_model) == ae_lib.architecture(model)
  testlib.assert_trees_close(loaded, params, rtol=0, atol=0)
  # Stage 2: FedDM-prox and FedDM-quant on the latents.
  with config.unlocked():
    config.prox_mu = 0.01
    config.upload.quantize_bits = 8
    config.num_rounds = 2
    config.evaluators.samples.every_rounds = 2
  workdir = str(tmp_path / 'ldm')
  state = trainer.train_and_evaluate(config, workdir)
  # The UNet works on 4×4×2 latents: its input conv has 2 channels.
  assert state.params['conv_in']['kernel'].shape[2] == 2
  # Communication: the latent UNet's parameters, nothing of the autoencoder.
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  per_client = comm.tree_bytes(state.params)
  assert summary['param_bytes'] == summary['downlink_bytes_per_client'] == (
      per_client)
  assert summary['total_downlink_bytes'] == 2 * 3 * per_client  # 3 a round.
  assert summary['uplink_compression_vs_fedavg_fp32'] > 3   # 8 bits.
  rows = workdir_lib.read_metrics(workdir)
  assert np.isfinite(rows[-1]['heldout_loss'])
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = np.asarray(Image.open(os.path.join(workdir, 'samples',
                                            'round_000002.png')))
  # 16 decoded 8×8 digits upscaled ×7 on a 4×4 grid: image-sized tiles.
  assert grid.shape[0] == 4 * (8 * 7 + 2) + 2


def test_missing_autoencoder_says_which_command_makes_one(tmp_path):
  config = test_config.get_config()
  config.latent = ml_collections.ConfigDict(dict(
      autoencoder=str(tmp_path / 'none'), scale_factor=None))
  with pytest.raises(FileNotFoundError, match='launch/train_autoencoder.py'):
    latent_lib.from_config(config, np.zeros((4, 8, 8, 1), np.uint8))
  config.latent.autoencoder = ''
  with pytest.raises(ValueError, match='launch/train_autoencoder.py'):
    latent_lib.from_config(config, np.zeros((4, 8, 8, 1), np.uint8))
  assert latent_lib.from_config(test_config.get_config(),
                                np.zeros((4, 8, 8, 1), np.uint8)) == (None,
                                                                      None)
