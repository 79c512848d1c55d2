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
collectively. Paths go through `etils.epath`, so a workdir may be a local
folder or a bucket (`gs://...`, which the hosts of a pod share).

Partial files (a run killed while writing) never block a resume:
config.json and summary.json are written whole or not at all (a temporary
file renamed over the old one); metrics.jsonl is appended one complete line
at a time, so a kill can leave only its last line torn, which `read_metrics`
detects (no newline, or not JSON) and drops with a warning; a checkpoint
that cannot be restored, or holds a non-finite value, is moved to
`checkpoints_bad/` with a warning naming its step, and the run resumes from
the newest intact one (`resume`). A non-finite state is never saved
(`save_checkpoint`).
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers

from fedjax_diff.errors import ConfigError
from fedjax_diff.errors import TrainingDiverged
from fedjax_diff.strategies import faults as faults_lib

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
    ConfigError: the workdir holds a run of a different configuration (other
      than the fields in `resumable`, by default RESUMABLE_CHANGES; a name
      ending in '.' covers a block), its config.json is unreadable, or the
      workdir is not a directory; nothing in it is touched.
  """
  root = epath.Path(workdir)
  if root.exists() and not root.is_dir():
    raise ConfigError(f'--workdir={workdir} is a file, not a directory: '
                      'name a new directory (it is created) or a workdir.')
  path = root / 'config.json'
  new = config_to_json(config)
  if path.exists():
    try:
      old = _flatten(json.loads(path.read_text()))
    except (ValueError, OSError) as e:
      raise ConfigError(
          f'{path} is unreadable ({e}), so this workdir\'s run cannot be '
          'identified: restore the file (it is the resolved config of the '
          'run), or use a new --workdir.') from None
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
      raise ConfigError(
          f'{workdir} holds a run with a different config; resuming it with '
          f'this one would mix two experiments:\n{lines}{hint}\nUse a new '
          '--workdir, or the workdir\'s own config.json. Only '
          f'{", ".join(resumable)} may change on resume.')
  if is_writer():
    root.mkdir(parents=True, exist_ok=True)
    # Whole: the other processes of a resumed run read it meanwhile.
    write_atomic(path, new + '\n')


def _is_local(path) -> bool:
  return '://' not in os.fspath(path)


def write_atomic(path, text: str) -> None:
  """Writes `path` whole or not at all: locally a temporary file renamed
  over it; an object store (gs://) writes an object whole by itself."""
  if not _is_local(path):
    epath.Path(path).write_text(text)
    return
  tmp = f'{os.fspath(path)}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.fspath(path))


def _describe(flat: Mapping[str, Any], key: str) -> str:
  return repr(flat[key]) if key in flat else '(absent)'


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  """Writes summary.json (process 0 only)."""
  if is_writer():
    write_atomic(epath.Path(workdir) / 'summary.json',
                 json.dumps(summary, indent=2, sort_keys=True) + '\n')


def read_summary(workdir: str) -> dict[str, Any]:
  return json.loads((epath.Path(workdir) / 'summary.json').read_text())


def _scalar(v):
  """A Python int for integral values (byte counts stay exact), else float."""
  v = np.asarray(v)
  if np.issubdtype(v.dtype, np.integer):
    return int(v)
  return float(v)


class MetricsLog:
  """Writes metrics to metrics.jsonl and to clu's writers (TensorBoard)."""

  def __init__(self, workdir: str):
    self._path = epath.Path(workdir) / 'metrics.jsonl'
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_writer())

  def write(self, round_idx: int, metrics: Mapping[str, Any]) -> None:
    """Appends one row: a complete line in one write (a kill can tear only
    the last line, which `read_metrics` drops)."""
    scalars = {k: _scalar(v) for k, v in metrics.items()}
    self._writer.write_scalars(round_idx, scalars)
    if is_writer():
      _append_line(self._path, json.dumps({'round': round_idx, **scalars}))

  def write_images(self, round_idx: int, images: Mapping[str, np.ndarray]):
    self._writer.write_images(round_idx, images)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def read_metrics(workdir: str, warn: Optional[Callable[[str], None]] = None
                 ) -> list[dict[str, Any]]:
  """The rows of a workdir's metrics.jsonl.

  A torn last line (no final newline, or not a JSON object: what a kill
  during a write leaves) is dropped, with a message to `warn` (default: the
  log).

  Raises:
    ValueError: a line other than the last is not a JSON object (the file
      was edited or damaged otherwise); the message names the line.
  """
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  text = path.read_text()
  lines = text.split('\n')
  torn = lines.pop()   # '' after a final newline, else the torn tail.
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    row = _json_row(line)
    if row is None:
      if i == len(lines) - 1 and not torn:
        torn = line
        continue
      raise ValueError(f'{path}: line {i + 1} is not a JSON object '
                       f'({line[:60]!r}); fix or remove it.')
    rows.append(row)
  if torn.strip():
    (warn or logging.warning)(
        f'{path}: dropped a torn last line ({torn[:60]!r}...), left by a run '
        'stopped while writing it; its round is logged again on resume.')
  return rows


def _json_row(line: str) -> Optional[dict]:
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row if isinstance(row, dict) and 'round' in row else None


def truncate_metrics(workdir: str, last_round: int,
                     warn: Optional[Callable[[str], None]] = None) -> None:
  """Keeps the rows of rounds <= `last_round` (those after it are recomputed
  on resume; 0: none) and drops a torn last line; rewrites the file whole.

  A run killed between a log and the next checkpoint leaves rows that the
  resumed run writes again; this keeps one row per round.
  """
  if not is_writer():
    return
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return
  rows = read_metrics(workdir, warn)
  kept = [r for r in rows if r['round'] <= last_round]
  text = ''.join(json.dumps(r) + '\n' for r in kept)
  if path.read_text() != text:
    write_atomic(path, text)


def checkpoint_manager(workdir: str, max_to_keep: int = 3
                       ) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      absolute(workdir) / 'checkpoints',
      # Synchronous saves: the run waits for each anyway, and Orbax's
      # background commit threads deadlocked two CPU processes (gloo) here.
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True,
                                           enable_async_checkpointing=False))


_check_finite = jax.jit(faults_lib.state_finite)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` as step `step` and waits until it is written.

  Raises:
    TrainingDiverged: `state` holds a non-finite value (nothing is written;
      the message names the leaves).
    RuntimeError: Orbax skipped the save (a step >= `step` exists).
  """
  if not bool(_check_finite(state)):
    bad = faults_lib.non_finite_leaves(state)
    raise TrainingDiverged(
        f'Refusing to save checkpoint {step}: the state holds non-finite '
        f'values in {", ".join(bad[:4])}{" ..." if len(bad) > 4 else ""}. '
        f'The newest checkpoint in {manager.directory} is '
        f'{manager.latest_step()}.')
  if not manager.save(step, args=ocp.args.StandardSave(state)):
    raise RuntimeError(f'Orbax skipped saving step {step} in '
                       f'{manager.directory} (its latest step is '
                       f'{manager.latest_step()}).')
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


def resume(workdir: str, like, log: Callable[[str], None] = print):
  """Opens `<workdir>/checkpoints` and restores its newest intact step.

  A step whose restore fails (a truncated or missing file, a torn
  _METADATA, ...) or that holds a non-finite value is moved to
  `<workdir>/checkpoints_bad/<step>` (kept for inspection; a later save of
  that step would otherwise be refused) with a warning naming it, and the
  next older step is tried.

  Returns:
    (manager, state, step): state is `like` and step None when there is no
    checkpoint.

  Raises:
    ConfigError: there are checkpoints but none is intact.
  """
  manager = checkpoint_manager(workdir)
  bad = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, _ = restore_checkpoint(manager, like, step)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).splitlines() or [''])[0]
      reason = (f'{type(e).__name__}: '
                f'{first[:240]}{"..." if len(first) > 240 else ""}')
    else:
      if bool(_check_finite(state)):
        if bad:
          manager.close()
          manager = checkpoint_manager(workdir)
        return manager, state, step
      reason = ('non-finite values in ' +
                ', '.join(faults_lib.non_finite_leaves(state)[:4]))
    bad.append(step)
    moved = _move_aside(workdir, step)
    log(f'WARNING: checkpoint {step} in {workdir}/checkpoints is unusable '
        f'({reason}); moved it to {moved} and falling back to the previous '
        'checkpoint.')
  if bad:
    raise ConfigError(
        f'No intact checkpoint in {workdir}/checkpoints: steps {bad} are '
        f'unusable (moved to {workdir}/checkpoints_bad). Use a new '
        '--workdir, or move checkpoints_bad/ and metrics.jsonl away to '
        'start this one over.')
  return manager, like, None


def _move_aside(workdir: str, step: int) -> str:
  root = absolute(workdir)
  src = root / 'checkpoints' / str(step)
  dst = root / 'checkpoints_bad' / str(step)
  if dst.exists():
    dst = dst.parent / f'{step}.{time.strftime("%Y%m%d-%H%M%S")}'
  if is_writer():
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
  return os.fspath(dst)


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
    latest), restored with their saved shardings where this process has
    those devices, else whole on its first device (a run of several
    processes read back by one).

  Raises:
    FileNotFoundError: no config.json, or no such checkpoint.
  """
  import types  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: the workdir must be a '
                            'training workdir (launch/train.py writes '
                            'config.json).')
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  manager = checkpoint_manager(workdir)
  step = manager.latest_step() if step is None else int(step)
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(
        f'no checkpoint {"" if step is None else step} in {workdir}/'
        f'checkpoints (steps there: {list(manager.all_steps())}).')
  raw = manager.restore(step, args=ocp.args.StandardRestore(
      fallback_sharding=jax.sharding.SingleDeviceSharding(
          jax.local_devices()[0])))
  manager.close()
  return config, types.SimpleNamespace(params=raw['params'],
                                       ema_params=raw['ema_params'],
                                       round=int(raw['round']))


def samples_dir(workdir: str) -> str:
  path = epath.Path(workdir) / 'samples'
  if is_writer():
    path.mkdir(parents=True, exist_ok=True)
  return os.fspath(path)


def all_files(workdir: str) -> Iterable[str]:
  """Paths of the files under `workdir`, relative to it.

  Walked one folder at a time (`iterdir`): newer etils refuse a recursive
  glob (`rglob`) on any path they back with their gfile layer.
  """
  root = epath.Path(workdir)
  folders = [root]
  while folders:
    for path in folders.pop().iterdir():
      if path.is_dir():
        folders.append(path)
      else:
        yield os.fspath(path.relative_to(root))


def absolute(workdir) -> epath.Path:
  """`workdir` as an absolute epath: a local folder made absolute, a
  `gs://` (or other remote) path kept as it is."""
  path = epath.Path(workdir)
  return epath.Path(os.path.abspath(os.fspath(path))) if _is_local(
      path) else path


def _append_line(path: epath.Path, line: str) -> None:
  """Appends `line` to a text file in one write: in place for a local
  file; by rewriting it where the storage has no append (object stores such
  as gs://, whose objects are written whole)."""
  if _is_local(path):
    with open(os.fspath(path), 'a') as f:
      f.write(line + '\n')
      f.flush()
  else:
    old = path.read_text() if path.exists() else ''
    path.write_text(old + line + '\n')
