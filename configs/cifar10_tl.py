"""ViT + TokenLearner V1.1 on CIFAR-10: patch 4 (64 tokens) -> 8 learned tokens before layer 6.

configs/cifar10_vit.py is the same model and recipe without TokenLearner (same data order, seed
and steps). Model: the `cifar` benchmark preset (width 192, 12 layers, 3 heads, MLP 768, GAP).
A from-scratch recipe with crop + flip augmentation and label smoothing, sized for a GPU (on the
2-core CPU an epoch takes tens of minutes).

Command:
  python -m vit_flax.main --config=configs/cifar10_tl.py [--workdir=runs/cifar10_tl]

Data: TFDS cifar10 (prepared copy in data_dir, else a download when the network is reachable).
Expected test accuracy: not yet measured. Training time: not yet measured.
"""

import ml_collections

placeholder = ml_collections.config_dict.placeholder


def get_config() -> ml_collections.ConfigDict:
  """Returns the CIFAR-10 ViT + TokenLearner config."""
  config = ml_collections.ConfigDict()
  config.experiment_name = 'cifar10_tl'
  config.dataset_name = 'cifar10'
  config.dataset_configs = ml_collections.ConfigDict()
  config.dataset_configs.data_dir = placeholder(str)  # None: TFDS's default data dir.
  config.dataset_configs.allow_download = True
  config.dataset_configs.download_timeout_s = 3.0
  config.dataset_configs.validation_size = 5000  # Carved from the end of train.
  config.dataset_configs.crop_padding = 4
  config.dataset_configs.random_flip = True

  config.batch_size = 128
  config.eval_batch_size = 1024  # A multiple of microbatch_size.
  config.num_training_epochs = 100
  config.num_training_steps = placeholder(int)  # Set to override the epochs.
  config.log_summary_steps = 100
  config.log_eval_steps = 1000
  config.checkpoint_steps = 2000
  config.max_checkpoint_keep = 3
  config.rng_seed = 42

  config.optimizer = 'adamw'
  config.optimizer_configs = ml_collections.ConfigDict()
  config.optimizer_configs.beta1 = 0.9
  config.optimizer_configs.beta2 = 0.999
  config.optimizer_configs.weight_decay = 0.05
  config.optimizer_configs.skip_scale_and_bias_regularization = True
  config.max_grad_norm = 1.0
  config.label_smoothing = 0.1
  config.init_head_bias = placeholder(float)
  config.lr_configs = ml_collections.ConfigDict()
  config.lr_configs.learning_rate_schedule = 'compound'
  config.lr_configs.factors = 'constant*linear_warmup*cosine_decay'
  config.lr_configs.warmup_steps = 2000  # ~5 epochs of 351 steps.
  config.lr_configs.base_learning_rate = 1e-3

  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 192
  config.model.num_layers = 12
  config.model.num_heads = 3
  config.model.mlp_dim = 768
  config.model.classifier = 'gap'
  config.model.representation_size = placeholder(int)
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.0
  config.model.stochastic_depth = 0.1
  config.model.positional_embedding = 'learned_1d'
  config.model.tokenizer = ml_collections.ConfigDict()
  config.model.tokenizer.type = 'dynamic'  # TokenLearner.
  config.model.tokenizer.patches = ml_collections.ConfigDict({'size': (4, 4)})
  config.model.tokenizer.num_tokens = 8
  config.model.tokenizer.tokenlearner_loc = 6  # Learn the tokens before this block.
  config.model.tokenizer.use_v11 = True
  config.model.tokenizer.use_tokenfuse = False
  config.model_dtype_str = 'float32'
  config.loss = 'softmax'
  # Micro-batches of 32 (the CPU default is 16): width 192 makes bigger matmuls, and 32 measured
  # ~10% faster for ViT and TL on the 2-core CPU. On GPU/TPU set None for whole-batch steps.
  config.microbatch_size = 32
  return config
