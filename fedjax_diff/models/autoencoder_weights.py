"""Autoencoder weights from PyTorch files: diffusers' `AutoencoderKL` and
LDM's first stage (arXiv 2112.10752), into `models.autoencoder`.

`load(path)` reads

* a diffusers `AutoencoderKL` directory: `config.json` and
  `diffusion_pytorch_model.safetensors` (or `.bin`); a pipeline directory
  with a `vae/` subfolder also works;
* one weight file, `.safetensors` or a PyTorch pickle (`.bin`, `.pt`,
  `.pth`, `.ckpt`; a Lightning checkpoint's `state_dict` is unwrapped),
  with diffusers' key names (`encoder.down_blocks.0.resnets.0.conv1.weight`)
  or CompVis LDM's (`encoder.down.0.block.0.conv1.weight`), the latter
  also under `first_stage_model.` (a whole LDM checkpoint: its
  `scale_factor` buffer is read, its UNet ignored) or `vae.`. The LDM
  first stage's training-loss weights (`loss.*`: LPIPS, discriminator) are
  ignored.

The architecture comes from `config.json`, else from the tensors' shapes
(widths from each level's first conv, blocks per level, latent channels,
mid-block attention, quant convs); GroupNorm's group count is not in the
weights and is 32 (LDM's and diffusers' default) unless given.

Conversion: LDM names become diffusers' (`ldm_to_diffusers`), diffusers'
names map to flax paths by name (`down_blocks.0` is `down_blocks_0`), and
tensors leave PyTorch's layout (conv OIHW → HWIO, linear [out, in] →
[in, out]; LDM's 1×1-conv attention projections become dense kernels).
Every flax parameter must be found and every tensor used, with the expected
shape, or a ValueError names what is wrong.

PyTorch pickles load with `weights_only=True` (tensors only, no code runs);
a checkpoint that needs more is refused unless `trust_pickle=True`.
"""

import dataclasses
import json
import os
import re
from typing import Any, Optional

import jax
import numpy as np

from fedjax_diff.models import autoencoder as ae_lib

PyTree = Any

DIFFUSERS_WEIGHTS = ('diffusion_pytorch_model.safetensors',
                     'diffusion_pytorch_model.bin')
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt')
# Prefixes under which whole checkpoints hold their autoencoder.
PREFIXES = ('first_stage_model.', 'vae.')


@dataclasses.dataclass(frozen=True)
class Loaded:
  """An autoencoder read from a file.

  Attributes:
    model: the `AutoencoderKL`.
    params: its flax parameters (float32 numpy arrays).
    scaling_factor: the latent scale the file states (diffusers'
      `scaling_factor`, an LDM checkpoint's `scale_factor`), or None.
    shift_factor: diffusers' `shift_factor` (latents are (z − shift)·scale),
      or None.
    source: what was read, for logs.
  """
  model: ae_lib.AutoencoderKL
  params: PyTree
  scaling_factor: Optional[float]
  shift_factor: Optional[float]
  source: str


def load(path: str, *, num_groups: Optional[int] = None,
         trust_pickle: bool = False) -> Loaded:
  """Reads an autoencoder from a diffusers directory or a weight file (see
  the module docstring)."""
  if os.path.isdir(path):
    return _load_diffusers_dir(path, trust_pickle)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'No autoencoder at {path!r}: give a diffusers AutoencoderKL '
        'directory, or a .safetensors / .bin / .ckpt file of diffusers or '
        'LDM (first_stage_model.*) weights.')
  tensors = read_tensors(path, trust_pickle=trust_pickle)
  sd, scale = strip_prefix(tensors, path)
  if is_ldm(sd):
    sd = ldm_to_diffusers(sd)
  sd = rename_deprecated_attention(sd)
  model = infer_architecture(sd, num_groups or 32)
  return Loaded(model, to_flax(sd, model, path), scale, None, path)


def _load_diffusers_dir(path: str, trust_pickle: bool) -> Loaded:
  if (not os.path.exists(os.path.join(path, 'config.json')) and
      os.path.isdir(os.path.join(path, 'vae'))):
    path = os.path.join(path, 'vae')
  config_path = os.path.join(path, 'config.json')
  weights = [os.path.join(path, w) for w in DIFFUSERS_WEIGHTS
             if os.path.exists(os.path.join(path, w))]
  if not os.path.exists(config_path) or not weights:
    raise FileNotFoundError(
        f'{path!r} is not a diffusers AutoencoderKL directory: it needs '
        f'config.json and one of {DIFFUSERS_WEIGHTS} (or pass the weight '
        'file itself).')
  with open(config_path) as f:
    config = json.load(f)
  model, scale, shift = diffusers_architecture(config, config_path)
  sd = rename_deprecated_attention(
      read_tensors(weights[0], trust_pickle=trust_pickle))
  return Loaded(model, to_flax(sd, model, weights[0]), scale, shift,
                weights[0])


# -- Files. -------------------------------------------------------------------


def read_tensors(path: str, *, trust_pickle: bool = False
                 ) -> dict[str, np.ndarray]:
  """{name: float32 array} of a .safetensors file or a PyTorch pickle."""
  if path.endswith('.safetensors'):
    try:
      from safetensors import flax as st_flax  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'Reading {path} needs the safetensors package: '
                        'pip install safetensors') from e
    # Through jax arrays: numpy has no bfloat16.
    return {k: np.asarray(v, np.float32)
            for k, v in st_flax.load_file(path).items()}
  if not path.endswith(PICKLE_SUFFIXES):
    raise ValueError(f'{path}: unknown weight file type; use .safetensors or '
                     f'a PyTorch pickle ({", ".join(PICKLE_SUFFIXES)}).')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading the PyTorch pickle {path} needs torch (pip '
                      'install torch), or convert it to .safetensors.') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except Exception as e:  # pylint: disable=broad-except
    if trust_pickle:
      raise
    raise ValueError(
        f'{path} holds Python objects beyond tensors, which torch.load '
        'refuses to unpickle safely. If you trust the file, load it with '
        'trust_pickle=True (config.latent.trust_pickle=True); or re-save '
        f'its state_dict as .safetensors. ({type(e).__name__}: {e})') from e
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state '
                     'dict of tensors.')
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.ndim == 0):
      out[k] = v.detach().to(torch.float32).numpy()
  return out


def strip_prefix(tensors: dict[str, np.ndarray], path: str = ''
                 ) -> tuple[dict[str, np.ndarray], Optional[float]]:
  """The autoencoder's tensors of a checkpoint, without `first_stage_model.`
  or `vae.` (then the checkpoint's `scale_factor` too, if it has one), and
  without the LDM first stage's loss weights (`loss.*`)."""
  for prefix in PREFIXES:
    if any(k.startswith(prefix) for k in tensors):
      sd = {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix)}
      scale = tensors.get('scale_factor')
      return _drop_loss(sd), None if scale is None else float(scale)
  if not any(k.startswith(('encoder.', 'decoder.')) for k in tensors):
    some = sorted(tensors)[:5]
    raise ValueError(
        f'{path or "the checkpoint"} has no autoencoder weights: no key '
        f'starts with encoder./decoder. or {" / ".join(PREFIXES)} (first '
        f'keys: {some}).')
  return _drop_loss(tensors), None


def _drop_loss(sd):
  return {k: v for k, v in sd.items() if not k.startswith('loss.')}


# -- Names. -------------------------------------------------------------------


def is_ldm(sd: dict[str, Any]) -> bool:
  """Whether the keys are CompVis LDM's (`encoder.down.0.block.0...`)."""
  return any(k.startswith(('encoder.down.', 'encoder.mid.block_'))
             for k in sd)


_ATTN = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v',
         'proj_out': 'to_out.0'}


def ldm_to_diffusers(sd: dict[str, Any]) -> dict[str, Any]:
  """LDM's first-stage key names → diffusers' `AutoencoderKL` names.

  LDM numbers the decoder's levels by resolution (`up.0` is the last one
  run, at full resolution); diffusers numbers them in the order they run
  (`up_blocks.0` is the deepest). Shortcut convs are `nin_shortcut` in LDM,
  `conv_shortcut` in diffusers; the mid attention's `norm/q/k/v/proj_out`
  are `group_norm/to_q/to_k/to_v/to_out.0`.
  """
  levels = {int(m.group(1)) for k in sd
            for m in [re.match(r'decoder\.up\.(\d+)\.', k)] if m}
  n_up = max(levels) + 1 if levels else 0
  out, unknown, attn = {}, [], []
  for key, value in sd.items():
    new = _ldm_key(key, n_up)
    if new is None:
      (attn if re.match(r'(encoder\.down|decoder\.up)\.\d+\.attn\.', key)
       else unknown).append(key)
    else:
      out[new] = value
  if attn:
    raise ValueError(
        'This LDM autoencoder has self-attention inside its resolution '
        f'levels (e.g. {attn[0]}; attn_resolutions non-empty, as in KL-f16 '
        'and KL-f32). fedjax_diff implements the architecture of the KL-f4 '
        'and KL-f8 models and of diffusers\' AutoencoderKL, which have '
        'attention only in the mid blocks.')
  if unknown:
    raise ValueError(f'Unexpected LDM autoencoder keys: {sorted(unknown)[:8]}'
                     f'{" ..." if len(unknown) > 8 else ""}.')
  return out


def _ldm_key(key: str, n_up: int) -> Optional[str]:
  m = re.fullmatch(r'(encoder|decoder)\.(conv_in|conv_out)\.(\w+)', key)
  if m or re.fullmatch(r'(post_)?quant_conv\.(weight|bias)', key):
    return key
  m = re.fullmatch(r'(encoder|decoder)\.norm_out\.(\w+)', key)
  if m:
    return f'{m[1]}.conv_norm_out.{m[2]}'
  m = re.fullmatch(r'encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)', key)
  if m:
    return (f'encoder.down_blocks.{m[1]}.resnets.{m[2]}.'
            f'{_shortcut(m[3])}.{m[4]}')
  m = re.fullmatch(r'encoder\.down\.(\d+)\.downsample\.conv\.(\w+)', key)
  if m:
    return f'encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}'
  m = re.fullmatch(r'decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(\w+)', key)
  if m:
    return (f'decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}.'
            f'{_shortcut(m[3])}.{m[4]}')
  m = re.fullmatch(r'decoder\.up\.(\d+)\.upsample\.conv\.(\w+)', key)
  if m:
    return f'decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}'
  m = re.fullmatch(r'(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(\w+)', key)
  if m:
    return (f'{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_shortcut(m[3])}.'
            f'{m[4]}')
  m = re.fullmatch(r'(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.'
                   r'(\w+)', key)
  if m:
    return f'{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}.{m[3]}'
  return None


def _shortcut(name: str) -> str:
  return 'conv_shortcut' if name == 'nin_shortcut' else name


_DEPRECATED_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                    'proj_attn': 'to_out.0'}


def rename_deprecated_attention(sd: dict[str, Any]) -> dict[str, Any]:
  """diffusers' pre-0.14 attention names (query/key/value/proj_attn) →
  the current ones (to_q/to_k/to_v/to_out.0), as in older saved VAEs."""
  out = {}
  for key, value in sd.items():
    m = re.fullmatch(r'(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.'
                     r'(\w+)', key)
    out[f'{m[1]}.{_DEPRECATED_ATTN[m[2]]}.{m[3]}' if m else key] = value
  return out


# -- Architecture. ------------------------------------------------------------


def diffusers_architecture(config: dict, where: str = 'config.json'):
  """(AutoencoderKL, scaling_factor, shift_factor) of a diffusers
  `AutoencoderKL` config.json."""
  name = config.get('_class_name', 'AutoencoderKL')
  if name != 'AutoencoderKL':
    raise ValueError(f'{where} describes a {name}; only AutoencoderKL '
                     'converts.')
  widths = tuple(int(w) for w in config['block_out_channels'])
  down = tuple(config.get('down_block_types', ('DownEncoderBlock2D',) *
                          len(widths)))
  up = tuple(config.get('up_block_types', ('UpDecoderBlock2D',) *
                        len(widths)))
  if set(down) != {'DownEncoderBlock2D'} or set(up) != {'UpDecoderBlock2D'}:
    raise ValueError(f'{where}: block types {down} / {up} are not the '
                     'KL autoencoder\'s DownEncoderBlock2D / UpDecoderBlock2D.')
  if config.get('act_fn', 'silu') != 'silu':
    raise ValueError(f'{where}: act_fn={config["act_fn"]!r}; only silu.')
  for field in ('latents_mean', 'latents_std'):
    if config.get(field) is not None:
      raise ValueError(f'{where}: per-channel {field} normalisation is not '
                       'supported (only scaling_factor and shift_factor).')
  model = ae_lib.AutoencoderKL(
      widths=widths, num_res_blocks=int(config.get('layers_per_block', 1)),
      latent_channels=int(config.get('latent_channels', 4)),
      in_channels=int(config.get('in_channels', 3)),
      out_channels=int(config.get('out_channels', 3)),
      num_groups=int(config.get('norm_num_groups', 32)),
      mid_attention=bool(config.get('mid_block_add_attention', True)),
      use_quant_conv=bool(config.get('use_quant_conv', True)),
      use_post_quant_conv=bool(config.get('use_post_quant_conv', True)))
  # diffusers' default when config.json does not say.
  scale = float(config.get('scaling_factor', 0.18215))
  shift = config.get('shift_factor')
  return model, scale, None if shift is None else float(shift)


def infer_architecture(sd: dict[str, Any], num_groups: int = 32
                       ) -> ae_lib.AutoencoderKL:
  """The `AutoencoderKL` whose parameters `sd` (diffusers names) holds."""
  try:
    levels = 1 + max(int(m.group(1)) for k in sd for m in
                     [re.match(r'encoder\.down_blocks\.(\d+)\.', k)] if m)
    blocks = 1 + max(int(m.group(1)) for k in sd for m in
                     [re.match(r'encoder\.down_blocks\.0\.resnets\.(\d+)\.',
                               k)] if m)
    widths = tuple(
        int(sd[f'encoder.down_blocks.{i}.resnets.0.conv1.weight'].shape[0])
        for i in range(levels))
    return ae_lib.AutoencoderKL(
        widths=widths, num_res_blocks=blocks,
        latent_channels=int(sd['decoder.conv_in.weight'].shape[1]),
        in_channels=int(sd['encoder.conv_in.weight'].shape[1]),
        out_channels=int(sd['decoder.conv_out.weight'].shape[0]),
        num_groups=int(num_groups),
        mid_attention=any(k.startswith('encoder.mid_block.attentions.')
                          for k in sd),
        use_quant_conv='quant_conv.weight' in sd,
        use_post_quant_conv='post_quant_conv.weight' in sd)
  except (KeyError, ValueError) as e:
    raise ValueError(f'Cannot read an AutoencoderKL architecture from these '
                     f'weights (missing {e}).') from e


# -- Tensors. -----------------------------------------------------------------


def torch_key(path) -> str:
  """The diffusers name of a flax parameter path: `name_N` → `name.N`,
  kernel/scale → weight."""
  parts = []
  for p in path:
    name = str(getattr(p, 'key', p))
    m = re.fullmatch(r'(.*\D)_(\d+)', name)
    parts.append(f'{m[1]}.{m[2]}' if m else name)
  parts[-1] = {'kernel': 'weight', 'scale': 'weight'}.get(parts[-1],
                                                          parts[-1])
  return '.'.join(parts)


def to_flax(sd: dict[str, Any], model: ae_lib.AutoencoderKL,
            where: str = '') -> PyTree:
  """The flax parameters of `model` from a diffusers-named state dict."""
  f = model.downsampling_factor
  shapes = jax.eval_shape(lambda: ae_lib.init_params(
      model, jax.random.key(0), (2 * f, 2 * f, model.in_channels)))
  used, missing, wrong = set(), [], []

  def convert(path, want):
    key = torch_key(path)
    if key not in sd:
      missing.append(key)
      return np.zeros(want.shape, np.float32)
    used.add(key)
    x = np.asarray(sd[key], np.float32)
    if len(want.shape) == 4:        # conv: OIHW → HWIO.
      x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
    elif len(want.shape) == 2:      # dense: [out, in] (or a 1×1 conv) → [in, out].
      x = x.reshape(x.shape[0], -1).T if x.ndim >= 2 else x
    if x.shape != tuple(want.shape):
      wrong.append(f'{key}: {tuple(np.shape(sd[key]))} for '
                   f'{tuple(want.shape)}')
    return np.ascontiguousarray(x)

  params = jax.tree_util.tree_map_with_path(convert, shapes)
  unused = sorted(set(sd) - used)
  problems = []
  if missing:
    problems.append(f'missing {missing[:6]}'
                    f'{" ..." if len(missing) > 6 else ""}')
  if unused:
    problems.append(f'unexpected {unused[:6]}'
                    f'{" ..." if len(unused) > 6 else ""}')
  if wrong:
    problems.append(f'wrong shapes {wrong[:4]}')
  if problems:
    raise ValueError(
        f'{where or "The weights"} do not fit {model}: ' + '; '.join(problems)
        + '. Check the architecture (e.g. num_groups) or the file.')
  return params
