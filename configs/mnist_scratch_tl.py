"""configs/mnist_transfer_tl.py from a random init: the TokenLearner model trained from scratch.

Command:
  python -m vit_flax.main --config=configs/mnist_scratch_tl.py

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; the transfer compare
in configs/mnist_transfer.py): test accuracy 90.6% (EMA 90.7%) on the 5k sample, 2,298 train
images/s, 79 s wall.
"""

from vit_flax.configs import mnist_transfer_tl


def get_config():
  """Returns the from-scratch twin of the TokenLearner fine-tuning config."""
  config = mnist_transfer_tl.get_config()
  config.experiment_name = 'mnist_scratch_tl'
  config.init_from = None
  return config
