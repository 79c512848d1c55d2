"""CPU hosts: one XLA device per core, so that clients train in parallel.

XLA's CPU backend gives a process one device, whose programs use the cores
through an intra-op thread pool. A local step of a small UNet (batch 16 of
28×28 in the quickstart) is made of many small operations, and one device
left the second core of a 2-core machine partly idle (two devices trained
the quickstart 1.43× faster than one). The federation has parallelism that
does not depend on operation sizes: its clients. With K CPU devices
(`jax_num_cpu_devices`), the engine shards the round's clients over K
devices (`shard_map`), and each device trains its own clients, all K at
once; see README, "Benchmarks", for what this gains on a 2-core machine.

The device count is fixed when jax starts its CPU backend, so `configure`
runs before anything touches a device (launch/train.py and launch/bench.py
call it first thing). A count set by the user's `XLA_FLAGS`
(`--xla_force_host_platform_device_count`, as the tests' 8 fake devices) is
kept. On GPU and TPU hosts the CPU devices are not the ones the run uses,
and nothing changes.
"""

import os
from typing import Optional, Union

import jax

FLAG_HELP = (
    "CPU hosts: XLA devices to split the cores into ('auto': one per core, "
    'at most one per client of a round; 1: one device using every core). '
    'Clients are sharded over them and train in parallel. Ignored when '
    'XLA_FLAGS sets --xla_force_host_platform_device_count, and on GPU/TPU.')


def physical_cores() -> int:
  """The cores this process may run on (its CPU affinity)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def count_from_xla_flags() -> Optional[int]:
  """The CPU device count `XLA_FLAGS` sets, or None."""
  for flag in os.environ.get('XLA_FLAGS', '').split():
    name, _, value = flag.partition('=')
    if name == '--xla_force_host_platform_device_count':
      return int(value)
  return None


def resolve(requested: Union[str, int], clients_per_round: int) -> int:
  """The CPU device count for `requested` ('auto' or a positive int).

  'auto' is one device per core but no more than the clients of a round
  (a device without a client would train padding).
  """
  if str(requested) == 'auto':
    return max(1, min(physical_cores(), int(clients_per_round)))
  try:
    count = int(requested)
  except ValueError:
    count = 0
  if count < 1:
    raise ValueError(f"--cpu_devices={requested}: use 'auto' or a "
                     'positive number of CPU devices, e.g. --cpu_devices=2.')
  return count


def clients_per_round(config) -> int:
  """`config.federation.clients_per_round`, or 1 where the config does not
  say (the trainer reports a bad value itself)."""
  try:
    return max(1, int(config.federation.clients_per_round))
  except (AttributeError, KeyError, TypeError, ValueError):
    return 1


def configure(requested: Union[str, int], clients_per_round: int) -> int:
  """Gives this process `resolve(requested, ...)` CPU devices, unless
  `XLA_FLAGS` already sets a count; returns the count in effect.

  Must run before jax initializes its backends (the first `jax.devices()`
  or computation).
  """
  count = resolve(requested, clients_per_round)
  preset = count_from_xla_flags()
  if preset is not None:
    return preset
  jax.config.update('jax_num_cpu_devices', count)
  return count
