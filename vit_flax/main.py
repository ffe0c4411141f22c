"""`python -m vit_flax.main --config=configs/NAME.py [--workdir=DIR] [--config.FIELD=VALUE ...]`.

Flags only; the work is `vit_flax.train.train_and_evaluate`. A `--config` path that does not exist
names a shipped config by its file name, so the same command works from a checkout and from an
installed wheel. Before JAX starts, the host CPU is split into one XLA device per core
(`loops.use_one_device_per_cpu_core`) unless XLA_FLAGS or jax_num_cpu_devices already chose a count,
and a multi-process job starts `jax.distributed` (`multihost.initialize`): every process runs the
same command with its own `--process_id` (on Cloud TPU, SLURM and Open MPI without these flags).
"""

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_flax import cli
from vit_flax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/mnist_tl.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and summary.json; re-running with the '
    'same one resumes. Default: ./runs/<config file name>. Shared by all processes of a job.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process jobs: HOST:PORT of process 0, where JAX\'s '
    'coordinator listens (not needed on Cloud TPU, SLURM or Open MPI, which JAX discovers).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process jobs: processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process jobs: this process, 0..N-1.')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'Error: unexpected arguments {argv[1:]}.')
  from vit_flax import checkpoints  # pylint: disable=g-import-not-at-top
  from vit_flax import input_pipeline  # pylint: disable=g-import-not-at-top
  from vit_flax import loops  # pylint: disable=g-import-not-at-top
  from vit_flax import multihost  # pylint: disable=g-import-not-at-top
  from vit_flax import pretrained  # pylint: disable=g-import-not-at-top
  from vit_flax import rundir  # pylint: disable=g-import-not-at-top
  from vit_flax import train  # pylint: disable=g-import-not-at-top
  try:
    multihost.check_flags(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except multihost.DistributedConfigError as e:
    sys.exit(f'Error: {e}')
  loops.use_one_device_per_cpu_core()
  multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not multihost.is_primary():
    logging.set_verbosity(logging.WARNING)  # Process 0 reports progress; the others, problems.
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  try:  # Bad input is a usage error: one line, before anything loads or compiles.
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value or os.path.join('runs', name))
  except (config_lib.ConfigError, OSError, input_pipeline.DataError, pretrained.PretrainedError,
          rundir.WorkdirBusyError, checkpoints.CheckpointMismatchError,
          checkpoints.CheckpointError, train.TrainingDivergedError) as e:
    sys.exit(f'Error: {e}')  # One line on stderr, exit status 1.
  except train.TrainingStopped as e:
    print(e)  # One line: where the run stopped and how to resume.


def run() -> None:
  """The command: checks --config and its overrides (one-line errors), then runs `main`."""
  cli.run(main)


if __name__ == '__main__':
  run()
