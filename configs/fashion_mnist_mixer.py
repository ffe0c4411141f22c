"""MLP-Mixer (Tolstikhin et al. 2021) on Fashion-MNIST.

The model: no attention: 6 blocks of a token-mixing MLP (across the 49 patches, width 64) and a
channel-mixing MLP (width 128).
The recipe (data, optimizer, schedule, EMA) is configs/fashion_mnist_vit.py's, for 1 epoch
with a 100-step warmup (the family comparison's budget); only the model differs, so
`python -m vit_flax.compare --configs=...` puts them side by side.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_mixer.py

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; the family compare
in the README): test accuracy 83.62% (EMA 83.60%) after 1 epoch, 1,734 train images/s, 60 s wall.
"""

import ml_collections

from vit_flax.configs import fashion_mnist_vit


def get_config() -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST mixer config."""
  config = fashion_mnist_vit.get_config()
  config.experiment_name = 'fashion_mnist_mixer'
  # The family comparison's budget: one epoch (469 steps; 2-5 minutes each on a 2-core CPU).
  config.num_training_epochs = 1
  config.lr_configs.warmup_steps = 100
  config.dataset_configs.random_erasing = 0.0  # The family table was measured without it.
  config.model = ml_collections.ConfigDict(dict(
      name='mixer', hidden_size=64, num_layers=6, sequence_mlp_dim=64, channels_mlp_dim=128,
      patch_size=(4, 4)))
  return config
