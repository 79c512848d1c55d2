"""Privacy audits of a diffusion model: membership inference and memorization.

Membership inference asks whether an image x was in the training set from
the model alone. Diffusion models fit their training images more closely
than unseen ones (Carlini et al. 2023, "Extracting Training Data from
Diffusion Models", arXiv 2301.13188; Matsumoto et al. 2023, arXiv
2302.03262), so a score that is lower on members separates them. Two scores
(lower = "member"):

* `denoising_errors`, the loss-threshold attack (Yeom et al. 2018, arXiv
  1709.01604, on the diffusion loss): the ε-prediction error averaged over a
  fixed set of timesteps T_a and of noises ε_1..ε_J shared by all images,

      s(x) = 1/(|T_a|·J) Σ_{t∈T_a} Σ_j ‖ε_j − ε_θ(√ᾱ_t x + √(1−ᾱ_t) ε_j, t)‖²/D;

* `secmi_t_errors`, SecMI's t-error (Duan et al. 2023, "Are Diffusion Models
  Vulnerable to Membership Inference Attacks?", arXiv 2302.01316, SecMI_stat):
  x̃_t = Φ_θ(x, t), the deterministic DDIM inversion of x from 0 to t in
  steps of k; one more inversion step x̃_{t+k} = φ_θ(x̃_t, t) and one
  deterministic DDIM step back x̂_t = ψ_θ(x̃_{t+k}, t + k);

      s(x) = ‖x̂_t − x̃_t‖²/D       (t = T/10, k = T/100 by default, as the
                                      paper's t_SEC = 100, k = 10 of T = 1000).

Both are scored on members and held-out non-members of the same
distribution: `roc_auc` (0.5 = chance), `tpr_at_fpr` (the true-positive rate
at a 1% false-positive rate, the low-FPR figure Carlini et al. 2022, arXiv
2112.03570, recommend), and a bootstrap interval over members and
non-members resampled with replacement (`bootstrap_interval`).

Memorization (`memorization`): for every generated sample, the L2 distance
to its nearest member against its nearest non-member (a member set of the
non-members' size, so that neither side has more images to be near to): a
ratio well below 1 for many samples means the model reproduces its
training images. A near-copy is Carlini et al.'s (ℓ2, δ)-extraction: the
nearest member is closer than δ = 1/3 of the mean distance to the
n = 50 nearest members.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff.diffusion import samplers
from fedjax_diff.diffusion import schedules as schedules_lib

PyTree = Any


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield slice(start, min(start + batch_size, n))


def _labels_batch(labels, sl):
  return None if labels is None else jnp.asarray(labels[sl])


def denoising_errors(eps_fn, params: PyTree,
                     schedule: schedules_lib.NoiseSchedule,
                     images: np.ndarray, labels: Optional[np.ndarray] = None,
                     *, timesteps: Sequence[int], num_noises: int = 2,
                     seed: int = 0, batch_size: int = 100) -> np.ndarray:
  """The loss-threshold attack's score of every image (module docstring).

  Args:
    eps_fn: `(params, x_t, t, labels, *, train, rng) -> ε̂`.
    params: the model's parameters (e.g. the EMA ones).
    schedule: its noise schedule.
    images: float [N, H, W, C] in [−1, 1].
    labels: int [N] for a class-conditional model, else None.
    timesteps: the fixed timesteps T_a.
    num_noises: J, noises per timestep, `normal(fold_in(PRNGKey(seed), j),
      image shape)`, the same for every image.
    seed: the noises' seed.
    batch_size: images per forward pass.

  Returns:
    float64 [N]: the mean squared ε-error per image.
  """
  timesteps = [int(t) for t in timesteps]
  bad = [t for t in timesteps if not 0 <= t < schedule.num_timesteps]
  if bad or not timesteps or num_noises < 1:
    raise ValueError(f'timesteps must be a non-empty list in [0, '
                     f'{schedule.num_timesteps}) and num_noises >= 1; got '
                     f'{timesteps}, {num_noises}.')
  shape = tuple(images.shape[1:])
  noises = jnp.stack([jax.random.normal(
      jax.random.fold_in(jax.random.PRNGKey(seed), j), shape, jnp.float32)
                      for j in range(num_noises)])
  rng = jax.random.PRNGKey(0)

  @jax.jit
  def score(params, x, y):
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for t in timesteps:
      tt = jnp.full((x.shape[0],), t, jnp.int32)
      for j in range(num_noises):
        eps = jnp.broadcast_to(noises[j], x.shape)
        x_t = schedules_lib.q_sample(schedule, x, tt, eps)
        pred = eps_fn(params, x_t, tt, y, train=False, rng=rng)
        total += jnp.mean(jnp.square(eps - pred.astype(jnp.float32)),
                          axis=(1, 2, 3))
    return total / (len(timesteps) * num_noises)

  out = [np.asarray(score(params, jnp.asarray(images[sl], jnp.float32),
                          _labels_batch(labels, sl)))
         for sl in _batches(len(images), batch_size)]
  return np.concatenate(out).astype(np.float64)


def secmi_t_errors(eps_fn, params: PyTree,
                   schedule: schedules_lib.NoiseSchedule, images: np.ndarray,
                   labels: Optional[np.ndarray] = None, *,
                   t: Optional[int] = None, interval: Optional[int] = None,
                   batch_size: int = 100) -> np.ndarray:
  """SecMI's t-error of every image (module docstring), with the DDIM
  step of `samplers.ddim_step` (η = 0, no clipping) both ways.

  Args:
    eps_fn, params, schedule, images, labels, batch_size: as for
      `denoising_errors`.
    t: the attacked timestep t_SEC, a multiple of `interval` (default T/10).
    interval: the step k (default max(1, T/100)).

  Returns:
    float64 [N]: ‖x̂_t − x̃_t‖²/D per image.
  """
  num_t = schedule.num_timesteps
  interval = int(interval or max(1, num_t // 100))
  t = int(t if t is not None else interval * max(1, num_t // 10 // interval))
  if interval < 1 or t < interval or t % interval or t + interval >= num_t:
    raise ValueError(f'secmi_t_errors: t={t} must be a positive multiple of '
                     f'interval={interval} with t + interval < {num_t}.')
  rng = jax.random.PRNGKey(0)

  @jax.jit
  def score(params, x, y):

    def step(x, s, s_next):
      ss = jnp.full((x.shape[0],), s, jnp.int32)
      eps = eps_fn(params, x, ss, y, train=False, rng=rng)
      return samplers.ddim_step(schedule, x, ss, s_next,
                                eps.astype(jnp.float32), eta=0.0,
                                clip_denoised=False)

    for s in range(0, t, interval):         # Φ_θ: x_0 → x̃_t.
      x = step(x, s, s + interval)
    x_next = step(x, t, t + interval)       # φ_θ: x̃_t → x̃_{t+k}.
    x_back = step(x_next, t + interval, t)  # ψ_θ: x̃_{t+k} → x̂_t.
    return jnp.mean(jnp.square(x_back - x), axis=(1, 2, 3))

  out = [np.asarray(score(params, jnp.asarray(images[sl], jnp.float32),
                          _labels_batch(labels, sl)))
         for sl in _batches(len(images), batch_size)]
  return np.concatenate(out).astype(np.float64)


# -- Attack figures. ---------------------------------------------------------


def _check_scores(members, nonmembers):
  members = np.asarray(members, np.float64).ravel()
  nonmembers = np.asarray(nonmembers, np.float64).ravel()
  if not len(members) or not len(nonmembers):
    raise ValueError('need at least one member and one non-member score.')
  return members, nonmembers


def roc_auc(members, nonmembers) -> float:
  """P(s(member) < s(non-member)) + ½·P(tie): the area under the ROC curve
  of the rule "member when s(x) ≤ τ" (Mann–Whitney U / (n_m·n_n))."""
  members, nonmembers = _check_scores(members, nonmembers)
  scores = np.concatenate([members, nonmembers])
  # Average ranks of the scores (ties share the mean rank).
  order = np.argsort(scores, kind='mergesort')
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  i = 0
  while i < len(scores):
    j = i
    while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
      j += 1
    ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
    i = j + 1
  n_m, n_n = len(members), len(nonmembers)
  # Members are the positives of *low* scores: rank the non-members.
  u = ranks[n_m:].sum() - n_n * (n_n + 1) / 2
  return float(u / (n_m * n_n))


def tpr_at_fpr(members, nonmembers, fpr: float = 0.01) -> float:
  """The largest fraction of members flagged (s ≤ τ) over thresholds τ that
  flag at most a fraction `fpr` of the non-members."""
  members, nonmembers = _check_scores(members, nonmembers)
  if not 0 <= fpr <= 1:
    raise ValueError(f'fpr must be in [0, 1], got {fpr}.')
  allowed = int(np.floor(fpr * len(nonmembers) + 1e-9))
  sorted_non = np.sort(nonmembers)
  # τ just below the (allowed+1)-th smallest non-member score.
  if allowed >= len(sorted_non):
    return 1.0
  limit = sorted_non[allowed]
  return float(np.mean(members < limit))


def bootstrap_interval(members, nonmembers,
                       statistic: Callable[[np.ndarray, np.ndarray], float],
                       num_resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of `statistic(members, nonmembers)`,
  resampling members and non-members with replacement (separately)."""
  members, nonmembers = _check_scores(members, nonmembers)
  rng = np.random.default_rng(seed)
  values = np.array([
      statistic(members[rng.integers(0, len(members), len(members))],
                nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))])
      for _ in range(int(num_resamples))])
  alpha = (1 - level) / 2
  return (float(np.quantile(values, alpha)),
          float(np.quantile(values, 1 - alpha)))


@dataclasses.dataclass(frozen=True)
class AttackResult:
  """One attack's figures, with bootstrap intervals."""
  name: str
  auc: float
  auc_interval: tuple[float, float]
  tpr: float
  tpr_interval: tuple[float, float]
  fpr: float
  num_members: int
  num_nonmembers: int

  def as_dict(self) -> dict:
    return {'auc': self.auc, 'auc_low': self.auc_interval[0],
            'auc_high': self.auc_interval[1], 'tpr': self.tpr,
            'tpr_low': self.tpr_interval[0],
            'tpr_high': self.tpr_interval[1], 'fpr': self.fpr,
            'members': self.num_members, 'nonmembers': self.num_nonmembers}


def evaluate_attack(name: str, members, nonmembers, *, fpr: float = 0.01,
                    num_resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> AttackResult:
  """AUC and TPR at `fpr` of one attack's scores, with their bootstrap
  intervals."""
  members, nonmembers = _check_scores(members, nonmembers)
  tpr = lambda m, n: tpr_at_fpr(m, n, fpr)
  return AttackResult(
      name=name, auc=roc_auc(members, nonmembers),
      auc_interval=bootstrap_interval(members, nonmembers, roc_auc,
                                      num_resamples, level, seed),
      tpr=tpr(members, nonmembers),
      tpr_interval=bootstrap_interval(members, nonmembers, tpr,
                                      num_resamples, level, seed),
      fpr=fpr, num_members=len(members), num_nonmembers=len(nonmembers))


# -- Memorization. -------------------------------------------------------------


def pairwise_distances(queries: np.ndarray, references: np.ndarray,
                       block: int = 1024) -> np.ndarray:
  """L2 distances [Q, R] between flattened images (float64)."""
  q = np.asarray(queries, np.float64).reshape(len(queries), -1)
  r = np.asarray(references, np.float64).reshape(len(references), -1)
  r2 = np.sum(r * r, axis=1)
  out = np.empty((len(q), len(r)), np.float64)
  for sl in _batches(len(q), block):
    qb = q[sl]
    d2 = np.sum(qb * qb, axis=1)[:, None] + r2[None, :] - 2.0 * qb @ r.T
    out[sl] = np.sqrt(np.maximum(d2, 0.0))
  return out


@dataclasses.dataclass(frozen=True)
class Memorization:
  """Generated samples against members and non-members.

  Attributes:
    num_samples: generated samples checked.
    median_ratio: median over samples of d(nearest member) / d(nearest
      non-member), with as many members as non-members.
    fraction_closer_to_members: samples whose ratio is < 1.
    near_copies: samples whose nearest member (of all members) is closer
      than `threshold` × the mean distance to their `num_neighbors`
      nearest members.
    threshold, num_neighbors: the near-copy test's δ and n.
  """
  num_samples: int
  median_ratio: float
  fraction_closer_to_members: float
  near_copies: int
  threshold: float
  num_neighbors: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def memorization(samples: np.ndarray, members: np.ndarray,
                 nonmembers: np.ndarray, *, num_neighbors: int = 50,
                 threshold: float = 1 / 3, seed: int = 0) -> Memorization:
  """The memorization check of the module docstring.

  Args:
    samples: generated images [S, H, W, C] (any fixed range, the same as
      the others').
    members: all training images the model could have seen.
    nonmembers: held-out images of the same distribution.
    num_neighbors: n of the near-copy test (at most the members' count).
    threshold: δ of the near-copy test.
    seed: picks the size-matched member subset of the ratio.
  """
  if len(members) < len(nonmembers):
    raise ValueError('memorization: need at least as many members as '
                     f'non-members, got {len(members)} < {len(nonmembers)}.')
  rng = np.random.default_rng(seed)
  subset = members[rng.choice(len(members), len(nonmembers), replace=False)]
  d_sub = pairwise_distances(samples, subset).min(axis=1)
  d_non = pairwise_distances(samples, nonmembers).min(axis=1)
  ratio = d_sub / np.maximum(d_non, 1e-12)
  d_all = pairwise_distances(samples, members)
  n = min(int(num_neighbors), d_all.shape[1])
  nearest = np.sort(d_all, axis=1)[:, :n]
  near = nearest[:, 0] <= threshold * nearest.mean(axis=1)
  return Memorization(
      num_samples=len(samples), median_ratio=float(np.median(ratio)),
      fraction_closer_to_members=float(np.mean(ratio < 1)),
      near_copies=int(near.sum()), threshold=float(threshold),
      num_neighbors=n)


def format_table(attacks: Sequence[AttackResult],
                 memo: Optional[Memorization] = None) -> str:
  """The audit as a Markdown table (and a memorization line)."""
  if not attacks:
    raise ValueError('format_table: no attack results.')
  level = '95%'
  lines = [f'| attack | AUC [{level} CI] | TPR @ {attacks[0].fpr:.0%} FPR '
           f'[{level} CI] | members / non-members |',
           '|---|---|---|---|']
  for a in attacks:
    lines.append(
        f'| {a.name} | {a.auc:.3f} [{a.auc_interval[0]:.3f}, '
        f'{a.auc_interval[1]:.3f}] | {a.tpr:.3f} [{a.tpr_interval[0]:.3f}, '
        f'{a.tpr_interval[1]:.3f}] | {a.num_members} / {a.num_nonmembers} |')
  if memo is not None:
    lines.append('')
    lines.append(
        f'Memorization over {memo.num_samples} samples: median d(nearest '
        f'member)/d(nearest non-member) {memo.median_ratio:.3f}, '
        f'{memo.fraction_closer_to_members:.1%} closer to a member, '
        f'{memo.near_copies} near-copies (nearest member < '
        f'{memo.threshold:.2f} × mean of the {memo.num_neighbors} nearest).')
  return '\n'.join(lines)
