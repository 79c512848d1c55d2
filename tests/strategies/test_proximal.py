"""Tests for the FedProx transform, fedjax_diff.strategies.proximal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_diff.strategies import proximal as proximal_lib

proximal = proximal_lib.proximal


def _tree(w, b):
  return {'w': jnp.asarray(w, jnp.float32), 'b': jnp.asarray(b, jnp.float32)}


def test_sgd_step_by_hand():
  # θ = [1, 2], θ_g = [0, 0], g = [0.5, 0.5], μ = 0.1, lr = 1:
  #   g' = g + μ(θ − θ_g) = [0.6, 0.7],  θ' = θ − g' = [0.4, 1.3].
  # Second leaf: θ = 3, θ_g = 1, g = 0: g' = 0.1·2 = 0.2, θ' = 2.8.
  params = _tree([1.0, 2.0], 3.0)
  global_params = _tree([0.0, 0.0], 1.0)
  grads = _tree([0.5, 0.5], 0.0)
  opt = optax.chain(proximal(0.1), optax.sgd(1.0))
  state = opt.init(params)
  updates, _ = opt.update(grads, state, params, global_params=global_params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['w'], [0.4, 1.3], rtol=1e-6)
  np.testing.assert_allclose(new['b'], 2.8, rtol=1e-6)


def test_chain_with_clip_by_hand():
  # g' = [3, 4] + 0.1·[1, 2] = [3.1, 4.2], ‖g'‖ = √27.25 > 1, so the clip
  # rescales it to g'/‖g'‖; with sgd(1) θ' = θ − g'/‖g'‖.
  params = {'w': jnp.array([1.0, 2.0])}
  global_params = {'w': jnp.zeros(2)}
  grads = {'w': jnp.array([3.0, 4.0])}
  opt = optax.chain(proximal(0.1), optax.clip_by_global_norm(1.0),
                    optax.sgd(1.0))
  updates, _ = opt.update(grads, opt.init(params), params,
                          global_params=global_params)
  expected = np.array([1.0, 2.0]) - np.array([3.1, 4.2]) / np.sqrt(27.25)
  np.testing.assert_allclose(params['w'] + updates['w'], expected, rtol=1e-6)


@pytest.mark.parametrize('jit', [False, True])
def test_chain_with_clip_and_adam_first_step(jit):
  # g' = [0.6, 0.7] (norm √0.85 < 1: no clip). Adam's first step has
  # m̂ = g', v̂ = g'², so the update is −lr · g' / (|g'| + eps).
  lr, eps = 2e-4, 1e-8
  params = _tree([1.0, 2.0], 3.0)
  global_params = _tree([0.0, 0.0], 1.0)
  grads = _tree([0.5, 0.5], 0.0)
  opt = optax.chain(proximal(0.1), optax.clip_by_global_norm(1.0),
                    optax.adam(lr))
  state = opt.init(params)
  update = jax.jit(opt.update) if jit else opt.update
  updates, state = update(grads, state, params, global_params=global_params)
  new = optax.apply_updates(params, updates)
  g = np.array([0.6, 0.7])
  np.testing.assert_allclose(new['w'], [1.0, 2.0] - lr * g / (g + eps),
                             rtol=1e-6)
  np.testing.assert_allclose(new['b'], 3.0 - lr * 0.2 / (0.2 + eps), rtol=1e-6)
  # The state keeps nothing of the global params.
  assert proximal_lib.ProximalState() in state
  assert state[0] == proximal_lib.ProximalState()


def _local_sgd(mu, steps=50, lr=0.1, sign=1.0):
  """Local SGD on F(θ) = ½‖θ − θ*‖², starting at θ_g; returns ‖θ − θ_g‖."""
  theta_star = {'a': jnp.array([5.0, -3.0]), 'b': jnp.array(2.0)}
  theta_g = {'a': jnp.array([0.5, 0.0]), 'b': jnp.array(0.0)}
  opt = optax.chain(proximal(mu), optax.sgd(lr))
  if sign < 0:  # g ↦ g − μ(θ − θ_g): the term with its sign flipped.
    opt = optax.chain(optax.scale(-1.0), proximal(mu), optax.scale(-1.0),
                      optax.sgd(lr))

  @jax.jit
  def run(theta):
    state = opt.init(theta)

    def step(carry, _):
      theta, state = carry
      grads = jax.tree.map(lambda t, s: t - s, theta, theta_star)
      updates, state = opt.update(grads, state, theta, global_params=theta_g)
      return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta, state), None, length=steps)
    return theta

  theta = run(theta_g)
  diff = jax.tree.map(lambda t, g: t - g, theta, theta_g)
  return float(optax.tree.norm(diff)), theta


def test_larger_mu_keeps_client_closer_to_global():
  mus = [0.0, 0.1, 1.0, 10.0]
  dists = [_local_sgd(mu)[0] for mu in mus]
  assert all(a > b for a, b in zip(dists, dists[1:])), dists
  # And the fixed point is the closed form (θ* + μ θ_g) / (1 + μ).
  _, theta = _local_sgd(1.0)
  np.testing.assert_allclose(theta['a'], (np.array([5.0, -3.0]) +
                                          np.array([0.5, 0.0])) / 2, rtol=1e-3)
  np.testing.assert_allclose(theta['b'], 1.0, rtol=1e-3)


def test_sign_check_catches_a_flipped_term():
  # Flipping the sign of μ(θ − θ_g) (i.e. using the gradient of −μ/2‖θ−θ_g‖²)
  # must break the monotone ordering of the test above.
  mus = [0.0, 0.1, 1.0, 10.0]
  dists = [_local_sgd(mu, sign=-1.0)[0] for mu in mus]
  assert not all(a > b for a, b in zip(dists, dists[1:])), dists


@pytest.mark.parametrize('inner', ['sgd', 'adam'])
def test_mu_zero_is_bitwise_the_plain_optimizer(inner):
  make = (lambda: optax.sgd(0.3)) if inner == 'sgd' else (
      lambda: optax.adam(2e-4))
  keys = jax.random.split(jax.random.key(0), 4)
  params = {'w': jax.random.normal(keys[0], (3, 4)),
            'b': jnp.array([0.0, -0.0, jnp.inf])}
  global_params = jax.tree.map(lambda x: x + 1.0, params)
  plain, prox = make(), optax.chain(proximal(0.0), make())
  s_plain, s_prox = plain.init(params), prox.init(params)
  p_plain = p_prox = params
  for k in keys[1:]:
    grads = {'w': jax.random.normal(k, (3, 4)),
             'b': jnp.array([-0.0, 1.0, 2.0])}
    u_plain, s_plain = plain.update(grads, s_plain, p_plain)
    u_prox, s_prox = prox.update(grads, s_prox, p_prox,
                                 global_params=global_params)
    for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_prox)):
      np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                    np.asarray(b).view(np.uint32))
    p_plain = optax.apply_updates(p_plain, u_plain)
    p_prox = optax.apply_updates(p_prox, u_prox)
  # proximal(0) alone hands back the very same updates.
  tx = proximal(0.0)
  updates, _ = tx.update(grads, tx.init(params), params,
                         global_params=global_params)
  assert updates is grads


def test_vmap_over_clients_with_shared_global():
  num_clients = 3
  params = {'w': jnp.arange(6.0).reshape(num_clients, 2)}
  grads = {'w': jnp.ones((num_clients, 2))}
  global_params = {'w': jnp.array([1.0, -1.0])}
  opt = optax.chain(proximal(0.5), optax.sgd(1.0))

  def client_update(p, g, gp):
    updates, _ = opt.update(g, opt.init(p), p, global_params=gp)
    return optax.apply_updates(p, updates)

  new = jax.jit(jax.vmap(client_update, in_axes=(0, 0, None)))(
      params, grads, global_params)
  expected = (np.arange(6.0).reshape(3, 2) - 1.0 -
              0.5 * (np.arange(6.0).reshape(3, 2) - np.array([1.0, -1.0])))
  np.testing.assert_allclose(new['w'], expected, rtol=1e-6)


def test_errors():
  params = {'w': jnp.ones(2)}
  with pytest.raises(ValueError, match='mu'):
    proximal(-0.1)
  with pytest.raises(ValueError, match='mu'):
    proximal(float('nan'))
  for mu in (0.0, 0.1):
    tx = proximal(mu)
    state = tx.init(params)
    with pytest.raises(ValueError, match='global_params'):
      tx.update(params, state, params)
    with pytest.raises(ValueError, match='params'):
      tx.update(params, state, None, global_params=params)
    with pytest.raises(ValueError, match='structure'):
      tx.update(params, state, params, global_params={'v': jnp.ones(2)})
  # Through a chain as well.
  opt = optax.chain(proximal(0.1), optax.adam(1e-3))
  with pytest.raises(ValueError, match='global_params'):
    opt.update(params, opt.init(params), params)
