"""One common suite over every client-side and every upload-path transform.

In the spirit of optax's own transform tests: the properties every transform
of the library must have, whatever it computes, checked over two registries,

* `CLIENT_TRANSFORMS`: optax `GradientTransformationExtraArgs` of the client
  optimizer, called as `update(grads, state, params, global_params=θ_global,
  global_step=s)`;
* `UPLOAD_TRANSFORMS`: `strategies.upload.UploadTransform`s, called as
  `apply(delta, z, key, ctx)`.

Adding a transform is adding one entry: a factory and its neutral setting
(the setting in which it must leave its input unchanged). A guard
(`test_registries_cover_every_factory`) fails when a module of the library
gains a transform factory that no entry exercises.

Client transforms: init/update under `jax.jit` (equal to the eager call);
under `jax.vmap` over a leading client axis of params, grads and state with
θ_global and the step unmapped, equal per client to the unvmapped call;
updates keep the tree, shapes and dtypes of the grads (float32, bfloat16,
and bfloat16 grads of float32 params, where an optimizer with float32
moments returns float32: `mixed_out_dtype`); the state keeps its tree,
shapes and dtypes through `update` (it runs as a `lax.scan` carry); the
neutral setting returns the grads unchanged: `proximal(0.0)` bit for bit (as
it promises), `group_lasso(lam=0.0)`, `frobenius_penalty(0.0)`, a mask
keeping every channel, a learning rate of −1 for the `u ↦ −lr·u` schedule,
and for
`client_optimizer` (Adam has no identity setting) SGD at lr −1 without
momentum or clipping around the neutral extras, to 1e-7.

Upload transforms: the same for jit / vmap (ctx.global_params unmapped,
everything else mapped) / tree, shapes, dtypes / client state; `wire_bytes`
is a positive Python int fixed by the shapes; the output is a function of
the key (same key, same output; stochastic rounding: another key, another
output; deterministic stages: the key is ignored); the neutral setting sends
Δ exactly (identity, error feedback around it, a mask keeping everything) or
within the 16-bit quantizer's rounding bound (see `_check_half_scale`).

The trees are tiny (a conv kernel [3, 3, 2, 4], its bias [4] and a dense
kernel [4, 3], with hand-made channel groups over them); a tiny real UNet
only where a transform derives its channel groups from the UNet's tree
(`group_lasso(None, ...)`, as `strategies.build` makes it). The module runs
with `jax_disable_most_optimizations` (restored after it): compiling is most
of its cost, and none of the properties depends on XLA's optimizations.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_diff import comm
from fedjax_diff import models
from fedjax_diff import optimizers
from fedjax_diff.diffusion import linear_schedule
from fedjax_diff.models import channel_groups as cg
from fedjax_diff.strategies import clipping
from fedjax_diff.strategies import proximal as proximal_lib
from fedjax_diff.strategies import pruning
from fedjax_diff.strategies import quantize as q_lib
from fedjax_diff.strategies import upload as upload_lib
from fedjax_diff.strategies.calibration import Calibration

Config = q_lib.QuantizationConfig
F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.fixture(scope='module', autouse=True)
def _fast_compiles():
  """XLA without its expensive passes: the programs here are tiny and
  compile time is most of this file's cost (restored after the module)."""
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', before)


NUM_CLIENTS = 3
STEP = 7  # The global_step passed to client transforms.

# ------------------------------------------------------------------------------
# Trees.
# ------------------------------------------------------------------------------

TINY_SHAPES = {'conv': {'kernel': (3, 3, 2, 4), 'bias': (4,)},
               'dense': {'kernel': (4, 3)}}

# Channel groups over the tiny tree, as `channel_groups` builds them for the
# UNet: 'hidden' is the conv's output = the dense layer's input; 'out' the
# dense layer's output (so a dense entry is in two groups, like a UNet conv).
TINY_GROUPS = [
    cg.ChannelGroup('hidden', 'inner', 4, [
        cg.Member(('conv', 'kernel'), 3), cg.Member(('conv', 'bias'), 0),
        cg.Member(('dense', 'kernel'), 0)]),
    cg.ChannelGroup('out', 'inner', 3, [cg.Member(('dense', 'kernel'), 1)]),
]
TINY_KEEP = {'hidden': np.array([1., 0., 1., 1.], np.float32),
             'out': np.array([1., 1., 0.], np.float32)}
TINY_ALL = {g.name: np.ones((g.size,), np.float32) for g in TINY_GROUPS}

UNET_GROUPS_NUM = 2


@functools.cache
def _unet_shapes():
  model = models.UNet(ch=4, ch_mult=(1,), num_res_blocks=1,
                      attn_resolutions=(), dropout=0.0,
                      num_groups=UNET_GROUPS_NUM)
  shapes = jax.eval_shape(
      lambda: models.init_params(model, jax.random.key(0), (4, 4, 1)))
  return jax.tree.map(lambda s: s.shape, shapes,
                      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tree(kind, seed, dtype=F32, scale=1.0):
  shapes = TINY_SHAPES if kind == 'tiny' else _unet_shapes()
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), dtype), shapes,
      is_leaf=_is_shape)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _row(tree, k):
  return jax.tree.map(lambda x: x[k], tree)


def _signature(tree):
  """Tree structure and (shape, dtype) of every leaf."""
  return (jax.tree.structure(tree),
          [(tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree.leaves(tree)])


def _bits(x):
  x = np.asarray(x)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32,
                 8: np.uint64}[x.dtype.itemsize])


def assert_trees_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert jnp.dtype(x.dtype) == jnp.dtype(y.dtype)
    np.testing.assert_array_equal(_bits(x), _bits(y))


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert jnp.dtype(x.dtype) == jnp.dtype(y.dtype), (x.dtype, y.dtype)
    assert x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)


# ------------------------------------------------------------------------------
# Client-transform registry.
# ------------------------------------------------------------------------------


def _adam_cfg(**kw):
  return ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-3, warmup_steps=10, grad_clip=1.0, **kw))


def _sgd_cfg(learning_rate=1e-2, momentum=0.9):
  return ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=learning_rate, warmup_steps=0,
      grad_clip=0.0, momentum=momentum))


def _negated(transform):
  """`transform` followed by u ↦ −u: SGD at learning rate 1 (u ↦ −u) then
  negated is the identity (a learning rate must be > 0 in a config)."""
  return optax.chain(transform, optax.scale(-1.0))


def _minus_one(step):
  """The neutral learning rate of a `u ↦ −lr·u` transform."""
  del step
  return jnp.asarray(-1.0, F32)


@dataclasses.dataclass(frozen=True)
class ClientCase:
  """A client transform of the suite.

  Attributes:
    name: test id.
    make: () -> the transform in a typical (non-neutral) setting.
    neutral: () -> the transform in its neutral setting (identity map).
    bitwise_neutral: the library promises the neutral setting returns the
      updates bit for bit (else they are checked to 1e-7).
    factories: the library factories the entry exercises.
    tree: 'tiny' or 'unet' (for transforms that derive UNet channel groups).
    mixed_out_dtype: dtype of the updates for float32 params and bfloat16
      grads when it is not the grads' (None: the grads' dtype).
  """
  name: str
  make: Callable[[], optax.GradientTransformationExtraArgs]
  neutral: Callable[[], optax.GradientTransformationExtraArgs]
  bitwise_neutral: bool
  factories: tuple
  tree: str = 'tiny'
  mixed_out_dtype: Any = None


CLIENT_TRANSFORMS = [
    ClientCase('proximal', lambda: proximal_lib.proximal(0.1),
               lambda: proximal_lib.proximal(0.0), True,
               (proximal_lib.proximal,)),
    ClientCase('group_lasso', lambda: pruning.group_lasso(TINY_GROUPS, 1e-2),
               lambda: pruning.group_lasso(TINY_GROUPS, 0.0), False,
               (pruning.group_lasso,)),
    ClientCase('group_lasso_unet_derived_groups',
               lambda: pruning.group_lasso(None, 1e-2,
                                           num_groups=UNET_GROUPS_NUM),
               lambda: pruning.group_lasso(None, 0.0,
                                           num_groups=UNET_GROUPS_NUM),
               False, (pruning.group_lasso,), tree='unet'),
    ClientCase('frobenius_penalty', lambda: pruning.frobenius_penalty(1e-2),
               lambda: pruning.frobenius_penalty(0.0), False,
               (pruning.frobenius_penalty,)),
    ClientCase('mask_transform',
               lambda: pruning.mask_transform(TINY_GROUPS, TINY_KEEP),
               lambda: pruning.mask_transform(TINY_GROUPS, TINY_ALL), False,
               (pruning.mask_transform,)),
    ClientCase('global_step_schedule',
               lambda: optimizers.scale_by_global_step_schedule(
                   optimizers.warmup_schedule(1e-2, 10)),
               lambda: optimizers.scale_by_global_step_schedule(_minus_one),
               False, (optimizers.scale_by_global_step_schedule,)),
    ClientCase('client_adam_prox_clip',
               lambda: optimizers.client_optimizer(
                   _adam_cfg(), [proximal_lib.proximal(0.1)]),
               lambda: _negated(optimizers.client_optimizer(
                   _sgd_cfg(1.0, 0.0), [proximal_lib.proximal(0.0)])),
               False, (optimizers.client_optimizer, proximal_lib.proximal),
               mixed_out_dtype=F32),
    ClientCase('client_sgdm_lasso_mask',
               lambda: optimizers.client_optimizer(
                   _sgd_cfg(), [pruning.group_lasso(TINY_GROUPS, 1e-3),
                                pruning.mask_transform(TINY_GROUPS,
                                                       TINY_KEEP)]),
               lambda: _negated(optimizers.client_optimizer(
                   _sgd_cfg(1.0, 0.0),
                   [pruning.group_lasso(TINY_GROUPS, 0.0),
                    pruning.mask_transform(TINY_GROUPS, TINY_ALL)])),
               False, (optimizers.client_optimizer, pruning.group_lasso,
                       pruning.mask_transform),
               mixed_out_dtype=F32),
]
CLIENT_BY_NAME = {c.name: c for c in CLIENT_TRANSFORMS}
CLIENT_IDS = list(CLIENT_BY_NAME)

# (params and θ_global dtype, grads dtype).
DTYPE_MODES = {'float32': (F32, F32), 'bfloat16': (BF16, BF16),
               'bf16_grads_f32_params': (F32, BF16)}


@functools.cache
def _client(name, neutral=False):
  case = CLIENT_BY_NAME[name]
  return (case.neutral if neutral else case.make)()


def _client_update(opt):
  def update(grads, state, params, global_params, step):
    return opt.update(grads, state, params, global_params=global_params,
                      global_step=step)
  return update


@functools.cache
def _client_update_jit(name, neutral=False):
  return jax.jit(_client_update(_client(name, neutral)))


@functools.cache
def _client_init_jit(name, neutral=False):
  return jax.jit(_client(name, neutral).init)


def _client_inputs(case, seed, mode='float32'):
  p_dtype, g_dtype = DTYPE_MODES[mode]
  params = _tree(case.tree, seed, p_dtype)
  grads = _tree(case.tree, seed + 1000, g_dtype)
  return grads, params


def _global(case, dtype=F32):
  return _tree(case.tree, 99, dtype)


def _step():
  return jnp.asarray(STEP, jnp.int32)


@pytest.mark.parametrize('name', CLIENT_IDS)
def test_client_jit_matches_eager(name):
  case = CLIENT_BY_NAME[name]
  opt = _client(name)
  grads, params = _client_inputs(case, 0)
  gp = _global(case)
  state = opt.init(params)
  state_jit = _client_init_jit(name)(params)
  assert_trees_close(state_jit, state, 0, 0)
  updates, new_state = opt.update(grads, state, params, global_params=gp,
                                  global_step=_step())
  updates_jit, new_state_jit = _client_update_jit(name)(
      grads, state_jit, params, gp, _step())
  assert_trees_close(updates_jit, updates)
  assert_trees_close(new_state_jit, new_state)
  assert _signature(updates_jit) == _signature(grads)
  assert _signature(new_state_jit) == _signature(state_jit)
  # Not the identity: the typical setting changes the grads.
  assert any(not np.array_equal(u, g) for u, g in
             zip(jax.tree.leaves(updates_jit), jax.tree.leaves(grads)))


@pytest.mark.parametrize('name', CLIENT_IDS)
def test_client_vmap_over_clients_with_state_as_scan_carry(name):
  """Two local steps of NUM_CLIENTS clients: `lax.scan` (the state is the
  carry; scan rejects one whose tree, shapes or dtypes change) of the
  update `vmap`ped over params, grads and state, θ_global and the step
  unmapped; per client equal to two unvmapped calls."""
  case = CLIENT_BY_NAME[name]
  opt = _client(name)
  num_steps = 2
  # grads[s][k], params[k]
  grads = [[_client_inputs(case, 10 * k + s)[0] for k in range(NUM_CLIENTS)]
           for s in range(num_steps)]
  params = [_client_inputs(case, 10 * k)[1] for k in range(NUM_CLIENTS)]
  gp = _global(case)
  stacked_params = _stack(params)
  states = jax.jit(jax.vmap(opt.init))(stacked_params)
  vmapped = jax.vmap(_client_update(opt), in_axes=(0, 0, 0, None, None))

  def body(states, g):
    u, new_states = vmapped(g, states, stacked_params, gp, _step())
    assert _signature(new_states) == _signature(states)  # At trace time.
    return new_states, u

  final, updates = jax.jit(lambda s, gs: lax.scan(body, s, gs))(
      states, _stack([_stack(g) for g in grads]))
  assert _signature(final) == _signature(states)
  for k in range(NUM_CLIENTS):
    state_k = _client_init_jit(name)(params[k])
    assert_trees_close(_row(states, k), state_k, 0, 0)
    for s in range(num_steps):
      u_k, state_k = _client_update_jit(name)(grads[s][k], state_k,
                                              params[k], gp, _step())
      assert_trees_close(_row(_row(updates, s), k), u_k)
    assert_trees_close(_row(final, k), state_k)
  # The clients differ, so a broadcast of one client's result would fail.
  leaf = jax.tree.leaves(updates)[0]
  assert not np.array_equal(leaf[0, 0], leaf[0, 1])


@pytest.mark.parametrize('mode', ['bfloat16', 'bf16_grads_f32_params'])
@pytest.mark.parametrize('name', CLIENT_IDS)
def test_client_low_precision_keeps_tree_shapes_dtypes_and_state(name, mode):
  """bfloat16 grads (float32 is checked by the jit test): the updates have
  the grads' tree, shapes and dtype (or `mixed_out_dtype`), the state its
  init's tree, shapes and dtypes."""
  case = CLIENT_BY_NAME[name]
  p_dtype, g_dtype = DTYPE_MODES[mode]
  grads, params = _client_inputs(case, 0, mode)
  gp = _global(case, p_dtype)
  state = _client_init_jit(name)(params)
  updates, new_state = _client_update_jit(name)(grads, state, params, gp,
                                                _step())
  out_dtype = g_dtype
  if mode == 'bf16_grads_f32_params' and case.mixed_out_dtype is not None:
    out_dtype = case.mixed_out_dtype
  want = jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape, out_dtype),
                      grads)
  assert _signature(updates) == _signature(want)
  assert _signature(new_state) == _signature(state)
  assert all(bool(jnp.all(jnp.isfinite(u.astype(F32))))
             for u in jax.tree.leaves(updates))
  # The update is the float32 one to bfloat16 precision.
  grads32, params32 = _client_inputs(case, 0)
  ref, _ = _client_update_jit(name)(grads32, _client_init_jit(name)(params32),
                                    params32, _global(case), _step())
  for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(u, np.float64),
                               np.asarray(r, np.float64), rtol=0.05,
                               atol=0.05 * float(np.max(np.abs(r))))


@pytest.mark.parametrize('name', CLIENT_IDS)
def test_client_neutral_setting_returns_the_grads(name):
  case = CLIENT_BY_NAME[name]
  grads, params = _client_inputs(case, 0)
  gp = _global(case)
  opt = _client(name, neutral=True)
  state = opt.init(params)
  updates, _ = _client_update_jit(name, True)(grads, state, params, gp,
                                              _step())
  if case.bitwise_neutral:
    assert_trees_bitwise(updates, grads)
    eager, _ = opt.update(grads, state, params, global_params=gp,
                          global_step=_step())
    assert_trees_bitwise(eager, grads)
  else:
    assert_trees_close(updates, grads, rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------------------------
# Upload-transform registry.
# ------------------------------------------------------------------------------


def _tiny_eps(params, x, t, labels, *, train):
  """A two-layer ε-network over the tiny tree (1x1 conv: the kernel summed
  over its window; ignores t and y)."""
  del t, labels, train
  h = jnp.tanh(x @ params['conv']['kernel'].sum((0, 1))
               + params['conv']['bias'])
  return (h @ params['dense']['kernel'])[..., :2]


CALIBRATION = Calibration(eps_fn=_tiny_eps, schedule=linear_schedule(100),
                          image_shape=(2, 2, 2), batch=2, steps=1)
CALIB_RATIOS = (1.0, 0.75, 0.5)


@dataclasses.dataclass(frozen=True)
class UploadCase:
  """An upload transform of the suite.

  Attributes:
    name: test id.
    make: () -> the transform in a typical setting.
    neutral: () -> its neutral setting.
    neutral_check: 'exact' (Δ̂ = Δ bit for bit: promised), 'close' (to
      1e-7), or a granularity ('per_tensor' / 'per_channel'): a 16-bit,
      nearest-rounding, r = 1 quantizer with those scales, checked
      against `_check_half_scale`'s bound.
    key_use: 'ignored' (another key gives the same output), 'stochastic'
      (another key gives another output), or None (the key only feeds a
      data-dependent choice, e.g. calibration inputs: not checked).
    factories: the library factories the entry exercises.
    tree: 'tiny' or 'unet'.
    compresses: the message is smaller than the raw float32 Δ (else it is
      exactly the raw Δ).
  """
  name: str
  make: Callable[[], upload_lib.UploadTransform]
  neutral: Callable[[], upload_lib.UploadTransform]
  neutral_check: str
  key_use: Optional[str]
  factories: tuple
  tree: str = 'tiny'
  compresses: bool = True


Q16 = functools.partial(Config, bits=16, rounding='nearest',
                        scale_method='minmax')

UPLOAD_TRANSFORMS = [
    UploadCase('identity', upload_lib.identity, upload_lib.identity, 'exact',
               'ignored', (upload_lib.identity,), compresses=False),
    UploadCase('quant_int8_tensor_nearest_minmax',
               lambda: upload_lib.quantizer(Config(bits=8)),
               lambda: upload_lib.quantizer(Q16(granularity='per_tensor')),
               'per_tensor', 'ignored', (upload_lib.quantizer,)),
    UploadCase('quant_int4_channel_stochastic_mse',
               lambda: upload_lib.quantizer(Config(
                   bits=4, granularity='per_channel', rounding='stochastic',
                   scale_method='mse')),
               lambda: upload_lib.quantizer(Q16(granularity='per_channel')),
               'per_channel', 'stochastic', (upload_lib.quantizer,)),
    UploadCase('quant_int8_channel_calibrated',
               lambda: upload_lib.quantizer(Config(
                   bits=8, granularity='per_channel',
                   scale_method='calibrated', ratios=CALIB_RATIOS),
                   CALIBRATION),
               lambda: upload_lib.quantizer(Config(
                   bits=16, granularity='per_channel',
                   scale_method='calibrated', ratios=(1.0,)), CALIBRATION),
               'per_channel', None, (upload_lib.quantizer,)),
    UploadCase('error_feedback_identity',
               lambda: upload_lib.error_feedback(upload_lib.identity()),
               lambda: upload_lib.error_feedback(upload_lib.identity()),
               'exact', 'ignored',
               (upload_lib.error_feedback, upload_lib.identity),
               compresses=False),
    UploadCase('error_feedback_quant_int4_stochastic',
               lambda: upload_lib.error_feedback(upload_lib.quantizer(
                   Config(bits=4, rounding='stochastic'))),
               lambda: upload_lib.error_feedback(upload_lib.quantizer(
                   Q16(granularity='per_tensor'))),
               'per_tensor', 'stochastic',
               (upload_lib.error_feedback, upload_lib.quantizer)),
    UploadCase('mask_upload',
               lambda: pruning.mask_upload(TINY_GROUPS, TINY_KEEP,
                                           send_mask=True),
               lambda: pruning.mask_upload(TINY_GROUPS, TINY_ALL),
               'close', 'ignored', (pruning.mask_upload,)),
    UploadCase('chain_mask_quant_int8_channel_stochastic',
               lambda: upload_lib.chain(
                   pruning.mask_upload(TINY_GROUPS, TINY_KEEP),
                   upload_lib.quantizer(Config(
                       bits=8, granularity='per_channel',
                       rounding='stochastic'))),
               lambda: upload_lib.chain(
                   pruning.mask_upload(TINY_GROUPS, TINY_ALL),
                   upload_lib.quantizer(Q16(granularity='per_channel'))),
               'per_channel', 'stochastic',
               (upload_lib.chain, pruning.mask_upload,
                upload_lib.quantizer)),
    # DP-FedAvg's clipping (‖Δ‖ ≈ 0.09 here): the neutral bound is infinite.
    UploadCase('clip', lambda: clipping.clip(0.05),
               lambda: clipping.clip(float('inf')), 'exact', 'ignored',
               (clipping.clip,), compresses=False),
    UploadCase('chain_clip_quant_int8_channel_stochastic',
               lambda: upload_lib.chain(
                   clipping.clip(0.05),
                   upload_lib.quantizer(Config(
                       bits=8, granularity='per_channel',
                       rounding='stochastic'))),
               lambda: upload_lib.chain(
                   clipping.clip(float('inf')),
                   upload_lib.quantizer(Q16(granularity='per_channel'))),
               'per_channel', 'stochastic',
               (upload_lib.chain, clipping.clip, upload_lib.quantizer)),
    UploadCase('chain_mask_error_feedback_quant_int2',
               lambda: upload_lib.chain(
                   pruning.mask_upload(TINY_GROUPS, TINY_KEEP),
                   upload_lib.error_feedback(upload_lib.quantizer(
                       Config(bits=2, scale_method='mse')))),
               lambda: upload_lib.chain(
                   pruning.mask_upload(TINY_GROUPS, TINY_ALL),
                   upload_lib.error_feedback(upload_lib.quantizer(
                       Q16(granularity='per_tensor')))),
               'per_tensor', 'ignored',
               (upload_lib.chain, pruning.mask_upload,
                upload_lib.error_feedback, upload_lib.quantizer)),
]
UPLOAD_BY_NAME = {c.name: c for c in UPLOAD_TRANSFORMS}
UPLOAD_IDS = list(UPLOAD_BY_NAME)

CTX_AXES = upload_lib.UploadContext(global_params=None, params=0, labels=0,
                                    count=0, round=0)


@functools.cache
def _upload(name, neutral=False):
  case = UPLOAD_BY_NAME[name]
  return (case.neutral if neutral else case.make)()


@functools.cache
def _apply_jit(name, neutral=False):
  return jax.jit(_upload(name, neutral).apply)


def _upload_inputs(case, seed, dtype=F32):
  """(delta, ctx) of one client: θ_k = θ_global + Δ, 4 examples."""
  gp = _tree(case.tree, 99)
  delta = _tree(case.tree, seed, dtype, scale=0.01)
  params = jax.tree.map(lambda g, d: g + d.astype(F32), gp, delta)
  ctx = upload_lib.UploadContext(
      global_params=gp, params=params,
      labels=jnp.asarray([seed % 3, 1, 2, 0], jnp.int32),
      count=jnp.asarray(4, jnp.int32), round=jnp.asarray(2, jnp.int32))
  return delta, ctx


def _key(i):
  return jax.random.fold_in(jax.random.key(0), i)


def _differs(a, b):
  return any(not np.array_equal(_bits(x), _bits(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('name', UPLOAD_IDS)
def test_upload_jit_matches_eager(name):
  case = UPLOAD_BY_NAME[name]
  t = _upload(name)
  delta, ctx = _upload_inputs(case, 0)
  z = t.init_client_state(ctx.params)
  assert_trees_close(jax.jit(t.init_client_state)(ctx.params), z, 0, 0)
  eager = t.apply(delta, z, _key(0), ctx)
  jitted = _apply_jit(name)(delta, z, _key(0), ctx)
  assert_trees_close(jitted, eager)
  assert _signature(jitted[0]) == _signature(delta)
  assert _signature(jitted[1]) == _signature(z)


@pytest.mark.parametrize('name', UPLOAD_IDS)
def test_upload_vmap_over_clients_with_state_as_scan_carry(name):
  """Two rounds of NUM_CLIENTS clients: `lax.scan` (the client state is the
  carry) of `apply` `vmap`ped over Δ, z, keys and ctx but ctx.global_params;
  per client equal to two unvmapped calls (the second from a non-zero z
  for stateful transforms)."""
  case = UPLOAD_BY_NAME[name]
  t = _upload(name)
  num_rounds = 2
  # inputs[r][k] = (delta, ctx); the client's params stay fixed.
  inputs = [[_upload_inputs(case, 10 * k + r + 1) for k in range(NUM_CLIENTS)]
            for r in range(num_rounds)]
  ctxs = [c for _, c in inputs[0]]
  ctx = ctxs[0].replace(
      params=_stack([c.params for c in ctxs]),
      labels=jnp.stack([c.labels for c in ctxs]),
      count=jnp.stack([c.count for c in ctxs]),
      round=jnp.stack([c.round for c in ctxs]))
  keys = [jnp.stack([_key(100 * r + k) for k in range(NUM_CLIENTS)])
          for r in range(num_rounds)]
  deltas = [_stack([d for d, _ in inputs[r]]) for r in range(num_rounds)]
  zs = jax.vmap(t.init_client_state)(ctx.params)
  vmapped = jax.vmap(t.apply, in_axes=(0, 0, 0, CTX_AXES))

  def body(zs, xs):
    d, key = xs
    hat, new_zs = vmapped(d, zs, key, ctx)
    assert _signature(new_zs) == _signature(zs)  # At trace time.
    return new_zs, hat

  final, hats = jax.jit(lambda z, xs: lax.scan(body, z, xs))(
      zs, (_stack(deltas), jnp.stack(keys)))
  assert _signature(final) == _signature(zs)
  for k in range(NUM_CLIENTS):
    z_k = t.init_client_state(ctxs[k].params)
    assert_trees_close(_row(zs, k), z_k, 0, 0)
    for r in range(num_rounds):
      h, z_k = _apply_jit(name)(inputs[r][k][0], z_k, keys[r][k], ctxs[k])
      assert_trees_close(_row(_row(hats, r), k), h)
    assert_trees_close(_row(final, k), z_k)
  leaf = jax.tree.leaves(hats)[0]
  assert not np.array_equal(leaf[0, 0], leaf[0, 1])


@pytest.mark.parametrize('name', UPLOAD_IDS)
def test_upload_bfloat16_keeps_tree_shapes_dtypes_and_state(name):
  """bfloat16 Δ (float32 is checked by the jit test)."""
  case = UPLOAD_BY_NAME[name]
  delta, ctx = _upload_inputs(case, 0, BF16)
  z = _upload(name).init_client_state(ctx.params)
  hat, z1 = _apply_jit(name)(delta, z, _key(0), ctx)
  assert _signature(hat) == _signature(delta)
  assert _signature(z1) == _signature(z)
  assert all(bool(jnp.all(jnp.isfinite(h.astype(F32))))
             for h in jax.tree.leaves(hat))


@pytest.mark.parametrize('name', UPLOAD_IDS)
def test_upload_wire_bytes_is_a_static_positive_int(name):
  case = UPLOAD_BY_NAME[name]
  t = _upload(name)
  delta_a, _ = _upload_inputs(case, 0)
  delta_b = jax.tree.map(lambda d: 7.0 * d + 1.0,
                         _upload_inputs(case, 1)[0])
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        delta_a)
  raw = t.wire_bytes(shapes, comm.tree_bytes)
  assert isinstance(raw, int) and not isinstance(raw, bool)
  assert raw > 0
  assert comm.message_bytes(t, delta_a) == raw
  assert comm.message_bytes(t, delta_b) == raw
  full = comm.tree_bytes(shapes)
  if case.compresses:
    assert raw < full
  else:
    assert raw == full


@pytest.mark.parametrize('name', UPLOAD_IDS)
def test_upload_output_is_a_function_of_the_key(name):
  case = UPLOAD_BY_NAME[name]
  t = _upload(name)
  delta, ctx = _upload_inputs(case, 0)
  z = t.init_client_state(ctx.params)
  apply = _apply_jit(name)
  first = apply(delta, z, _key(5), ctx)
  again = apply(delta, z, jax.random.fold_in(jax.random.key(0), 5), ctx)
  assert_trees_bitwise(again, first)
  if case.key_use is not None:
    other = apply(delta, z, _key(6), ctx)
    if case.key_use == 'stochastic':
      assert _differs(other[0], first[0])
    else:
      assert case.key_use == 'ignored'
      assert_trees_bitwise(other, first)


def _residuals(z):
  """Every error-feedback residual in a (possibly chained) client state."""
  if isinstance(z, dict):
    found = [z['residual']] if 'residual' in z else []
    return found + [r for k, v in z.items() if k != 'residual'
                    for r in _residuals(v)]
  if isinstance(z, (tuple, list)):
    return [r for v in z for r in _residuals(v)]
  return []


def _check_half_scale(delta, hat, granularity):
  """|Δ̂ − Δ| ≤ s/2 + 2⁻²²·max|Δ| per entry, for 16-bit nearest rounding.

  quantize.py: s = fl32(max|Δ| · fl32(1/q_max)), q_max = 2¹⁵ − 1, over the
  tensor or (per_channel, ndim ≥ 2) over all axes but the last;
  q = clip(round(fl32(Δ/s)), ±q_max) and Δ̂ = fl32(q·s). In exact arithmetic
  |Δ − q·s| ≤ s/2 (no entry is clipped: |Δ|/s ≤ q_max up to rounding);
  the two float32 roundings (of Δ/s and of q·s) add at most
  2⁻²⁴·|Δ| + 2⁻²⁴·(|Δ| + s/2) ≤ 2⁻²²·max|Δ| (s ≪ max|Δ|).
  """
  for d, h in zip(jax.tree.leaves(delta), jax.tree.leaves(hat)):
    d = np.asarray(d, np.float32)
    per_channel = granularity == 'per_channel' and d.ndim >= 2
    axis = tuple(range(d.ndim - 1)) if per_channel else None
    amax = np.max(np.abs(d), axis=axis, keepdims=True)
    s = (amax * np.float32(1.0 / (2 ** 15 - 1))).astype(np.float32)
    bound = (s.astype(np.float64) / 2
             + 2.0 ** -22 * np.max(np.abs(d)).astype(np.float64))
    err = np.abs(np.asarray(h, np.float64) - d.astype(np.float64))
    assert np.all(err <= bound), float(np.max(err - bound))
    # Not the identity map: 16 bits still round.
    assert np.any(err > 0)


@pytest.mark.parametrize('name', UPLOAD_IDS)
def test_upload_neutral_setting(name):
  case = UPLOAD_BY_NAME[name]
  t = _upload(name, neutral=True)
  delta, ctx = _upload_inputs(case, 3)
  z = t.init_client_state(ctx.params)
  hat, z1 = _apply_jit(name, True)(delta, z, _key(0), ctx)
  if case.neutral_check == 'exact':
    assert_trees_bitwise(hat, delta)
  elif case.neutral_check == 'close':
    assert_trees_close(hat, delta, rtol=1e-7, atol=1e-7)
  else:
    _check_half_scale(delta, hat, case.neutral_check)
  # Error feedback from e = 0 keeps e' = Δ − Δ̂ (zero for the identity).
  # (To one float32 rounding of Δ̂: XLA may fuse Δ − q·s into an FMA.)
  for e in _residuals(z1):
    want = jax.tree.map(lambda d, h: d - h, delta, hat)
    amax = max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(delta))
    assert_trees_close(e, want, 0, 2.0 ** -23 * amax)
    if case.neutral_check == 'exact':
      assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(e))


def test_error_feedback_identity_has_a_residual_to_check():
  """The zero-residual check above is not vacuous for EF(identity)."""
  t = _upload('error_feedback_identity', neutral=True)
  delta, ctx = _upload_inputs(UPLOAD_BY_NAME['error_feedback_identity'], 3)
  _, z1 = t.apply(delta, t.init_client_state(ctx.params), _key(0), ctx)
  (e,) = _residuals(z1)
  assert _signature(e) == _signature(
      jax.tree.map(lambda d: d.astype(F32), delta))


# ------------------------------------------------------------------------------
# The registries cover the library.
# ------------------------------------------------------------------------------

CLIENT_MODULES = (proximal_lib, pruning, optimizers)
UPLOAD_MODULES = (upload_lib, pruning, clipping)
# Server-side, not a client transform.
NOT_CLIENT = {optimizers.server_optimizer}
CLIENT_RETURNS = {optax.GradientTransformation,
                  optax.GradientTransformationExtraArgs,
                  'optax.GradientTransformation',
                  'optax.GradientTransformationExtraArgs'}
UPLOAD_RETURNS = {upload_lib.UploadTransform, 'UploadTransform',
                  'upload_lib.UploadTransform'}


def _factories(modules, returns):
  found = set()
  for module in modules:
    for fn in vars(module).values():
      if (inspect.isfunction(fn) and fn.__module__ == module.__name__
          and inspect.signature(fn).return_annotation in returns):
        found.add(fn)
  return found


def test_registries_cover_every_factory():
  client = _factories(CLIENT_MODULES, CLIENT_RETURNS) - NOT_CLIENT
  upload = _factories(UPLOAD_MODULES, UPLOAD_RETURNS)
  assert {f.__name__ for f in client} >= {
      'proximal', 'group_lasso', 'mask_transform',
      'scale_by_global_step_schedule', 'client_optimizer'}
  assert {f.__name__ for f in upload} >= {
      'identity', 'quantizer', 'error_feedback', 'chain', 'mask_upload',
      'clip'}
  covered_client = {f for c in CLIENT_TRANSFORMS for f in c.factories}
  covered_upload = {f for c in UPLOAD_TRANSFORMS for f in c.factories}
  missing = sorted(f.__qualname__ for f in client - covered_client)
  assert not missing, f'client transforms without a suite entry: {missing}'
  missing = sorted(f.__qualname__ for f in upload - covered_upload)
  assert not missing, f'upload transforms without a suite entry: {missing}'
