"""A small CNN classifier of MNIST-like digits, for evaluating generators.

Trained by the project on a real training split (embedded `mnist5k` by
default, or `digits`), cached with its test accuracy, and used for

  * classifier-feature FID and precision/recall: its penultimate (128-d)
    activations play the role Inception's pool features play for natural
    images, at a cost of milliseconds on CPU;
  * class coverage: its predicted classes of generated samples.

Architecture (LeCun et al. 1998 style): conv3×3(16)–ReLU–maxpool2,
conv3×3(32)–ReLU–maxpool2, dense(128)–ReLU (the features), dense(C).
Trained with Adam (Kingma & Ba 2014, arXiv 1412.6980) on softmax
cross-entropy. Inputs are images in [−1, 1] (the diffusion model's range),
[B, H, W, C].
"""

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Optional

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_diff import data as data_lib

_VERSION = 1  # bump when the architecture or recipe changes (new cache key)


def default_cache_dir() -> str:
  """$FEDJAX_DIFF_CACHE, else ~/.cache/fedjax_diff."""
  return os.environ.get('FEDJAX_DIFF_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'fedjax_diff')


class SmallCNN(nn.Module):
  """Returns (logits [B, C], features [B, `features`])."""
  num_classes: int
  features: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), padding='SAME')(x))
    x = nn.max_pool(x, (2, 2), (2, 2), padding='SAME')
    x = nn.relu(nn.Conv(32, (3, 3), padding='SAME')(x))
    x = nn.max_pool(x, (2, 2), (2, 2), padding='SAME')
    x = x.reshape(x.shape[0], -1)
    feats = nn.relu(nn.Dense(self.features)(x))
    return nn.Dense(self.num_classes)(feats), feats


def to_model_range(images) -> np.ndarray:
  """uint8 images in 0..255 → float32 in [−1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


@dataclasses.dataclass
class Classifier:
  """A trained classifier: `logits_and_features(x)` on [B, H, W, C] in
  [−1, 1], jitted; `accuracy` on the test split it was checked on."""
  params: Any
  num_classes: int
  image_shape: tuple[int, int, int]
  accuracy: float
  dataset: str
  feature_dim: int = 128
  cache_key: str = ''  # names the recipe (file name of its cache entry)

  def __post_init__(self):
    model = SmallCNN(self.num_classes, self.feature_dim)
    self._apply = jax.jit(lambda p, x: model.apply({'params': p}, x))

  def logits_and_features(self, images, batch_size: int = 500):
    """(logits [N, C], features [N, D]) as numpy, in jitted batches."""
    x = np.asarray(images, np.float32)
    if tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f'the {self.dataset} classifier takes images of shape '
                       f'{self.image_shape}; got {x.shape[1:]}.')
    logits, feats = [], []
    for s in range(0, x.shape[0], batch_size):
      lo, fe = self._apply(self.params, jnp.asarray(x[s:s + batch_size]))
      logits.append(np.asarray(lo))
      feats.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(feats)


def _recipe(dataset, epochs, batch_size, learning_rate, seed, feature_dim):
  return dict(version=_VERSION, dataset=dataset, epochs=epochs,
              batch_size=batch_size, learning_rate=learning_rate, seed=seed,
              feature_dim=feature_dim)


def train(train_set: data_lib.Dataset, test_set: data_lib.Dataset, *,
          epochs: int = 3, batch_size: int = 64, learning_rate: float = 1e-3,
          seed: int = 0, feature_dim: int = 128) -> Classifier:
  """Trains `SmallCNN` on `train_set`; accuracy measured on `test_set`."""
  c = train_set.num_classes
  model = SmallCNN(c, feature_dim)
  x = to_model_range(train_set.images)
  y = np.asarray(train_set.labels)
  params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))['params']
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits, _ = model.apply({'params': p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  n = x.shape[0]
  bs = min(batch_size, n)
  for _ in range(epochs):
    perm = rng.permutation(n)
    for s in range(0, n - bs + 1, bs):
      idx = perm[s:s + bs]
      params, opt_state, _ = step(params, opt_state, jnp.asarray(x[idx]),
                                  jnp.asarray(y[idx]))
  clf = Classifier(params=params, num_classes=c,
                   image_shape=tuple(train_set.images.shape[1:]), accuracy=0.0,
                   dataset=train_set.name, feature_dim=feature_dim)
  logits, _ = clf.logits_and_features(to_model_range(test_set.images))
  clf.accuracy = float(np.mean(logits.argmax(1) == test_set.labels))
  return clf


def load_or_train(dataset: str = 'mnist5k', cache_dir: Optional[str] = None,
                  *, epochs: int = 3, batch_size: int = 64,
                  learning_rate: float = 1e-3, seed: int = 0,
                  feature_dim: int = 128, verbose: bool = True) -> Classifier:
  """The classifier of `dataset` from the cache, trained and cached if absent.

  The cache file name hashes the recipe (every argument but `cache_dir`), so
  a different recipe trains a new classifier. Files:
  `<cache_dir>/classifiers/<dataset>_<hash>.msgpack` (params) and `.json`
  (recipe, test accuracy, training seconds).
  """
  recipe = _recipe(dataset, epochs, batch_size, learning_rate, seed,
                   feature_dim)
  key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
  root = os.path.join(cache_dir or default_cache_dir(), 'classifiers')
  base = os.path.join(root, f'{dataset}_{key[:12]}')
  train_set = data_lib.load_dataset(dataset, 'train')
  shape = tuple(train_set.images.shape[1:])
  c = train_set.num_classes
  if os.path.exists(base + '.msgpack') and os.path.exists(base + '.json'):
    with open(base + '.json') as f:
      meta = json.load(f)
    template = SmallCNN(c, feature_dim).init(
        jax.random.PRNGKey(0), jnp.zeros((1,) + shape))['params']
    with open(base + '.msgpack', 'rb') as f:
      params = flax.serialization.from_bytes(template, f.read())
    return Classifier(params=params, num_classes=c, image_shape=shape,
                      accuracy=float(meta['test_accuracy']), dataset=dataset,
                      feature_dim=feature_dim,
                      cache_key=os.path.basename(base))
  t = time.perf_counter()
  clf = train(train_set, data_lib.load_dataset(dataset, 'test'),
              epochs=epochs, batch_size=batch_size,
              learning_rate=learning_rate, seed=seed, feature_dim=feature_dim)
  clf.cache_key = os.path.basename(base)
  seconds = time.perf_counter() - t
  if verbose and jax.process_index() == 0:
    print(f'Trained the {dataset} classifier in {seconds:.1f}s: test accuracy '
          f'{clf.accuracy:.4f}; cached in {base}.msgpack', flush=True)
  if jax.process_index() == 0:
    os.makedirs(root, exist_ok=True)
    tmp = f'{base}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
      f.write(flax.serialization.to_bytes(clf.params))
    os.replace(tmp, base + '.msgpack')
    with open(tmp, 'w') as f:
      json.dump({**recipe, 'test_accuracy': clf.accuracy,
                 'train_seconds': seconds}, f, indent=2)
    os.replace(tmp, base + '.json')
  return clf
