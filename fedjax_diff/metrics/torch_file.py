"""Reads a PyTorch state dict file (`torch.save`) into numpy, without torch.

pytorch-fid publishes the FID Inception weights as a `.pth` file. Reading it
must not need PyTorch at run time (a TPU VM has none). Both of `torch.save`'s
formats are pickles whose tensors point at raw storage bytes:

* the zip format (PyTorch >= 1.6): a zip archive holding `<name>/data.pkl`
  (the pickled object), `<name>/data/<key>` (each storage's raw bytes) and
  `<name>/byteorder`;
* the legacy format: consecutive pickles in one stream (magic number,
  protocol version, system info, the object, the list of storage keys), then
  each storage as an int64 element count followed by its raw bytes.

In both, a tensor is pickled as `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` and a storage as a persistent id
`('storage', torch.<Type>Storage, key, location, numel[, view])`. The
unpickler here is restricted: it resolves only those names (plus
`collections.OrderedDict` and `torch._utils._rebuild_parameter`) to numpy
equivalents, and refuses every other global, so a file cannot run code the
way an unrestricted `pickle.load` would let it.
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype (little-endian on disk).
_STORAGE_DTYPES = {
    'DoubleStorage': '<f8', 'FloatStorage': '<f4', 'HalfStorage': '<f2',
    'BFloat16Storage': None,  # no numpy dtype; refused with a clear error
    'LongStorage': '<i8', 'IntStorage': '<i4', 'ShortStorage': '<i2',
    'CharStorage': 'i1', 'ByteStorage': 'u1', 'BoolStorage': '?',
}


class _StorageType:
  """Stands for `torch.<Name>Storage` in a persistent id."""

  def __init__(self, name: str):
    self.name = name
    dtype = _STORAGE_DTYPES[name]
    if dtype is None:
      raise pickle.UnpicklingError(
          f'torch.{name} has no numpy dtype; convert the file with torch '
          '(tensor.float()) first.')
    self.dtype = np.dtype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2 on a numpy storage: the view
  `storage[offset:]` with `size` and element `stride`, copied."""
  del unused  # requires_grad, backward hooks, metadata.
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[storage_offset])
  itemsize = storage.dtype.itemsize
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if min(size) > 0 and last >= storage.size:
    raise pickle.UnpicklingError(
        f'a tensor of size {size} and stride {stride} at offset '
        f'{storage_offset} reads past its storage of {storage.size} elements.')
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view, order='C')


def _rebuild_parameter(data, requires_grad, backward_hooks, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only the names a state dict needs.

  `storage(key, dtype, numel, view)` gives the storage of a persistent id;
  `rebuild(storage, offset, size, stride, ...)` makes a tensor of it.
  """

  def __init__(self, file: BinaryIO, storage, rebuild=_rebuild_tensor_v2):
    super().__init__(file)
    self._storage = storage
    self._globals = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch._utils', '_rebuild_tensor_v2'): rebuild,
        ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f'{module}.{name} is not part of a tensor state dict; refusing to '
        'load it without torch (only tensors, storages and OrderedDict are '
        'read).')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and
            pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unknown persistent id {pid!r}.')
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unknown storage type {storage_type!r}.')
    view = pid[5] if len(pid) > 5 else None  # legacy: (key, offset, size)
    return self._storage(str(key), storage_type.dtype, int(numel), view)


def _load_zip(f: BinaryIO) -> Any:
  with zipfile.ZipFile(f) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith('data.pkl')]
    if len(pkl) != 1:
      raise pickle.UnpicklingError(
          f'a torch zip file holds one */data.pkl; found {pkl}.')
    prefix = pkl[0][:-len('data.pkl')]
    order = prefix + 'byteorder'
    if order in names and z.read(order).decode().strip() != 'little':
      raise pickle.UnpicklingError('only little-endian torch files are read.')
    cache = {}

    def storage(key, dtype, numel, view):
      del view  # The zip format has no storage views.
      if key not in cache:
        raw = z.read(f'{prefix}data/{key}')
        if len(raw) < numel * dtype.itemsize:
          raise pickle.UnpicklingError(
              f'storage {key} holds {len(raw)} bytes; {numel} elements of '
              f'{dtype} need {numel * dtype.itemsize}.')
        cache[key] = np.frombuffer(raw, dtype, count=numel)
      return cache[key]

    return _Unpickler(io.BytesIO(z.read(pkl[0])), storage).load()


class _Deferred:
  """A legacy-format tensor: its storage's bytes follow the pickle, so it is
  rebuilt once they are read (`_resolve`)."""

  def __init__(self, storage, args):
    self.storage, self.args = storage, args  # storage: (key, view)


def _load_legacy(f: BinaryIO) -> Any:
  plain = lambda: pickle.Unpickler(f).load()
  if plain() != _LEGACY_MAGIC:
    raise pickle.UnpicklingError('not a torch.save file (bad magic number).')
  if plain() != _LEGACY_PROTOCOL:
    raise pickle.UnpicklingError('unknown torch.save protocol version.')
  sys_info = plain()
  if not isinstance(sys_info, dict) or not sys_info.get('little_endian',
                                                         True):
    raise pickle.UnpicklingError('only little-endian torch files are read.')
  dtypes = {}

  def storage(key, dtype, numel, view):
    dtypes[key] = (dtype, numel)
    return key, view

  result = _Unpickler(f, storage,
                      rebuild=lambda s, *args: _Deferred(s, args)).load()
  storages = {}
  for key in plain():
    dtype, numel = dtypes[key]
    (count,) = struct.unpack('<q', f.read(8))
    raw = f.read(count * dtype.itemsize)
    if count < numel or len(raw) != count * dtype.itemsize:
      raise pickle.UnpicklingError(f'storage {key} is truncated.')
    storages[key] = np.frombuffer(raw, dtype)
  return _resolve(result, storages)


def _resolve(obj, storages):
  """`obj` with its deferred tensors rebuilt from `storages`."""
  if isinstance(obj, _Deferred):
    key, view = obj.storage
    array = storages[key]
    if view is not None:
      _, offset, size = view
      array = array[offset:offset + size]
    return _rebuild_tensor_v2(array, *obj.args)
  if isinstance(obj, dict):
    out = type(obj)((k, _resolve(v, storages)) for k, v in obj.items())
    if hasattr(obj, '__dict__'):  # e.g. a state dict's _metadata
      out.__dict__.update(obj.__dict__)
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages) for v in obj)
  return obj


def load(path_or_file) -> Any:
  """The object a `torch.save` file holds, tensors as numpy arrays.

  Args:
    path_or_file: a path, or a binary file object open for reading.

  Returns:
    The unpickled object (for a state dict: an `OrderedDict` of name ->
    `np.ndarray`), each tensor copied out of its storage with its dtype,
    shape and values exactly as saved.

  Raises:
    pickle.UnpicklingError: not a torch.save file of tensors, or one that
      names anything else (code, modules, custom classes).
  """
  if not hasattr(path_or_file, 'read'):
    with open(path_or_file, 'rb') as f:
      return load(f)
  f = path_or_file
  start = f.tell()
  is_zip = zipfile.is_zipfile(f)
  f.seek(start)
  return _load_zip(f) if is_zip else _load_legacy(f)
