"""`config.pruning`: when and how a training run prunes its UNet (FedPhD).

Config block (absent or None: no pruning):

    config.pruning.ratio          fraction of channels removed per group
                                  (FedPhD: 0.2 CIFAR-10, 0.4 CelebA)
    config.pruning.rule           'torch_pruning' (default: FedPhD's,
                                  torch-pruning's per-GroupNorm-block floor
                                  with the same positions in every block) |
                                  'nearest' (round, channels chosen freely;
                                  see models/channel_groups.py)
    config.pruning.importance     'l2' (group L2 norm, FedPhD,
                                  arXiv 2507.06449) | 'taylor' (first-order
                                  Taylor on the diffusion loss, Diff-Pruning,
                                  arXiv 2305.10924)
    config.pruning.importance_params  'kernels' | 'all': what a channel's
                                  importance sums over (default: 'kernels'
                                  for 'torch_pruning', torch-pruning's
                                  default; 'all' for 'nearest')
    config.pruning.schedule       'before' | 'after_sparse'
    config.pruning.sparse_rounds  'after_sparse': rounds of sparse training
    config.pruning.penalty        'after_sparse': 'group_lasso' (default,
                                  λ·Σ_g Σ_c ‖θ_{g,c}‖₂ over channels) |
                                  'frobenius' (FedPhD's code:
                                  λ·Σ_W ‖W‖_F over whole weight tensors)
    config.pruning.lasso          'after_sparse': the penalty's λ
    config.pruning.taylor_batches 'taylor': noise/timestep draws (default 8)
    config.pruning.taylor_examples 'taylor': training images used (64)

Schedules:

* 'before' (FedPhD's final setting): the initial UNet is pruned (its
  importance computed at initialisation) and compacted
  (`models.compact`); every round trains, sends and aggregates the small
  model.
* 'after_sparse': first `sparse_rounds` federated rounds of the full UNet
  with the sparse-training penalty in every client's optimizer (the group
  lasso λ·Σ‖θ_{g,c}‖₂, `pruning.group_lasso`, or FedPhD's λ·Σ_W ‖W‖_F,
  `pruning.frobenius_penalty`), run as a stage of its own in
  `<workdir>/sparse`
  (it resumes like any run); then its final global model is pruned and
  compacted, and the run's `num_rounds` rounds train the small model from
  there (server optimizer state and EMA start afresh from the compact
  model). The total budget is `sparse_rounds + num_rounds` rounds. The
  trainer runs the first stage (`sparse_stage`) before `prepare`.

Taylor importance needs the diffusion loss on data; the server has none in
federated learning, so here it uses `taylor_examples` training images
(equivalently: the example-weighted mean of the clients' gradients on
them). FedPhD's L2 importance is data-free.
"""

import copy
import dataclasses
import json
from typing import Any, Callable, Optional

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_diff.models import channel_groups as cg
from fedjax_diff.models import compact as compact_lib
from fedjax_diff.models import macs as macs_lib
from fedjax_diff.models import unet as unet_lib
from fedjax_diff.strategies import pruning

PyTree = Any
SCHEDULES = ('before', 'after_sparse')
PENALTIES = ('group_lasso', 'frobenius')


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  ratio: float
  importance: str = 'l2'
  schedule: str = 'before'
  sparse_rounds: int = 0
  lasso: float = 0.0
  taylor_batches: int = 8
  taylor_examples: int = 64
  rule: str = 'torch_pruning'
  importance_params: str = 'kernels'
  penalty: str = 'group_lasso'


def config_from(config: ml_collections.ConfigDict) -> Optional[PruningConfig]:
  """The validated `config.pruning`, or None when pruning is off.

  Raises:
    ValueError: a field is missing or out of range (the message says which
      and what is allowed).
  """
  cfg = config.get('pruning')
  if cfg is None:
    return None
  if 'ratio' not in cfg:
    raise ValueError('config.pruning needs a ratio in [0, 1) (FedPhD: 0.2 '
                     'on CIFAR-10); set config.pruning = None for no '
                     'pruning.')
  rule = str(cfg.get('rule', 'torch_pruning'))
  if rule not in cg.RULES:
    raise ValueError(f'config.pruning.rule must be one of {cg.RULES}, got '
                     f'{rule!r}.')
  out = PruningConfig(
      ratio=float(cfg.ratio), importance=str(cfg.get('importance', 'l2')),
      schedule=str(cfg.get('schedule', 'before')),
      sparse_rounds=int(cfg.get('sparse_rounds', 0) or 0),
      lasso=float(cfg.get('lasso', 0.0) or 0.0),
      taylor_batches=int(cfg.get('taylor_batches', 8)),
      taylor_examples=int(cfg.get('taylor_examples', 64)),
      rule=rule,
      importance_params=str(
          cfg.get('importance_params', None) or
          pruning.DEFAULT_IMPORTANCE_PARAMS[rule]),
      penalty=str(cfg.get('penalty', 'group_lasso')))
  if out.importance_params not in pruning.IMPORTANCE_PARAMS:
    raise ValueError(f'config.pruning.importance_params must be one of '
                     f'{pruning.IMPORTANCE_PARAMS}, got '
                     f'{out.importance_params!r}.')
  if out.penalty not in PENALTIES:
    raise ValueError(f'config.pruning.penalty must be one of {PENALTIES}, '
                     f'got {out.penalty!r}.')
  if not 0.0 <= out.ratio < 1.0:
    raise ValueError(f'config.pruning.ratio must be in [0, 1), got '
                     f'{out.ratio}.')
  if out.importance not in pruning.IMPORTANCES:
    raise ValueError(f'config.pruning.importance must be one of '
                     f'{pruning.IMPORTANCES}, got {out.importance!r}.')
  if out.schedule not in SCHEDULES:
    raise ValueError(f'config.pruning.schedule must be one of {SCHEDULES}, '
                     f'got {out.schedule!r}.')
  if out.schedule == 'after_sparse' and (out.sparse_rounds < 1 or
                                         not out.lasso > 0):
    raise ValueError(
        "config.pruning.schedule='after_sparse' needs sparse_rounds >= 1 "
        f'and lasso > 0 (got sparse_rounds={out.sparse_rounds}, '
        f'lasso={out.lasso}); e.g. sparse_rounds=5, lasso=1e-4.')
  if out.importance == 'taylor' and (out.taylor_batches < 1 or
                                     out.taylor_examples < 1):
    raise ValueError('config.pruning.taylor_batches and taylor_examples '
                     'must be >= 1.')
  return out


def prune(model: unet_lib.UNet, params: PyTree, cfg: PruningConfig, *,
          image_shape, loss_fn: Optional[Callable[..., jax.Array]] = None,
          images: Optional[jax.Array] = None,
          labels: Optional[jax.Array] = None,
          rng: Optional[jax.Array] = None
          ) -> tuple[unet_lib.UNet, PyTree, dict[str, Any]]:
  """Prunes `params` by `cfg` and compacts them.

  Args:
    model: the UNet of `params`.
    params: its parameters.
    cfg: the pruning config.
    image_shape: (H, W, C), for the MAC counts.
    loss_fn, images, labels, rng: 'taylor' only: the diffusion loss
      `(params, x, labels, rng)`, float images in [-1, 1] and their labels.

  Returns:
    (compact model, compact params, info) with info the figures of the
    pruning (params and MACs before and after, widths).
  """
  groups = cg.unet_channel_groups(params, model.num_groups)
  terms = cfg.importance_params
  if cfg.importance == 'l2':
    importance = pruning.l2_importance(params, groups, terms)
    if cfg.rule == 'torch_pruning':
      # torch-pruning scores a channel by Σ θ² (p = 2, no root) and averages
      # these over the GroupNorm blocks.
      importance = {k: jnp.square(v) for k, v in importance.items()}
  else:
    if loss_fn is None or images is None or rng is None:
      raise ValueError("importance='taylor' needs loss_fn, images and rng.")
    grads = pruning.taylor_gradients(loss_fn, params, images, labels, rng,
                                     cfg.taylor_batches)
    importance = pruning.taylor_importance(params, grads, groups, terms)
  channels = pruning.select(importance, groups, cfg.ratio, cfg.rule)
  small, small_params = compact_lib.compact(model, params, groups, channels)
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                        params)
  small_shapes = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), small_params)
  expect = jax.eval_shape(
      lambda: unet_lib.init_params(small, jax.random.key(0), image_shape))
  shape_of = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  if shape_of(expect) != shape_of(small_shapes):
    raise ValueError(
        'prune: the compacted parameters do not fit the compact UNet '
        f'(widths stem {small.stem_width}, levels {small.level_widths}, '
        f'upsample inputs {small.upsample_in_widths}, time embedding '
        f'{small.temb_width}): channel groups that the UNet ties to one '
        'width kept different counts. Prune every group by one ratio.')
  info = {
      'ratio': cfg.ratio, 'importance': cfg.importance,
      'rule': cfg.rule, 'importance_params': cfg.importance_params,
      'schedule': cfg.schedule,
      'params_before': unet_lib.count_params(shapes),
      'params_after': unet_lib.count_params(small_shapes),
      'macs_before': macs_lib.unet_macs(model, image_shape, shapes),
      'macs_after': macs_lib.unet_macs(small, image_shape, small_shapes),
      'stem_width': small.stem_width,
      'level_widths': list(small.level_widths),
      'temb_width': small.temb_width,
      'upsample_in_widths': list(small.upsample_in_widths),
      'kept_channels': pruning.counts(channels),
  }
  return small, small_params, info


def sparse_stage(config: ml_collections.ConfigDict
                 ) -> Optional[ml_collections.ConfigDict]:
  """The config of 'after_sparse''s first stage, or None for no stage: the
  full UNet trained `sparse_rounds` rounds with the sparse-training penalty
  (`config.group_lasso` or `config.frobenius_penalty` = λ), no evaluators.
  The trainer runs it in `<workdir>/sparse` (it resumes like any run) and
  passes its final global parameters to `prepare`."""
  cfg = config_from(config)
  if cfg is None or cfg.schedule != 'after_sparse':
    return None
  out = copy.deepcopy(config)
  with out.unlocked():
    out.pruning = None
    if cfg.penalty == 'frobenius':
      out.frobenius_penalty = cfg.lasso
    else:
      out.group_lasso = cfg.lasso
    out.num_rounds = cfg.sparse_rounds
    out.evaluators = ml_collections.ConfigDict()
    out.checkpoint_every = cfg.sparse_rounds
  return out


def prepare(config: ml_collections.ConfigDict, workdir: str,
            model: unet_lib.UNet, params: PyTree, *, image_shape,
            loss_fn_for: Callable[[unet_lib.UNet], Callable[..., Any]],
            images: np.ndarray, labels: Optional[np.ndarray], seed: int,
            log: Callable[[str], None] = print
            ) -> tuple[unet_lib.UNet, PyTree, Optional[dict[str, Any]]]:
  """The model and parameters a run trains.

  Without `config.pruning`, (model, params, None). Otherwise the compact
  model and its parameters, pruned from `params` (the initial ones for
  'before'; for 'after_sparse', the final global model of `sparse_stage`),
  and the pruning's figures, also written to `<workdir>/pruning.json`.

  Args:
    config: the run's config.
    workdir: the run's workdir.
    model, params: the UNet and the parameters to prune.
    image_shape: (H, W, C).
    loss_fn_for: model -> the diffusion loss `(params, x, labels, rng)`.
    images: uint8 training images (for 'taylor'); labels their labels.
    seed: the run's seed.
    log: where progress lines go.
  """
  cfg = config_from(config)
  if cfg is None:
    return model, params, None
  taylor = {}
  if cfg.importance == 'taylor':
    n = min(cfg.taylor_examples, len(images))
    idx = np.random.default_rng(seed).choice(len(images), n, replace=False)
    taylor = dict(
        loss_fn=loss_fn_for(model),
        images=jnp.asarray(images[idx], jnp.float32) / 127.5 - 1.0,
        labels=None if labels is None else jnp.asarray(labels[idx]),
        rng=jax.random.key(seed + 7))
  small, small_params, info = prune(model, params, cfg,
                                    image_shape=image_shape, **taylor)
  log(f'Pruned the UNet by {cfg.ratio:g} ({cfg.rule}, {cfg.importance} '
      f'over {cfg.importance_params}, {cfg.schedule}): '
      f'{info["params_before"]:,} -> '
      f'{info["params_after"]:,} parameters, '
      f'{info["macs_before"] / 1e9:.3f} -> {info["macs_after"] / 1e9:.3f} '
      f'GMACs; widths stem {small.stem_width}, levels '
      f'{tuple(small.level_widths)}, upsample inputs '
      f'{tuple(small.upsample_in_widths)}, time embedding '
      f'{small.temb_width}.')
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / 'pruning.json').write_text(
        json.dumps(info, indent=2, sort_keys=True))
  return small, jax.tree.map(jnp.asarray, small_params), info


def model_for_run(config: ml_collections.ConfigDict,
                  workdir: str) -> unet_lib.UNet:
  """The UNet a run in `workdir` trains: the compact one when the run was
  pruned (widths from `<workdir>/pruning.json`), for tools that restore a
  checkpoint (e.g. launch/evaluate.py)."""
  model = unet_lib.unet_from_config(config.model)
  if config_from(config) is None:
    return model
  path = epath.Path(workdir) / 'pruning.json'
  if not path.exists():
    raise FileNotFoundError(
        f'{path} is missing: the config prunes the UNet, and the pruned '
        'widths are written there when training starts.')
  info = json.loads(path.read_text())
  # Runs pruned before upsample_in_widths existed tied them to the levels.
  upsample_in = info.get('upsample_in_widths')
  return model.clone(stem_width=int(info['stem_width']),
                     level_widths=tuple(int(w) for w in info['level_widths']),
                     temb_width=int(info['temb_width']),
                     upsample_in_widths=(None if upsample_in is None else
                                         tuple(int(w) for w in upsample_in)))
