"""configs/mnist_transfer.py from a random init: the baseline the fine-tuned runs are held to.

Command:
  python -m vit_flax.main --config=configs/mnist_scratch.py

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; the transfer compare
in configs/mnist_transfer.py): test accuracy 92.6% (EMA 92.4%) on the 5k sample, 1,087 train
images/s, 149 s wall.
"""

from vit_flax.configs import mnist_transfer


def get_config():
  """Returns the from-scratch twin of the fine-tuning config."""
  config = mnist_transfer.get_config()
  config.experiment_name = 'mnist_scratch'
  config.init_from = None
  return config
