"""configs/mnist_transfer_tl.py from a random init: the TokenLearner model trained from scratch.

Command:
  python -m vit_flax.main --config=configs/mnist_scratch_tl.py
"""

from vit_flax.configs import mnist_transfer_tl


def get_config():
  """Returns the from-scratch twin of the TokenLearner fine-tuning config."""
  config = mnist_transfer_tl.get_config()
  config.experiment_name = 'mnist_scratch_tl'
  config.init_from = None
  return config
