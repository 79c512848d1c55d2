"""Tests of fedjax_diff.diffusion.ema."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff import diffusion


def test_ema_update_hand_computed():
  ema = {'w': jnp.array([1.0, 2.0]), 'b': {'c': jnp.array(0.0)}}
  params = {'w': jnp.array([3.0, 6.0]), 'b': {'c': jnp.array(10.0)}}
  out = diffusion.ema_update(ema, params, 0.9)
  # 0.9 * [1, 2] + 0.1 * [3, 6] = [1.2, 2.4];  0.9 * 0 + 0.1 * 10 = 1.
  np.testing.assert_allclose(out['w'], [1.2, 2.4], rtol=1e-6)
  np.testing.assert_allclose(out['b']['c'], 1.0, rtol=1e-6)
  assert jax.tree.structure(out) == jax.tree.structure(ema)


def test_ema_update_limits_jit_and_dtype():
  ema = {'w': jnp.array([1.0, -1.0], jnp.bfloat16)}
  params = {'w': jnp.array([3.0, 5.0], jnp.float32)}
  f = jax.jit(diffusion.ema_update)
  np.testing.assert_array_equal(f(ema, params, 1.0)['w'], [1.0, -1.0])
  np.testing.assert_array_equal(f(ema, params, 0.0)['w'], [3.0, 5.0])
  out = f(ema, params, jnp.float32(0.75))['w']
  assert out.dtype == jnp.bfloat16
  # 0.75 * [1, -1] + 0.25 * [3, 5] = [1.5, 0.5], exact in bfloat16.
  np.testing.assert_array_equal(out.astype(jnp.float32), [1.5, 0.5])
  # Two steps compose: ema_2 = d^2 ema_0 + (1 - d^2) p for a constant p.
  two = diffusion.ema_update(diffusion.ema_update({'w': 1.0}, {'w': 3.0}, 0.5),
                             {'w': 3.0}, 0.5)
  np.testing.assert_allclose(two['w'], 0.25 * 1.0 + 0.75 * 3.0)
