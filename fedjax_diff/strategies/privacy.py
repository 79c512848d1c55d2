"""Client-level differential privacy: DP-FedAvg's sampling, noise and ledger.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models" (arXiv 1710.06963), with the adaptive clipping of Andrew et al. 2021
(arXiv 1905.03871). Round r of N clients:

1. sampling: every client takes part independently with probability
   q = m/N (Poisson sampling; m = `federation.clients_per_round` is the
   *expected* cohort), deterministic from (seed, r)
   (`federation.poisson_sample_clients`, `algorithms.base.round_clients`);
2. client k uploads Δ̂_k = U(clip_{C_r}(Δ_k)): its update clipped to the
   round's L2 norm C_r (`clipping.clip`, the first upload stage, before any
   quantizer);
3. the server sums the clipped updates with equal weights (an example-count
   weight would not be private), adds N(0, σ_Δ²C_r²) per coordinate and
   divides by the expected cohort m (not by the sampled count, which is
   itself private):

       Δ̄ = (Σ_{k∈S_r} clip_{C_r}(Δ̂_k) + N(0, σ_Δ² C_r² I)) / m;

   `gaussian_sum` is that aggregator, in units of C_r (contributions
   Δ̂_k/C_r, clipped again to norm 1 where noise is added, so a quantizer's
   rounding cannot raise the sensitivity); the algorithm scales Δ̄ back;
4. with adaptive clipping the server also releases the fraction of clients
   whose update fitted under C_r, b̄ = (Σ_k (b_k − ½) + N(0, σ_b²))/m + ½,
   b_k = 1[‖Δ_k‖ ≤ C_r] (shifted by ½, sensitivity ½), and moves
   C_{r+1} = C_r·exp(−η_C(b̄ − γ)) (`clipping.adapt_clip_norm`).

Privacy: the two releases of a round are Gaussian mechanisms on the same
sample, together one with noise multiplier σ, σ^{−2} = σ_Δ^{−2} +
(2σ_b)^{−2} (Andrew et al., Thm. 1); without adaptive clipping σ_Δ = σ. The
ledger is R rounds of the Poisson-subsampled Gaussian mechanism with rate q
and multiplier σ, add-or-remove-one-client adjacency (`accountant`, through
`dp_accounting`). `target_epsilon` calibrates σ before training for the
run's `num_rounds`; ε at δ after every round goes to metrics.jsonl.

What is and is not covered: the model trajectory (θ_r for every r) is
(ε, δ)-DP with respect to adding or removing one client's whole data. Kept
client state (optimizer moments, error-feedback residuals, SCAFFOLD's c_k)
never leaves a client and costs nothing. FedDDPM (an auxiliary set sampled
from every client's model) and FedPhD (edge selection and cloud weights
from each client's label distribution and example count) release data that
is neither clipped nor noised: they refuse `config.dp`. The simulation's
own logs (the cohort's training loss and update norms, its size, the
fraction clipped) are diagnostics computed from raw client data, outside
the guarantee: a deployment would not publish them.

Config (`config.dp`; `Settings.from_config` is its only parser):

    enabled            False (or no block): no DP.
    clip_norm          C > 0 (C_0 with adaptive clipping).
    noise_multiplier   σ ≥ 0, or None when target_epsilon is set.
    target_epsilon     ε > 0: σ is calibrated to reach it after num_rounds
                       rounds (None: use noise_multiplier).
    delta              δ of the reported ε (e.g. 1e-4 < 1/N).
    accountant         'rdp' (default) | 'pld'.
    adaptive.enabled   adaptive clipping (Andrew et al. 2021).
    adaptive.target_quantile   γ, 0.5.
    adaptive.learning_rate     η_C, 0.2.
    adaptive.count_stddev      σ_b; None: 0.05·m (TFF's default).
"""

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from fedjax_diff.strategies import accountant as accountant_lib
from fedjax_diff.strategies import aggregator as aggregator_lib
from fedjax_diff.strategies import clipping

PyTree = Any
STATE_KEY = 'dp'  # ServerState.algorithm[STATE_KEY]


@dataclasses.dataclass(frozen=True)
class Settings:
  """The parsed `config.dp` block (see the module docstring)."""
  clip_norm: float
  noise_multiplier: Optional[float]
  target_epsilon: Optional[float]
  delta: float
  accountant: str = 'rdp'
  adaptive: bool = False
  target_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  count_stddev: Optional[float] = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict
                  ) -> Optional['Settings']:
    """`config.dp` parsed and checked; None when absent or not enabled.

    Raises:
      ValueError: a field is missing, out of range or of the wrong type,
        with the field named.
    """
    if not enabled(config):
      return None
    cfg = config.dp
    known = {'enabled', 'clip_norm', 'noise_multiplier', 'target_epsilon',
             'delta', 'accountant', 'adaptive'}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
      raise ValueError(f'config.dp has unknown fields {unknown}; the fields '
                       f'are {sorted(known)} (see strategies/privacy.py).')

    def number(name, value, lo, lo_ok=False, hi=None, optional=False):
      if value is None and optional:
        return None
      try:
        if isinstance(value, bool):
          raise TypeError
        value = float(value)
      except (TypeError, ValueError):
        raise ValueError(f'config.dp.{name} must be a number, got '
                         f'{value!r}.') from None
      if not (value >= lo if lo_ok else value > lo) or (
          hi is not None and not value < hi):
        rng = f'{"[" if lo_ok else "("}{lo:g}, {"inf" if hi is None else hi}'
        raise ValueError(f'config.dp.{name} must be in {rng}), got {value!r}.')
      return value

    clip_norm = number('clip_norm', cfg.get('clip_norm'), 0.0)
    sigma = number('noise_multiplier', cfg.get('noise_multiplier'), 0.0,
                   lo_ok=True, optional=True)
    target = number('target_epsilon', cfg.get('target_epsilon'), 0.0,
                    optional=True)
    if (sigma is None) == (target is None):
      raise ValueError(
          'config.dp needs exactly one of noise_multiplier (σ) and '
          'target_epsilon (σ calibrated before training); got '
          f'noise_multiplier={sigma!r}, target_epsilon={target!r}. Set the '
          'other to None.')
    delta = number('delta', cfg.get('delta'), 0.0, hi=1.0)
    acc = cfg.get('accountant', 'rdp')
    if acc not in accountant_lib.ACCOUNTANTS:
      raise ValueError(f'config.dp.accountant={acc!r}; use one of '
                       f'{accountant_lib.ACCOUNTANTS}.')
    ad = cfg.get('adaptive') or {}
    adaptive = bool(ad.get('enabled', False))
    quantile = number('adaptive.target_quantile',
                      ad.get('target_quantile', 0.5), 0.0, hi=1.0)
    lr = number('adaptive.learning_rate', ad.get('learning_rate', 0.2), 0.0,
                lo_ok=True)
    count_stddev = number('adaptive.count_stddev', ad.get('count_stddev'),
                          0.0, optional=True)
    return cls(clip_norm=clip_norm, noise_multiplier=sigma,
               target_epsilon=target, delta=delta, accountant=acc,
               adaptive=adaptive, target_quantile=quantile,
               clip_learning_rate=lr, count_stddev=count_stddev)

  def upload_stage(self):
    """The clipping stage of the upload path: `clip(C)`, or `clip()` (the
    round's C_r) with adaptive clipping."""
    return clipping.clip(None if self.adaptive else self.clip_norm)


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` asks for client-level DP (`config.dp.enabled`)."""
  cfg = config.get('dp')
  return cfg is not None and bool(cfg.get('enabled', False))


def update_noise_multiplier(noise_multiplier: float,
                            count_stddev: Optional[float]) -> float:
  """σ_Δ from the ledger's σ and the count's σ_b (Andrew et al. 2021, Thm.
  1): σ_Δ = (σ^{−2} − (2σ_b)^{−2})^{−1/2}; σ itself without a count.

  Raises:
    ValueError: 2σ_b ≤ σ (the count alone would spend the whole budget).
  """
  if count_stddev is None or noise_multiplier == 0:
    return noise_multiplier
  if not 2 * count_stddev > noise_multiplier:
    raise ValueError(
        f'Adaptive clipping: the count noise σ_b={count_stddev:g} needs '
        f'2σ_b > σ={noise_multiplier:g} (σ^-2 = σ_Δ^-2 + (2σ_b)^-2); raise '
        'config.dp.adaptive.count_stddev.')
  return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


class Contribution(NamedTuple):
  """What a client of a DP round adds to the sum.

  Attributes:
    update: Δ̂_k / C_r, its (clipped, uploaded) update in units of the clip
      norm.
    below: b_k − ½, b_k = 1[‖Δ_k‖ ≤ C_r] (read with adaptive clipping).
  """
  update: PyTree
  below: jax.Array


def contribution(update: PyTree, norm, clip_norm) -> Contribution:
  """Client k's `Contribution` from Δ̂_k, ‖Δ_k‖ and C_r."""
  c = jnp.asarray(clip_norm, jnp.float32)
  return Contribution(
      update=jax.tree.map(lambda d: (d.astype(jnp.float32) / c
                                     ).astype(d.dtype), update),
      below=(jnp.asarray(norm, jnp.float32) <= c).astype(jnp.float32) - 0.5)


def noise_tree(key: jax.Array, tree: PyTree, stddev) -> PyTree:
  """N(0, stddev²) per entry: leaf i (in `jax.tree.leaves` order) draws
  `normal(fold_in(key, i), shape, dtype)`."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [
      stddev * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      for i, x in enumerate(leaves)])


def gaussian_sum(noise_multiplier: float, divisor: float,
                 count_stddev: Optional[float] = None
                 ) -> aggregator_lib.Aggregator:
  """DP-FedAvg's aggregator, in units of the clip norm.

  Contributions are `Contribution`s (update u_k = Δ̂_k/C, b_k − ½). Each
  client weighs 1 (`weight`); `accumulate` clips every u_k to norm 1 again
  (the bound the noise is calibrated to holds whatever the upload stages
  after clipping did) and sums over real clients; `finalize` psums and, with
  `key_u, key_b = split(key)`,

      ū = (Σ_k clip_1(u_k) + σ_Δ·z) / m,      z = `noise_tree(key_u, ·, 1)`,
      b̄ = (Σ_k (b_k − ½) + σ_b·normal(key_b)) / m + ½,

  returning `(ū, b̄)` (b̄ is None without `count_stddev`, and then never
  computed). With a replicated key every device draws the same noise after
  the psum.

  Args:
    noise_multiplier: σ_Δ.
    divisor: m, the expected cohort size.
    count_stddev: σ_b (adaptive clipping), or None.
  """
  divisor = float(divisor)
  if not divisor > 0:
    raise ValueError(f'gaussian_sum: divisor must be > 0, got {divisor}.')

  def weight(count):
    return jnp.ones_like(jnp.asarray(count, jnp.float32))

  def init(shapes):
    return (aggregator_lib.zeros_like_shapes(shapes.update),
            jnp.zeros((), jnp.float32))

  def accumulate(acc, contributions, weights):
    total, below = acc
    u = contributions.update
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)),
                     axis=tuple(range(1, x.ndim)))
             for x in jax.tree.leaves(u))
    scale = clipping.clip_scale(jnp.sqrt(sq), 1.0)
    u = jax.tree.map(lambda x: x * scale.reshape(
        (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), u)
    chunk = aggregator_lib.weighted_sum(u, weights)
    real = weights > 0
    return (jax.tree.map(jnp.add, total, chunk),
            below + jnp.sum(jnp.where(real, contributions.below, 0.0)))

  def finalize(acc, axis_name, key):
    total, below = jax.lax.psum(acc, axis_name)
    key_u, key_b = jax.random.split(key)
    noise = noise_tree(key_u, total, noise_multiplier)
    mean = jax.tree.map(lambda t, z: (t + z) / divisor, total, noise)
    frac = None
    if count_stddev is not None:
      frac = (below + count_stddev * jax.random.normal(key_b, ())
              ) / divisor + 0.5
    return mean, frac

  return aggregator_lib.Aggregator(weight, init, accumulate, finalize)


class Mechanism:
  """DP-FedAvg for one run: aggregator, clip-norm state, ledger (the
  Poisson sampling it assumes is `algorithms.base.round_clients`).

  Built once by `algorithms.base.Algorithm` from `Settings` and the
  federation; σ is calibrated here when `target_epsilon` is set.

  Attributes:
    settings: the parsed config.
    num_clients: N.
    expected_cohort: m = `clients_per_round`.
    sampling_rate: q = m / N.
    num_rounds: R, the run's rounds (what target_epsilon is calibrated for).
    noise_multiplier: σ of the ledger.
    update_noise_multiplier: σ_Δ on the sum of updates.
    count_stddev: σ_b (adaptive clipping) or None.
  """

  def __init__(self, settings: Settings, *, num_clients: int,
               clients_per_round: int, num_rounds: int):
    if not 0 < clients_per_round <= num_clients:
      raise ValueError(
          f'config.dp: federation.clients_per_round={clients_per_round} is '
          f'the expected cohort m of Poisson sampling; it must be in [1, '
          f'num_clients={num_clients}].')
    self.settings = settings
    self.num_clients = int(num_clients)
    self.expected_cohort = int(clients_per_round)
    self.sampling_rate = self.expected_cohort / self.num_clients
    self.num_rounds = int(num_rounds)
    if settings.noise_multiplier is not None:
      sigma = settings.noise_multiplier
    else:
      sigma = accountant_lib.calibrate_noise(
          settings.target_epsilon, self.sampling_rate, self.num_rounds,
          settings.delta, settings.accountant)
    self.noise_multiplier = float(sigma)
    self.count_stddev = None
    if settings.adaptive:
      self.count_stddev = (settings.count_stddev
                           if settings.count_stddev is not None
                           else 0.05 * self.expected_cohort)
    self.update_noise_multiplier = update_noise_multiplier(
        self.noise_multiplier, self.count_stddev)

  # -- The round. ------------------------------------------------------------

  def init(self) -> dict:
    """The server's DP state (`ServerState.algorithm[STATE_KEY]`): the
    round's clip norm C_r, and σ (checked when a run resumes)."""
    return {'clip_norm': jnp.asarray(self.settings.clip_norm, jnp.float32),
            'noise_multiplier': jnp.asarray(self.noise_multiplier,
                                            jnp.float32)}

  def aggregator(self) -> aggregator_lib.Aggregator:
    return gaussian_sum(self.update_noise_multiplier, self.expected_cohort,
                        self.count_stddev)

  def finish(self, dp_state: dict, aggregate) -> tuple[PyTree, dict, dict]:
    """(Δ̄ = C_r·ū, the next DP state, the round's figures) from
    `gaussian_sum`'s (ū, b̄)."""
    mean, frac = aggregate
    c = dp_state['clip_norm']
    delta = jax.tree.map(lambda u: u * c.astype(u.dtype), mean)
    figures = {'dp_clip_norm': c}
    new = dict(dp_state)
    if self.settings.adaptive:
      s = self.settings
      new['clip_norm'] = clipping.adapt_clip_norm(
          c, frac, s.target_quantile, s.clip_learning_rate)
      figures['dp_unclipped_fraction'] = frac
    return delta, new, figures

  # -- The ledger. -----------------------------------------------------------

  def epsilon(self, rounds: int) -> float:
    """ε at δ after `rounds` rounds (`accountant.epsilon`)."""
    return accountant_lib.epsilon(self.noise_multiplier, self.sampling_rate,
                                  int(rounds), self.settings.delta,
                                  self.settings.accountant)

  def check_resumed(self, dp_state: dict) -> None:
    """Raises unless a restored state was trained with this σ (a resumed
    run whose num_rounds changes would calibrate another σ)."""
    got = float(jax.device_get(dp_state['noise_multiplier']))
    if not math.isclose(got, self.noise_multiplier, rel_tol=1e-6):
      raise ValueError(
          f'This DP run was trained with noise multiplier σ={got:.6g}, but '
          f'the config now gives σ={self.noise_multiplier:.6g} (with '
          'target_epsilon, σ is calibrated for num_rounds, which changed). '
          'The ledger covers one σ for the whole run: resume with the '
          'original num_rounds, or set config.dp.noise_multiplier to '
          f'{got:.6g} (target_epsilon=None) to continue past the target ε '
          'in a new workdir.')

  def describe(self) -> str:
    s = self.settings
    clip = (f'adaptive clip norm from C_0={s.clip_norm:g} (quantile '
            f'{s.target_quantile:g}, lr {s.clip_learning_rate:g}, count '
            f'noise σ_b={self.count_stddev:g})' if s.adaptive else
            f'clip norm C={s.clip_norm:g}')
    how = (f'calibrated to ε={s.target_epsilon:g}'
           if s.target_epsilon is not None else 'given')
    return (f'DP-FedAvg: Poisson sampling q={self.sampling_rate:.4g} '
            f'(expected cohort {self.expected_cohort}), {clip}, noise '
            f'multiplier σ={self.noise_multiplier:.4f} ({how}; σ_Δ='
            f'{self.update_noise_multiplier:.4f} on the sum), ε='
            f'{self.epsilon(self.num_rounds):.3f} at δ={s.delta:g} after '
            f'{self.num_rounds} rounds ({s.accountant.upper()}).')

