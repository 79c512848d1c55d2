"""The digit classifier: trains to a useful accuracy, caches, reloads."""

import numpy as np
import pytest

from fedjax_diff import data as data_lib
from fedjax_diff.metrics import mnist_classifier


def test_train_cache_and_reload(tmp_path):
  cache = str(tmp_path)
  clf = mnist_classifier.load_or_train('digits', cache_dir=cache, epochs=3,
                                       verbose=False)
  assert clf.accuracy > 0.85
  again = mnist_classifier.load_or_train('digits', cache_dir=cache, epochs=3,
                                         verbose=False)
  assert again.accuracy == clf.accuracy
  test = data_lib.load_dataset('digits', 'test')
  x = mnist_classifier.to_model_range(test.images)
  l1, f1 = clf.logits_and_features(x, batch_size=100)
  l2, f2 = again.logits_and_features(x)
  np.testing.assert_array_equal(l1, l2)
  np.testing.assert_array_equal(f1, f2)
  assert f1.shape == (len(x), 128)
  assert np.mean(l1.argmax(1) == test.labels) == pytest.approx(clf.accuracy)
  with pytest.raises(ValueError, match='takes images of shape'):
    clf.logits_and_features(np.zeros((1, 28, 28, 1)))
