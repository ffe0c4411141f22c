"""ViT on Fashion-MNIST, no TokenLearner: patch 4 (49 tokens), width 64, 6 layers, GAP.

The baseline for configs/fashion_mnist_tl.py: that file with `tokenizer.type = 'patch'`, so the
recipe, data order, seed and steps are identical and only the learner differs.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py [--workdir=runs/fashion_mnist_vit]

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; `python -m
vit_flax.compare --configs=configs/fashion_mnist_vit.py,configs/fashion_mnist_tl.py`): test
accuracy 89.63% (EMA 89.62%), 16.8 min wall, 957 train images/s. On a 2-core Intel Xeon (AVX-512)
the same day: 89.96%, 18.4 min, 851 images/s.
"""

from vit_flax.configs import fashion_mnist_tl


def get_config():
  """Returns configs/fashion_mnist_tl.py without its TokenLearner."""
  config = fashion_mnist_tl.get_config()
  config.experiment_name = 'fashion_mnist_vit'
  config.model.tokenizer.type = 'patch'  # A plain ViT; the learner's keys stay, unread.
  return config
