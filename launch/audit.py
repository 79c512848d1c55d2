r"""Privacy audit of a trained global model: membership inference and
memorization.

  python launch/audit.py WORKDIR [--step=N] [--num_members=500]
      [--num_samples=500] [--sample_steps=20] [--bootstrap=1000]

Members are training images of clients that took part in at least one of the
checkpoint's rounds (the run's own sampling, recomputed from its config),
drawn with the class mix of the non-members; non-members are the held-out
split of the same dataset. The EMA model (the
one that samples) is attacked with the loss-threshold attack on its
ε-prediction error at fixed timesteps and noises, and with SecMI's t-error;
each gets its AUC and TPR at 1% FPR with bootstrap intervals. Then
`--num_samples` DDIM samples are checked for memorization (distance to the
nearest member against the nearest non-member, and near-copies). See
fedjax_diff/metrics/membership.py for the definitions.

Prints a Markdown table and writes WORKDIR/audit_round_XXXXXX.json.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

_STEP = flags.DEFINE_integer('step', None, 'Checkpoint round (default: the '
                             'latest).')
_NUM_MEMBERS = flags.DEFINE_integer(
    'num_members', None, 'Members attacked (default: as many as the held-out '
    'non-members, with their class mix).')
_NUM_NONMEMBERS = flags.DEFINE_integer(
    'num_nonmembers', None, 'Held-out non-members attacked (default: the '
    'whole held-out split).')
_TIMESTEPS = flags.DEFINE_list(
    'timesteps', ['0.02', '0.05', '0.1', '0.2', '0.3'],
    'The loss attack\'s fixed timesteps, as fractions of T.')
_NUM_NOISES = flags.DEFINE_integer('num_noises', 2, 'Fixed noises per '
                                   'timestep of the loss attack.')
_SECMI_T = flags.DEFINE_float('secmi_t', 0.1, 'SecMI\'s t, a fraction of T.')
_SECMI_INTERVAL = flags.DEFINE_float('secmi_interval', 0.01, 'SecMI\'s step '
                                     'k, a fraction of T.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 500, 'DDIM samples of the '
                                    'memorization check (0: skip it).')
_SAMPLE_STEPS = flags.DEFINE_integer('sample_steps', 20, 'DDIM steps of those '
                                     'samples (η = 0).')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap resamples.')
_FPR = flags.DEFINE_float('fpr', 0.01, 'The false-positive rate of TPR@FPR.')
_SEED = flags.DEFINE_integer('seed', 0, 'Picks the members, the noises and '
                             'the bootstrap resamples.')
_BATCH = flags.DEFINE_integer('batch_size', 100, 'Images per forward pass.')


def participants(config, num_clients: int, rounds: int):
  """Clients sampled in any of the first `rounds` rounds of the run."""
  from fedjax_diff.algorithms import base  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  seen = set()
  for r in range(rounds):
    seen.update(int(k) for k in base.round_clients(config, num_clients, r))
  return np.array(sorted(seen), np.int64)


def matched_members(pool, labels, nonmember_labels, num: int, rng):
  """`num` members drawn from `pool` (indices into `labels`) with the class
  proportions of the non-members, so that neither side of the attack is
  easier by its mix of digits (as many of a class as the pool has, at
  most); without replacement."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  pool = np.asarray(pool)
  classes, counts = np.unique(nonmember_labels, return_counts=True)
  want = np.floor(counts / counts.sum() * num).astype(int)
  # Largest remainders first, to `num` in all.
  rest = counts / counts.sum() * num - want
  want[np.argsort(-rest)[:num - want.sum()]] += 1
  out = []
  for c, k in zip(classes, want):
    mine = pool[labels[pool] == c]
    out.append(rng.choice(mine, min(k, len(mine)), replace=False))
  return np.sort(np.concatenate(out))


def audit(workdir: str, *, step=None, num_members=None, num_nonmembers=None,
          timesteps=(0.02, 0.05, 0.1, 0.2, 0.3), num_noises=2, secmi_t=0.1,
          secmi_interval=0.01, num_samples=500, sample_steps=20,
          bootstrap=1000, fpr=0.01, seed=0, batch_size=100,
          log=print) -> dict:
  """Runs the audit of `workdir`'s checkpoint; returns its figures (also
  written to WORKDIR/audit_round_XXXXXX.json) with the table under
  'table'."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_diff import client as client_lib  # pylint: disable=g-import-not-at-top
  from fedjax_diff import models  # pylint: disable=g-import-not-at-top
  from fedjax_diff import trainer  # pylint: disable=g-import-not-at-top
  from fedjax_diff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from fedjax_diff.diffusion import make_schedule  # pylint: disable=g-import-not-at-top
  from fedjax_diff.evaluators import _generative  # pylint: disable=g-import-not-at-top
  from fedjax_diff.evaluators import base as evaluators_base  # pylint: disable=g-import-not-at-top
  from fedjax_diff.metrics import membership  # pylint: disable=g-import-not-at-top
  from fedjax_diff.strategies import pruning_schedule  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  config, state = workdir_lib.load_run(workdir, step)
  train, test = trainer.load_data(config.data)
  num_clients = int(config.federation.num_clients)
  parts = trainer.partition(train.labels, config.partition, num_clients,
                            int(config.seed))
  seen = participants(config, len(parts), state.round)
  if not len(seen):
    raise ValueError(f'{workdir}: no client took part in the checkpoint\'s '
                     f'{state.round} rounds; nothing to audit.')
  member_pool = np.concatenate([parts[k] for k in seen])
  rng = np.random.default_rng(seed)
  n_non = min(num_nonmembers or len(test.images), len(test.images))
  non_idx = rng.choice(len(test.images), n_non, replace=False)
  mem_idx = matched_members(member_pool, train.labels, test.labels[non_idx],
                            num_members or n_non, rng)
  n_mem = len(mem_idx)
  to_float = lambda x: np.asarray(client_lib.to_float_images(x))
  members, nonmembers = (to_float(train.images[mem_idx]),
                         to_float(test.images[non_idx]))
  conditional = config.model.get('num_classes') is not None
  mem_labels = train.labels[mem_idx] if conditional else None
  non_labels = test.labels[non_idx] if conditional else None

  model = pruning_schedule.model_for_run(config, workdir)
  eps_fn = models.make_eps_fn(model)
  schedule = make_schedule(config.diffusion.schedule,
                           int(config.diffusion.num_timesteps))
  num_t = schedule.num_timesteps
  params = state.ema_params
  ts = sorted({min(num_t - 1, max(0, int(round(float(f) * num_t))))
               for f in timesteps})
  interval = max(1, int(round(secmi_interval * num_t)))
  t_sec = max(interval, int(round(secmi_t * num_t)) // interval * interval)
  log(f'Auditing {workdir} at round {state.round}: {n_mem} members (of '
      f'{len(member_pool)} images of the {len(seen)} clients that took part) '
      f'and {n_non} held-out non-members; loss attack at t = {ts} with '
      f'{num_noises} noises, SecMI at t = {t_sec}, k = {interval}.')

  def loss_scores(x, y):
    return membership.denoising_errors(
        eps_fn, params, schedule, x, y, timesteps=ts, num_noises=num_noises,
        seed=seed, batch_size=batch_size)

  def secmi_scores(x, y):
    return membership.secmi_t_errors(eps_fn, params, schedule, x, y,
                                     t=t_sec, interval=interval,
                                     batch_size=batch_size)

  attacks = []
  for name, score in (('loss threshold (ε-error)', loss_scores),
                      ('SecMI t-error', secmi_scores)):
    attacks.append(membership.evaluate_attack(
        name, score(members, mem_labels), score(nonmembers, non_labels),
        fpr=fpr, num_resamples=bootstrap, seed=seed))
  memo = None
  if num_samples:
    ctx = evaluators_base.EvalContext(
        eps_fn=eps_fn, schedule=schedule, test_data=test,
        image_shape=tuple(test.images.shape[1:]),
        num_classes=config.model.get('num_classes'), workdir=workdir,
        seed=int(config.seed) + seed, write_images=lambda *a: None)
    draw = _generative.Generator(evaluators_base.parse(
        ml_collections.ConfigDict(dict(
            num_samples=num_samples, num_steps=sample_steps, eta=0.0,
            batch_size=min(250, num_samples))),
        _generative.FIELDS, 'audit'), ctx)
    samples = draw(state, state.round)
    memo = membership.memorization(
        samples, to_float(train.images[member_pool]),
        to_float(test.images), seed=seed)
  table = membership.format_table(attacks, memo)
  out = {'round': state.round, 'seconds': time.perf_counter() - t0,
         'participating_clients': int(len(seen)),
         'attacks': {a.name: a.as_dict() for a in attacks},
         'memorization': memo.as_dict() if memo else None,
         'loss_timesteps': ts, 'num_noises': num_noises,
         'secmi_t': t_sec, 'secmi_interval': interval, 'table': table}
  path = os.path.join(workdir, f'audit_round_{state.round:06d}.json')
  if workdir_lib.is_writer():
    with open(path, 'w') as f:
      json.dump(out, f, indent=2, sort_keys=True)
  log(table)
  log(f'Wrote {path} ({out["seconds"]:.0f}s).')
  return out


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('Usage: python launch/audit.py WORKDIR [--flags]')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  audit(argv[1], step=_STEP.value, num_members=_NUM_MEMBERS.value,
        num_nonmembers=_NUM_NONMEMBERS.value,
        timesteps=[float(t) for t in _TIMESTEPS.value],
        num_noises=_NUM_NOISES.value, secmi_t=_SECMI_T.value,
        secmi_interval=_SECMI_INTERVAL.value, num_samples=_NUM_SAMPLES.value,
        sample_steps=_SAMPLE_STEPS.value, bootstrap=_BOOTSTRAP.value,
        fpr=_FPR.value, seed=_SEED.value, batch_size=_BATCH.value)


if __name__ == '__main__':
  app.run(main)
