"""Tests of fedjax_diff.diffusion.losses."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_diff import diffusion
from fedjax_diff.diffusion import losses

# One data shape throughout, so that compiled programs are shared by tests.
BATCH = 2048
SHAPE = (BATCH, 2, 1, 1)
_loss = jax.jit(diffusion.diffusion_loss, static_argnums=(0,),
                static_argnames=('train',))


def _oracle_eps_fn(params, x_t, t, labels, *, train, rng):
  """Knows x_0 (in params) and so recovers the noise exactly from x_t.

  eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t). When params
  also holds a null label, it adds 1 where the label is null, so that the
  loss is the fraction of dropped labels.
  """
  del train, rng
  schedule, x0, null_label = params
  a = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
  b = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
  eps = (x_t - a * x0) / b
  if null_label is not None:
    eps += (labels == null_label).astype(eps.dtype)[:, None, None, None]
  return eps


def _x0(seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), SHAPE, jnp.float32,
                            -1.0, 1.0)


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_loss_is_zero_for_exact_noise_prediction(name):
  schedule = diffusion.make_schedule(name, 1000)
  x0 = _x0()
  loss = _loss(_oracle_eps_fn, (schedule, x0, None), schedule, x0,
               jax.random.PRNGKey(1))
  assert loss.shape == () and loss.dtype == jnp.float32
  assert float(loss) < 1e-8


def test_loss_with_zero_prediction_is_mean_squared_noise():
  schedule = diffusion.linear_schedule(1000)
  x0 = _x0()
  rng = jax.random.PRNGKey(2)
  seen = {}

  def zero_eps_fn(params, x_t, t, labels, *, train, rng):
    seen.update(params=params, t=t, labels=labels, train=train, rng=rng)
    return jnp.zeros_like(x_t)

  loss = diffusion.diffusion_loss(zero_eps_fn, 'p', schedule, x0, rng)
  # E ||eps||^2 per element = 1; 4096 elements -> std of the mean ~0.022.
  assert abs(float(loss) - 1.0) < 0.1
  # Exactly: the mean square of the noise drawn from the documented key.
  t_key, noise_key, _, dropout_key = jax.random.split(rng, 4)
  noise = jax.random.normal(noise_key, SHAPE, jnp.float32)
  np.testing.assert_allclose(loss, np.mean(np.square(noise)), rtol=1e-6)
  # And eps_fn saw the documented timesteps, flags and dropout key.
  t = jax.random.randint(t_key, (BATCH,), 0, 1000, dtype=jnp.int32)
  np.testing.assert_array_equal(seen['t'], t)
  assert seen['t'].dtype == jnp.int32 and seen['t'].shape == (BATCH,)
  assert seen['params'] == 'p' and seen['labels'] is None
  assert seen['train'] is True
  np.testing.assert_array_equal(jax.random.key_data(seen['rng']),
                                jax.random.key_data(dropout_key))
  # t spreads over the whole range {0, ..., 999}.
  assert int(t.min()) < 10 and int(t.max()) > 990


def _scaled_eps_fn(params, x_t, t, labels, *, train, rng):
  del t, labels, rng
  assert train is False
  return params['a'] * x_t


def test_loss_hand_computed_and_differentiable():
  """eps_theta = a * x_t: loss = mean((eps - a x_t)^2), d/da by hand."""
  schedule = diffusion.cosine_schedule(50)
  x0 = _x0()
  rng = jax.random.PRNGKey(3)
  loss_fn = jax.jit(
      lambda p: diffusion.diffusion_loss(_scaled_eps_fn, p, schedule, x0, rng,
                                         train=False))
  loss, grad = jax.value_and_grad(loss_fn)({'a': jnp.float32(0.5)})
  t_key, noise_key, _, _ = jax.random.split(rng, 4)
  t = np.asarray(jax.random.randint(t_key, (BATCH,), 0, 50, dtype=jnp.int32))
  noise = np.asarray(jax.random.normal(noise_key, SHAPE, jnp.float32),
                     np.float64)
  ab = np.cumprod(1 - np.asarray(schedule.betas, np.float64))[t]
  x_t = (np.sqrt(ab)[:, None, None, None] * np.asarray(x0, np.float64)
         + np.sqrt(1 - ab)[:, None, None, None] * noise)
  np.testing.assert_allclose(loss, np.mean((noise - 0.5 * x_t)**2),
                             rtol=1e-5)
  np.testing.assert_allclose(
      grad['a'], np.mean(-2 * (noise - 0.5 * x_t) * x_t), rtol=1e-4)


@pytest.mark.parametrize('gamma', [5.0, 1.0])
def test_min_snr_weighting_hand_computed(gamma):
  """Min-SNR-γ (arXiv 2303.09556): each example's mean squared error times
  min(SNR_t, γ)/SNR_t, SNR_t = ᾱ_t/(1 − ᾱ_t), with ᾱ_t computed here in
  float64 from the betas."""
  schedule = diffusion.linear_schedule(1000)
  x0 = _x0()
  rng = jax.random.PRNGKey(3)
  loss_fn = jax.jit(
      lambda p: diffusion.diffusion_loss(_scaled_eps_fn, p, schedule, x0, rng,
                                         min_snr_gamma=gamma, train=False))
  loss, grad = jax.value_and_grad(loss_fn)({'a': jnp.float32(0.5)})
  t_key, noise_key, _, _ = jax.random.split(rng, 4)
  t = np.asarray(jax.random.randint(t_key, (BATCH,), 0, 1000,
                                    dtype=jnp.int32))
  noise = np.asarray(jax.random.normal(noise_key, SHAPE, jnp.float32),
                     np.float64)
  ab = np.cumprod(1 - np.asarray(schedule.betas, np.float64))[t]
  x_t = (np.sqrt(ab)[:, None, None, None] * np.asarray(x0, np.float64)
         + np.sqrt(1 - ab)[:, None, None, None] * noise)
  snr = ab / (1 - ab)
  w = np.minimum(snr, gamma) / snr
  # Both sides of γ are drawn: the weights are not all 1.
  assert w.min() < 0.05 and w.max() == 1.0
  err = np.mean(((noise - 0.5 * x_t)**2).reshape(BATCH, -1), axis=1)
  np.testing.assert_allclose(loss, np.mean(w * err), rtol=1e-5)
  derr = np.mean((-2 * (noise - 0.5 * x_t) * x_t).reshape(BATCH, -1), axis=1)
  np.testing.assert_allclose(grad['a'], np.mean(w * derr), rtol=1e-4)


def test_min_snr_above_every_snr_is_the_unweighted_loss():
  schedule = diffusion.linear_schedule(1000)
  x0, rng = _x0(), jax.random.PRNGKey(4)
  params = {'a': jnp.float32(0.3)}
  plain = diffusion.diffusion_loss(_scaled_eps_fn, params, schedule, x0, rng,
                                   train=False)
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  huge = float(np.max(ab / (1 - ab))) * 2
  weighted = diffusion.diffusion_loss(_scaled_eps_fn, params, schedule, x0,
                                      rng, min_snr_gamma=huge, train=False)
  np.testing.assert_allclose(weighted, plain, rtol=1e-6)


def test_min_snr_gamma_from_config():
  def of(**fields):
    return losses.min_snr_gamma_from_config(ml_collections.ConfigDict(
        dict(diffusion=dict(schedule='linear', **fields))))

  assert of() is None and of(min_snr_gamma=None) is None
  assert of(min_snr_gamma=0) is None
  assert of(min_snr_gamma=5) == 5.0
  for bad in (-1.0, 'five', True):
    with pytest.raises(ValueError, match='min_snr_gamma must be a number > 0'):
      of(min_snr_gamma=bad)


def test_condition_dropout_rate_and_values():
  schedule = diffusion.linear_schedule(100)
  null = 10
  x0 = _x0()
  labels = jnp.arange(BATCH, dtype=jnp.int32) % 10  # never the null label
  params = (schedule, x0, null)
  rng = jax.random.PRNGKey(4)
  for p in (0.1, 0.5):
    # Binomial(2048, p) / 2048 has std <= 0.011; allow 4 sigma.
    loss = _loss(_oracle_eps_fn, params, schedule, x0, rng, labels,
                 null_label=null, cond_drop_prob=p)
    assert abs(float(loss) - p) < 0.045
  for p in (0.0, 1.0):
    loss = _loss(_oracle_eps_fn, params, schedule, x0, rng, labels,
                 null_label=null, cond_drop_prob=p)
    np.testing.assert_allclose(loss, p, atol=1e-5)
  # No dropout without a drop probability (the default).
  loss = diffusion.diffusion_loss(_oracle_eps_fn, params, schedule, x0, rng,
                                  labels, null_label=null)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)

  # The labels the network sees: kept ones unchanged, dropped ones null,
  # dropped where the documented drop key says so.
  seen = []

  def recording_eps_fn(params, x_t, t, labels, *, train, rng):
    seen.append(labels)
    return jnp.zeros_like(x_t)

  diffusion.diffusion_loss(recording_eps_fn, None, schedule, x0, rng, labels,
                           null_label=null, cond_drop_prob=0.3)
  got = np.asarray(seen[0])
  dropped = got == null
  assert 0.255 < dropped.mean() < 0.345
  np.testing.assert_array_equal(got[~dropped], np.asarray(labels)[~dropped])
  drop_key = jax.random.split(rng, 4)[2]
  np.testing.assert_array_equal(
      dropped, jax.random.bernoulli(drop_key, 0.3, (BATCH,)))


def test_bad_inputs():
  schedule = diffusion.linear_schedule(10)
  x0 = jnp.zeros((2, 1, 1, 1))
  eps_fn = lambda p, x, t, y, *, train, rng: x
  with pytest.raises(ValueError, match='null_label'):
    diffusion.diffusion_loss(eps_fn, None, schedule, x0,
                             jax.random.PRNGKey(0), jnp.array([1, 2]),
                             cond_drop_prob=0.1)
  with pytest.raises(ValueError, match='batch size'):
    diffusion.diffusion_loss(eps_fn, None, schedule, x0,
                             jax.random.PRNGKey(0), jnp.array([1, 2, 3]))
