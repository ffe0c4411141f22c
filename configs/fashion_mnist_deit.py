"""DeiT (Touvron et al. 2021) with its distillation token on Fashion-MNIST.

The model: a ViT with a class and a distillation token and two heads; the distillation head learns
the hard labels of a teacher, configs/fashion_mnist_vit.py's trained run (train it first), and the
prediction is the mean of the two heads.
The recipe (data, optimizer, schedule, EMA) is configs/fashion_mnist_vit.py's, for 1 epoch
with a 100-step warmup (the family comparison's budget); only the model differs, so
`python -m vit_flax.compare --configs=...` puts them side by side.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py  # the teacher, first
  python -m vit_flax.main --config=configs/fashion_mnist_deit.py

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; the family compare
in the README, teacher: the 16-epoch ViT run at 89.6%): test accuracy 80.90% (EMA 80.73%) after 1
epoch, 731 train images/s, 123 s wall.
"""

import ml_collections

from vit_flax.configs import fashion_mnist_vit


def get_config() -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST deit config."""
  config = fashion_mnist_vit.get_config()
  config.experiment_name = 'fashion_mnist_deit'
  # The family comparison's budget: one epoch (469 steps; 2-5 minutes each on a 2-core CPU).
  config.num_training_epochs = 1
  config.lr_configs.warmup_steps = 100
  config.dataset_configs.random_erasing = 0.0  # The family table was measured without it.
  config.model = ml_collections.ConfigDict(dict(
      name='deit', hidden_size=64, num_layers=6, num_heads=4, mlp_dim=128, patch_size=(4, 4)))
  # The teacher: a vit_flax run on the same data (here the ViT of configs/fashion_mnist_vit.py).
  config.distillation = ml_collections.ConfigDict(dict(
      teacher_workdir='runs/fashion_mnist_vit', teacher_checkpoint='best'))
  return config
