"""FedAvg, i.e. FedDM-vanilla: the weighted mean of client updates.

McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (arXiv 1602.05629); FedDM-vanilla (Vora et al. 2024,
arXiv 2407.14730) is FedAvg of diffusion UNets. Round r:

1. the server broadcasts θ to the round's clients S_r;
2. client k runs `local_steps` steps of its optimizer on its own data from
   θ (`client.make_local_training`) and uploads Δ̂_k = U(θ_k − θ), its
   update through the upload path U (identity: FedAvg);
3. Δ̄ = Σ_{k∈S_r} n_k Δ̂_k / Σ_{k∈S_r} n_k (`aggregator.weighted_mean`);
   under `config.dp`, DP-FedAvg's Δ̄ = (Σ_k clip_C(Δ̂_k) + N(0, σ²C²))/m
   over a Poisson sample S_r (`strategies.privacy`, arXiv 1710.06963);
4. θ ← θ − ServerOpt(−Δ̄): `sgd(1.0)` gives θ + Δ̄ (FedAvg), `adam` FedAdam
   (Reddi et al. 2021, arXiv 2003.00295);
5. EMA ← d·EMA + (1 − d)·θ, with warmup (`diffusion.ema.ema_decay_at`).

A client whose upload is not finite is left out of the mean, and a round
without any client left changes nothing (`strategies.faults`).

FedDM-prox (the proximal term), FedDM-quant (a quantizing upload path),
pruning masks, kept client optimizer state and client-level DP are
transforms and options that compose with it; they live in `strategies/`,
`client.py` and `algorithms/base.py` (the aggregator of the run).
"""

import jax
import optax

from fedjax_diff import engine
from fedjax_diff import state as state_lib
from fedjax_diff.algorithms import base


class Algorithm(base.Algorithm):
  """FedAvg with the run's client optimizer, upload path and server
  optimizer."""

  name = 'fedavg'

  def round_step(self):
    server_opt = self.run.server_optimizer
    run_clients = self.client_round(
        self.client_fn(lambda shared, _: shared[0]))

    def round_fn(state: state_lib.ServerState, data, client_ids, client_mask):
      aggregate, outputs, rows = run_clients(
          state, data, client_ids, client_mask,
          shared=(state.params, state.round))
      delta, changes, figures = self.finish_aggregate(state, aggregate)
      updates, opt_state = server_opt.update(
          jax.tree.map(lambda d: -d, delta), state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      if changes:
        state = state.replace(algorithm={**state.algorithm, **changes})
      return (state_lib.advance(state, params, opt_state, self.ema_decay,
                                client_states=rows,
                                **self.shared_state_update(outputs)),
              {**engine.client_metrics(outputs), **figures})

    return round_fn
