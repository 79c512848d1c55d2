r"""Runs evaluators on a workdir's checkpoint, without training.

  python launch/evaluate.py --workdir=DIR
  python launch/evaluate.py --workdir=DIR --config=configs/mnist_fedavg.py \
      --only=fid,precision_recall,class_coverage [--step=40]

The model, data and diffusion come from DIR/config.json (the run that was
trained). The evaluators are that run's `evaluators` block, or the one of
`--config` when given (e.g. a config that gained evaluators after the run);
they judge the model of the run's `eval_params` ('ema' or 'raw'), or of
`--config`'s when given.
Restores the latest checkpoint (or `--step`), runs every evaluator once, and
prints and writes its figures and seconds to DIR/evaluation_round_XXXXXX.json.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Optional config file whose `evaluators` block is run '
    'instead of the workdir\'s.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint round (default: the '
                             'latest).')
_ONLY = flags.DEFINE_list('only', None, 'Run only these evaluators.')
flags.mark_flags_as_required(['workdir'])


def evaluate_workdir(workdir: str, evaluators_cfg=None, step=None,
                     only=None, write_images=None, eval_params=None):
  """Restores `workdir`'s checkpoint and runs evaluators once.

  Args:
    workdir: a training workdir (config.json and checkpoints/).
    evaluators_cfg: mapping name → entry; default: the run's own.
    eval_params: 'ema' or 'raw', the model judged; default: the run's
      `eval_params` ('ema' if it has none).
    step: the checkpoint's round; default: the latest.
    only: names of the evaluators to run (default: all).
    write_images: `(round, {name: images})` sink for image evaluators.

  Returns:
    (round, {figure: value}, {evaluator: seconds}).
  """
  from fedjax_diff import evaluators as evaluators_lib  # pylint: disable=g-import-not-at-top
  from fedjax_diff import models  # pylint: disable=g-import-not-at-top
  from fedjax_diff import trainer  # pylint: disable=g-import-not-at-top
  from fedjax_diff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from fedjax_diff import experiment  # pylint: disable=g-import-not-at-top
  from fedjax_diff import latent as latent_lib  # pylint: disable=g-import-not-at-top
  from fedjax_diff.strategies import pruning_schedule  # pylint: disable=g-import-not-at-top

  config, state = workdir_lib.load_run(workdir, step)

  train, test = trainer.load_data(config.data)
  # Latent diffusion: the run's first stage and latent scale (recomputed
  # from the train split as the run did, unless its config fixes it).
  space, _ = latent_lib.from_config(config, train.images)
  # The UNet the run trained: the compact one of a pruned (FedPhD) run.
  model = pruning_schedule.model_for_run(config, workdir)
  ctx = evaluators_lib.EvalContext(
      eps_fn=models.make_eps_fn(model),
      schedule=experiment.schedule_of(config),
      test_data=test, image_shape=tuple(test.images.shape[1:]), latent=space,
      num_classes=config.model.get('num_classes'), workdir=workdir,
      seed=int(config.seed),
      write_images=write_images or (lambda *a: None),
      params=evaluators_lib.check_params(
          eval_params or config.get('eval_params', None) or 'ema'))
  cfg = evaluators_cfg if evaluators_cfg is not None else config.evaluators
  cfg = ml_collections.ConfigDict(
      {k: v for k, v in cfg.items() if not only or k in only})
  if only and set(only) - set(cfg.keys()):
    raise ValueError(f'--only names {sorted(set(only) - set(cfg.keys()))}, '
                     f'not in the evaluators {sorted(cfg.keys())}.')
  figures, seconds = {}, {}
  for name, entry in cfg.items():
    t = time.perf_counter()
    ev = evaluators_lib.build_evaluators(
        ml_collections.ConfigDict({name: entry}), ctx)[name]
    built = time.perf_counter()
    figures.update(ev(state, state.round))
    seconds[name] = {'build': built - t, 'run': time.perf_counter() - built}
  return state.round, figures, seconds


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if not any(a.startswith(('--verbosity', '-v')) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  evaluators_cfg = _CONFIG.value.evaluators if _CONFIG.value else None
  eval_params = _CONFIG.value.get('eval_params') if _CONFIG.value else None
  workdir = _WORKDIR.value
  round_idx, figures, seconds = evaluate_workdir(
      workdir, evaluators_cfg, _STEP.value, _ONLY.value,
      eval_params=eval_params)
  for name, s in seconds.items():
    print(f'{name}: built in {s["build"]:.1f}s, ran in {s["run"]:.1f}s')
  for k, v in figures.items():
    print(f'  {k} = {v:.6g}')
  out = os.path.join(workdir, f'evaluation_round_{round_idx:06d}.json')
  with open(out, 'w') as f:
    json.dump({'round': round_idx, 'figures': figures, 'seconds': seconds},
              f, indent=2, sort_keys=True)
  print(f'Wrote {out}')


if __name__ == '__main__':
  app.run(main)
