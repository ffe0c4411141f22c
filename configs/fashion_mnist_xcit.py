"""XCiT (El-Nouby et al. 2021) on Fashion-MNIST.

The model: cross-covariance attention (a head_dim x head_dim map over channels), local patch
interaction (3 x 3 depthwise convolutions with BatchNorm), a 2-convolution stem for patch 4, Fourier
position encoding, 6 blocks and 2 class-attention blocks.
The recipe (data, optimizer, schedule, EMA) is configs/fashion_mnist_vit.py's, for 1 epoch
with a 100-step warmup (the family comparison's budget); only the model differs, so
`python -m vit_flax.compare --configs=...` puts them side by side.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_xcit.py

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; the family compare
in the README): test accuracy 86.16% (EMA 85.98%) after 1 epoch, 645 train images/s, 154 s wall.
"""

import ml_collections

from vit_flax.configs import fashion_mnist_vit


def get_config() -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST xcit config."""
  config = fashion_mnist_vit.get_config()
  config.experiment_name = 'fashion_mnist_xcit'
  # The family comparison's budget: one epoch (469 steps; 2-5 minutes each on a 2-core CPU).
  config.num_training_epochs = 1
  config.lr_configs.warmup_steps = 100
  config.dataset_configs.random_erasing = 0.0  # The family table was measured without it.
  config.model = ml_collections.ConfigDict(dict(
      name='xcit', hidden_size=64, num_layers=6, num_class_layers=2, num_heads=4, mlp_dim=128,
      patch_size=4))
  return config
