r"""FedDM-quant of the DDPM CIFAR-10 UNet (35.7M parameters).

Reproduces: FedDM-quant (arXiv 2407.14730) on CIFAR-10 at the size of
configs/cifar10_fedavg.py (20 clients with 2 classes each, 40%
participation, DDPM's CIFAR-10 UNet): each client uploads its update
quantized to `bits` bits per output channel with stochastic rounding and
minmax scales.

`get_config(arg)`: arg is the bit width, 8 (default), 4 or 2
(`--config=configs/cifar10_quant.py:4`). The exact bytes are printed at the
start of training and in summary.json: per client and round
142,985,228 B in float32; 35,853,675 B at 8 bits (3.99× less), 17,980,522 B
at 4 (7.95×), 9,043,945 B at 2 (15.81×).

Command (data prepared with `tfds build cifar10 --data_dir=DIR`):
  python launch/train.py --config=configs/cifar10_quant.py:8 \
      --workdir=workdirs/cifar10_quant8 --config.data.data_dir=DIR

Expected runtime: as configs/cifar10_fedavg.py (not measured yet; needs an
accelerator). Results: not measured yet.
"""

from configs import cifar10_fedavg
from configs import mnist_quant


def get_config(arg=None):
  config = cifar10_fedavg.get_config()
  config.upload.quantize_bits = mnist_quant.bits_from_arg(arg)
  config.upload.granularity = 'per_channel'
  config.upload.rounding = 'stochastic'
  config.upload.scale_method = 'minmax'
  return config
