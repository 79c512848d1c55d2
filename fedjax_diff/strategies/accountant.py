"""Privacy accounting of DP-FedAvg with Google's `dp-accounting` package.

A DP-FedAvg round (`strategies.privacy`) samples every client independently
with probability q (Poisson sampling) and releases the sum of their clipped
updates plus N(0, σ²C²): a Poisson-subsampled Gaussian mechanism with noise
multiplier σ, on the add-or-remove-one-client relation (client-level DP,
McMahan et al. 2018, arXiv 1710.06963). R rounds compose:

    event = SelfComposed(PoissonSampled(q, Gaussian(σ)), R).

This module only builds that event and asks `dp_accounting` for ε at δ
(`epsilon`) or for the σ that reaches a target ε (`calibrate_noise`, through
`dp_accounting.calibrate_dp_mechanism`): no privacy arithmetic is written
here. Two accountants are offered: 'rdp' (Rényi DP, Mironov 2017, arXiv
1702.07476; Mironov et al. 2019, arXiv 1908.10530; the default, fast) and
'pld' (privacy loss distributions, tighter, slower).
"""

import contextlib
import functools
import logging

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

ACCOUNTANTS = ('rdp', 'pld')


def make_accountant(name: str = 'rdp') -> dp_accounting.PrivacyAccountant:
  """A fresh accountant: 'rdp' (`RdpAccountant`) or 'pld'
  (`PLDAccountant`), both on the add-or-remove-one relation."""
  if name == 'rdp':
    return rdp.RdpAccountant()
  if name == 'pld':
    return pld.PLDAccountant()
  raise ValueError(f'Unknown accountant {name!r}; use one of {ACCOUNTANTS}.')


def dp_event(noise_multiplier: float, sampling_rate: float,
             rounds: int) -> dp_accounting.DpEvent:
  """R rounds of the Poisson-subsampled Gaussian mechanism."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          float(sampling_rate),
          dp_accounting.GaussianDpEvent(float(noise_multiplier))),
      int(rounds))


class _DropUnconvergedOrders(logging.Filter):
  """The RDP accountant logs a warning for every fractional order α whose
  series does not converge (small σ, α < 2) and leaves that order out of its
  minimum over orders, which stays a valid bound: here those lines would
  repeat at every logged round, so they are dropped."""

  def filter(self, record):
    return 'failed to converge' not in record.getMessage()


@contextlib.contextmanager
def _quiet():
  logger, f = logging.getLogger('absl'), _DropUnconvergedOrders()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


def _check(sampling_rate, delta, rounds):
  if not 0 < sampling_rate <= 1:
    raise ValueError(f'sampling rate q must be in (0, 1], got '
                     f'{sampling_rate!r}.')
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta!r}.')
  if int(rounds) < 0:
    raise ValueError(f'rounds must be >= 0, got {rounds!r}.')


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int,
            delta: float, accountant: str = 'rdp') -> float:
  """ε at δ after `rounds` rounds (0 before any; inf when σ = 0)."""
  _check(sampling_rate, delta, rounds)
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return float('inf')
  acc = make_accountant(accountant)
  with _quiet():
    acc.compose(dp_event(noise_multiplier, sampling_rate, rounds))
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, sampling_rate: float, rounds: int,
                    delta: float, accountant: str = 'rdp',
                    tol: float = 1e-5) -> float:
  """The smallest noise multiplier σ (to `tol`) whose ε after `rounds`
  rounds at δ is at most `target_epsilon`
  (`dp_accounting.calibrate_dp_mechanism`, which guarantees ε(σ) ≤ target).
  The search starts at σ = 1 from 10⁻³ for RDP; PLD, tighter, needs a σ no
  larger than RDP's, and is searched from half of it (a PLD of a much
  smaller σ would not fit in memory).

  Raises:
    ValueError: target_epsilon is not > 0, or rounds < 1.
  """
  _check(sampling_rate, delta, rounds)
  if not target_epsilon > 0:
    raise ValueError(f'target_epsilon must be > 0, got {target_epsilon!r}.')
  if int(rounds) < 1:
    raise ValueError('calibrating σ needs at least one round; got '
                     f'rounds={rounds}.')
  bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
  if accountant == 'pld':
    upper = calibrate_noise(target_epsilon, sampling_rate, rounds, delta,
                            'rdp', tol)
    bracket = dp_accounting.ExplicitBracketInterval(upper / 2, upper)
  with _quiet():
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        lambda sigma: dp_event(sigma, sampling_rate, rounds),
        float(target_epsilon), float(delta), bracket_interval=bracket,
        tol=tol))
