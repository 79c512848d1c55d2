"""Channel groups of the DDPM UNet: which parameter slices prune together.

Structured pruning removes whole channels. A channel is not one slice of one
tensor: removing output channel c of a conv also removes input slice c of
every layer that reads it, its GroupNorm scale and bias, and everything the
residual additions tie to it. Following DepGraph (Fang et al., CVPR 2023,
arXiv 2301.12900), the torch-pruning graph that FedPhD (arXiv 2507.06449)
and Diff-Pruning (arXiv 2305.10924) prune with, we collect the coupled slices
into *channel groups*: a group of size C is a set of members
(parameter path, axis, offset), and keeping channel c of the group keeps
index `offset + c` along `axis` of every member. Groups of the UNet of
`models/unet.py`:

* time embedding: the hidden channels of `temb_dense0 -> temb_dense1`, and
  the embedding channels (`temb_dense1`'s output, the label table's columns
  and the input rows of every residual block's `temb_proj`);
* each residual block's inner channels (`conv1` out, `temb_proj` out,
  `norm2`, `conv2` in);
* residual streams: tensors tied by identity additions share channels. The
  stem `conv_in` and every block of level 0 without a 1x1 skip add onto one
  stream; a block with a skip conv (width change, and every up-path block,
  which reads a concatenation) starts a new stream; the attention blocks
  (`x + proj_out(...)`, and their q/k/v/proj widths, which the UNet ties to
  the input width: one head of the stream's width) join their input's
  stream. The down- and upsampling convs read one stream and start another
  (a conv's input and output channels are independent, as in DepGraph):
  the downsampling conv's output is the stream of the next level's first
  block when that block has no skip conv. The skip concatenations
  `concat([h, skip])` of the up path read two streams: each is a member at
  its offset in the concatenated input of `norm1`, `conv1` and `skip`;
* the stream that enters an upsampling conv (the output of the level's last
  up-path block and of its attention block) is kind 'upsample_in': without
  attention no GroupNorm reads it, so it may keep a count of its own
  (`UNet.upsample_in_widths`);
* the output conv's output channels (the image channels) are never pruned,
  nor is the input conv's input.

GroupNorm ties channels in blocks: a group that feeds a GroupNorm has
`granularity` = its `num_groups`, and its channel c lies in GroupNorm block
c // (size / num_groups) at position c mod (size / num_groups) (flax's and
PyTorch's GroupNorm split channels into contiguous blocks). How many
channels a group keeps at a pruning ratio r is a `rule` (`kept_count`):

* 'torch_pruning' (FedPhD's, arXiv 2507.06449: torch-pruning >= 1.4's
  MetaPruner with local pruning, as FedPhD's code calls it): a group of u
  positions per block (u = size / granularity) keeps ⌊u·(1 − r)⌋ positions,
  the same ones in every block (`pruning.select` ranks positions by their
  importance averaged over the blocks). At r = 0.2 the DDPM CIFAR-10 UNet
  keeps 96 of 128, 192 of 256, 409 of the 512 time-embedding channels and
  204 of the 256 channels entering an upsampling conv without attention:
  20,340,086 parameters and 3.42 GMACs, FedPhD's 20.34M / 3.42 G; at
  r = 0.4, 9,259,190 parameters (64; 128; 307; 153).
* 'nearest' (this library's earlier rule): granularity·round(u·(1 − r))
  channels, chosen freely among the whole group (`pruning.select` regroups
  the kept channels into blocks by rank). It keeps closer to the nominal
  ratio (256 → 160 at r = 0.4, where 'torch_pruning' keeps 128).

The groups are built from the parameter tree alone (arrays or
`jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`), so the 35.7M CIFAR-10
UNet is analysed without materialising it.
"""

import dataclasses
import re
from typing import Any, Optional

import jax
import numpy as np

PyTree = Any
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Member:
  """Channel c of a group is index `offset + c` along `axis` of `path`."""
  path: Path
  axis: int
  offset: int = 0


@dataclasses.dataclass
class ChannelGroup:
  """A set of parameter slices removed together.

  Attributes:
    name: where the group starts, e.g. 'stream:down_1_res_0' or
      'inner:up_2_res_1'.
    kind: 'stream', 'upsample_in', 'inner', 'temb_hidden' or 'temb'.
    size: number of channels.
    members: the (path, axis, offset) slices.
    granularity: GroupNorm's num_groups for groups read by a GroupNorm
      (the kept count is a multiple of it), else 1.
    level: resolution level of a stream / inner group (None for temb).
  """
  name: str
  kind: str
  size: int
  members: list[Member]
  granularity: int = 1
  level: Optional[int] = None

  def add(self, path: Path, axis: int, offset: int = 0):
    self.members.append(Member(tuple(path), axis, offset))


def _shape(params: PyTree, path: Path) -> tuple[int, ...]:
  node = params
  for k in path:
    node = node[k]
  return tuple(node.shape)


def _levels(params: PyTree) -> tuple[int, int]:
  """(number of levels, residual blocks per level on the down path)."""
  pat = re.compile(r'down_(\d+)_res_(\d+)$')
  found = [tuple(int(g) for g in pat.match(k).groups()) for k in params
           if pat.match(k)]
  if not found or 'conv_in' not in params or 'conv_out' not in params:
    raise ValueError(
        'channel_groups: expected the parameter tree of '
        'fedjax_diff.models.UNet (conv_in, down_<i>_res_<j>, ..., conv_out); '
        f'got top-level keys {sorted(params)[:8]}...')
  return max(i for i, _ in found) + 1, max(j for _, j in found) + 1


def unet_channel_groups(params: PyTree, num_groups: int = 32
                        ) -> list[ChannelGroup]:
  """The channel groups of a `models.unet.UNet` parameter tree.

  Args:
    params: the UNet's 'params' tree (arrays or ShapeDtypeStructs).
    num_groups: the UNet's GroupNorm group count.

  Returns:
    The groups, in the order the forward pass creates them. Every parameter
    slice that depends on a prunable channel is a member of exactly one
    group per axis.
  """
  num_levels, num_res = _levels(params)
  groups: list[ChannelGroup] = []

  def new(name, kind, size, level=None, granularity=1):
    g = ChannelGroup(name, kind, int(size), [], granularity, level)
    groups.append(g)
    return g

  def add_out(g, layer: Path):
    """A conv / dense layer whose output channels are g's."""
    kernel = _shape(params, layer + ('kernel',))
    g.add(layer + ('kernel',), len(kernel) - 1)
    if 'bias' in _node(params, layer):
      g.add(layer + ('bias',), 0)

  def add_in(pieces, layer: Path):
    """A layer reading the concatenation of `pieces` [(group, offset)]."""
    kernel = _shape(params, layer + ('kernel',))
    for g, off in pieces:
      g.add(layer + ('kernel',), len(kernel) - 2, off)

  def add_norm(pieces, layer: Path):
    for g, off in pieces:
      g.add(layer + ('scale',), 0, off)
      g.add(layer + ('bias',), 0, off)
      g.granularity = num_groups

  # Time embedding.
  d0 = _shape(params, ('temb_dense0', 'kernel'))
  d1 = _shape(params, ('temb_dense1', 'kernel'))
  temb_hidden = new('temb_hidden', 'temb_hidden', d0[1])
  add_out(temb_hidden, ('temb_dense0',))
  add_in([(temb_hidden, 0)], ('temb_dense1',))
  temb = new('temb', 'temb', d1[1])
  add_out(temb, ('temb_dense1',))
  if 'label_embed' in params:
    temb.add(('label_embed', 'embedding'), 1)

  def res_block(name: str, pieces, level: int,
                kind: str = 'stream') -> ChannelGroup:
    inner_ch = _shape(params, (name, 'conv1', 'kernel'))[-1]
    out_ch = _shape(params, (name, 'conv2', 'kernel'))[-1]
    add_norm(pieces, (name, 'norm1'))
    add_in(pieces, (name, 'conv1'))
    inner = new(f'inner:{name}', 'inner', inner_ch, level)
    add_out(inner, (name, 'conv1'))
    add_out(inner, (name, 'temb_proj'))
    temb.add((name, 'temb_proj', 'kernel'), 0)
    add_norm([(inner, 0)], (name, 'norm2'))
    add_in([(inner, 0)], (name, 'conv2'))
    if 'skip' in params[name]:
      add_in(pieces, (name, 'skip'))
      out = new(f'stream:{name}', kind, out_ch, level)
      add_out(out, (name, 'skip'))
    else:
      if len(pieces) != 1:
        raise ValueError(f'{name}: a concatenated input needs a skip conv.')
      out = pieces[0][0]
    add_out(out, (name, 'conv2'))
    return out

  def attn_block(name: str, g: ChannelGroup):
    add_norm([(g, 0)], (name, 'norm'))
    for layer in ('q', 'k', 'v', 'proj_out'):
      add_in([(g, 0)], (name, layer))
      add_out(g, (name, layer))

  def resample(name: str, g: ChannelGroup, level: int) -> ChannelGroup:
    """A down/upsampling conv: reads `g`, starts a stream of its own."""
    add_in([(g, 0)], (name, 'conv'))
    out = new(f'stream:{name}', 'stream',
              _shape(params, (name, 'conv', 'kernel'))[-1], level)
    add_out(out, (name, 'conv'))
    return out

  stem = new('stream:conv_in', 'stream', _shape(params, ('conv_in', 'kernel'))[-1], 0)
  add_out(stem, ('conv_in',))
  hs = [stem]
  for i in range(num_levels):
    for j in range(num_res):
      h = res_block(f'down_{i}_res_{j}', [(hs[-1], 0)], i)
      if f'down_{i}_attn_{j}' in params:
        attn_block(f'down_{i}_attn_{j}', h)
      hs.append(h)
    if i != num_levels - 1:
      hs.append(resample(f'down_{i}_downsample', hs[-1], i))
  h = res_block('mid_res_0', [(hs[-1], 0)], num_levels - 1)
  attn_block('mid_attn', h)
  h = res_block('mid_res_1', [(h, 0)], num_levels - 1)
  for i in reversed(range(num_levels)):
    for j in range(num_res + 1):
      skip = hs.pop()
      last = j == num_res and i != 0
      h = res_block(f'up_{i}_res_{j}', [(h, 0), (skip, h.size)], i,
                    'upsample_in' if last else 'stream')
      if f'up_{i}_attn_{j}' in params:
        attn_block(f'up_{i}_attn_{j}', h)
    if i != 0:
      h = resample(f'up_{i}_upsample', h, i)
  add_norm([(h, 0)], ('norm_out',))
  add_in([(h, 0)], ('conv_out',))
  _check_coverage(params, groups)
  return groups


def _node(params, path):
  for k in path:
    params = params[k]
  return params


def _check_coverage(params: PyTree, groups: list[ChannelGroup]):
  """Every member slice fits its parameter: a guard against UNet changes."""
  for g in groups:
    for m in g.members:
      shape = _shape(params, m.path)
      if m.offset + g.size > shape[m.axis]:
        raise ValueError(
            f'channel group {g.name} (size {g.size}) does not fit '
            f'{"/".join(m.path)} of shape {shape} at axis {m.axis}, offset '
            f'{m.offset}: the UNet changed without channel_groups.py.')


RULES = ('torch_pruning', 'nearest')


def check_rule(rule: str) -> str:
  if rule not in RULES:
    raise ValueError(f'Unknown pruning rule {rule!r}; use one of {RULES}.')
  return rule


def kept_count(size: int, ratio: float, granularity: int = 1,
               rule: str = 'torch_pruning') -> int:
  """Channels kept when pruning `ratio` of a group of `size`.

  With u = size / granularity positions per GroupNorm block (u = size for
  a group no GroupNorm reads), the group keeps granularity·k channels,

      'torch_pruning':  k = ⌊u·(1 − ratio)⌋   (torch-pruning's
                        `int(u * (1 - ratio))`, the same float expression);
      'nearest':        k = round(u·(1 − ratio)),

  and at least one position. E.g. ratio 0.2, DDPM's CIFAR-10 UNet:
  128 → 96 and 256 → 192 under both rules (32 blocks of 4 and 8
  positions), 512 → 409 ('torch_pruning') or 410 ('nearest').
  """
  check_rule(rule)
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f'pruning ratio must be in [0, 1), got {ratio!r}.')
  if size % granularity:
    raise ValueError(f'group size {size} is not a multiple of its '
                     f'granularity {granularity}.')
  units = size // granularity
  if rule == 'torch_pruning':
    keep = int(units * (1 - ratio))
  else:
    keep = int(np.floor((1.0 - ratio) * units + 0.5))
  return granularity * min(max(keep, 1), units)


# (group name, offset, size) segments of one axis of one parameter.
Segments = list[tuple[str, int, int]]


def axis_layout(groups: list[ChannelGroup]) -> dict[Path, dict[int, Segments]]:
  """path -> axis -> the group segments along that axis.

  Indices of an axis that no segment covers (the image channels of
  `conv_in`'s input and `conv_out`'s output) are never pruned.
  """
  layout: dict[Path, dict[int, Segments]] = {}
  for g in groups:
    for m in g.members:
      layout.setdefault(m.path, {}).setdefault(m.axis, []).append(
          (g.name, m.offset, g.size))
  for axes in layout.values():
    for segs in axes.values():
      segs.sort(key=lambda s: s[1])
  return layout


def kept_counts(groups: list[ChannelGroup], ratio: float,
                rule: str = 'torch_pruning') -> dict[str, int]:
  """`kept_count` of every group at a uniform `ratio` (FedPhD prunes every
  group by the same ratio: torch-pruning's local, non-global pruning)."""
  return {g.name: kept_count(g.size, ratio, g.granularity, rule)
          for g in groups}


def pruned_shapes(params: PyTree, groups: list[ChannelGroup],
                  counts: dict[str, int]) -> PyTree:
  """ShapeDtypeStructs of the parameters once each group keeps `counts`."""
  layout = axis_layout(groups)

  def one(path, leaf):
    key = tuple(getattr(p, 'key', p) for p in path)
    shape = list(leaf.shape)
    for axis, segs in layout.get(key, {}).items():
      shape[axis] -= sum(size - counts[name] for name, _, size in segs)
    return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, params)
