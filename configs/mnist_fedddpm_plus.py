r"""FedDDPM+ on embedded MNIST: a one-shot correction when learning slows.

Reproduces: FedDDPM+ (arXiv 2503.06426, from its abstract) with everything of
configs/mnist_fedddpm.py (data, 2-class shards, class-conditional UNet with
classifier-free guidance, phase 1, the auxiliary set), except the server step:
FedDDPM+ makes no per-round server steps. After each round it measures the
global model's DDPM loss on the held-out 10% of the auxiliary set (fixed
timesteps and noise), and when the mean of the last 2 values improves on the
mean of the 2 before by less than 5% (relative), it makes one correction of
40 server steps (Adam 5e-4, batch 16) on the auxiliary training set; at most
one correction per run (`plus_max_corrections`). The trigger's state is
rebuilt from metrics.jsonl on resume (fedjax_diff/strategies/plateau.py).

Choices the abstract leaves open, beyond those of configs/mnist_fedddpm.py:
the signal (held-out auxiliary loss of the raw global params), the test
(relative improvement of window means, window 2, threshold 0.05, at least
2 windows since the start or the last correction), the correction's length
(40 steps = half of FedDDPM's 8×10 per-run server steps) and one correction.
Run with the same rounds as FedDDPM: summary.json's `server_aux_steps`
against FedDDPM's gives the steps saved.

Command:
  python launch/train.py --config=configs/mnist_fedddpm_plus.py \
      --workdir=workdirs/mnist_fedddpm_plus

Expected runtime: measured 28 min wall clock each for FedDDPM and FedDDPM+
and 40 min for the 18-round FedAvg, evaluation included, on a 2-core CPU shared
with 4 other jobs (load average 11–19); not measured on an idle machine.
Results (held-out loss, FID/coverage, server steps, bytes):
README, "FedDDPM and FedDDPM+ on embedded MNIST".
"""

from configs import mnist_fedddpm


def get_config(arg=None):
  del arg
  config = mnist_fedddpm.get_config()
  config.fedddpm.plus = True
  return config
