"""config.model.dtype='bfloat16': bf16 compute, float32 everything else."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import testlib as lib
from configs import test as test_config
from fedjax_diff import client as client_lib
from fedjax_diff import comm
from fedjax_diff import experiment
from fedjax_diff import models
from fedjax_diff import optimizers
from fedjax_diff.diffusion import make_schedule
from fedjax_diff.strategies import quantize
from fedjax_diff.strategies import upload

ROUNDS = [[0, 1, 2, 3], [1, 2, 3, 4]]


def _unet_run(dtype, upload_transform=None, seed=42):
  """Two FedAvg rounds of a one-level UNet (configs/test.py's, with its
  attention at 8×8) on 8×8 data in `dtype`, the diffusion noise drawn from
  PRNGKey(`seed`). One level keeps every layer kind (convolutions, group
  norm, attention, time embedding) and compiles in a third of the time."""
  config = test_config.get_config()
  config.model.dtype = dtype
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = (8,)
  model = models.unet_from_config(config.model)
  assert model.dtype == {'float32': jnp.float32,
                         'bfloat16': jnp.bfloat16}[dtype]
  params = models.init_params(model, jax.random.PRNGKey(0), (8, 8, 1))
  loss = experiment.make_loss_fn(models.make_eps_fn(model),
                              make_schedule('linear', 100), config)
  data = lib.make_data(8)
  algorithm, sharded = lib.make_algorithm(
      data, 1, loss=loss, params=params, upload=upload_transform,
      # The quickstart's Adam: testlib's 5e-2 makes the tiny UNet's training
      # chaotic, and bf16's rounding then grows into any difference at all.
      optimizer=optimizers.client_optimizer(ml_collections.ConfigDict(dict(
          name='adam', learning_rate=2e-3, warmup_steps=4, grad_clip=1.0))),
      **{'federation.num_clients': 8, 'federation.clients_per_round': 4})
  state = algorithm.initial_state(params, jax.random.PRNGKey(seed))
  state, metrics, _ = lib.run_rounds(algorithm, sharded, ROUNDS, state=state)
  return params, state, metrics


def _ef_int8():
  return upload.error_feedback(upload.quantizer(
      quantize.QuantizationConfig(bits=8, rounding='nearest')))


@pytest.fixture(scope='module')
def runs():
  """The three runs upload through error-feedback int8 (one compiled
  program per dtype serves the tolerance test and the upload-path test)."""
  runs = {d: _unet_run(d, _ef_int8()) for d in ('float32', 'bfloat16')}
  runs['float32, other noise'] = _unet_run('float32', _ef_int8(), seed=43)
  return runs


def test_bf16_round_matches_fp32_within_tolerance(runs):
  """The rounds' losses agree to 2% (bf16 has 8 bits of mantissa: ~0.4%
  per product, averaged over many), and bf16 moves the model less far from
  the float32 run than float32 itself does when only the diffusion noise
  (t, ε) is drawn from another key: the rounding is below the noise that
  training has anyway. (A fixed fraction of how far the model moved is not
  a stable bar: Adam divides by √v̂, so on a few steps of a tiny model the
  coordinates with near-zero gradients flip with the rounding, and how far
  depends on the CPU's kernels.)"""
  start, fp32, m32 = runs['float32']
  _, bf16, m16 = runs['bfloat16']
  for a, b in zip(m32, m16):
    np.testing.assert_allclose(float(b['loss']), float(a['loss']), rtol=2e-2)
  moved = lib.tree_distance(fp32.params, start)
  assert moved > 1e-3
  _, other_noise, _ = runs['float32, other noise']
  noise_floor = lib.tree_distance(other_noise.params, fp32.params)
  rounding = lib.tree_distance(bf16.params, fp32.params)
  assert rounding < noise_floor, (rounding, noise_floor, moved)
  # Not the same computation: bf16 does differ.
  assert float(m16[0]['loss']) != float(m32[0]['loss'])


def test_bf16_keeps_parameters_state_and_updates_float32(runs):
  _, bf16, _ = runs['bfloat16']
  for tree in (bf16.params, bf16.ema_params, bf16.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32


def test_bf16_upload_path_is_exact(runs):
  """With error-feedback int8 uploads under bf16 compute, the clients'
  residual rows stay float32 (the update Δ = θ_k − θ is float32) and a
  client's message has the same bytes as in float32."""
  transform = _ef_int8()
  start, state, _ = runs['bfloat16']
  rows = state.client_states[client_lib.UPLOAD]['residual']
  for leaf in jax.tree.leaves(rows):
    assert leaf.dtype == jnp.float32
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(rows))
  # The message is the same as in float32: the upload sees float32 Δ.
  shapes = jax.eval_shape(lambda: start)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  assert comm.message_bytes(transform, shapes) == quantize.wire_bytes(
      shapes, quantize.QuantizationConfig(bits=8))


def test_unknown_dtype_is_refused():
  with pytest.raises(ValueError, match=r"config.model.dtype='float16'"):
    models.unet_from_config(ml_collections.ConfigDict(dict(
        ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
        dropout=0.0, dtype='float16')))
