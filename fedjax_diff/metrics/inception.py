"""The FID Inception-v3 network in Flax, with a converter of its weights.

FID (Heusel et al. 2017, arXiv 1706.08500) and the Inception Score
(Salimans et al. 2016, arXiv 1606.03498) are published with one network: the
Inception-v3 (Szegedy et al. 2015, arXiv 1512.00567) graph of TensorFlow's
`inception-2015-12-05` release, which the original FID code used. pytorch-fid
ported it to PyTorch (weights file `pt_inception-2015-12-05-6726825d.pth`);
this module is an exact Flax port of that network:

  * torchvision's Inception3 layout, every conv followed by BatchNorm
    (ε = 0.001, running statistics) and ReLU;
  * the FID graph's differences from torchvision: the average pools of the
    Mixed_5*, Mixed_6b–e and Mixed_7b blocks exclude padding from their
    mean (TensorFlow's behaviour), and Mixed_7c's pool branch is a 3×3 max
    pool instead of an average pool;
  * the classifier has 1008 outputs (the 2015 graph's), used by the IS.

Preprocessing follows pytorch-fid: images in [0, 1] are resized to 299×299
with bilinear interpolation (PyTorch's `align_corners=False`, no
antialiasing), then mapped to [−1, 1] by 2x − 1. Grey images are repeated to
3 channels, as pytorch-fid's loader converts every image to RGB.

Outputs: the 2048-d pool features (the FID features, pytorch-fid's block 3)
and the 1008 logits.

Weights: `load_variables(path)` reads pytorch-fid's `.pth` without PyTorch
(`fedjax_diff.metrics.torch_file`, a restricted unpickler of torch.save's
format) or a `.npz` written by `save_variables`; `download_weights()`
fetches the `.pth` when the network allows. `convert_state_dict` maps the
PyTorch names (`Mixed_5b.branch1x1.conv.weight`, ...) onto this module.
"""

import functools
import os
from typing import Any, Mapping, Optional, Sequence
import urllib.request

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff.metrics import torch_file

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/'
                   'fid_weights/pt_inception-2015-12-05-6726825d.pth')
FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
NUM_LOGITS = 1008
POOL_DIM = 2048
INPUT_SIZE = 299


def _pair(v):
  return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class BasicConv(nn.Module):
  """conv (no bias) → BatchNorm(ε=0.001, running statistics) → ReLU."""
  features: int
  kernel_size: Any
  strides: Any = 1
  padding: Any = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), _pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_no_pad(x):
  """3×3 average pool, stride 1, padding 1, padding excluded from the mean."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride),
                     padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b–d (FID variant: the pool excludes padding)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, 1, name='branch1x1')(x)
    b5 = BasicConv(48, 1, name='branch5x5_1')(x)
    b5 = BasicConv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, 1, name='branch_pool')(
        _avg_pool_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 → 17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, strides=2, name='branch3x3')(x)
    bd = BasicConv(64, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b–e: factorised 7×7 convs (FID variant: pool excludes padding)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, 1, name='branch1x1')(x)
    b7 = BasicConv(c7, 1, name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, 1, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, 1, name='branch_pool')(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 → 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, 1, name='branch3x3_1')(x)
    b3 = BasicConv(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, 1, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool excluding padding) and Mixed_7c (max pool)."""
  max_pool_branch: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, 1, name='branch1x1')(x)
    b3 = BasicConv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
    ], axis=-1)
    bd = BasicConv(448, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
    ], axis=-1)
    pooled = (_max_pool(x, stride=1, pad=1) if self.max_pool_branch
              else _avg_pool_no_pad(x))
    bp = BasicConv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3 on preprocessed inputs [B, 299, 299, 3] in [−1, 1].

  Returns (pool features [B, 2048], logits [B, 1008]).
  """

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, 3, name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool(x)
    x = BasicConv(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(False, name='Mixed_7b')(x)
    x = InceptionE(True, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    return pool, nn.Dense(NUM_LOGITS, name='fc')(pool)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of PyTorch's bilinear resize, align_corners=False.

  src = (dst + ½)·in/out − ½, clamped below at 0; i₀ = ⌊src⌋,
  i₁ = min(i₀ + 1, in − 1), and dst = (1 − λ)·x[i₀] + λ·x[i₁], λ = src − i₀.
  """
  # In float32, as PyTorch's CPU kernel computes it (float64 index
  # arithmetic moves λ by up to 1e-4 when downsampling).
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5))
                   - f32(0.5), f32(0)).astype(f32)
  i0 = np.floor(src).astype(np.int64)
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0.astype(f32)).astype(np.float64)
  m = np.zeros((out_size, in_size))
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m.astype(np.float32)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """pytorch-fid's input pipeline: [B, H, W, C] in [0, 1] → [B, 299, 299, 3]
  in [−1, 1] (bilinear resize, align_corners=False; grey → RGB)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError('Inception takes images [B, H, W, C] with C = 1 or 3; '
                     f'got shape {images.shape}.')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  mh = jnp.asarray(bilinear_matrix(x.shape[1], size))
  mw = jnp.asarray(bilinear_matrix(x.shape[2], size))
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=hp)
  x = jnp.einsum('pw,bowc->bopc', mw, x, precision=hp)
  return 2.0 * x - 1.0


def init_variables(seed: int = 0):
  """Randomly initialised variables (for shape checks and tests).

  Jitted with an 'rbg' key: XLA compiles threefry initialisers of a network
  this size slowly on CPU (as in the trainer).
  """
  init = jax.jit(lambda k: FIDInceptionV3().init(
      k, jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
  return init(jax.random.key(seed, impl='rbg'))


# ---------------------------------------------------------------- weights --


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """'collection/module/.../leaf' → shape of the FID network's variables
  (traced once per process)."""
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(jax.eval_shape(init_variables)), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}

_BN_NAMES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
             'running_mean': ('batch_stats', 'mean'),
             'running_var': ('batch_stats', 'var')}


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """pytorch-fid's Inception state dict (name → array) → Flax variables.

  conv weights [O, I, kh, kw] → kernels [kh, kw, I, O]; BatchNorm weight,
  bias, running_mean, running_var → scale, bias, mean, var; fc.weight
  [1008, 2048] → kernel [2048, 1008]. `num_batches_tracked` and the
  auxiliary classifier (`AuxLogits.*`) are not part of the FID network and
  are skipped.

  Raises:
    ValueError: names or shapes that do not match the FID network.
  """
  params, stats = {}, {}

  def put(tree, path, value):
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = value

  unexpected = []
  for name, value in state_dict.items():
    v = np.asarray(value)
    parts = name.split('.')
    if parts[-1] == 'num_batches_tracked' or parts[0] == 'AuxLogits':
      continue
    if parts[0] == 'fc' and len(parts) == 2:
      put(params, ['fc', 'kernel' if parts[1] == 'weight' else 'bias'],
          v.T if parts[1] == 'weight' else v)
    elif len(parts) >= 3 and parts[-2] == 'conv' and parts[-1] == 'weight':
      put(params, parts[:-1] + ['kernel'], np.transpose(v, (2, 3, 1, 0)))
    elif len(parts) >= 3 and parts[-2] == 'bn' and parts[-1] in _BN_NAMES:
      col, leaf = _BN_NAMES[parts[-1]]
      put(params if col == 'params' else stats, parts[:-1] + [leaf], v)
    else:
      unexpected.append(name)
  variables = {'params': params, 'batch_stats': stats}
  exp_flat = _expected_shapes()
  got_flat = flax.traverse_util.flatten_dict(variables, sep='/')
  missing = sorted(set(exp_flat) - set(got_flat))
  extra = sorted(set(got_flat) - set(exp_flat)) + unexpected
  bad = sorted(k for k in set(exp_flat) & set(got_flat)
               if exp_flat[k] != tuple(got_flat[k].shape))
  if missing or extra or bad:
    raise ValueError(
        'the state dict is not pytorch-fid\'s FID Inception '
        f'({FID_WEIGHTS_FILE}): missing {missing[:5]}{"..." if len(missing) > 5 else ""}, '
        f'unexpected {extra[:5]}, wrong shapes {bad[:5]}.')
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)


def save_variables(path: str, variables) -> None:
  """Saves converted variables to `.npz` (readable without PyTorch)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables),
                                         sep='/')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'
  np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)


def load_variables(path: str):
  """Flax variables from pytorch-fid's `.pth` (read without torch) or a
  converted `.npz`."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'no Inception weights at {path}. Give the path of {FID_WEIGHTS_FILE} '
        f'(from {FID_WEIGHTS_URL}) or of a .npz converted from it.')
  if path.endswith('.npz'):
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files}
    variables = flax.traverse_util.unflatten_dict(flat, sep='/')
    expected = _expected_shapes()
    if set(expected) != set(flat) or any(
        expected[k] != flat[k].shape for k in flat):
      raise ValueError(f'{path} does not hold FID Inception variables.')
    return jax.tree.map(jnp.asarray, variables)
  return convert_state_dict(torch_file.load(path))


def download_weights(cache_dir: str) -> str:
  """Path of pytorch-fid's weights in `cache_dir`, downloaded if absent."""
  path = os.path.join(cache_dir, FID_WEIGHTS_FILE)
  if os.path.exists(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    urllib.request.urlretrieve(FID_WEIGHTS_URL, tmp)
  except OSError as e:
    raise RuntimeError(
        f'could not download the FID Inception weights from {FID_WEIGHTS_URL} '
        f'({e}). Download {FID_WEIGHTS_FILE} elsewhere and pass its path '
        '(config: inception_weights=PATH).') from None
  os.replace(tmp, path)
  return path


class InceptionExtractor:
  """Jitted pool features and logits of images in [0, 1], in batches."""

  def __init__(self, variables, batch_size: int = 50):
    self.variables = variables
    self.batch_size = int(batch_size)
    net = FIDInceptionV3()
    self._fn = jax.jit(lambda v, x: net.apply(v, preprocess(x)))

  def __call__(self, images01) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(images01, np.float32)
    pools, logits = [], []
    for s in range(0, x.shape[0], self.batch_size):
      p, l = self._fn(self.variables, jnp.asarray(x[s:s + self.batch_size]))
      pools.append(np.asarray(p))
      logits.append(np.asarray(l))
    return np.concatenate(pools), np.concatenate(logits)


def extractor_from_weights(weights: Optional[str], cache_dir: str,
                           batch_size: int = 50) -> InceptionExtractor:
  """From a weights file (`.pth`/`.npz`), or the downloaded `.pth` when
  `weights` is empty; a converted `.npz` is cached beside a downloaded
  file (it loads faster than unpickling the `.pth` again)."""
  if not weights:
    npz = os.path.join(cache_dir, FID_WEIGHTS_FILE[:-4] + '.npz')
    if os.path.exists(npz):
      return InceptionExtractor(load_variables(npz), batch_size)
    variables = load_variables(download_weights(cache_dir))
    save_variables(npz, variables)
    return InceptionExtractor(variables, batch_size)
  return InceptionExtractor(load_variables(weights), batch_size)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise SystemExit('usage: python -m fedjax_diff.metrics.inception '
                     f'{FID_WEIGHTS_FILE} OUT.npz')
  save_variables(argv[2], load_variables(argv[1]))
  print(f'wrote {argv[2]}')


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  main(sys.argv)
