"""Shared machinery of the generative evaluators (not an evaluator itself).

  * `Generator`: evaluation samples from the global EMA model, drawn with the
    DDIM sampler (Song et al. 2021, arXiv 2010.02502; with `method`, DDPM or
    DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095) in jitted batches,
    with the same noise every round (`base.make_drawer`: decoded through the
    first stage in latent diffusion). Evaluators whose entries ask for the same
    samples (batch_size, num_steps, eta, guidance_scale, method) share the
    batches drawn in a round and one compiled sampler.
  * `features_from_config`: the feature space of FID and precision/recall,
    'classifier' (the project's digit classifier, seconds on CPU) or
    'inception' (the FID Inception-v3, `fedjax_diff.metrics.inception`).
  * `reference_data`: the real split that generated images are compared
    with, loaded once per process.

Entry fields read here (all optional; `FIELDS`, checked by `base.parse`):
num_samples (1000), batch_size (250),
method ('ddim'; or 'ddpm', 'dpm_solver++'), num_steps (50), eta (0.0; DDIM
only), guidance_scale (1.0, a class-conditional model draws classes 0, 1, …,
C−1, 0, … as evaluators/samples.py does), features ('classifier'), cache_dir
($FEDJAX_DIFF_CACHE or ~/.cache/fedjax_diff), classifier_dataset (the run's
dataset), inception_weights (path of pytorch-fid's .pth or a converted .npz;
empty: downloaded), reference_split ('train'), data_dir, image_size (of a
TFDS reference split; default: the run's config.json in the workdir).
"""

import dataclasses
import json
from typing import Any, Callable, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff import data as data_lib
from fedjax_diff.evaluators import base
from fedjax_diff.evaluators.base import EvalContext
from fedjax_diff.evaluators.base import evaluated_params
from fedjax_diff.evaluators.base import make_drawer
from fedjax_diff.metrics import mnist_classifier

_LAST_DRAW: dict = {}
_REFERENCE: dict = {}
_FEATURES: dict = {}


# The fields of a generative evaluator's entry (`base.parse`).
FIELDS = {
    'every_rounds': base.EVERY_ROUNDS,
    'num_samples': base.Field(1000, 'int', low=2),
    'batch_size': base.Field(250, 'int', low=1),
    'method': base.Field('ddim', 'str',
                         choices=('ddim', 'ddpm', 'dpm_solver++')),
    'num_steps': base.Field(50, 'int', low=1),
    'eta': base.Field(0.0, 'float', low=0.0),
    'guidance_scale': base.Field(1.0, 'float'),
    'features': base.Field('classifier', 'str',
                           choices=('classifier', 'inception')),
    'cache_dir': base.Field(None, 'path'),
    'classifier_dataset': base.Field(None, 'path'),
    'inception_weights': base.Field(None, 'path'),
    'inception_batch_size': base.Field(50, 'int', low=1),
    'reference_split': base.Field('train', 'str'),
    'data_dir': base.Field(None, 'path'),
    'image_size': base.Field(None, 'int', low=1, optional=True),
}


class Generator:
  """Draws the evaluation samples of an entry (in [−1, 1], NHWC); `cfg` is
  the entry parsed with `FIELDS`.

  Batch i of an entry is drawn from the key `fold_in(PRNGKey(seed +
  15485863), i)` with labels `(i·batch + j) mod C`, so it depends only on
  the sampler settings and the batch size, not on `num_samples`: entries
  with the same settings (the grid of evaluators/samples.py with fid's, say)
  share the batches drawn in a round instead of drawing them again, and an
  entry of n samples gets the first n of a longer draw.
  """

  def __init__(self, cfg, ctx: EvalContext):
    self.num_samples = int(cfg.num_samples)
    batch = min(int(cfg.batch_size), self.num_samples)
    method = str(cfg.method)
    num_steps = int(cfg.num_steps)
    eta = float(cfg.eta)
    scale = float(cfg.guidance_scale)
    self._batch = batch
    self._ctx = ctx
    self._key = (id(ctx), batch, method, num_steps, eta, scale)
    self._draw = make_drawer(ctx, batch, method=method, num_steps=num_steps,
                             eta=eta, guidance_scale=scale)
    self._num_batches = -(-self.num_samples // batch)
    self.labels = (None if ctx.num_classes is None else
                   np.arange(self._num_batches * batch) % ctx.num_classes)
    self._rng = jax.random.PRNGKey(ctx.seed + 15485863)

  def __call__(self, state, round_idx: int) -> np.ndarray:
    params = evaluated_params(state, self._ctx)
    last = _LAST_DRAW.get(self._key)
    if last is None or last[0] != round_idx or last[1] is not params:
      last = (round_idx, params, [], {})  # a new round: nothing to share.
      _LAST_DRAW[self._key] = last
    _, _, batches, outputs = last
    if self.num_samples not in outputs:
      for i in range(len(batches), self._num_batches):
        labels = (None if self.labels is None else
                  jnp.asarray(self.labels[i * self._batch:(i + 1) *
                                          self._batch]))
        batches.append(np.asarray(self._draw(
            params, jax.random.fold_in(self._rng, i), labels)))
      outputs[self.num_samples] = np.concatenate(
          batches[:self._num_batches])[:self.num_samples]
    return outputs[self.num_samples]


def cache_dir(cfg) -> str:
  return cfg.cache_dir or mnist_classifier.default_cache_dir()


def _run_data_config(ctx: EvalContext) -> dict:
  path = epath.Path(ctx.workdir) / 'config.json'  # local or gs://
  if not path.exists():
    return {}
  return json.loads(path.read_text()).get('data', {}) or {}


def reference_data(cfg, ctx: EvalContext) -> data_lib.Dataset:
  """The real split named by `reference_split` ('test': the run's test
  split, as the trainer loaded it)."""
  split = str(cfg.reference_split)
  if split == 'test':
    return ctx.test_data
  run = _run_data_config(ctx)
  data_dir = cfg.data_dir or run.get('data_dir')
  image_size = cfg.image_size or run.get('image_size')
  key = (ctx.test_data.name, split, data_dir, image_size)
  if key not in _REFERENCE:
    kwargs = {'image_size': int(image_size)} if image_size else {}
    _REFERENCE[key] = data_lib.load_dataset(ctx.test_data.name, split,
                                            data_dir, **kwargs)
  return _REFERENCE[key]


@dataclasses.dataclass
class Features:
  """`fn(images in [−1, 1]) -> (features [N, D], logits [N, K])`."""
  name: str          # 'classifier' or 'inception'
  key: str           # names the extractor in reference-statistics caches
  fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  classifier: Optional[Any] = None   # mnist_classifier.Classifier
  extractor: Optional[Any] = None    # inception.InceptionExtractor


def classifier_features(cfg, ctx: EvalContext) -> Features:
  dataset = cfg.classifier_dataset or ctx.test_data.name
  key = ('classifier', dataset, cache_dir(cfg))
  if key not in _FEATURES:
    try:
      clf = mnist_classifier.load_or_train(dataset, cache_dir(cfg))
    except Exception as e:
      raise ValueError(
          f'features=classifier trains a digit classifier on {dataset!r} '
          f'({e}). Use it with a labelled MNIST-like dataset (mnist5k, '
          'digits) or set features=inception.') from e
    if tuple(clf.image_shape) != tuple(ctx.image_shape):
      raise ValueError(f'the {dataset} classifier takes images of shape '
                       f'{clf.image_shape}; this run generates '
                       f'{ctx.image_shape}. Set classifier_dataset.')
    _FEATURES[key] = Features(
        'classifier', clf.cache_key,
        lambda x: clf.logits_and_features(x)[::-1], clf)
  return _FEATURES[key]


def inception_features(cfg, ctx: EvalContext) -> Features:
  del ctx
  from fedjax_diff.metrics import inception  # pylint: disable=g-import-not-at-top
  weights = cfg.inception_weights or ''
  key = ('inception', weights, cache_dir(cfg))
  if key not in _FEATURES:
    ext = inception.extractor_from_weights(
        weights, cache_dir(cfg), int(cfg.inception_batch_size))
    _FEATURES[key] = Features('inception', 'inception-2015-12-05',
                              lambda x: ext((np.asarray(x) + 1.0) / 2.0),
                              extractor=ext)
  return _FEATURES[key]


def features_from_config(cfg, ctx: EvalContext) -> Features:
  kind = str(cfg.features)
  if kind == 'classifier':
    return classifier_features(cfg, ctx)
  if kind == 'inception':
    return inception_features(cfg, ctx)
  raise ValueError(f'features={kind!r}; use "classifier" (digit classifier, '
                   'MNIST-like data) or "inception" (FID Inception-v3).')


def real_images(dataset: data_lib.Dataset) -> np.ndarray:
  """uint8 images → float32 in [−1, 1]."""
  return np.asarray(dataset.images, np.float32) / 127.5 - 1.0


def batched_features(features: Features, images_uint8: np.ndarray,
                     batch: int = 1000) -> np.ndarray:
  """Features of uint8 images, converted to [−1, 1] batch by batch."""
  out = []
  for s in range(0, len(images_uint8), batch):
    out.append(features.fn(
        np.asarray(images_uint8[s:s + batch], np.float32) / 127.5 - 1.0)[0])
  return np.concatenate(out)
