r"""FedDDPM / FedDDPM+ of a class-conditional DDPM UNet on CIFAR-100.

Reproduces: FedDDPM and FedDDPM+ (arXiv 2503.06426, from its abstract) on
CIFAR-100, with the layout of configs/cifar10_fedddpm.py scaled to 100
classes: 20 clients holding 10 classes each (grouped shards: 10 groups of 2
clients, group g holds classes {g, g+10, ..., g+90}), 40% participation, 1
local epoch (20 steps of batch 128), DDPM's 35.7M UNet with a 101-entry class
embedding (null = 100) and label dropout 0.1.

`get_config(arg)`: None or 'fedddpm', 'plus', 'fedavg', as for CIFAR-10.

Choices beyond configs/cifar10_fedddpm.py's: 10 classes per client (the
abstract gives no CIFAR-100 split; 2 of 100 would leave each client 500
images); 50 auxiliary images per class (5,000 in all, as for CIFAR-10, each
class drawn from the 2 clients holding it).

Command (data prepared with `tfds build cifar100 --data_dir=DIR`):
  python launch/train.py --config=configs/cifar100_fedddpm.py \
      --workdir=workdirs/cifar100_fedddpm --config.data.data_dir=DIR

Expected runtime: not measured (needs an accelerator). Results: not measured
yet.
"""

from configs import cifar10_fedavg
from configs import cifar10_fedddpm


def get_config(arg=None):
  config = cifar10_fedavg.get_config()
  config.data.name = 'cifar100'
  config.partition.classes_per_client = 10
  config.model.num_classes = 100
  return cifar10_fedddpm.apply_fedddpm(config, arg, aux_per_class=50)
