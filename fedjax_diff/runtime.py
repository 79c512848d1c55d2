"""Where a run executes: multi-process start-up and the backend it got.

`distributed_args(...)` says how to start `jax.distributed` when a run is launched as several
processes (one per host of a TPU pod or GPU cluster, or several on one
machine for tests): with an explicit coordinator address, process count and
id, or with jax's own detection of the cluster (Cloud TPU, SLURM, ...).
After it, `jax.devices()` lists every process's devices and each process
addresses its own (`jax.local_devices()`).

`describe()` is the start-up line (backend, device and process counts), and
`accelerator_warning()` says when the machine has a GPU or TPU that jax does
not use (a CPU-only jax installed by `pip install -e .`), with the command
that installs the matching jax; see README, "Install".
"""

import glob
import os
import shutil
from typing import Optional

import jax

INSTALL_COMMANDS = {
    'gpu': "pip install -e '.[cuda12]'",
    'tpu': "pip install -e '.[tpu]'",
}


def _cluster_detected() -> bool:
  """Whether jax's cluster detection (Cloud TPU pods, SLURM, ...) finds a
  multi-process environment that `jax.distributed.initialize()` can join
  without arguments."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  for env in getattr(clusters.ClusterEnv, '_cluster_types', ()):
    try:
      if env.is_env_present() and not getattr(env, 'opt_in_only_method',
                                              False):
        return True
    except Exception:  # pylint: disable=broad-except
      continue
  return False


def distributed_args(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None,
                     mode: str = 'auto') -> Optional[dict]:
  """The arguments of `jax.distributed.initialize` for this run, or None
  when it runs as one process (launch/train.py makes the call).

  Args:
    coordinator_address: 'host:port' of process 0's coordinator.
    num_processes: how many processes take part.
    process_id: this process's id in [0, num_processes).
    mode: 'auto' (start when the three arguments are given, or when jax
      detects a cluster such as a Cloud TPU pod), 'on' (always start; jax
      fills in what is not given) or 'off'.

  Returns:
    None (one process), or the keyword arguments to pass: the explicit
    three, or {} for jax's detection.

  Raises:
    ValueError: some but not all of the explicit arguments are given, or
      an unknown mode.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f'--distributed={mode!r}; use auto, on or off.')
  explicit = (coordinator_address, num_processes, process_id)
  given = [a is not None for a in explicit]
  if any(given) and not all(given):
    raise ValueError(
        'Multi-process runs need all of --coordinator_address, '
        '--num_processes and --process_id (or none of them, on a cluster jax '
        'detects, e.g. a Cloud TPU pod); got coordinator_address='
        f'{coordinator_address!r}, num_processes={num_processes!r}, '
        f'process_id={process_id!r}.')
  if mode == 'off' or (mode == 'auto' and not all(given) and
                       not _cluster_detected()):
    return None
  kwargs = {}
  if all(given):
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=int(num_processes), process_id=int(process_id))
  if not os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    # CPU devices of several processes talk through gloo (no effect on
    # GPUs and TPUs, which have their own interconnect).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  return kwargs


def visible_accelerator() -> Optional[str]:
  """'gpu' or 'tpu' when the machine has one (device files or driver tools),
  else None; independent of what jax uses."""
  if glob.glob('/dev/nvidia[0-9]*') or shutil.which('nvidia-smi'):
    return 'gpu'
  if glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'):
    return 'tpu'
  if os.environ.get('COLAB_TPU_ADDR') or os.environ.get('TPU_NAME'):
    return 'tpu'
  return None


def describe() -> str:
  """The start-up line: backend, devices (all processes) and processes."""
  devices = jax.devices()
  kind = devices[0].device_kind if devices else '?'
  return (f'JAX {jax.__version__}: backend {jax.default_backend()}, '
          f'{len(devices)} devices ({kind}), {jax.local_device_count()} on '
          f'this host; process {jax.process_index()} of '
          f'{jax.process_count()}.')


def accelerator_warning() -> Optional[str]:
  """A warning with the install command when the machine has a GPU or TPU
  but jax runs on CPU; None otherwise."""
  if jax.default_backend() != 'cpu':
    return None
  if os.environ.get('JAX_PLATFORMS', '').strip() == 'cpu':
    return None  # CPU asked for explicitly.
  kind = visible_accelerator()
  if kind is None:
    return None
  return (f'WARNING: this machine has a {kind.upper()} but jax runs on CPU '
          f'(jax {jax.__version__} has no {kind} backend installed). '
          f'Install it with `{INSTALL_COMMANDS[kind]}` (README, "Install"), '
          'or set JAX_PLATFORMS=cpu to silence this.')


_BARRIERS = {}


def barrier(name: str, timeout_s: float = 1200.0) -> None:
  """Waits until every process reaches `barrier(name)` (the coordination
  service's barrier; a no-op in a one-process run).

  Cross-process CPU collectives (gloo) give up when a peer is more than 30 s
  late to a program's first run, which a slow compile on a loaded host
  exceeds; a barrier before a new collective program lines the processes
  up with a long timeout.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  count = _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
  distributed.global_state.client.wait_at_barrier(
      f'fedjax_diff_{name}_{count}', int(timeout_s * 1000))
