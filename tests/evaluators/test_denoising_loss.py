"""The held-out denoising loss evaluator's null-label figure."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff import data as data_lib
from fedjax_diff import evaluators as evaluators_lib
from fedjax_diff.diffusion import make_schedule

NUM_CLASSES = 10


def _evaluator(eps_fn, num_classes):
  ctx = evaluators_lib.EvalContext(
      eps_fn=eps_fn, schedule=make_schedule('linear', 100),
      test_data=data_lib.load_dataset('digits', 'test'),
      image_shape=(8, 8, 1), num_classes=num_classes, workdir='', seed=0,
      write_images=lambda *a: None)
  cfg = ml_collections.ConfigDict({'denoising_loss': dict(
      every_rounds=1, num_examples=256, batch_size=64)})
  return evaluators_lib.build_evaluators(cfg, ctx)['denoising_loss']


def _state():
  return types.SimpleNamespace(ema_params={}, params={})


def _null_shifted(params, x_t, t, labels, *, train, rng):
  """Predicts ε = 0, plus 1 where the label is the null class."""
  del params, t, train, rng
  return jnp.zeros_like(x_t) + (labels == NUM_CLASSES).astype(
      x_t.dtype)[:, None, None, None]


def test_null_label_loss_is_the_loss_with_null_labels():
  """With ε̂ = 1[null], the loss on true labels is E ε² ≈ 1 and on null
  labels E (ε − 1)² = E ε² + 1 − 2 E ε ≈ 2, on the same draws of ε, so
  their gap is 1 − 2·mean(ε) (|mean ε| < 0.03 over 16,384 draws)."""
  figures = _evaluator(_null_shifted, NUM_CLASSES)(_state(), 1)
  assert set(figures) == {'heldout_loss', 'heldout_loss_raw',
                          'heldout_loss_null_label'}
  assert abs(figures['heldout_loss'] - 1.0) < 0.05
  gap = figures['heldout_loss_null_label'] - figures['heldout_loss']
  assert abs(gap - 1.0) < 0.06, figures


def test_a_model_that_ignores_labels_has_no_gap():
  zero = lambda params, x_t, t, labels, *, train, rng: jnp.zeros_like(x_t)
  figures = _evaluator(zero, NUM_CLASSES)(_state(), 1)
  np.testing.assert_equal(figures['heldout_loss_null_label'],
                          figures['heldout_loss'])


def test_unconditional_model_has_no_null_label_figure():
  zero = lambda params, x_t, t, labels, *, train, rng: jnp.zeros_like(x_t)
  figures = _evaluator(zero, None)(_state(), 1)
  assert set(figures) == {'heldout_loss', 'heldout_loss_raw'}
