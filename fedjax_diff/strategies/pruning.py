"""Structured channel pruning of the UNet: importance, masks, group lasso.

FedPhD (Long et al., arXiv 2507.06449) prunes the DDPM UNet by channel
groups (`models.channel_groups`) before federated training, ranking the
channels of each group by the L2 norm of the weights they own; Diff-Pruning
(Fang et al., arXiv 2305.10924) ranks them by a first-order Taylor estimate
of how much the diffusion loss changes when they are removed. Every group
keeps `kept_count(size, ratio, granularity, rule)` channels (the same ratio
for every group, FedPhD's setting), the most important ones (`select`):

* rule 'torch_pruning' (FedPhD's code, torch-pruning's MetaPruner with
  GroupNormImportance(p=2)): a channel's score is Σ θ² over its members'
  kernels (conv and dense weights: no biases, no GroupNorm scale or bias,
  no embedding table, torch-pruning's default target layers), a GroupNorm
  position's score the mean over the blocks of its channels' scores, and
  the group keeps the ⌊u·(1 − r)⌋ best positions in every block;
* rule 'nearest' (this library's earlier rule): ‖θ_{g,c}‖₂ over every
  parameter the channel owns, and the group keeps its best
  granularity·round(u·(1 − r)) channels wherever they are.

A pruning decision is a dict `channels` mapping each group name to a float
vector of 0/1 (1 = kept) of the group's size. It is tiny, and
`expand_masks` turns it into parameter-shaped masks inside jit: entry
θ[i_0, …, i_n] is kept iff, along every axis that some group indexes, the
channel it belongs to is kept (axes no group covers, such as the image
channels, are always kept).

* `mask_transform(groups, channels)`: optax transform `u ↦ u ⊙ M`. Put last
  in the client chain (after Adam) the final update of a pruned entry is
  exactly 0, so parameters that start at 0 (`apply_masks`) stay exactly 0;
  put first, pruned gradients are out of the clipping norm too.
* `group_lasso(groups, lam)`: a sparse-training penalty
  λ·Σ_g Σ_c ‖θ_{g,c}‖₂ (group lasso, Yuan & Lin 2006; as structured
  sparsity for channels, Wen et al. 2016, arXiv 1608.03665), whose
  gradient λ·θ_{g,c}/‖θ_{g,c}‖₂ this transform adds to the incoming
  gradient: it drives whole channels to zero, which the channel ranking
  then exploits.
* `frobenius_penalty(lam)`: FedPhD's sparse-training penalty as its code
  writes it, λ·Σ_W ‖W‖_F over whole weight tensors (what PyTorch names
  'weight': conv and dense kernels, GroupNorm scales, embedding tables),
  gradient λ·W/‖W‖_F. It shrinks whole tensors, not channels.
* `mask_upload(groups, channels, counts)`: the upload stage Δ ↦ Δ ⊙ M,
  whose message carries only the kept entries (and the channel bitmask
  when `send_mask`, Σ_g size_g bits), so pruned channels cost nothing on
  the wire.

With compaction (`models.compact`), the small model is trained instead and
none of the masks are needed; they serve masked training and the sparse
phase before pruning.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_diff import comm
from fedjax_diff.models import channel_groups as cg
from fedjax_diff.strategies import upload as upload_lib

PyTree = Any
Channels = dict[str, jax.Array]

IMPORTANCES = ('l2', 'taylor')
# Which parameters a channel's importance sums over: 'kernels' (conv and
# dense kernels only: torch-pruning's default target layers, without
# biases) or 'all' (every parameter the channel owns).
IMPORTANCE_PARAMS = ('kernels', 'all')
# The importance terms each rule uses unless told otherwise.
DEFAULT_IMPORTANCE_PARAMS = {'torch_pruning': 'kernels', 'nearest': 'all'}


def _key(path) -> tuple[str, ...]:
  return tuple(getattr(p, 'key', p) for p in path)


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _per_channel(x: jax.Array, axis: int, offset: int, size: int
                 ) -> jax.Array:
  """Σ over all axes but `axis` of x, for indices [offset, offset+size)."""
  x = jnp.moveaxis(x, axis, 0)[offset:offset + size]
  return jnp.sum(x.reshape(size, -1), axis=1)


def _jit_unless_traced(fn, *trees):
  """fn(*trees), compiled as one program when called on concrete arrays
  (op-by-op dispatch of hundreds of slices is slow on CPU)."""
  if any(isinstance(x, jax.core.Tracer) for t in trees
         for x in jax.tree.leaves(t)):
    return fn(*trees)
  return jax.jit(fn)(*trees)


def _check_terms(terms: str) -> str:
  if terms not in IMPORTANCE_PARAMS:
    raise ValueError(f'importance params must be one of {IMPORTANCE_PARAMS}, '
                     f'got {terms!r}.')
  return terms


def _group_sums(tree: PyTree, groups: list[cg.ChannelGroup],
                terms: str = 'all') -> Channels:
  """For each group, Σ over its members' slices of channel c: [size];
  with terms='kernels', over the members that are a 'kernel' only."""
  out = {}
  for g in groups:
    total = jnp.zeros((g.size,), jnp.float32)
    for m in g.members:
      if terms == 'kernels' and m.path[-1] != 'kernel':
        continue
      total = total + _per_channel(
          jnp.asarray(_leaf(tree, m.path), jnp.float32), m.axis, m.offset,
          g.size)
    out[g.name] = total
  return out


def l2_importance(params: PyTree, groups: list[cg.ChannelGroup],
                  terms: str = 'all') -> Channels:
  """The group-norm importance: I_{g,c} = ‖θ_{g,c}‖₂.

  θ_{g,c} is every parameter entry channel c of group g owns (all member
  slices; terms='kernels': the slices of conv and dense kernels only, the
  layers torch-pruning's GroupNormImportance(p=2), FedPhD's criterion
  (arXiv 2507.06449), scores by default). `select`'s 'torch_pruning' rule
  ranks by I² = Σ θ², torch-pruning's score.
  """
  _check_terms(terms)

  def fn(params):
    sq = _group_sums(jax.tree.map(
        lambda p: jnp.square(p.astype(jnp.float32)), params), groups, terms)
    return {k: jnp.sqrt(v) for k, v in sq.items()}

  return _jit_unless_traced(fn, params)


def taylor_importance(params: PyTree, grads: PyTree,
                      groups: list[cg.ChannelGroup],
                      terms: str = 'all') -> Channels:
  """Diff-Pruning's first-order Taylor importance (arXiv 2305.10924, Eq. 8).

  Removing θ_{g,c} changes the loss by ≈ −∇L·θ_{g,c}; the importance is
  I_{g,c} = Σ_{i ∈ (g,c)} |θ_i · ∂L/∂θ_i|, with ∇L the gradient of the
  diffusion loss (`taylor_gradients` averages it over timesteps and
  batches); terms='kernels' sums over kernel entries only.
  """
  _check_terms(terms)

  def fn(params, grads):
    return _group_sums(jax.tree.map(
        lambda p, d: jnp.abs(p.astype(jnp.float32) * d.astype(jnp.float32)),
        params, grads), groups, terms)

  return _jit_unless_traced(fn, params, grads)


def taylor_gradients(loss_fn: Callable[..., jax.Array], params: PyTree,
                     images: jax.Array, labels: Optional[jax.Array],
                     rng: jax.Array, num_batches: int = 1) -> PyTree:
  """Mean over `num_batches` noise/timestep draws of ∇_θ loss_fn.

  `loss_fn(params, x, labels, rng) -> scalar` is the diffusion loss of the
  trainer (`experiment.make_loss_fn`): each draw samples t ~ U{0..T−1} and
  ε ~ N(0, I) afresh, so the mean covers the whole range of timesteps that
  Diff-Pruning accumulates over.
  """
  @jax.jit
  def mean_grad(params, images, labels, keys):
    def body(total, key):
      grads = jax.grad(loss_fn)(params, images, labels, key)
      return jax.tree.map(jnp.add, total, grads), None

    total, _ = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params),
                            keys)
    return jax.tree.map(lambda g: g / keys.shape[0], total)

  return mean_grad(params, images, labels,
                   jax.random.split(rng, num_batches))


def select(importance: Channels, groups: list[cg.ChannelGroup],
           ratio: float, rule: str = 'torch_pruning') -> Channels:
  """Keeps the `kept_count(size, ratio, granularity, rule)` most important
  channels of every group.

  'torch_pruning': with G = granularity blocks of u positions (channel
  c = b·u + j is position j of block b), position j scores
  s_j = (1/G)·Σ_b importance[b·u + j] (torch-pruning's mean over GroupNorm
  groups), the ⌊u·(1 − ratio)⌋ best positions are kept, the same ones in
  every block. 'nearest': the best G·round(u·(1 − ratio)) channels of the
  whole group. Pass the importance on the scale the rule ranks: for
  FedPhD's L2 criterion under 'torch_pruning', squared norms (Σ θ²).

  Returns:
    group name -> float32 0/1 vector (1 = kept). Ties keep the lower index.
  """
  cg.check_rule(rule)
  out = {}
  for g in groups:
    imp = np.asarray(importance[g.name], np.float64)
    if imp.shape != (g.size,):
      raise ValueError(f'importance of {g.name} has shape {imp.shape}, '
                       f'expected ({g.size},).')
    k = cg.kept_count(g.size, ratio, g.granularity, rule)
    if rule == 'torch_pruning':
      units = g.size // g.granularity
      score = imp.reshape(g.granularity, units).mean(axis=0)
      best = np.argsort(-score, kind='stable')[:k // g.granularity]
      positions = np.zeros(units, np.float32)
      positions[best] = 1.0
      keep = np.tile(positions, g.granularity)
    else:
      keep = np.zeros(g.size, np.float32)
      keep[np.argsort(-imp, kind='stable')[:k]] = 1.0
    out[g.name] = jnp.asarray(keep)
  return out


def counts(channels: Channels) -> dict[str, int]:
  """Kept channels per group (host values)."""
  return {k: int(np.asarray(v).sum()) for k, v in channels.items()}


def _axis_vector(segs, channels, length, fill, dtype):
  """The per-index vector of one axis: `fill` outside the segments."""
  pieces, pos = [], 0
  for name, offset, size in segs:
    if offset > pos:
      pieces.append(jnp.full((offset - pos,), fill, dtype))
    pieces.append(channels[name].astype(dtype))
    pos = offset + size
  if pos < length:
    pieces.append(jnp.full((length - pos,), fill, dtype))
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def expand(params: PyTree, groups: list[cg.ChannelGroup],
           channels: Channels, combine: str = 'product',
           fill: float = 1.0, dtype=jnp.float32) -> PyTree:
  """Parameter-shaped tree from per-channel vectors.

  Entry θ[i] gets, over the axes a of its leaf that groups index, the
  product (combine='product': masks) or sum (combine='sum') of
  `channels[group(a, i_a)][channel(a, i_a)]`; axes outside every group
  contribute `fill` (product) or nothing (sum). Leaves no group touches
  get ones (product) or zeros (sum).
  """
  layout = cg.axis_layout(groups)

  def one(path, leaf):
    shape = tuple(leaf.shape)
    axes = layout.get(_key(path), {})
    if combine == 'product':
      out = jnp.ones(shape, dtype)
    else:
      out = jnp.zeros(shape, dtype)
    for axis, segs in axes.items():
      vec = _axis_vector(segs, channels, shape[axis],
                         fill if combine == 'product' else 0.0, dtype)
      bshape = [1] * len(shape)
      bshape[axis] = shape[axis]
      vec = vec.reshape(bshape)
      out = out * vec if combine == 'product' else out + vec
    return out

  return jax.tree_util.tree_map_with_path(one, params)


def expand_masks(params: PyTree, groups: list[cg.ChannelGroup],
                 channels: Channels) -> PyTree:
  """Parameter-shaped 0/1 masks of a pruning decision (see module doc)."""
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                        params)
  return _jit_unless_traced(
      lambda c: expand(shapes, groups, c, 'product'), channels)


def apply_masks(params: PyTree, groups: list[cg.ChannelGroup],
                channels: Channels) -> PyTree:
  """θ ⊙ M: pruned entries set to exactly zero."""
  def fn(params, channels):
    masks = expand_masks(params, groups, channels)
    return jax.tree.map(lambda p, m: (p * m).astype(p.dtype), params, masks)

  return _jit_unless_traced(fn, params, channels)


class MaskState(NamedTuple):
  """The kept-channel vectors (small: one float per channel)."""
  channels: Channels


def mask_transform(groups: list[cg.ChannelGroup],
                   channels: Channels) -> optax.GradientTransformation:
  """u ↦ u ⊙ M with M = `expand_masks(channels)` (FedPhD, 2507.06449).

  The channel vectors live in the state, so a new decision needs no
  recompilation; the parameter-shaped mask is rebuilt from them at each
  update (a broadcast product, no parameter-sized state per client).
  """
  channels = {k: jnp.asarray(v, jnp.float32) for k, v in channels.items()}

  def init_fn(params):
    del params
    return MaskState(channels=dict(channels))

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    masks = expand_masks(updates, groups, state.channels)
    return jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates,
                        masks), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def group_lasso(groups: Optional[list[cg.ChannelGroup]], lam: float,
                eps: float = 1e-12, num_groups: int = 32
                ) -> optax.GradientTransformation:
  """Adds the gradient of λ·Σ_g Σ_c ‖θ_{g,c}‖₂ (group lasso).

      g_i ↦ g_i + λ · Σ_{(g,c) ∋ i} θ_i / ‖θ_{g,c}‖₂,

  a sum over the (one or two) channel groups entry i belongs to: a conv
  kernel entry belongs to an input and an output channel. Sparse training
  (Wen et al. 2016, arXiv 1608.03665) drives whole channels to zero before
  pruning, so that removing them changes the model little; FedPhD
  (arXiv 2507.06449) trains sparsely before pruning in its 'after'
  setting. Put it first in the client chain (raw gradients), like FedProx.

  Args:
    groups: the channel groups; None derives them from the parameters'
      shapes at each update (`unet_channel_groups(params, num_groups)`), so
      the transform can be built from a config before the model exists.
    lam: λ >= 0.
    eps: floor of ‖θ_{g,c}‖₂ (the penalty is not differentiable at 0).
    num_groups: the UNet's GroupNorm groups, when `groups` is None.
  """
  if not lam >= 0.0:
    raise ValueError(f'group_lasso: lam must be >= 0, got {lam!r}.')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError('group_lasso: `params` is required: call '
                       'opt.update(grads, state, params).')
    gs = (groups if groups is not None else
          cg.unet_channel_groups(params, num_groups))
    norms = l2_importance(params, gs)
    inv = {k: 1.0 / jnp.maximum(v, eps) for k, v in norms.items()}
    scale = expand(params, gs, inv, 'sum')
    updates = jax.tree.map(
        lambda u, p, s: (u + lam * p * s).astype(u.dtype), updates, params,
        scale)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def group_lasso_penalty(params: PyTree, groups: list[cg.ChannelGroup]
                        ) -> jax.Array:
  """Σ_g Σ_c ‖θ_{g,c}‖₂ (what `group_lasso` differentiates)."""
  return sum(jnp.sum(v) for v in l2_importance(params, groups).values())


# The leaves PyTorch calls 'weight' (conv/dense kernels, GroupNorm scales,
# embedding tables): the tensors FedPhD's sparse-training penalty sums over.
WEIGHT_LEAVES = ('kernel', 'scale', 'embedding')


def _is_weight(path) -> bool:
  return bool(path) and _key(path)[-1] in WEIGHT_LEAVES


def frobenius_penalty_value(params: PyTree) -> jax.Array:
  """Σ_W ‖W‖_F over the weight tensors (what `frobenius_penalty`
  differentiates)."""
  return sum(jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32))))
             for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
             if _is_weight(path))


def frobenius_penalty(lam: float, eps: float = 1e-12
                      ) -> optax.GradientTransformation:
  """Adds the gradient of FedPhD's sparse-training penalty λ·Σ_W ‖W‖_F.

      g_W ↦ g_W + λ·W / max(‖W‖_F, eps)

  for every weight tensor W (leaves named 'kernel', 'scale' or 'embedding':
  what PyTorch names 'weight'), biases untouched. FedPhD's code
  (arXiv 2507.06449; EricLoong/fed_phd, prune_trainer.py) adds
  λ·Σ ‖W.view(W.size(0), −1)‖₂ to the loss, the Frobenius norm of each
  whole tensor, before clipping: put it first in the client chain (raw
  gradients), like FedProx.
  """
  if not lam >= 0.0:
    raise ValueError(f'frobenius_penalty: lam must be >= 0, got {lam!r}.')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError('frobenius_penalty: `params` is required: call '
                       'opt.update(grads, state, params).')

    def one(path, u, p):
      if not _is_weight(path):
        return u
      p32 = p.astype(jnp.float32)
      norm = jnp.sqrt(jnp.sum(jnp.square(p32)))
      return (u + lam * p32 / jnp.maximum(norm, eps)).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mask_bytes(groups: list[cg.ChannelGroup]) -> int:
  """The channel bitmask: one bit per channel of every group."""
  return (sum(g.size for g in groups) + 7) // 8


def mask_upload(groups: list[cg.ChannelGroup], channels: Channels,
                send_mask: bool = False) -> upload_lib.UploadTransform:
  """Upload stage Δ ↦ Δ ⊙ M; the message holds only the kept entries.

  The kept counts are read from `channels` here (host values), so the wire
  size is static: the stages after it get the pruned shapes
  (`channel_groups.pruned_shapes`), and `send_mask` adds the channel
  bitmask (`mask_bytes`), for a receiver that does not know the decision.
  """
  kept = counts(channels)
  channels = {k: jnp.asarray(v, jnp.float32) for k, v in channels.items()}

  def apply(delta, z, key, ctx):
    del key, ctx
    masks = expand_masks(delta, groups, channels)
    return jax.tree.map(lambda d, m: (d * m).astype(d.dtype), delta,
                        masks), z

  def wire_bytes(shapes, rest):
    return (rest(cg.pruned_shapes(shapes, groups, kept))
            + (mask_bytes(groups) if send_mask else 0))

  total = sum(g.size for g in groups)
  name = f'channel mask ({sum(kept.values())}/{total} channels kept)'
  return upload_lib.UploadTransform(lambda params: (), apply, wire_bytes,
                                    name)


def masked_bytes(shapes: PyTree, groups: list[cg.ChannelGroup],
                 channels: Channels, send_mask: bool = False) -> int:
  """Bytes of a masked tree sent as its kept entries (+ the bitmask)."""
  return (comm.tree_bytes(cg.pruned_shapes(shapes, groups, counts(channels)))
          + (mask_bytes(groups) if send_mask else 0))
