"""ViT on CIFAR-10 without TokenLearner: 32x32x3, patch 4 (64 tokens), width 192, 12 layers.

The baseline for configs/cifar10_tl.py (the same model plus TokenLearner V1.1 with 8 tokens before
layer 6); everything else is identical. Model: the `cifar` benchmark preset (width 192, 12 layers,
3 heads, MLP 768, GAP). A from-scratch recipe with crop + flip augmentation and label smoothing;
sized for a GPU (on the 2-core CPU an epoch of the ViT takes tens of minutes).

Command:
  python -m vit_flax.main --config=configs/cifar10_vit.py [--workdir=runs/cifar10_vit]

Data: TFDS cifar10 (prepared copy in data_dir, else a download when the network is reachable).
Expected test accuracy: not yet measured. Training time: not yet measured.
"""

from vit_flax.configs import cifar10_tl


def get_config():
  """Returns configs/cifar10_tl.py without its TokenLearner."""
  config = cifar10_tl.get_config()
  config.experiment_name = 'cifar10_vit'
  config.model.tokenizer.type = 'patch'  # A plain ViT: no learner, so its keys go too.
  for key in ('num_tokens', 'tokenlearner_loc', 'use_v11', 'use_tokenfuse'):
    del config.model.tokenizer[key]
  return config
