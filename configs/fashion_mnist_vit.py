"""ViT on Fashion-MNIST, no TokenLearner: 28x28x1, patch 2 (196 tokens), width 64, 4 layers, GAP.

The baseline for configs/fashion_mnist_tl.py, which is this file plus TokenLearner V1.1 (8 tokens
before layer 1); everything else (data order, seed, recipe) is identical.

Command:
  python -m vit_flax.main --config=configs/fashion_mnist_vit.py [--workdir=runs/fashion_mnist_vit]

Data: a prepared TFDS fashion_mnist copy, else the IDX files of Debian's `dataset-fashion-mnist`
package (/usr/share/datasets/fashion-mnist: the full 60,000 / 10,000 images), else a TFDS download.
Expected test accuracy: not yet measured. Training time: not yet measured (2-core AMD EPYC CPU).
"""

import ml_collections

placeholder = ml_collections.config_dict.placeholder


def get_config() -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST ViT config."""
  config = ml_collections.ConfigDict()
  config.experiment_name = 'fashion_mnist_vit'
  config.dataset_name = 'fashion_mnist'
  config.dataset_configs = ml_collections.ConfigDict()
  config.dataset_configs.data_dir = placeholder(str)  # None: TFDS's default data dir.
  config.dataset_configs.idx_dir = placeholder(str)  # None: Debian's IDX directory.
  config.dataset_configs.allow_download = True
  config.dataset_configs.download_timeout_s = 3.0
  config.dataset_configs.validation_size = 5000  # Carved from the end of train.
  config.dataset_configs.crop_padding = 2
  config.dataset_configs.random_flip = True  # Clothes are (mostly) mirror-symmetric.

  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_training_epochs = placeholder(int)  # Used when num_training_steps is None.
  config.num_training_steps = 2000  # ~4.7 epochs of 55,000 images: a CPU-sized budget.
  config.log_summary_steps = 100
  config.log_eval_steps = 250
  config.checkpoint_steps = 1000
  config.max_checkpoint_keep = 3
  config.rng_seed = 42

  config.optimizer = 'adamw'
  config.optimizer_configs = ml_collections.ConfigDict()
  config.optimizer_configs.beta1 = 0.9
  config.optimizer_configs.beta2 = 0.999
  config.optimizer_configs.weight_decay = 0.05
  config.optimizer_configs.skip_scale_and_bias_regularization = True
  config.max_grad_norm = 1.0
  config.label_smoothing = placeholder(float)
  config.init_head_bias = placeholder(float)
  config.lr_configs = ml_collections.ConfigDict()
  config.lr_configs.learning_rate_schedule = 'compound'
  config.lr_configs.factors = 'constant*linear_warmup*cosine_decay'
  config.lr_configs.warmup_steps = 200
  config.lr_configs.base_learning_rate = 1e-3

  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.classifier = 'gap'
  config.model.representation_size = placeholder(int)
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.0
  config.model.stochastic_depth = 0.0
  config.model.positional_embedding = 'learned_1d'
  config.model.tokenizer = ml_collections.ConfigDict()
  config.model.tokenizer.type = 'patch'
  config.model.tokenizer.patches = ml_collections.ConfigDict({'size': [2, 2]})
  config.model_dtype_str = 'float32'
  config.loss = 'softmax'
  return config
