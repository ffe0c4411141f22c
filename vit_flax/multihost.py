"""JAX's multi-process runtime: starting it, and what the processes of one job agree on.

One process per host (a TPU VM of a pod slice, a SLURM task on a GPU node) drives that host's
devices; together they form one global `Mesh`. `initialize` starts `jax.distributed` from the
command line's `--coordinator_address/--num_processes/--process_id`, or by itself where JAX can
discover the job (a SLURM job of several tasks, Open MPI, a Cloud TPU VM). Everything else here is
a collective every process calls at the same point: the primary process (0) writes the run's
files and logs; the others follow its decisions.
"""

import importlib.util
import os
import re

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class DistributedConfigError(ValueError):
  """The multi-process flags are inconsistent; the message is one line."""


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
  """Validates the three flags (all or none); returns whether they ask for several processes."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not any(given):
    return False
  if not all(given):
    raise DistributedConfigError(
        '--coordinator_address, --num_processes and --process_id go together: give all three.')
  if not re.fullmatch(r'[^\s:]+:\d{1,5}', coordinator_address):
    raise DistributedConfigError(
        f'--coordinator_address must be HOST:PORT (e.g. 10.0.0.2:1234), got '
        f'{coordinator_address!r}.')
  if num_processes < 1:
    raise DistributedConfigError(f'--num_processes must be >= 1, got {num_processes}.')
  if not 0 <= process_id < num_processes:
    raise DistributedConfigError(
        f'--process_id must be in [0, {num_processes}), got {process_id}.')
  return True


def _discoverable_job() -> bool:
  """Whether the environment is a multi-process job `jax.distributed.initialize()` discovers."""
  for key in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if os.environ.get(key, '1').isdigit() and int(os.environ.get(key, '1')) > 1:
      return True
  on_colab = any(k.startswith('COLAB_') for k in os.environ)  # One host: nothing to discover.
  return importlib.util.find_spec('libtpu') is not None and not on_colab


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts `jax.distributed` when this is one process of a multi-process job; call before JAX
  computes anything.

  With the three flags, connects to the coordinator at HOST:PORT as process `process_id` of
  `num_processes`. Without them, lets JAX discover the job on SLURM (several tasks), Open MPI and
  Cloud TPU VMs; elsewhere (a laptop, one GPU machine, Colab) does nothing. On CPU, cross-process
  collectives use gloo.
  """
  explicit = check_flags(coordinator_address, num_processes, process_id)
  if not explicit and not _discoverable_job():
    return
  if explicit and num_processes == 1:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_primary() -> bool:
  """Process 0: the one that writes the run's files and logs its progress."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """Whether `flag` is true in any process (every process must call this at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def broadcast_from_primary(value: int) -> int:
  """The primary process's `value` (an int), in every process."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.array(value, np.int64)))


def barrier(name: str) -> None:
  """Waits until every process reaches this point."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def preemption_reached(dispatch: int) -> bool:
  """Whether the job was told to stop (SIGTERM to any process: a TPU maintenance event, SLURM's
  preemption): true in every process at the same `dispatch` number (JAX's preemption service,
  which orbax's `CheckpointManager.reached_preemption` wraps). Always false in one process, where
  the trainer's own signal handler answers SIGTERM.
  """
  if jax.process_count() == 1:
    return False
  return multihost_utils.reached_preemption_sync_point(dispatch)
