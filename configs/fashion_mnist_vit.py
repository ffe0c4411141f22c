"""ViT on Fashion-MNIST, no TokenLearner: patch 4 (49 tokens), width 64, 6 layers, GAP.

The baseline for configs/fashion_mnist_tl.py: that file with `tokenizer.type = 'patch'`, so the
recipe, data order, seed and steps are identical and only the learner differs.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py [--workdir=runs/fashion_mnist_vit]

Measured 2026-12-06 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; `python -m
vit_flax.compare --configs=configs/fashion_mnist_vit.py,configs/fashion_mnist_tl.py`): test
accuracy 90.97% (EMA 90.94%, best-validation checkpoint 91.01%), 45.5 min wall, 648 train
images/s. Without random erasing (`--config.dataset_configs.random_erasing=0`) it gave 90.33% in
17.9 min (1,645 train images/s) on a 2-core AMD EPYC Zen 5 (AVX-512) on 2026-12-04; this Zen 3
runs it about 2.5x slower.
"""

from vit_flax.configs import fashion_mnist_tl


def get_config():
  """Returns configs/fashion_mnist_tl.py without its TokenLearner."""
  config = fashion_mnist_tl.get_config()
  config.experiment_name = 'fashion_mnist_vit'
  config.model.tokenizer.type = 'patch'  # A plain ViT; the learner's keys stay, unread.
  return config
