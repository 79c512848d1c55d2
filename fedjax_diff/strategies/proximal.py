"""FedDM-prox: the FedProx proximal term as an optax gradient transformation.

FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks",
arXiv:1812.06127) has every client ``k`` minimise, in round ``r``,

  h_k(θ) = F_k(θ) + (μ / 2) · ‖θ − θ_global^r‖²,

so the gradient a client's local optimizer sees is

  ∇h_k(θ) = ∇F_k(θ) + μ · (θ − θ_global^r).

FedDM (Vora et al., 2024, "FedDM: Enhancing Communication Efficiency and
Handling Data Heterogeneity in Federated Diffusion Models", arXiv:2407.14730)
uses this term as FedDM-prox: it pulls each client's diffusion model towards
the round's global model and so limits client drift under non-IID data.

:func:`proximal` adds ``μ · (θ − θ_global)`` to the incoming updates. It is the
first link of a chain, before any clipping or adaptive scaling, so that the
rest of the optimizer sees the gradient of ``h_k``::

  opt = optax.chain(proximal(mu), optax.clip_by_global_norm(1.0),
                    optax.adam(2e-4))
  state = opt.init(params)
  updates, state = opt.update(grads, state, params, global_params=gp)

The global parameters come in as an extra argument on every call and are
never stored in the optimizer state, so a federation that stacks client states
on a leading axis does not hold one copy of the global model per client.
"""

from typing import Any, NamedTuple

import jax
import optax

__all__ = ['ProximalState', 'proximal']


class ProximalState(NamedTuple):
  """:func:`proximal` keeps no state: the global params arrive per call."""


def _static_value(mu: Any) -> float | None:
  """Returns ``mu`` as a Python float, or None when it is traced."""
  try:
    return float(mu)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def proximal(mu: float) -> optax.GradientTransformationExtraArgs:
  """Adds the gradient of the FedProx term ``(μ/2)·‖θ − θ_global‖²``.

  The update is ``g ↦ g + μ · (θ − θ_global)`` (Li et al., 2020,
  arXiv:1812.06127, Eq. 2; FedDM-prox in arXiv:2407.14730). With ``μ = 0``
  (a static zero) the incoming updates are returned unchanged, bit for bit.

  Args:
    mu: The proximal coefficient μ ≥ 0. A Python number or a concrete scalar
      is validated here; a traced scalar is used as is.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose
    ``update(updates, state, params, *, global_params, **extra)`` needs both
    ``params`` (the client's current parameters θ) and the keyword
    ``global_params`` (θ_global, same tree structure as ``params``). Other extra
    arguments are ignored.

  Raises:
    ValueError: If ``mu`` is negative or not finite.
  """
  mu_value = _static_value(mu)
  if mu_value is not None:
    if not mu_value >= 0.0 or mu_value == float('inf'):
      raise ValueError(
          f'proximal: mu must be a finite number >= 0, got {mu!r}.')

  def init_fn(params):
    del params
    return ProximalState()

  def update_fn(updates, state, params=None, *, global_params=None,
                **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          'proximal: `params` is required, since the proximal gradient '
          'mu * (params - global_params) depends on it. Call '
          '`opt.update(grads, state, params, global_params=...)`.')
    if global_params is None:
      raise ValueError(
          'proximal: the extra argument `global_params` is required. Call '
          '`opt.update(grads, state, params, global_params=...)` with the '
          "round's global model.")
    params_def = jax.tree.structure(params)
    global_def = jax.tree.structure(global_params)
    if params_def != global_def:
      raise ValueError(
          'proximal: `global_params` must have the same tree structure as '
          f'`params`; got {global_def} and {params_def}.')
    if mu_value == 0.0:
      return updates, state

    def add_prox(g, p, pg):
      if g is None:
        return None
      return (g + mu * (p - pg)).astype(g.dtype)

    updates = jax.tree.map(
        add_prox, updates, params, global_params,
        is_leaf=lambda x: x is None)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
