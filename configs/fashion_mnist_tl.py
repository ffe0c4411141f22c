"""ViT + TokenLearner V1.1 on Fashion-MNIST: patch 2 (196 tokens) -> 8 learned tokens at layer 1.

configs/fashion_mnist_vit.py is the same model and recipe without TokenLearner (same data order,
seed and steps). Model: 28x28x1, width 64, 4 layers, 4 heads, MLP 128, GAP (the `mnist`
benchmark preset).

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_tl.py [--workdir=runs/fashion_mnist_tl]

Data: a prepared TFDS fashion_mnist copy, else the IDX files of Debian's `dataset-fashion-mnist`
package (/usr/share/datasets/fashion-mnist: the full 60,000 / 10,000 images), else a TFDS download.
Expected test accuracy: 74.5% (full Fashion-MNIST test set, 2,000 steps: under-trained).
Training time: 7.8 min wall (598 train images/s) on a shared 2-core AMD EPYC CPU (measured 2026-11-24).
"""

from vit_flax.configs import mnist_tl


def get_config():
  """Returns configs/mnist_tl.py's model and recipe on Fashion-MNIST."""
  config = mnist_tl.get_config()
  config.experiment_name = 'fashion_mnist_tl'
  config.dataset_name = 'fashion_mnist'
  config.dataset_configs.idx_dir = None  # None: Debian's /usr/share/datasets/fashion-mnist.
  config.dataset_configs.random_flip = True  # Clothes are (mostly) mirror-symmetric.
  return config
