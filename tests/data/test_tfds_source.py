"""Tests of the TFDS reader, on mocked data (no download, no network)."""

# pylint: disable=protected-access

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fedjax_diff import data
from fedjax_diff.data import tfds_source

N = 5


@pytest.fixture(name='mock_tfds')
def _mock_tfds():
  with tfds.testing.mock_data(num_examples=N):
    yield


@pytest.mark.usefixtures('mock_tfds')
class TestMocked:

  def test_mnist_via_load_dataset(self, tmp_path):
    ds = data.load_dataset('mnist', 'train', data_dir=str(tmp_path))
    assert ds.images.shape == (N, 28, 28, 1)
    assert ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.labels.shape == (N,)
    assert ds.num_classes == 10
    assert ds.labels.min() >= 0 and ds.labels.max() < 10
    assert ds.name == 'mnist' and ds.attributes is None
    resized = tfds_source.load('mnist', 'test', str(tmp_path), image_size=32)
    assert resized.images.shape == (N, 32, 32, 1)

  def test_cifar10(self, tmp_path):
    ds = tfds_source.load('cifar10', 'test', str(tmp_path))
    assert ds.images.shape == (N, 32, 32, 3)
    assert ds.images.dtype == np.uint8
    assert ds.num_classes == 10

  def test_celeb_a(self, tmp_path):
    ds = tfds_source.load('celeb_a', 'train', str(tmp_path))
    assert ds.images.shape == (N, 64, 64, 3)
    assert ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, np.zeros(N, np.int32))
    assert ds.num_classes == 1
    assert len(ds.attributes) == 40
    for key in ('Smiling', 'Male', 'Young', 'Eyeglasses'):
      assert ds.attributes[key].shape == (N,)
      assert ds.attributes[key].dtype == bool
    small = tfds_source.load('celeb_a', 'validation', str(tmp_path),
                             image_size=32)
    assert small.images.shape == (N, 32, 32, 3)
    sub = small.subset([0, 2])
    assert sub.attributes['Smiling'].shape == (2,)


def _apply(name, image, size):
  spec = tfds_source._SPECS[name]
  fn = tfds_source._make_image_fn(spec, size, image.shape)
  return fn(tf.constant(image)).numpy()


def test_celeb_a_central_crop_geometry():
  # White exactly on the central 140x140 square of a 218x178 image.
  image = np.zeros((218, 178, 3), np.uint8)
  top, left = (218 - 140) // 2, (178 - 140) // 2
  image[top:top + 140, left:left + 140] = 255
  out = _apply('celeb_a', image, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  assert out.min() == 255  # No pixel from outside the crop leaks in.
  # One pixel off: the border of the output darkens.
  shifted = np.roll(image, 1, axis=0)
  assert _apply('celeb_a', shifted, 64)[0].max() < 255


def test_lsun_shorter_side_then_center_crop():
  image = np.zeros((300, 200, 3), np.uint8)
  image[50:250] = 200  # The central 200x200 square.
  out = _apply('lsun/church_outdoor', image, 16)
  assert out.shape == (16, 16, 3)
  # The crop keeps the central square; only the outermost rows see the
  # black bands through the antialiasing kernel.
  assert out[1:-1].min() == 200
  assert out[0].max() < 200 and out[-1].max() < 200
  wide = _apply('lsun/church_outdoor', image.transpose(1, 0, 2), 16)
  assert wide.shape == (16, 16, 3)
  assert wide[:, 1:-1].min() == 200


@pytest.mark.parametrize('name', ['cifar10', 'celeb_a'])
def test_not_prepared_error(tmp_path, name):
  data_dir = str(tmp_path)
  with pytest.raises(tfds_source.DatasetNotPreparedError) as info:
    data.load_dataset(name, 'train', data_dir=data_dir)
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert repr(name) in message
  assert data_dir in message
  assert f'tfds build {name} --data_dir={data_dir}' in message
  assert (f"tfds.builder('{name}', data_dir='{data_dir}')"
          '.download_and_prepare()') in message
  if name == 'celeb_a':
    assert 'manual' in message.lower()
  assert not list(tmp_path.iterdir())  # Nothing was downloaded.


def test_progress_line(tmp_path, capsys):
  with tfds.testing.mock_data(num_examples=3):
    tfds_source.load('mnist', 'train', str(tmp_path), progress=True)
  err = capsys.readouterr().err
  assert 'mnist[train]: 3 images' in err and 'done' in err


def test_unknown_config():
  with pytest.raises(data.UnknownDatasetError, match='lsun/no_such'):
    data.load_dataset('lsun/no_such_config')


@pytest.mark.parametrize('expected', [None, 4, 7, 10])
def test_collector(expected):
  collector = tfds_source._Collector(expected)
  batches = [np.full((3, 2), i) for i in range(3)]
  for b in batches:
    collector.add(b)
  np.testing.assert_array_equal(collector.result(), np.concatenate(batches))
