"""The Flax FID Inception against pytorch-fid's network (random weights).

pytorch-fid builds its network from torchvision's Inception3 blocks. The
test extra installs torchvision 0.28.0, the release paired with torch 2.13.0;
its C++ ops are linked against CUDA torch and do not load beside the CPU
build, and torchvision then fails at import because it registers fake
kernels for its `nms`/`qnms` ops unconditionally. `_import_pytorch_fid`
declares the schemas of those two ops (never called by Inception) so that
the real torchvision and pytorch-fid Python code imports. No weights are
downloaded: pytorch-fid's loader is replaced by random weights.
"""

import os

import numpy as np
import pytest

from fedjax_diff.metrics import inception
import testlib

# The torch references: run on Python 3.11 too (tests/conftest.py).
pytestmark = pytest.mark.py311

torch = pytest.importorskip('torch', reason=testlib.NO_TORCH)


def _import_pytorch_fid():
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    importlib.import_module('torchvision')
  except RuntimeError as e:
    if 'torchvision::nms' not in str(e):
      raise
    lib = torch.library.Library('torchvision', 'DEF')  # kept alive below
    for op in ('nms', 'qnms'):
      lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) '
                 '-> Tensor')
    _import_pytorch_fid.lib = lib
    import sys  # pylint: disable=g-import-not-at-top
    for name in [m for m in sys.modules if m.startswith('torchvision')]:
      del sys.modules[name]
    importlib.import_module('torchvision')
  return importlib.import_module('pytorch_fid.inception')


@pytest.fixture(scope='module')
def torch_fid():
  try:
    pfi = _import_pytorch_fid()
  except ImportError as e:
    pytest.skip(f'pytorch-fid / torchvision not installed ({e}); '
                'pip install -e ".[test]"')
  import torchvision  # pylint: disable=g-import-not-at-top
  orig_load = pfi.load_state_dict_from_url
  orig_sd = torchvision.models.inception.Inception3.load_state_dict
  # Build pytorch-fid's FID network exactly as it does, minus the download.
  pfi.load_state_dict_from_url = lambda *a, **k: None
  torchvision.models.inception.Inception3.load_state_dict = (
      lambda self, sd, *a, **k: None)
  try:
    torch.manual_seed(0)
    net = pfi.fid_inception_v3()
  finally:
    pfi.load_state_dict_from_url = orig_load
    torchvision.models.inception.Inception3.load_state_dict = orig_sd
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, t in net.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if name.endswith('conv.weight'):
        fan_in = t[0].numel()
        t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      elif name.endswith('bn.weight') or name.endswith('running_var'):
        t.copy_(0.5 + torch.rand(t.shape, generator=gen))
      elif name.endswith('bn.bias') or name.endswith('running_mean'):
        t.copy_(0.1 * torch.randn(t.shape, generator=gen))
      elif name == 'fc.weight':
        t.copy_(torch.randn(t.shape, generator=gen) / t.shape[1] ** 0.5)
      elif name == 'fc.bias':
        t.copy_(0.1 * torch.randn(t.shape, generator=gen))
  orig_fn = pfi.fid_inception_v3
  pfi.fid_inception_v3 = lambda: net
  try:
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  finally:
    pfi.fid_inception_v3 = orig_fn
  model.eval()
  net.eval()
  return model, net


def test_port_matches_pytorch_fid(torch_fid):
  model, net = torch_fid
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)  # NHWC, [0,1]
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    pool = model(x)[0]                       # [B, 2048, 1, 1]
    ref_pool = pool.flatten(1)
    ref_logits = net.fc(ref_pool)            # Inception3: fc(flatten(pool))
  ref_pool, ref_logits = ref_pool.numpy(), ref_logits.numpy()
  variables = inception.convert_state_dict(
      {k: v.numpy() for k, v in net.state_dict().items()})
  ours_pool, ours_logits = inception.InceptionExtractor(variables)(images)
  assert ours_pool.shape == (2, 2048) and ours_logits.shape == (2, 1008)
  # Features of O(1) size (the test's weights keep activations from
  # vanishing), so the 1e-4 bound is a real test.
  assert 0.1 < np.abs(ref_pool).mean() < 100
  np.testing.assert_allclose(ours_pool, ref_pool, rtol=0, atol=1e-4)
  np.testing.assert_allclose(ours_logits, ref_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize('in_size', [28, 32, 500])
def test_resize_matches_torch_interpolate(in_size):
  f = torch.nn.functional
  rng = np.random.default_rng(in_size)
  img = rng.uniform(size=(1, in_size, in_size, 1)).astype(np.float32)
  ref = f.interpolate(torch.from_numpy(img.transpose(0, 3, 1, 2).copy()),
                      size=(299, 299), mode='bilinear', align_corners=False)
  ref = 2 * ref.numpy().transpose(0, 2, 3, 1) - 1
  ours = np.asarray(inception.preprocess(img))
  assert ours.shape == (1, 299, 299, 3)
  for c in range(3):  # grey → RGB
    np.testing.assert_allclose(ours[..., c:c + 1], ref, atol=1e-5)


def test_converter_rejects_other_networks():
  with pytest.raises(ValueError, match='not pytorch-fid'):
    inception.convert_state_dict({'Conv2d_1a_3x3.conv.weight':
                                  np.zeros((32, 3, 3, 3))})


def test_npz_round_trip(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32),
      jax.eval_shape(inception.init_variables))
  path = str(tmp_path / 'w.npz')
  inception.save_variables(path, variables)
  loaded = inception.load_variables(path)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_load_variables_reads_a_pth_file(torch_fid, tmp_path, monkeypatch,
                                         zip_format):
  """The user-facing path: pytorch-fid's weights saved by torch.save (in
  either of its formats), read without torch, identical to torch.load's."""
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  _, net = torch_fid
  path = str(tmp_path / inception.FID_WEIGHTS_FILE)
  torch.save(net.state_dict(), path,
             _use_new_zipfile_serialization=zip_format)
  want = inception.convert_state_dict(
      {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()})
  monkeypatch.setitem(sys.modules, 'torch', None)  # torch unavailable.
  loaded = inception.load_variables(path)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Cached next to a downloaded file as .npz, so torch is needed once.
  cache = str(tmp_path)
  ext = inception.extractor_from_weights('', cache)
  assert os.path.exists(os.path.join(
      cache, inception.FID_WEIGHTS_FILE[:-4] + '.npz'))
  np.testing.assert_array_equal(
      np.asarray(jax.tree.leaves(ext.variables)[0]),
      np.asarray(jax.tree.leaves(want)[0]))
