"""ViT on Fashion-MNIST, no TokenLearner: patch 4 (49 tokens), width 64, 6 layers, GAP.

The baseline for configs/fashion_mnist_tl.py: that file with `tokenizer.type = 'patch'`, so the
recipe, data order, seed and steps are identical and only the learner differs.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py [--workdir=runs/fashion_mnist_vit]

Measured 2026-11-25 (2-core AMD EPYC Zen 5, no GPU, nothing else running; `python -m
vit_flax.compare --config=configs/fashion_mnist_tl.py`): test accuracy 90.21% (EMA 90.31%),
21.4 min wall, 825 train images/s.
"""

from vit_flax.configs import fashion_mnist_tl


def get_config():
  """Returns configs/fashion_mnist_tl.py without its TokenLearner."""
  config = fashion_mnist_tl.get_config()
  config.experiment_name = 'fashion_mnist_vit'
  config.model.tokenizer.type = 'patch'  # A plain ViT; the learner's keys stay, unread.
  return config
