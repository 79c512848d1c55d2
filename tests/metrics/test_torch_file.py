"""torch_file.load (no torch) against torch.load, on both torch.save formats."""

import collections
import io
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from fedjax_diff.metrics import torch_file

# The torch references: run on Python 3.11 too (tests/conftest.py).
pytestmark = pytest.mark.py311


def _state_dict(torch):
  """Tensors of every layout torch.save writes: views with an offset and
  strides into a shared storage, a transpose, a 0-d and an empty tensor,
  several dtypes, a Parameter, and a module's state dict (_metadata)."""
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 10, generator=gen)
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  sd = net.state_dict()
  sd.update(collections.OrderedDict(
      view=base[1:4, 2:7], transposed=base.t(), column=base[:, 3],
      scalar=torch.tensor(3, dtype=torch.int64), empty=torch.zeros(0, 3),
      half=torch.randn(5, generator=gen).half(),
      double=torch.randn(2, 2, generator=gen, dtype=torch.float64),
      ints=torch.arange(7, dtype=torch.int32), small=torch.arange(
          -3, 3, dtype=torch.int8), bytes=torch.arange(4, dtype=torch.uint8),
      mask=torch.tensor([True, False, True]),
      param=torch.nn.Parameter(torch.randn(2, generator=gen))))
  return sd


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_identical_to_torch_load(zip_format, monkeypatch):
  torch = pytest.importorskip(
      'torch', reason='the reference is torch.load (torch is in the test '
      'extra on Python 3.11 only; see setup.py)')
  sd = _state_dict(torch)
  buf = io.BytesIO()
  torch.save(sd, buf, _use_new_zipfile_serialization=zip_format)
  buf.seek(0)
  want = torch.load(buf, weights_only=True)
  buf.seek(0)
  monkeypatch.setitem(sys.modules, 'torch', None)  # no torch from here on.
  got = torch_file.load(buf)
  assert isinstance(got, collections.OrderedDict)
  assert list(got) == list(want)
  assert got._metadata == want._metadata  # pylint: disable=protected-access
  for name, ref in want.items():
    ref = ref.detach().numpy()
    assert got[name].dtype == ref.dtype, name
    assert got[name].shape == ref.shape, name
    np.testing.assert_array_equal(got[name], ref, err_msg=name)
    assert got[name].flags.writeable and got[name].flags.c_contiguous


def _legacy_stream(obj_bytes: bytes) -> io.BytesIO:
  head = b''.join(pickle.dumps(x) for x in (
      0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}))
  return io.BytesIO(head + obj_bytes + pickle.dumps([]))


class _Evil:

  def __reduce__(self):
    import os  # pylint: disable=g-import-not-at-top
    return (os.system, ('echo pwned',))


def test_refuses_code_in_legacy_file():
  with pytest.raises(pickle.UnpicklingError, match='posix.system|os.system'):
    torch_file.load(_legacy_stream(pickle.dumps(_Evil())))


def test_refuses_code_in_zip_file():
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('archive/data.pkl', pickle.dumps({'w': _Evil()}))
    z.writestr('archive/byteorder', 'little')
  buf.seek(0)
  with pytest.raises(pickle.UnpicklingError, match='not part of a tensor'):
    torch_file.load(buf)


def test_reads_a_hand_written_zip_file(monkeypatch):
  """The zip layout written by hand (no torch): a 2×3 float32 tensor with
  stride (1, 2) at offset 1 of its storage."""
  # Stand-in modules, so the pickler names torch's globals without torch.
  fake_torch = types.ModuleType('torch')
  fake_utils = types.ModuleType('torch._utils')
  monkeypatch.setitem(sys.modules, 'torch', fake_torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', fake_utils)

  class Storage:  # pickled as the global torch.FloatStorage
    __module__, __qualname__ = 'torch', 'FloatStorage'

  class Rebuild:  # pickled as the global torch._utils._rebuild_tensor_v2
    __module__, __qualname__ = 'torch._utils', '_rebuild_tensor_v2'

  fake_torch.FloatStorage = Storage
  fake_utils._rebuild_tensor_v2 = Rebuild  # pylint: disable=protected-access

  class Tensor:

    def __reduce__(self):
      return (Rebuild, (_Pid(), 1, (2, 3), (1, 2), False,
                        collections.OrderedDict()))

  class _Pid:
    pass

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if isinstance(obj, _Pid):
        return ('storage', Storage, '0', 'cpu', 7)
      return None

  storage = np.arange(7, dtype='<f4')
  buf = io.BytesIO()
  data = io.BytesIO()
  Pickler(data, protocol=2).dump(collections.OrderedDict(w=Tensor()))
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('archive/data.pkl', data.getvalue())
    z.writestr('archive/byteorder', 'little')
    z.writestr('archive/data/0', storage.tobytes())
  buf.seek(0)
  got = torch_file.load(buf)['w']
  np.testing.assert_array_equal(got, [[1, 3, 5], [2, 4, 6]])
  assert got.dtype == np.float32


def test_truncated_legacy_storage_is_an_error():
  torch = pytest.importorskip(
      'torch', reason='torch.save writes the file (torch is in the test '
      'extra on Python 3.11 only; see setup.py)')
  buf = io.BytesIO()
  torch.save({'w': torch.ones(100)}, buf, _use_new_zipfile_serialization=False)
  raw = buf.getvalue()
  with pytest.raises(pickle.UnpicklingError, match='truncated'):
    torch_file.load(io.BytesIO(raw[:-8]))
  assert struct.unpack('<q', raw[-408:-400]) == (100,)  # the layout read.
