"""Image datasets read from TensorFlow Datasets (TFDS), never downloaded here.

`load` reads a split that has already been prepared in a TFDS data_dir, applies
the per-dataset preprocessing of `_SPECS` inside the tf.data pipeline and
returns the whole split as a numpy `Dataset`. If the split is not prepared,
it raises `DatasetNotPreparedError` with the command that prepares it:
downloading is a deliberate, separate step (it needs the network, and for
CelebA and LSUN several GiB).

Preprocessing follows the usual diffusion-model practice:
  * CelebA (218x178): centre crop 140x140, then resize to 64x64, as in DDPM
    (Ho et al., 2020, arXiv 2006.11239) and DDIM (Song et al., 2021,
    arXiv 2010.02502) CelebA-64 experiments.
  * LSUN church_outdoor (Yu et al., 2015, arXiv 1506.03365): resize the
    shorter side to the target size, then centre crop to a square (256x256
    by default, as in DDPM).
  * MNIST, Fashion-MNIST, CIFAR-10/100: kept at native size unless
    `image_size` is given.
All resizes are antialiased bilinear (`tf.image.resize(..., antialias=True)`)
and rounded back to uint8.
"""

import dataclasses
import sys
import time
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fedjax_diff.data import dataset as dataset_lib

# Datasets larger than this print a progress line while being read.
_PROGRESS_MIN_EXAMPLES = 20_000
# Target bytes of decoded images per tf.data batch while reading.
_BATCH_BYTES = 32 * 2**20


# Defined with the dataset type so that callers can catch them without
# importing TensorFlow.
DatasetNotPreparedError = dataset_lib.DatasetNotPreparedError
UnknownDatasetError = dataset_lib.UnknownDatasetError


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How to turn one TFDS dataset into a `Dataset`.

  Attributes:
    label_key: feature holding the class label; None for unlabelled data,
      whose labels are all 0 (and num_classes 1).
    center_crop: side of a central square crop taken before resizing.
    resize_shorter_side: resize so that the shorter side equals the target
      size, then centre crop a square (for images of varying shape).
    default_size: target side when `image_size` is not given; None keeps the
      native size.
    attributes_key: feature holding a dict of per-example attributes.
    download_note: extra advice printed when the dataset is not prepared.
  """
  label_key: Optional[str] = 'label'
  center_crop: Optional[int] = None
  resize_shorter_side: bool = False
  default_size: Optional[int] = None
  attributes_key: Optional[str] = None
  download_note: str = ''


_CELEB_A_NOTE = (
    'celeb_a is fetched from Google Drive, which often refuses automated '
    'downloads (quota exceeded). If the build fails, download the five files '
    'listed in tensorflow_datasets/datasets/celeb_a/checksums.tsv '
    '(img_align_celeba.zip, list_eval_partition.txt, list_attr_celeba.txt, '
    'list_landmarks_align_celeba.txt, identity_CelebA.txt) by hand into '
    '{data_dir}/downloads/manual/ and run the command again.')
_LSUN_NOTE = (
    'lsun is fetched from http://dl.yf.io/lsun (about 2.3 GiB for '
    'church_outdoor), which is frequently offline, and reading its LMDB '
    'files needs the tensorflow-io package at build time. If the download '
    'fails, fetch church_outdoor_train_lmdb.zip and '
    'church_outdoor_val_lmdb.zip by hand (e.g. with the download script of '
    'github.com/fyu/lsun) into {data_dir}/downloads/manual/ and run the '
    'command again.')

# Per-dataset preprocessing. Names not listed here are read generically:
# the 'image' feature at native size and the 'label' feature if present.
_SPECS = {
    'mnist': _Spec(),
    'fashion_mnist': _Spec(),
    'cifar10': _Spec(),
    'cifar100': _Spec(),
    'celeb_a': _Spec(label_key=None, center_crop=140, default_size=64,
                     attributes_key='attributes',
                     download_note=_CELEB_A_NOTE),
    'lsun/church_outdoor': _Spec(label_key=None, resize_shorter_side=True,
                                 default_size=256,
                                 download_note=_LSUN_NOTE),
}

SUPPORTED_NAMES = tuple(_SPECS)


def prepare_commands(name: str, data_dir: str) -> tuple[str, str]:
  """The shell commands that download and prepare `name` in `data_dir`."""
  cli = f'tfds build {name} --data_dir={data_dir}'
  python = ('python -c "import tensorflow_datasets as tfds; '
            f"tfds.builder('{name}', data_dir='{data_dir}')"
            '.download_and_prepare()"')
  return cli, python


def _not_prepared_message(name: str, builder) -> str:
  data_dir = str(builder.data_dir_root)
  cli, python = prepare_commands(name, data_dir)
  lines = [
      f'TFDS dataset {name!r} is not prepared in data_dir {data_dir!r} '
      f'(looked for {builder.data_path}).',
      'fedjax_diff never downloads inside load(); prepare the dataset once '
      'with:',
      f'  {cli}',
      'or',
      f'  {python}',
  ]
  spec = _SPECS.get(_base_name(name))
  if spec is not None and spec.download_note:
    lines.append('Manual download may be needed: ' +
                 spec.download_note.format(data_dir=data_dir))
  return '\n'.join(lines)


def _base_name(name: str) -> str:
  """'cifar10:3.0.2' -> 'cifar10' (drops a version suffix)."""
  return name.split(':', 1)[0]


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _central_crop(image: tf.Tensor, height, width) -> tf.Tensor:
  shape = tf.shape(image)
  top = (shape[0] - height) // 2
  left = (shape[1] - width) // 2
  return tf.image.crop_to_bounding_box(image, top, left, height, width)


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  resized = tf.image.resize(image, tf.stack([height, width]),
                            method='bilinear', antialias=True)
  return _to_uint8(resized)


def _make_image_fn(spec: _Spec, size: Optional[int], static_shape):
  """Returns the per-image preprocessing function (uint8 -> uint8)."""

  def fn(image: tf.Tensor) -> tf.Tensor:
    if spec.center_crop is not None:
      image = _central_crop(image, spec.center_crop, spec.center_crop)
    if size is None:
      return image
    if spec.resize_shorter_side:
      shape = tf.shape(image)
      h = tf.cast(shape[0], tf.float32)
      w = tf.cast(shape[1], tf.float32)
      scale = size / tf.minimum(h, w)
      new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
      new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
      return _central_crop(_resize(image, new_h, new_w), size, size)
    side = spec.center_crop
    if side is None and static_shape[0] == static_shape[1]:
      side = static_shape[0]
    if side is not None and side == size:
      return image  # Already the requested size.
    return _resize(image, size, size)

  return fn


def _expected_count(builder, split: str) -> Optional[int]:
  try:
    count = int(builder.info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except
    return None  # Unknown (e.g. under tfds.testing.mock_data).
  return count or None


class _Progress:
  """A progress line on stderr for long reads.

  On a terminal the line is rewritten in place; in logs a line is written
  at every 10% (or every 50 batches when the total is unknown), and always
  once at the end.
  """

  def __init__(self, label: str, total: Optional[int], enabled: bool):
    self._label = label
    self._total = total
    self._enabled = enabled
    self._tty = enabled and sys.stderr.isatty()
    self._start = time.monotonic()
    self._next_frac = 0.1
    self._calls = 0
    self._done = 0

  def _line(self) -> str:
    elapsed = time.monotonic() - self._start
    if self._total:
      return (f'{self._label}: {self._done:,}/{self._total:,} images '
              f'({100 * self._done / self._total:5.1f}%), {elapsed:.0f}s')
    return f'{self._label}: {self._done:,} images, {elapsed:.0f}s'

  def update(self, done: int):
    """Reports that `done` examples have been read so far."""
    if not self._enabled:
      return
    self._done = done
    self._calls += 1
    if self._tty:
      sys.stderr.write('\r' + self._line())
    elif self._total:
      if done / self._total < self._next_frac:
        return
      self._next_frac = np.floor(done / self._total * 10 + 1) / 10
      if done < self._total:  # The last line is written by `close`.
        sys.stderr.write(self._line() + '\n')
    elif self._calls % 50 == 0:
      sys.stderr.write(self._line() + '\n')
    sys.stderr.flush()

  def close(self):
    if not self._enabled:
      return
    sys.stderr.write(('\r' if self._tty else '') + self._line() + ' done\n')
    sys.stderr.flush()


class _Collector:
  """Concatenates batches of arrays, preallocating when the count is known."""

  def __init__(self, expected: Optional[int]):
    self._expected = expected
    self._chunks = []
    self._buffer = None
    self._count = 0

  def add(self, batch: np.ndarray):
    n = batch.shape[0]
    if self._buffer is None and self._expected and not self._chunks:
      self._buffer = np.empty((self._expected,) + batch.shape[1:],
                              batch.dtype)
    if self._buffer is not None and self._count + n <= self._buffer.shape[0]:
      self._buffer[self._count:self._count + n] = batch
    else:
      if self._buffer is not None:  # More examples than announced.
        self._chunks.append(self._buffer[:self._count])
        self._buffer = None
      self._chunks.append(batch)
    self._count += n

  def result(self, empty_shape=(0,), dtype=np.uint8) -> np.ndarray:
    if self._buffer is not None:
      out = self._buffer
      return out if self._count == out.shape[0] else out[:self._count].copy()
    if not self._chunks:
      return np.zeros(empty_shape, dtype)
    return np.concatenate(self._chunks, axis=0)


def load(name: str,
         split: str,
         data_dir: Optional[str] = None,
         *,
         image_size: Optional[int] = None,
         progress: Optional[bool] = None) -> dataset_lib.Dataset:
  """Reads a prepared TFDS image dataset into memory.

  Args:
    name: TFDS name, optionally with a config and version, e.g. 'cifar10',
      'celeb_a', 'lsun/church_outdoor'. The names in `SUPPORTED_NAMES` get
      their own preprocessing; other image datasets are read from their
      'image' (and, if present, 'label') features, at native size, or for
      images of varying size resized (shorter side) and centre-cropped to
      `image_size`, which is then required.
    split: TFDS split string, e.g. 'train', 'test', 'train[:10%]'.
    data_dir: TFDS data directory; None uses TFDS's default
      (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    image_size: side of the square output images; None uses the dataset's
      default (64 for celeb_a, 256 for lsun, native size otherwise).
    progress: print a progress line on stderr; None prints one for splits
      of more than 20,000 examples.

  Returns:
    The split as a `Dataset` (uint8 images, int32 labels; labels are 0 and
    num_classes 1 for unlabelled datasets; CelebA's 40 boolean attributes in
    `attributes`).

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in the data_dir. The
      message names the directory searched and the command to prepare it.
    UnknownDatasetError: TFDS has no dataset of that name.
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UnknownDatasetError(f'TFDS has no dataset named {name!r}.') from e
  except ValueError as e:  # E.g. an unknown builder config: 'lsun/nope'.
    raise UnknownDatasetError(
        f'TFDS cannot build {name!r}: {str(e).splitlines()[0]}') from e
  base = _base_name(name)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as e:
    # TFDS asserts that its data directory exists before reading.
    if not builder.data_path.exists():
      raise DatasetNotPreparedError(_not_prepared_message(base, builder)) from e
    raise

  features = builder.info.features
  spec = _SPECS.get(base)
  if spec is None:
    if 'image' not in features:
      raise ValueError(f'TFDS dataset {name!r} has no "image" feature; '
                       f'supported datasets: {", ".join(SUPPORTED_NAMES)}.')
    varying = None in tuple(features['image'].shape[:2])
    spec = _Spec(label_key='label' if 'label' in features else None,
                 resize_shorter_side=varying)
  if spec.label_key is not None:
    num_classes = getattr(features[spec.label_key], 'num_classes', None)
    if not num_classes:
      raise ValueError(f'The {spec.label_key!r} feature of TFDS dataset '
                       f'{name!r} is not a ClassLabel.')
    num_classes = int(num_classes)
  else:
    num_classes = 1
  size = image_size if image_size is not None else spec.default_size
  if size is not None and size < 1:
    raise ValueError(f'image_size must be positive, got {size}.')
  if size is None and None in tuple(features['image'].shape[:2]):
    raise ValueError(f'TFDS dataset {name!r} has images of varying size; '
                     'pass image_size.')
  image_fn = _make_image_fn(spec, size, features['image'].shape)

  def select(example):
    out = {'image': image_fn(example['image'])}
    if spec.label_key is not None:
      out['label'] = tf.cast(example[spec.label_key], tf.int32)
    if spec.attributes_key is not None:
      out['attributes'] = example[spec.attributes_key]
    return out

  # Batch size from the output image size, to bound the memory per batch.
  out_shape = features['image'].shape
  if size is not None:
    out_shape = (size, size, out_shape[-1])
  pixels = int(np.prod([d if d else 256 for d in out_shape]))
  batch_size = int(np.clip(_BATCH_BYTES // pixels, 32, 8192))
  ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True).batch(batch_size).prefetch(2)

  expected = _expected_count(builder, split)
  if progress is None:
    progress = bool(expected and expected > _PROGRESS_MIN_EXAMPLES)
  reporter = _Progress(f'{name}[{split}]', expected, progress)
  images = _Collector(expected)
  labels = _Collector(expected)
  attributes = {}
  count = 0
  for batch in tfds.as_numpy(ds):
    images.add(batch['image'])
    if 'label' in batch:
      labels.add(batch['label'])
    for key, value in batch.get('attributes', {}).items():
      attributes.setdefault(key, _Collector(expected)).add(np.asarray(value))
    count += batch['image'].shape[0]
    reporter.update(count)
  reporter.close()

  image_array = images.result(
      empty_shape=(0,) + tuple(d or 1 for d in out_shape))
  if spec.label_key is not None:
    label_array = labels.result(dtype=np.int32).astype(np.int32, copy=False)
  else:
    label_array = np.zeros(image_array.shape[0], np.int32)
  attribute_arrays = None
  if spec.attributes_key is not None:
    attribute_arrays = {k: v.result(dtype=bool) for k, v in attributes.items()}
  return dataset_lib.Dataset(images=image_array, labels=label_array,
                             num_classes=num_classes, name=name,
                             attributes=attribute_arrays)
