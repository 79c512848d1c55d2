"""The KL autoencoder against diffusers' `AutoencoderKL`, on random weights.

diffusers' module is the reference: its weights are randomised, written in
each format the converter reads (a diffusers directory with safetensors, a
bare .bin, a CompVis LDM checkpoint), read back with
`autoencoder_weights.load`, and the flax model's posterior moments and
decoded images are compared with diffusers' own to 1e-4. The LDM-format
checkpoint is built in this test by renaming diffusers' keys, and that
renaming is itself checked against diffusers' own LDM converter
(`convert_ldm_vae_checkpoint`), so the LDM key names come from diffusers,
not from the code under test.
"""

import argparse
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_diff.models import autoencoder as ae_lib
from fedjax_diff.models import autoencoder_weights as weights_lib

torch = pytest.importorskip('torch')
# diffusers imports torchvision when it finds it; this machine's torchvision
# build does not load with the CPU torch, and the VAE needs none of it.
import diffusers.utils.import_utils as _import_utils  # pylint: disable=g-import-not-at-top
_import_utils._torchvision_available = False  # pylint: disable=protected-access
from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
from diffusers.loaders import single_file_utils  # pylint: disable=g-import-not-at-top

# (name, diffusers config, image size): f = 4 and f = 8, one and two blocks
# per level, RGB and grey, with and without the quant convs.
CASES = {
    'f4': (dict(block_out_channels=(16, 32, 32), layers_per_block=1,
                latent_channels=3, in_channels=3, out_channels=3,
                norm_num_groups=8), 16),
    'f8': (dict(block_out_channels=(16, 16, 32, 32), layers_per_block=2,
                latent_channels=4, in_channels=3, out_channels=3,
                norm_num_groups=8), 32),
    'f4_grey_no_quant': (dict(block_out_channels=(8, 16, 16),
                              layers_per_block=1, latent_channels=2,
                              in_channels=1, out_channels=1,
                              norm_num_groups=4, use_quant_conv=False,
                              use_post_quant_conv=False), 28),
}


def _diffusers_vae(config, seed=0):
  n = len(config['block_out_channels'])
  vae = AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * n,
                      up_block_types=('UpDecoderBlock2D',) * n, **config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if p.ndim > 1:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
      elif 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return vae.eval()


def _images(size, channels, seed=1):
  return np.random.default_rng(seed).uniform(
      -1, 1, (2, size, size, channels)).astype(np.float32)


def _reference(vae, x, z):
  """diffusers' posterior moments of x and decoding of z, NHWC."""
  with torch.no_grad():
    post = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    dec = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return nhwc(post.mean), nhwc(post.logvar), nhwc(dec)


def _check_parity(loaded, vae, size, channels):
  x = _images(size, channels)
  mean, logvar = loaded.model.apply({'params': loaded.params},
                                    jnp.asarray(x),
                                    method=ae_lib.AutoencoderKL.encode)
  z = np.asarray(mean) + 0.5 * np.random.default_rng(2).standard_normal(
      mean.shape).astype(np.float32)
  decoded = loaded.model.apply({'params': loaded.params}, jnp.asarray(z),
                               method=ae_lib.AutoencoderKL.decode)
  ref_mean, ref_logvar, ref_dec = _reference(vae, x, z)
  assert mean.shape == ref_mean.shape and decoded.shape == ref_dec.shape
  # Not a trivial agreement: the outputs vary.
  assert np.std(ref_mean) > 0.05 and np.std(ref_dec) > 0.05
  np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(decoded, ref_dec, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('case', sorted(CASES))
def test_diffusers_directory_matches_diffusers(case, tmp_path):
  config, size = CASES[case]
  vae = _diffusers_vae(config)
  vae.save_pretrained(tmp_path)  # config.json + .safetensors
  loaded = weights_lib.load(str(tmp_path))
  assert loaded.model.downsampling_factor == 2 ** (
      len(config['block_out_channels']) - 1)
  assert loaded.scaling_factor == pytest.approx(0.18215)
  assert loaded.source.endswith('.safetensors')
  _check_parity(loaded, vae, size, config['in_channels'])


def test_bin_file_without_config_infers_the_architecture(tmp_path):
  config, size = CASES['f8']
  vae = _diffusers_vae(config, seed=3)
  vae.save_pretrained(tmp_path, safe_serialization=False)
  path = str(tmp_path / 'diffusion_pytorch_model.bin')
  loaded = weights_lib.load(path, num_groups=config['norm_num_groups'])
  assert tuple(loaded.model.widths) == config['block_out_channels']
  assert loaded.model.num_res_blocks == config['layers_per_block']
  assert loaded.scaling_factor is None
  _check_parity(loaded, vae, size, 3)


def _to_ldm_key(key, num_levels):
  """diffusers' AutoencoderKL names → CompVis LDM's, written here from the
  two codebases' module structure (checked against diffusers' converter in
  `test_ldm_checkpoint_matches_diffusers`)."""
  key = key.replace('conv_norm_out', 'norm_out')
  key = key.replace('conv_shortcut', 'nin_shortcut')
  key = re.sub(r'encoder\.down_blocks\.(\d+)\.resnets\.',
               r'encoder.down.\1.block.', key)
  key = re.sub(r'encoder\.down_blocks\.(\d+)\.downsamplers\.0\.',
               r'encoder.down.\1.downsample.', key)
  key = re.sub(r'decoder\.up_blocks\.(\d+)\.resnets\.',
               lambda m: f'decoder.up.{num_levels - 1 - int(m[1])}.block.',
               key)
  key = re.sub(r'decoder\.up_blocks\.(\d+)\.upsamplers\.0\.',
               lambda m: f'decoder.up.{num_levels - 1 - int(m[1])}.upsample.',
               key)
  key = re.sub(r'mid_block\.resnets\.(\d)\.',
               lambda m: f'mid.block_{int(m[1]) + 1}.', key)
  for new, old in (('group_norm', 'norm'), ('to_q', 'q'), ('to_k', 'k'),
                   ('to_v', 'v'), ('to_out.0', 'proj_out')):
    key = key.replace(f'mid_block.attentions.0.{new}.', f'mid.attn_1.{old}.')
  return key


def _ldm_state_dict(vae):
  """The LDM first stage's state dict of `vae`: LDM names, and the
  attention projections as 1×1 convolutions ([C, C, 1, 1]), as LDM has."""
  n = len(vae.config.block_out_channels)
  out = {}
  for key, value in vae.state_dict().items():
    new = _to_ldm_key(key, n)
    if re.search(r'mid\.attn_1\.(q|k|v|proj_out)\.weight', new):
      value = value[:, :, None, None]
    out[new] = value.clone()
  return out


def test_ldm_checkpoint_matches_diffusers(tmp_path):
  config, size = CASES['f8']
  vae = _diffusers_vae(config, seed=4)
  ldm = _ldm_state_dict(vae)
  # The test's LDM names are what diffusers' own LDM converter reads.
  back = single_file_utils.convert_ldm_vae_checkpoint(
      {f'first_stage_model.{k}': v for k, v in ldm.items()},
      dict(vae.config))
  want = vae.state_dict()
  assert set(back) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(back[k].reshape(v.shape).numpy(), v.numpy())
  # A whole LDM checkpoint as Lightning writes it: the first stage under
  # first_stage_model., its training loss, a UNet and the scale factor.
  state = {f'first_stage_model.{k}': v for k, v in ldm.items()}
  state['first_stage_model.loss.logvar'] = torch.zeros(())
  state['model.diffusion_model.input_blocks.0.0.weight'] = torch.ones(3, 4)
  state['scale_factor'] = torch.tensor(0.2277)
  path = str(tmp_path / 'model.ckpt')
  torch.save({'state_dict': state, 'global_step': 7}, path)
  loaded = weights_lib.load(path, num_groups=config['norm_num_groups'])
  assert loaded.scaling_factor == pytest.approx(0.2277)
  _check_parity(loaded, vae, size, 3)
  # A bare first-stage checkpoint (no prefix) as LDM's kl-f8/model.ckpt.
  torch.save({'state_dict': ldm}, path)
  bare = weights_lib.load(path, num_groups=config['norm_num_groups'])
  assert bare.scaling_factor is None
  _check_parity(bare, vae, size, 3)


def test_deprecated_attention_names_load(tmp_path):
  config, size = CASES['f4']
  vae = _diffusers_vae(config, seed=5)
  renamed = {}
  for k, v in vae.state_dict().items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      k = k.replace(f'.{new}.', f'.{old}.')
    renamed[k] = v
  path = str(tmp_path / 'old.bin')
  torch.save(renamed, path)
  _check_parity(weights_lib.load(path, num_groups=8), vae, size, 3)


def test_bad_files_are_refused_with_the_reason(tmp_path):
  config, _ = CASES['f4']
  vae = _diffusers_vae(config)
  sd = dict(vae.state_dict())
  # A pickle with more than tensors needs trust_pickle.
  path = str(tmp_path / 'lightning.ckpt')
  torch.save({'state_dict': sd, 'hparams': argparse.Namespace(a=1)}, path)
  with pytest.raises(ValueError, match='trust_pickle'):
    weights_lib.load(path, num_groups=8)
  weights_lib.load(path, num_groups=8, trust_pickle=True)
  # A missing tensor is named.
  del sd['decoder.mid_block.resnets.1.conv2.bias']
  path = str(tmp_path / 'partial.bin')
  torch.save(sd, path)
  with pytest.raises(ValueError,
                     match=r'missing .*decoder\.mid_block\.resnets\.1\.conv2'):
    weights_lib.load(path, num_groups=8)
  # LDM's KL-f16 style in-level attention is refused, saying why.
  ldm = _ldm_state_dict(vae)
  ldm['encoder.down.1.attn.0.q.weight'] = torch.zeros(32, 32, 1, 1)
  path = str(tmp_path / 'f16.ckpt')
  torch.save(ldm, path)
  with pytest.raises(ValueError, match='attention inside'):
    weights_lib.load(path, num_groups=8)
  # Not an autoencoder at all.
  path = str(tmp_path / 'unet.bin')
  torch.save({'model.diffusion_model.out.weight': torch.zeros(2)}, path)
  with pytest.raises(ValueError, match='no autoencoder weights'):
    weights_lib.load(path)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'_class_name': 'VQModel', 'block_out_channels': [8]}, f)
  torch.save({}, tmp_path / 'diffusion_pytorch_model.bin')
  with pytest.raises(ValueError, match='only AutoencoderKL'):
    weights_lib.load(str(tmp_path))


def test_downsampling_factor_and_latent_shape():
  for widths, f in (((8, 8, 8), 4), ((8, 8, 8, 8), 8)):
    model = ae_lib.AutoencoderKL(widths=widths, num_res_blocks=1,
                                 latent_channels=4, in_channels=1,
                                 num_groups=4)
    params = ae_lib.init_params(model, jax.random.key(0), (2 * f, 2 * f, 1))
    x = jnp.zeros((3, 4 * f, 2 * f, 1))
    mean, logvar = model.apply({'params': params}, x,
                               method=ae_lib.AutoencoderKL.encode)
    assert mean.shape == logvar.shape == (3, 4, 2, 4)
    assert ae_lib.latent_shape(model, (4 * f, 2 * f, 1)) == (4, 2, 4)
    out = model.apply({'params': params}, mean,
                      method=ae_lib.AutoencoderKL.decode)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match='divide'):
      ae_lib.latent_shape(model, (4 * f + 2, 2 * f, 1))


def test_kl_divergence_by_hand():
  mean = jnp.array([[[[0.5, -1.0]]]])
  logvar = jnp.array([[[[0.0, np.log(4.0)]]]])
  # ½[(0.25 + 1 − 1 − 0) + (1 + 4 − 1 − log 4)].
  want = 0.5 * (0.25 + 4.0 - np.log(4.0))
  np.testing.assert_allclose(ae_lib.kl_divergence(mean, logvar), [want],
                             rtol=1e-6)


if __name__ == '__main__':
  os.sys.exit(pytest.main([__file__]))
