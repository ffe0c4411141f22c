"""ViT on Fashion-MNIST, no TokenLearner: 28x28x1, patch 2 (196 tokens), width 64, 4 layers, GAP.

The baseline for configs/fashion_mnist_tl.py, which is this file plus TokenLearner V1.1 (8 tokens
before layer 1); everything else (data order, seed, recipe) is identical.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py [--workdir=runs/fashion_mnist_vit]

Data: a prepared TFDS fashion_mnist copy, else the IDX files of Debian's `dataset-fashion-mnist`
package (/usr/share/datasets/fashion-mnist: the full 60,000 / 10,000 images), else a TFDS download.
Expected test accuracy: 77.5% (full Fashion-MNIST test set, 2,000 steps: under-trained; published small ViTs reach 92-93% after ~100 epochs).
Training time: 25.5 min wall (176 train images/s) on a shared 2-core AMD EPYC CPU (measured 2026-11-24).
"""

from vit_flax.configs import fashion_mnist_tl


def get_config():
  """Returns configs/fashion_mnist_tl.py without its TokenLearner."""
  config = fashion_mnist_tl.get_config()
  config.experiment_name = 'fashion_mnist_vit'
  config.model.tokenizer.type = 'patch'  # A plain ViT: no learner, so its keys go too.
  for key in ('num_tokens', 'tokenlearner_loc', 'use_v11', 'use_tokenfuse'):
    del config.model.tokenizer[key]
  return config
