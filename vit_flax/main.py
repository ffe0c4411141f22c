"""`python -m vit_flax.main --config=configs/NAME.py [--workdir=DIR] [--config.FIELD=VALUE ...]`.

Flags only; the work is `vit_flax.train.train_and_evaluate`. Before JAX starts, the host CPU is
split into one XLA device per core (`train.use_one_device_per_cpu_core`) unless XLA_FLAGS or
jax_num_cpu_devices already chose a count: the batch is then sharded over the cores, which roughly
doubles CPU training throughput on a 2-core machine.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/mnist_tl.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and summary.json; re-running with the '
    'same one resumes. Default: ./runs/<config file name>.')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  from vit_flax import train  # pylint: disable=g-import-not-at-top
  train.use_one_device_per_cpu_core()
  try:  # A bad config is a usage error: one line, before anything loads or compiles.
    train.validate_config(_CONFIG.value, num_devices=jax.device_count())
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  name = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value or os.path.join('runs', name))


if __name__ == '__main__':
  app.run(main)
