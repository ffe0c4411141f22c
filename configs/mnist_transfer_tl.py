"""configs/mnist_transfer.py with a TokenLearner inserted into the pretrained ViT.

The learner (V1.1, 8 tokens before block 2, as configs/fashion_mnist_tl.py) is new and starts from
its own init; every other parameter comes from the pretrained ViT. scenic#112 asks whether this
helps; configs/mnist_scratch_tl.py is the same model from a random init.

Command:
  python -m vit_flax.main --config=configs/mnist_transfer_tl.py

Measured 2026-12-02 (2-core AMD EPYC Zen 3, AVX2, no GPU, nothing else running; the transfer compare
in configs/mnist_transfer.py): test accuracy 93.9% (EMA 93.8%) on the 5k sample, 2,298 train
images/s, 78 s wall (the same model from scratch: 90.6%).
"""

from vit_flax import models
from vit_flax.configs import fashion_mnist_tl
from vit_flax.configs import mnist_transfer


def get_config():
  """Returns the fine-tuning config with a TokenLearner inserted."""
  config = mnist_transfer.get_config()
  config.experiment_name = 'mnist_transfer_tl'
  learner = fashion_mnist_tl.get_config().model.tokenizer
  for key in models.LEARNER_KEYS:
    config.model.tokenizer[key] = learner[key]
  config.model.tokenizer.type = 'dynamic'
  return config
