"""launch/prune_table.py: FedPhD's parameter counts of the pruned DDPM
CIFAR-10 UNet (arXiv 2507.06449)."""

import launch_scripts
from fedjax_diff import models

# FedPhD's published figure at ratio 0.2, and torch-pruning's count at 0.4
# (see TORCH_PRUNING_PARAMS in tests/models/test_compact.py).
FEDPHD_PARAMS_02 = 20.34e6
TORCH_PRUNING_PARAMS_04 = 9_259_190


def test_table_shows_fedphds_counts():
  prune_table = launch_scripts.load('prune_table')
  model = models.UNet()
  rows = prune_table.table(model, (32, 32, 3), [0.0, 0.2, 0.4])
  assert rows[0]['params'] == 35_746_307
  assert abs(rows[1]['params'] / FEDPHD_PARAMS_02 - 1) < 0.003
  assert rows[2]['params'] == TORCH_PRUNING_PARAMS_04
  text = prune_table.format_table(model, (32, 32, 3), rows, 'torch_pruning')
  assert '| 0.2 | 20.340M | 3.415 |' in text
  assert '96; 96,192,192,192; 192,204,204; 409 |' in text
  assert '| 0.4 | 9.259M |' in text
  # The earlier rule rounds: 410 time-embedding channels at 0.2.
  nearest = prune_table.table(model, (32, 32, 3), [0.2], 'nearest')
  assert nearest[0]['temb_width'] == 410
