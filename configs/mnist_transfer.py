"""Transfer: the Fashion-MNIST ViT fine-tuned on the offline MNIST 5k sample (ViT's recipe).

scenic's `init_from` block: every parameter of configs/fashion_mnist_vit.py's trained run
(runs/fashion_mnist_vit, train it first) but a fresh zero head for MNIST's classes, then 1,000
steps of configs/mnist_vit.py's small-data recipe. configs/mnist_scratch.py is the same run from
a random init; configs/mnist_transfer_2x.py fine-tunes at 56 x 56 with the position embedding
resized; configs/mnist_transfer_tl.py inserts a TokenLearner (fresh) into the pretrained ViT.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py  # the pretrained model, first
  python -m vit_flax.compare --configs=mnist_scratch.py,mnist_transfer.py,mnist_transfer_2x.py,\
mnist_scratch_tl.py,mnist_transfer_tl.py --workdir=runs/transfer

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; the compare command
above): test accuracy 95.3% (EMA 95.4%) on the 5k sample, 1,100 train images/s, 140 s wall (from
scratch: 92.6%).
"""

import ml_collections

from vit_flax.configs import mnist_vit


def get_config() -> ml_collections.ConfigDict:
  """Returns the fine-tuning config."""
  config = mnist_vit.get_config()
  config.experiment_name = 'mnist_transfer'
  config.num_training_steps = 1000  # ~35 epochs of the 5k sample's 3,667 training images.
  config.lr_configs.warmup_steps = 100
  config.log_eval_steps = 100
  config.checkpoint_steps = 500
  config.model.positional_embedding = 'learned_1d'  # The source's: its embedding is loaded.
  config.init_from = ml_collections.ConfigDict(dict(
      checkpoint_path='runs/fashion_mnist_vit', checkpoint_format='vit_flax',
      restore_head=False,  # MNIST's digits are not Fashion-MNIST's classes: a fresh head.
      positional_embed_size_change='resize', posemb_interpolation='bilinear'))
  return config
