"""Membership-inference and memorization audits on tiny models built here."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

from fedjax_diff import data as data_lib
from fedjax_diff.diffusion import linear_schedule
from fedjax_diff.diffusion import schedules
from fedjax_diff.metrics import membership

T = 100
SCHEDULE = linear_schedule(T)


# -- Scores against sklearn. ---------------------------------------------------


@pytest.mark.parametrize('seed,ties', [(0, False), (1, True), (2, False)])
def test_roc_auc_and_tpr_match_sklearn(seed, ties):
  rng = np.random.default_rng(seed)
  members = rng.normal(-0.5, 1.0, 300)
  nonmembers = rng.normal(0.0, 1.0, 400)
  if ties:
    members, nonmembers = np.round(members, 1), np.round(nonmembers, 1)
  # sklearn's positives are members, and a high score means positive.
  y = np.r_[np.ones(300), np.zeros(400)]
  s = -np.r_[members, nonmembers]
  assert membership.roc_auc(members, nonmembers) == pytest.approx(
      skm.roc_auc_score(y, s), abs=1e-12)
  fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
  for alpha in (0.0, 0.01, 0.1):
    assert membership.tpr_at_fpr(members, nonmembers, alpha) == (
        pytest.approx(tpr[fpr <= alpha + 1e-12].max(), abs=1e-12))


def test_bootstrap_interval_brackets_the_estimate():
  rng = np.random.default_rng(3)
  members, nonmembers = rng.normal(-1, 1, 200), rng.normal(0, 1, 200)
  auc = membership.roc_auc(members, nonmembers)
  lo, hi = membership.bootstrap_interval(members, nonmembers,
                                         membership.roc_auc, 500)
  assert lo < auc < hi and hi - lo < 0.15
  # Its width shrinks like 1/√n.
  lo4, hi4 = membership.bootstrap_interval(
      np.tile(members, 4), np.tile(nonmembers, 4), membership.roc_auc, 500)
  assert (hi4 - lo4) == pytest.approx((hi - lo) / 2, rel=0.3)
  assert membership.bootstrap_interval(
      members, nonmembers, membership.roc_auc, 500) == (lo, hi)


# -- The attacks on tiny denoisers trained here. -----------------------------


class TinyEps(nn.Module):
  """An MLP ε-network over 8×8 images with a timestep embedding: enough
  capacity to memorize a handful of images."""

  @nn.compact
  def __call__(self, x, t):
    h = x.reshape((x.shape[0], -1))
    temb = nn.Dense(256)(jnp.stack([jnp.sin(t / 16.0), jnp.cos(t / 16.0),
                                   t / T], axis=-1))
    h = nn.gelu(nn.Dense(256)(h) + temb)
    h = nn.gelu(nn.Dense(256)(h))
    return nn.Dense(x.shape[1] * x.shape[2] * x.shape[3])(h).reshape(x.shape)


MODEL = TinyEps()


def eps_fn(params, x, t, labels, *, train, rng=None):
  del labels, train, rng
  return MODEL.apply({'params': params}, x, t.astype(jnp.float32))


def train(images, steps, seed=0):
  """DDPM training of TinyEps on `images` (full batch, Adam)."""
  params = MODEL.init(jax.random.PRNGKey(seed), images[:1],
                      jnp.zeros((1,)))['params']
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, key):
    def loss(p):
      kt, kn = jax.random.split(key)
      x = jnp.tile(images, (4, 1, 1, 1))
      t = jax.random.randint(kt, (x.shape[0],), 0, T)
      n = jax.random.normal(kn, x.shape)
      pred = eps_fn(p, schedules.q_sample(SCHEDULE, x, t, n), t, None,
                    train=True)
      return jnp.mean(jnp.square(pred - n))
    g = jax.grad(loss)(params)
    u, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state

  for i in range(steps):
    params, opt_state = step(params, opt_state, jax.random.PRNGKey(1000 + i))
  return params


@pytest.fixture(scope='module')
def digits():
  d = data_lib.load_dataset('digits', 'train')
  x = d.images.astype(np.float32) / 127.5 - 1.0
  rng = np.random.default_rng(0)
  idx = rng.permutation(len(x))
  return x[idx[:8]], x[idx[8:72]], x[idx[72:136]], x[idx[136:600]]


def _attacks(params, members, nonmembers):
  loss = lambda x: membership.denoising_errors(
      eps_fn, params, SCHEDULE, x, timesteps=[2, 5, 10, 20, 30],
      num_noises=4, batch_size=64)
  secmi = lambda x: membership.secmi_t_errors(eps_fn, params, SCHEDULE, x,
                                              batch_size=64)
  return [membership.evaluate_attack(name, f(members), f(nonmembers),
                                     num_resamples=300)
          for name, f in (('loss', loss), ('secmi', secmi))]


def test_audit_is_chance_for_a_model_that_never_saw_the_members(digits):
  """Trained on other digits: members and non-members are alike to it."""
  _, members, nonmembers, others = digits
  params = train(jnp.asarray(others), 300)
  for a in _attacks(params, members, nonmembers):
    assert abs(a.auc - 0.5) < 0.12, a
    assert a.auc_interval[0] < 0.5 < a.auc_interval[1], a


def test_audit_flags_a_model_overfitted_to_its_members(digits):
  """Trained on 8 members only, for long: both attacks separate them."""
  few, _, nonmembers, _ = digits
  params = train(jnp.asarray(few), 1500)
  for a in _attacks(params, few, nonmembers[:32]):
    assert a.auc > 0.95, a
    assert a.auc_interval[0] > 0.8, a
    assert a.tpr > 0.5, a


def test_secmi_t_error_against_a_loop_of_ddim_formulas():
  """A linear ε-network ε = a·x + b·t/T: the t-error of the module against
  the DDIM equations written out with numpy (eq. 12 of arXiv 2010.02502,
  η = 0), inversion from 0 to t in steps k, one more step up and one down."""
  a, b = 0.3, 0.2
  lin = lambda params, x, t, y, *, train, rng=None: (
      a * x + b * (t.astype(jnp.float32) / T)[:, None, None, None])
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (5, 4, 4, 1)).astype(np.float32)
  ab = np.asarray(SCHEDULE.alphas_cumprod, np.float64)

  def ddim(x, s, s_next):
    eps = a * x + b * s / T
    x0_hat = (x - np.sqrt(1 - ab[s]) * eps) / np.sqrt(ab[s])
    return np.sqrt(ab[s_next]) * x0_hat + np.sqrt(1 - ab[s_next]) * eps

  t, k = 10, 2
  x = x0.astype(np.float64)
  for s in range(0, t, k):
    x = ddim(x, s, s + k)
  back = ddim(ddim(x, t, t + k), t + k, t)
  want = np.mean((back - x) ** 2, axis=(1, 2, 3))
  got = membership.secmi_t_errors(lin, None, SCHEDULE, x0, t=t, interval=k)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-10)
  assert np.all(want > 0)


def test_denoising_errors_by_hand():
  """ε̂ = 0 makes the score the mean of ε_j² over the fixed noises, the
  same for every image."""
  zero = lambda params, x, t, y, *, train, rng=None: jnp.zeros_like(x)
  x = np.zeros((3, 4, 4, 1), np.float32)
  got = membership.denoising_errors(zero, None, SCHEDULE, x, timesteps=[5],
                                    num_noises=2, seed=7)
  noises = [np.asarray(jax.random.normal(
      jax.random.fold_in(jax.random.PRNGKey(7), j), (4, 4, 1)))
            for j in range(2)]
  want = np.mean([np.mean(n ** 2) for n in noises])
  np.testing.assert_allclose(got, [want] * 3, rtol=1e-5)
  with pytest.raises(ValueError, match='timesteps'):
    membership.denoising_errors(zero, None, SCHEDULE, x, timesteps=[T])


def test_memorization_counts_copies():
  rng = np.random.default_rng(0)
  members = rng.uniform(-1, 1, (200, 4, 4, 1))
  nonmembers = rng.uniform(-1, 1, (50, 4, 4, 1))
  # Copies of members (plus a little noise) are near-copies; with as many
  # members as non-members (no subset) all are closer to the members.
  copies = members[:10] + 0.01 * rng.normal(size=(10, 4, 4, 1))
  memo = membership.memorization(copies, members[:50], nonmembers)
  assert memo.near_copies == 10 and memo.fraction_closer_to_members == 1.0
  assert memo.median_ratio < 0.1
  # Against all 200 members, the ratio uses a size-matched subset of them.
  memo = membership.memorization(copies, members, nonmembers)
  assert memo.near_copies == 10
  # Fresh draws of the distribution are neither.
  fresh = rng.uniform(-1, 1, (100, 4, 4, 1))
  memo = membership.memorization(fresh, members, nonmembers)
  assert memo.near_copies == 0
  assert 0.8 < memo.median_ratio < 1.25
  assert 0.3 < memo.fraction_closer_to_members < 0.7
  np.testing.assert_allclose(
      membership.pairwise_distances(members[:3], nonmembers[:4]),
      np.linalg.norm(members[:3, None].reshape(3, 1, -1) -
                     nonmembers[None, :4].reshape(1, 4, -1), axis=-1))


def test_format_table():
  a = membership.AttackResult('loss', 0.61, (0.55, 0.66), 0.04, (0.01, 0.08),
                              0.01, 500, 500)
  memo = membership.Memorization(500, 1.02, 0.48, 0, 1 / 3, 50)
  table = membership.format_table([a], memo)
  assert '| loss | 0.610 [0.550, 0.660] | 0.040 [0.010, 0.080] | 500 / 500 |' \
      in table
  assert '0 near-copies' in table
