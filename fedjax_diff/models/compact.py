"""Compaction: a channel-masked UNet as a physically smaller UNet.

After structured pruning (`strategies.pruning`), the masked UNet still has
every channel, the pruned ones at zero. `compact` slices them away: every
parameter keeps, along each axis a channel group indexes, the indices of
the kept channels (in their original order), and the UNet's config gets the
remaining widths (`UNet.level_widths`, `stem_width`, `temb_width`) while
`ch`, `ch_mult` keep naming the architecture (which blocks have skip
convs). Training, sampling and communication then use the small model.

The masked model is the UNet built with `channel_masks=True` and applied
with the live masks of `live_masks` (a 'channel_masks' collection): its
GroupNorms normalise over the live channels only and its attention scales
logits by the live width, which is exactly what the compact model computes,
so `compact`'s outputs equal the masked model's (up to float summation
order). This needs every group read by a GroupNorm to keep a multiple of
`num_groups` channels (`channel_groups.kept_count` ensures it). With the
'torch_pruning' rule every GroupNorm block keeps the same positions, so
each group of the compact GroupNorm holds the kept channels of one original
group: the compact model is the original one with channels removed. The
'nearest' rule keeps channels freely and regroups them by rank.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff.models import channel_groups as cg
from fedjax_diff.models import unet as unet_lib

PyTree = Any


def _key(path) -> tuple[str, ...]:
  return tuple(getattr(p, 'key', p) for p in path)


def _kept_indices(segs, channels, length) -> np.ndarray:
  keep = np.ones(length, bool)
  for name, offset, size in segs:
    keep[offset:offset + size] = np.asarray(channels[name]) > 0.5
  return np.nonzero(keep)[0]


def compact_params(params: PyTree, groups: list[cg.ChannelGroup],
                   channels: dict[str, Any]) -> PyTree:
  """Slices the pruned channels out of every parameter.

  Args:
    params: the (masked) UNet parameters.
    groups: `channel_groups.unet_channel_groups(params)`.
    channels: group name -> 0/1 vector, 1 = kept (`pruning.select`).

  Returns:
    The parameters of the compact UNet (`compact_model`).
  """
  layout = cg.axis_layout(groups)

  def one(path, leaf):
    leaf = np.asarray(leaf)
    for axis, segs in layout.get(_key(path), {}).items():
      idx = _kept_indices(segs, channels, leaf.shape[axis])
      leaf = np.take(leaf, idx, axis=axis)
    return jnp.asarray(leaf)

  return jax.tree_util.tree_map_with_path(one, params)


def compact_widths(groups: list[cg.ChannelGroup],
                   channels: dict[str, Any]) -> dict[str, Any]:
  """The compact UNet's `stem_width`, `level_widths`, `temb_width` and
  `upsample_in_widths`.

  Raises:
    ValueError: groups of one level (or the two time-embedding groups)
      keep different counts: the UNet has one width per level.
  """
  kept = {g.name: int(np.sum(np.asarray(channels[g.name]) > 0.5))
          for g in groups}
  levels: dict[int, set[int]] = {}
  upsample_in: dict[int, int] = {}
  temb = set()
  stem = None
  for g in groups:
    if g.name == 'stream:conv_in':
      stem = kept[g.name]
    elif g.kind == 'upsample_in':
      upsample_in[g.level] = kept[g.name]
    elif g.kind in ('stream', 'inner'):
      levels.setdefault(g.level, set()).add(kept[g.name])
    else:
      temb.add(kept[g.name])
  bad = {i: sorted(w) for i, w in levels.items() if len(w) != 1}
  if bad or len(temb) != 1:
    raise ValueError(
        'compact: the UNet has one width per level, but the pruning keeps '
        f'different counts within a level {bad} or in the time embedding '
        f'{sorted(temb)}; prune every group of a level by the same ratio '
        '(pruning.select does).')
  level_widths = tuple(levels[i].pop() for i in sorted(levels))
  return {'stem_width': stem, 'level_widths': level_widths,
          'temb_width': temb.pop(),
          'upsample_in_widths': tuple(upsample_in.get(i, w)
                                      for i, w in enumerate(level_widths))}


def compact_model(model: unet_lib.UNet, groups: list[cg.ChannelGroup],
                  channels: dict[str, Any]) -> unet_lib.UNet:
  """The UNet of the compact parameters (same architecture, new widths)."""
  return model.clone(channel_masks=False, **compact_widths(groups, channels))


def compact(model: unet_lib.UNet, params: PyTree,
            groups: list[cg.ChannelGroup], channels: dict[str, Any]
            ) -> tuple[unet_lib.UNet, PyTree]:
  """(compact model, compact params) of a pruning decision."""
  return (compact_model(model, groups, channels),
          compact_params(params, groups, channels))


def live_masks(param_masks: PyTree) -> PyTree:
  """The 'channel_masks' collection of a masked UNet from its param masks.

  Every GroupNorm ('scale'/'bias' leaves) gets `live` = its scale's mask,
  every attention block the live mask of its norm.
  """
  def walk(node):
    if not isinstance(node, dict):
      return None
    if 'scale' in node and 'kernel' not in node:
      return {'live': node['scale']}
    out = {}
    for k, v in node.items():
      sub = walk(v)
      if sub:
        out[k] = sub
    if 'norm' in node and 'q' in node:
      out['live'] = node['norm']['scale']
    return out

  return walk(param_masks)


def masked_apply_fn(model: unet_lib.UNet, param_masks: PyTree):
  """`apply(params, x, t, labels, *, train, rng)` of the masked UNet."""
  masked = model.clone(channel_masks=True)
  lives = live_masks(param_masks)

  def apply(params, x, t, labels=None, *, train=False, rng=None):
    return masked.apply({'params': params, unet_lib.CHANNEL_MASKS: lives},
                        x, t, labels, train=train,
                        rngs={'dropout': rng} if train else {})

  return jax.jit(apply, static_argnames='train')
