"""The privacy ledger against dp-accounting called directly."""

import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import pytest

from fedjax_diff.strategies import accountant


def _direct(acc, sigma, q, rounds, delta):
  """ε of `rounds` Poisson-subsampled Gaussian rounds, composed with the
  accountant's own count (not as a SelfComposedDpEvent, as the module
  does)."""
  event = dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma))
  acc.compose(event, rounds)
  return acc.get_epsilon(delta)


@pytest.mark.parametrize('sigma,q,rounds,delta', [
    (0.8, 0.1, 1, 1e-4), (0.8, 0.1, 30, 1e-4), (2.3, 0.1, 30, 1e-4),
    (1.1, 0.02, 200, 1e-5), (0.5, 1.0, 3, 1e-3)])
def test_epsilon_equals_rdp_accountant(sigma, q, rounds, delta):
  got = accountant.epsilon(sigma, q, rounds, delta)
  want = _direct(rdp.RdpAccountant(), sigma, q, rounds, delta)
  assert math.isclose(got, want, rel_tol=1e-9)


def test_epsilon_equals_pld_accountant():
  got = accountant.epsilon(1.2, 0.1, 10, 1e-4, 'pld')
  want = _direct(pld.PLDAccountant(), 1.2, 0.1, 10, 1e-4)
  assert math.isclose(got, want, rel_tol=1e-6)
  # PLD is tighter than RDP.
  assert got < accountant.epsilon(1.2, 0.1, 10, 1e-4, 'rdp')


def test_epsilon_edges():
  assert accountant.epsilon(1.0, 0.1, 0, 1e-4) == 0.0
  assert accountant.epsilon(0.0, 0.1, 3, 1e-4) == math.inf
  eps = [accountant.epsilon(1.0, 0.1, r, 1e-4) for r in (1, 2, 5, 20)]
  assert eps == sorted(eps) and eps[0] > 0
  with pytest.raises(ValueError, match='sampling rate'):
    accountant.epsilon(1.0, 0.0, 3, 1e-4)
  with pytest.raises(ValueError, match='delta'):
    accountant.epsilon(1.0, 0.1, 3, 0.0)
  with pytest.raises(ValueError, match='Unknown accountant'):
    accountant.make_accountant('moments')


@pytest.mark.parametrize('target,q,rounds,acc', [
    (10.0, 0.1, 30, 'rdp'), (1.0, 0.1, 30, 'rdp'), (3.0, 0.05, 100, 'rdp'),
    (1.0, 0.1, 10, 'pld')])
def test_calibrated_sigma_reaches_the_target_within_one_percent(
    target, q, rounds, acc):
  sigma = accountant.calibrate_noise(target, q, rounds, 1e-4, acc)
  # ε(σ), asked of dp-accounting directly: at most the target, within 1%.
  make = rdp.RdpAccountant if acc == 'rdp' else pld.PLDAccountant
  eps = _direct(make(), sigma, q, rounds, 1e-4)
  assert 0.99 * target <= eps <= target
  # A 2% smaller σ would overshoot: σ is the smallest that fits.
  assert _direct(make(), 0.98 * sigma, q, rounds, 1e-4) > target


def test_calibration_errors():
  with pytest.raises(ValueError, match='target_epsilon must be > 0'):
    accountant.calibrate_noise(0.0, 0.1, 3, 1e-4)
  with pytest.raises(ValueError, match='at least one round'):
    accountant.calibrate_noise(1.0, 0.1, 0, 1e-4)
