"""ViT on Fashion-MNIST, no TokenLearner: patch 4 (49 tokens), width 64, 6 layers, GAP.

The baseline for configs/fashion_mnist_tl.py: that file with `tokenizer.type = 'patch'`, so the
recipe, data order, seed and steps are identical and only the learner differs.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py [--workdir=runs/fashion_mnist_vit]

Measured 2026-12-04 (2-core AMD EPYC Zen 5, AVX-512, no GPU, nothing else running; `python -m
vit_flax.compare --configs=configs/fashion_mnist_vit.py,configs/fashion_mnist_tl.py`): test
accuracy 90.33% (EMA 90.57%, best-validation checkpoint 90.81%), 17.9 min wall, 1,645 train
images/s. The 16-epoch recipe (`--config.num_training_epochs=16`) gave 89.63% in 16.8 min on a
2-core AMD EPYC Zen 3 on 2026-12-02; this 30-epoch recipe would take about 32 min there.
"""

from vit_flax.configs import fashion_mnist_tl


def get_config():
  """Returns configs/fashion_mnist_tl.py without its TokenLearner."""
  config = fashion_mnist_tl.get_config()
  config.experiment_name = 'fashion_mnist_vit'
  config.model.tokenizer.type = 'patch'  # A plain ViT; the learner's keys stay, unread.
  return config
