"""The workdir contract: config, checkpoints, metrics, samples.

A workdir holds

    config.json       the resolved config of the run;
    summary.json      the run's exact communication (written at the end);
    checkpoints/      Orbax checkpoints of the server state (enough to resume
                      bit for bit: params, EMA, optimizer state, round, RNG);
    metrics.jsonl     one JSON object per logged round;
    samples/          PNG sample grids;
    events.out.*      TensorBoard event files (clu metric writers).

Running the same command again resumes from the latest checkpoint. Only
process 0 writes files other than checkpoints, which Orbax writes
collectively.
"""

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers

# Fields that may change between the first run and a resumed one: they change
# how long or how verbosely a run goes, or what is measured on it (the
# evaluators read the server state and never change it), not what it trains.
RESUMABLE_CHANGES = ('num_rounds', 'log_every', 'eval_every',
                     'checkpoint_every', 'eval.', 'evaluators.',
                     'eval_params', 'progress_every_seconds')

def is_writer() -> bool:
  return jax.process_index() == 0


def _flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(json.loads(config.to_json_best_effort()), indent=2,
                    sort_keys=True)


def check_and_write_config(workdir: str,
                           config: ml_collections.ConfigDict,
                           resumable: tuple[str, ...] = RESUMABLE_CHANGES
                           ) -> None:
  """Writes config.json, or checks a resumed run against the one there.

  The configs are compared field by field (flattened). A field that only
  one side has is a difference like any other: a workdir written by an
  older fedjax_diff, whose config.json lacks a field added since, is refused
  with the field named, rather than read through a table of assumed values.

  Raises:
    ValueError: the workdir holds a run of a different configuration (other
      than the fields in `resumable`, by default RESUMABLE_CHANGES; a
      name ending in '.' covers a block); nothing in it is touched.
  """
  path = os.path.join(workdir, 'config.json')
  new = config_to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      old = _flatten(json.load(f))
    cur = _flatten(json.loads(new))
    diff = sorted(
        k for k in set(old) | set(cur)
        if (k not in old or k not in cur or old[k] != cur[k]) and not any(
            k == r or (r.endswith('.') and k.startswith(r))
            for r in resumable))
    if diff:
      lines = '\n'.join(
          f'  {k}: {_describe(old, k)} in the workdir, {_describe(cur, k)} now'
          for k in diff)
      missing = [k for k in diff if k not in old]
      hint = (f'\nThe workdir\'s config.json has no {", ".join(missing)}: it '
              'was written before the field existed. If the run had the '
              'behaviour of the value now, add that value to its config.json; '
              'else use the old fedjax_diff.' if missing else '')
      raise ValueError(
          f'{workdir} holds a run with a different config; resuming it with '
          f'this one would mix two experiments:\n{lines}{hint}\nUse a new '
          '--workdir, or the workdir\'s own config.json. Only '
          f'{", ".join(resumable)} may change on resume.')
  if is_writer():
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
      f.write(new + '\n')


def _describe(flat: Mapping[str, Any], key: str) -> str:
  return repr(flat[key]) if key in flat else '(absent)'


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  """Writes summary.json (process 0 only)."""
  if is_writer():
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      f.write(json.dumps(summary, indent=2, sort_keys=True) + '\n')


def read_summary(workdir: str) -> dict[str, Any]:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _scalar(v):
  """A Python int for integral values (byte counts stay exact), else float."""
  v = np.asarray(v)
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  return float(v)


class MetricsLog:
  """Writes metrics to metrics.jsonl and to clu's writers (TensorBoard)."""

  def __init__(self, workdir: str):
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_writer())

  def write(self, round_idx: int, metrics: Mapping[str, Any]) -> None:
    scalars = {k: _scalar(v) for k, v in metrics.items()}
    self._writer.write_scalars(round_idx, scalars)
    if is_writer():
      with open(self._path, 'a') as f:
        f.write(json.dumps({'round': round_idx, **scalars}) + '\n')

  def write_images(self, round_idx: int, images: Mapping[str, np.ndarray]):
    self._writer.write_images(round_idx, images)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of a workdir's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_round: int) -> None:
  """Drops rows logged after `last_round` (they are recomputed on resume).

  A run killed between a log and the next checkpoint leaves rows that the
  resumed run writes again; this keeps one row per round.
  """
  if not is_writer():
    return
  rows = read_metrics(workdir)
  kept = [r for r in rows if r['round'] <= last_round]
  if len(kept) != len(rows):
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)


def checkpoint_manager(workdir: str, max_to_keep: int = 3
                       ) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state) -> None:
  manager.save(step, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, like,
                       step: Optional[int] = None):
  """Restores the checkpoint `step` (default: latest) shaped like `like`.

  Arrays are restored with the shardings of `like`'s. A dataclass field of
  `like` that holds no arrays (e.g. `ServerState.client_states == {}`) and
  that a checkpoint written before the field existed lacks is taken from
  `like`.

  Returns (state, step), or (like, None) when there is no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return like, None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  missing = _empty_fields_missing_on_disk(manager, step, abstract)
  if not missing:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return state, step
  present = {f.name: getattr(abstract, f.name)
             for f in dataclasses.fields(abstract) if f.name not in missing}
  restored = manager.restore(step, args=ocp.args.StandardRestore(present))
  return like.replace(**restored), step


def _empty_fields_missing_on_disk(manager, step, abstract) -> list[str]:
  """Array-free dataclass fields of `abstract` absent from the checkpoint."""
  if not dataclasses.is_dataclass(abstract):
    return []
  tree = getattr(manager.item_metadata(step), 'tree', None)
  if not isinstance(tree, Mapping):
    return []
  return [f.name for f in dataclasses.fields(abstract)
          if f.name not in tree and not jax.tree.leaves(
              getattr(abstract, f.name))]


def load_run(workdir: str, step: Optional[int] = None):
  """A trained run's config and a checkpoint's models, for tools that read
  a workdir without training (launch/evaluate.py, launch/audit.py).

  Returns:
    (config, state): the ConfigDict of config.json, and a namespace with
    `params`, `ema_params` and `round` of checkpoint `step` (default: the
    latest), restored as saved.

  Raises:
    FileNotFoundError: no config.json, or no such checkpoint.
  """
  import types  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: the workdir must be a '
                            'training workdir (launch/train.py writes '
                            'config.json).')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  manager = checkpoint_manager(workdir)
  step = manager.latest_step() if step is None else int(step)
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(
        f'no checkpoint {"" if step is None else step} in {workdir}/'
        f'checkpoints (steps there: {list(manager.all_steps())}).')
  raw = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return config, types.SimpleNamespace(params=raw['params'],
                                       ema_params=raw['ema_params'],
                                       round=int(raw['round']))


def samples_dir(workdir: str) -> str:
  path = os.path.join(workdir, 'samples')
  if is_writer():
    os.makedirs(path, exist_ok=True)
  return path


def all_files(workdir: str) -> Iterable[str]:
  for root, _, files in os.walk(workdir):
    for name in files:
      yield os.path.relpath(os.path.join(root, name), workdir)
