"""The generative evaluators (FID, precision/recall, class coverage) on the
tiny test model and the 8×8 digits, built through the evaluator contract."""

import pathlib
import types

import jax
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from fedjax_diff import data as data_lib
from fedjax_diff import evaluators as evaluators_lib
from fedjax_diff import models
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.evaluators import _generative
from fedjax_diff.metrics import class_coverage
from fedjax_diff.metrics import frechet
from fedjax_diff.metrics import mnist_classifier
from fedjax_diff.metrics import precision_recall


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = test_config.get_config()
  model = models.unet_from_config(config.model)
  params = jax.jit(lambda k: models.init_params(model, k, (8, 8, 1)))(
      jax.random.key(0, impl='rbg'))
  test = data_lib.load_dataset('digits', 'test')
  ctx = evaluators_lib.EvalContext(
      eps_fn=models.make_eps_fn(model),
      schedule=make_schedule('linear', config.diffusion.num_timesteps),
      test_data=test, image_shape=(8, 8, 1), num_classes=None,
      workdir=str(tmp_path_factory.mktemp('wd')), seed=0,
      write_images=lambda *a: None)
  cache = str(tmp_path_factory.getbasetemp() / 'classifier_cache')
  state = types.SimpleNamespace(ema_params=params)
  return ctx, state, cache


def _entries(cache, **kw):
  common = dict(every_rounds=1, num_samples=64, batch_size=32, num_steps=4,
                cache_dir=cache)
  common.update(kw)
  return ml_collections.ConfigDict(dict(
      fid=dict(common), precision_recall=dict(common),
      class_coverage=dict(common)))


def test_end_to_end_with_the_ddim_sampler(setup, monkeypatch):
  ctx, state, cache = setup
  evs = evaluators_lib.build_evaluators(_entries(cache), ctx)
  draws = []
  orig = _generative.Generator.__call__

  def counting(self, st, r):
    out = orig(self, st, r)
    draws.append(out)
    return out

  monkeypatch.setattr(_generative.Generator, '__call__', counting)
  figures = {}
  for ev in evs.values():
    figures.update(ev(state, 3))
  # One draw, shared: later evaluators get the very same array.
  assert all(d is draws[0] for d in draws) and draws[0].shape == (64, 8, 8, 1)
  assert np.abs(draws[0]).max() <= 1.0
  assert figures['fid_classifier'] > 0
  for k in ('precision_classifier', 'recall_classifier'):
    assert 0 <= figures[k] <= 1
  fracs = [figures[f'class_frac_{c}'] for c in range(10)]
  assert sum(fracs) == pytest.approx(1.0)
  assert figures['classes_under_2pct'] == sum(f < 0.02 for f in fracs)
  assert 0.85 < figures['classifier_accuracy'] <= 1


def test_the_grid_is_the_first_batch_of_the_shared_draw(setup, monkeypatch):
  """A samples grid with fid's sampler and batch size shows fid's first
  samples, and the batches it drew are not drawn again for fid."""
  ctx, state, cache = setup
  calls = []
  orig_make = _generative.make_drawer

  def counting_make(*args, **kwargs):
    draw = orig_make(*args, **kwargs)

    def counted(params, key, labels):
      calls.append(key)
      return draw(params, key, labels)
    return counted

  monkeypatch.setattr(_generative, 'make_drawer', counting_make)
  entries = _entries(cache)
  entries.samples = dict(every_rounds=1, num_samples=32, batch_size=32,
                         num_steps=4)
  evs = evaluators_lib.build_evaluators(entries, ctx)
  grid = evs['samples']._generator(state, 5)  # pylint: disable=protected-access
  assert len(calls) == 1 and grid.shape == (32, 8, 8, 1)
  evs['fid'](state, 5)
  assert len(calls) == 2  # only fid's second batch was drawn.
  draw = evs['fid']._generator(state, 5)  # pylint: disable=protected-access
  np.testing.assert_array_equal(draw[:32], grid)
  assert not np.array_equal(draw[32:], grid)
  # Another round draws afresh, with the same noise.
  again = evs['samples']._generator(state, 6)  # pylint: disable=protected-access
  assert len(calls) == 3
  np.testing.assert_array_equal(again, grid)


def test_figures_equal_direct_computation_on_real_images(setup, monkeypatch):
  """With a 'generator' that returns real images, each figure equals the
  metric computed directly; and FID of the reference set itself is 0."""
  ctx, state, cache = setup
  train = data_lib.load_dataset('digits', 'train')
  real = _generative.real_images(train)
  monkeypatch.setattr(_generative.Generator, '__call__',
                      lambda self, st, r: real[:self.num_samples])
  evs = evaluators_lib.build_evaluators(
      _entries(cache, num_samples=len(train)), ctx)
  figures = {}
  for ev in evs.values():
    figures.update(ev(state, 1))
  assert figures['fid_classifier'] == pytest.approx(0.0, abs=1e-6)
  assert figures['precision_classifier'] == 1.0
  assert figures['recall_classifier'] == 1.0
  clf = mnist_classifier.load_or_train('digits', cache, verbose=False)
  logits, feats = clf.logits_and_features(real)
  want = class_coverage.class_coverage(
      logits.argmax(1), class_coverage.class_histogram(train.labels, 10))
  for k, v in want.items():
    assert figures[k] == pytest.approx(v)
  # A half of the real images as 'samples': FID and PR as computed directly.
  half = len(train) // 2
  evs = evaluators_lib.build_evaluators(_entries(cache, num_samples=half),
                                        ctx)
  fid = evs['fid'](state, 2)['fid_classifier']
  direct = frechet.frechet_distance(frechet.gaussian_stats(feats),
                                    frechet.gaussian_stats(feats[:half]))
  assert fid == pytest.approx(direct, rel=1e-6) and fid > 0
  pr = evs['precision_recall']
  got = pr(state, 2)
  ref = precision_recall.precision_recall(pr._real, feats[:half])
  assert got == {'precision_classifier': ref['precision'],
                 'recall_classifier': ref['recall']}


def test_reference_statistics_are_cached(setup, tmp_path):
  ctx, _, cache = setup
  evaluators_lib.build_evaluators(
      ml_collections.ConfigDict(dict(fid=dict(cache_dir=cache))), ctx)
  files = list((pathlib.Path(cache) / 'fid_stats').glob('*'))
  assert len(files) == 1 and files[0].name.startswith('digits_train_')
  # A published .npz replaces the cache.
  path = str(tmp_path / 'stats.npz')
  np.savez(path, mu=np.zeros(128), sigma=np.eye(128))
  ev = evaluators_lib.build_evaluators(ml_collections.ConfigDict(dict(
      fid=dict(cache_dir=cache, stats_file=path))), ctx)['fid']
  np.testing.assert_array_equal(ev._real.sigma, np.eye(128))


def test_bad_feature_name(setup):
  ctx, _, cache = setup
  with pytest.raises(ValueError, match='features=.pool'):
    evaluators_lib.build_evaluators(ml_collections.ConfigDict(dict(
        fid=dict(cache_dir=cache, features='pool'))), ctx)


def test_inception_fid_and_is_wiring(setup, monkeypatch, tmp_path):
  """features=inception: samples in [−1, 1] reach Inception as (x + 1)/2;
  FID against a given stats_file, IS from the same draw's logits."""
  from fedjax_diff.metrics import inception  # pylint: disable=g-import-not-at-top
  from fedjax_diff.metrics import inception_score  # pylint: disable=g-import-not-at-top
  ctx, state, cache = setup
  rng = np.random.default_rng(0)
  def fake(path, s):
    if jax.tree_util.keystr(path).endswith("['var']"):  # BN variances > 0
      return rng.uniform(0.5, 1.5, size=s.shape).astype(np.float32)
    return (rng.normal(size=s.shape) * 0.05).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(
      fake, jax.eval_shape(inception.init_variables))
  weights = str(tmp_path / 'w.npz')
  inception.save_variables(weights, variables)
  stats = str(tmp_path / 'stats.npz')
  np.savez(stats, mu=np.full(2048, 0.1), sigma=np.eye(2048) * 0.01)
  # The shape of test_inception.py's images: XLA's persistent cache (see
  # tests/conftest.py) then compiles the Inception once for both tests.
  samples = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  monkeypatch.setattr(_generative.Generator, '__call__',
                      lambda self, st, r: samples)
  entry = dict(features='inception', inception_weights=weights,
               stats_file=stats, num_samples=2, cache_dir=cache)
  evs = evaluators_lib.build_evaluators(ml_collections.ConfigDict(dict(
      fid=dict(entry),
      inception_score={**{k: v for k, v in entry.items() if k != 'stats_file'},
                       'splits': 1})), ctx)
  figures = {**evs['fid'](state, 1), **evs['inception_score'](state, 1)}
  # The same (compiled) extractor, on the images converted by hand.
  extractor = evs['fid']._features.extractor
  np.testing.assert_array_equal(
      jax.tree.leaves(extractor.variables)[0],
      jax.tree.leaves(inception.load_variables(weights))[0])
  pool, logits = extractor((samples + 1) / 2)
  assert np.all(np.isfinite(pool)) and pool.std() > 0
  # Two samples: Σ_g = v vᵀ with v = (f₁ − f₂)/√2 (rank 1), so with
  # Σ_r = 0.01·I, Tr (Σ_r Σ_g)^{1/2} = √(0.01 ‖v‖²) and
  # FID = ‖μ_r − μ_g‖² + 0.01·2048 + ‖v‖² − 2·0.1‖v‖.
  p64 = pool.astype(np.float64)
  v = (p64[0] - p64[1]) / np.sqrt(2)
  mu_g = p64.mean(0)
  want = (np.sum((0.1 - mu_g) ** 2) + 20.48 + v @ v
          - 2 * 0.1 * np.linalg.norm(v))
  assert figures['fid_inception'] == pytest.approx(want, rel=1e-6)
  assert figures['inception_score'] == pytest.approx(
      inception_score.inception_score(logits, 1)[0], rel=1e-6)


def test_conditional_accuracy_of_a_class_conditional_model(setup,
                                                           monkeypatch):
  """Samples asked for classes 0..9, 0..: real images in that label order
  give the classifier's accuracy on them; shuffled ones about 10%."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  ctx, state, cache = setup
  ctx = dataclasses.replace(ctx, num_classes=10)
  train = data_lib.load_dataset('digits', 'train')
  per_class = [np.flatnonzero(train.labels == c)[:10] for c in range(10)]
  order = np.stack(per_class, 1).reshape(-1)  # labels 0, 1, ..., 9, 0, ...
  assert list(train.labels[order[:12]]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
  real = _generative.real_images(train)[order]
  monkeypatch.setattr(_generative.Generator, '__call__',
                      lambda self, st, r: real)
  ev = evaluators_lib.build_evaluators(ml_collections.ConfigDict(dict(
      class_coverage=dict(num_samples=100, cache_dir=cache))),
                                       ctx)['class_coverage']
  got = ev(state, 1)['conditional_accuracy']
  clf = mnist_classifier.load_or_train('digits', cache, verbose=False)
  logits, _ = clf.logits_and_features(real)
  assert got == np.mean(logits.argmax(1) == train.labels[order])
  assert got > 0.8
