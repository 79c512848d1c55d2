r"""Peak host memory of placing a CelebA-sized split on the client mesh.

  python launch/memory_bench.py                     # 162,770 x 64x64x3 uint8
  python launch/memory_bench.py --path=stack        # the stack-then-shard path

Generates a random uint8 split of CelebA's train size (162,770 x 64 x 64 x 3
= 2.0 GB), partitions it over `--clients` clients (iid or Dirichlet), and
places it on the devices as the trainer does (`federation.place_clients`,
or `--path=stack`: `stack_clients` then `shard_client_data`). Prints, in
bytes and as multiples of the split's size: the process's peak RSS
(getrusage), its RSS after imports (the baseline) and before placing (split
generated), and the bytes the placed arrays hold on the devices. On the CPU
backend the devices' buffers live in host memory too, so the host's own
overhead is peak − baseline − device bytes. A benchmark, not a test: it
needs about 2.5× the split in free memory.
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_N = flags.DEFINE_integer('examples', 162_770, 'Examples in the split.')
_SIDE = flags.DEFINE_integer('side', 64, 'Image side.')
_CLIENTS = flags.DEFINE_integer('clients', 10, 'Clients.')
_PARTITION = flags.DEFINE_enum('partition', 'iid', ['iid', 'dirichlet'],
                               'How the split is partitioned.')
_PATH = flags.DEFINE_enum('path', 'place', ['place', 'stack'],
                          'place_clients (the trainer) or stack+shard.')


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _peak_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_diff import federation  # pylint: disable=g-import-not-at-top
  from fedjax_diff.data import partition  # pylint: disable=g-import-not-at-top
  mesh = federation.client_mesh()
  baseline = _rss_bytes()
  n, side = _N.value, _SIDE.value
  images = np.empty((n, side, side, 3), np.uint8)
  rng = np.random.default_rng(0)
  for s in range(0, n, 4096):  # in chunks: no full-size temporary.
    images[s:s + 4096] = rng.integers(0, 256, images[s:s + 4096].shape,
                                      np.uint8)
  labels = rng.integers(0, 4, n).astype(np.int32)
  if _PARTITION.value == 'iid':
    parts = partition.iid(labels, _CLIENTS.value, seed=0)
  else:
    parts = partition.dirichlet(labels, _CLIENTS.value, seed=0, alpha=0.5)
  split = images.nbytes
  before = _rss_bytes()
  t = time.perf_counter()
  if _PATH.value == 'place':
    data = federation.place_clients(images, labels, parts, mesh)
  else:
    data = federation.shard_client_data(
        federation.stack_clients(images, labels, parts), mesh)
  jax.block_until_ready(data)
  seconds = time.perf_counter() - t
  on_devices = sum(x.nbytes for x in jax.tree.leaves(data))
  peak = _peak_bytes()
  gb = lambda b: f'{b / 1e9:.2f} GB ({b / split:.2f}x split)'
  print(f'{_PATH.value} on {mesh.size} {jax.default_backend()} devices, '
        f'{n:,} x {side}x{side}x3 uint8 over {len(parts)} clients '
        f'({_PARTITION.value}) in {seconds:.1f}s')
  print(f'  split            {gb(split)}')
  print(f'  RSS after import {gb(baseline)}')
  print(f'  RSS before place {gb(before)}')
  print(f'  peak RSS         {gb(peak)}')
  print(f'  on the devices   {gb(on_devices)}')
  print(f'  peak - baseline  {gb(peak - baseline)}')
  print(f'  host overhead (peak - baseline - split - device bytes) '
        f'{gb(peak - baseline - split - on_devices)}')


if __name__ == '__main__':
  app.run(main)
