"""configs/mnist_transfer.py from a random init: the baseline the fine-tuned runs are held to.

Command:
  python -m vit_flax.main --config=configs/mnist_scratch.py
"""

from vit_flax.configs import mnist_transfer


def get_config():
  """Returns the from-scratch twin of the fine-tuning config."""
  config = mnist_transfer.get_config()
  config.experiment_name = 'mnist_scratch'
  config.init_from = None
  return config
