"""scenic's ImageNet TokenLearner config (im1k_token_learner_config.py): B/16, 16 tokens at layer 9.

ViT-B/16 (width 768, 12 layers, 12 heads, MLP 3072) with TokenLearner V1.1 learning 16 tokens
before block 9, GAP head, trained from scratch for 90 epochs at batch 4096 with Adam (decoupled
weight decay 0.3 on every parameter), clipping at 1.0, warmup to 5e-3 over 10k steps then linear
decay to 1e-5 over 28,080 steps, output bias -10 and scenic's sigmoid (multilabel) loss.

Two deliberate differences from scenic's file: `stochastic_depth` is 0.0 here because scenic's
TokenLearner model never reads its 0.1 (vit_flax's model would apply it), and the dataset is
TFDS `imagenet2012` (scenic calls its loader 'imagenet'). `--config.batch_size=8` mimics scenic's
`runlocal`.

Command (needs a prepared TFDS imagenet2012 in data_dir; TFDS cannot download it):
  python -m vit_flax.main --config=configs/imagenet_tl_b16.py --workdir=runs/imagenet_tl_b16 \\
    --config.dataset_configs.data_dir=/path/to/tensorflow_datasets

Expected test accuracy (ImageNet validation): not yet measured; scenic publishes none for this
config (its plain ViT-B/16 reaches 73.7% top-1 from scratch in 90 epochs). Compute: scenic's count
is 13.53 GFLOPs per image (multiply-add = 1), ~27 by XLA's count. Training time: not yet measured
(a multi-accelerator job; not feasible on a CPU).
"""

import ml_collections

placeholder = ml_collections.config_dict.placeholder
_IMAGENET_TRAIN_SIZE = 1_281_167
_BATCH_SIZE = 4096
_EPOCHS = 90


def get_config() -> ml_collections.ConfigDict:
  """Returns scenic's ImageNet B/16 TokenLearner config."""
  config = ml_collections.ConfigDict()
  config.experiment_name = 'imagenet-vit'
  config.dataset_name = 'imagenet2012'
  config.dataset_configs = ml_collections.ConfigDict()
  config.dataset_configs.data_dir = placeholder(str)  # Where TFDS imagenet2012 is prepared.
  config.dataset_configs.allow_download = False  # TFDS needs the manually downloaded tars.
  # 0: train on all of train, as scenic. The 50k validation split is then evaluated (as 'test') at
  # the end only; scenic also evaluates it every log_eval_steps.
  config.dataset_configs.validation_size = 0
  config.dataset_configs.image_size = 224

  config.batch_size = _BATCH_SIZE
  config.eval_batch_size = _BATCH_SIZE
  config.num_training_epochs = _EPOCHS
  config.num_training_steps = placeholder(int)
  config.log_eval_steps = 1000
  config.log_summary_steps = placeholder(int)  # None: log_eval_steps, as scenic.
  config.checkpoint_steps = 5000
  config.max_checkpoint_keep = 3
  config.rng_seed = 42

  config.optimizer = 'adam'
  config.optimizer_configs = ml_collections.ConfigDict()
  config.optimizer_configs.beta1 = 0.9
  config.optimizer_configs.beta2 = 0.999
  config.optimizer_configs.weight_decay = 0.3
  config.max_grad_norm = 1.0
  config.label_smoothing = placeholder(float)
  config.init_head_bias = -10.0
  config.lr_configs = ml_collections.ConfigDict()
  config.lr_configs.learning_rate_schedule = 'compound'
  config.lr_configs.factors = 'constant*linear_warmup*linear_decay'
  config.lr_configs.total_steps = _EPOCHS * (_IMAGENET_TRAIN_SIZE // _BATCH_SIZE)  # 28,080.
  config.lr_configs.end_learning_rate = 1e-5
  config.lr_configs.warmup_steps = 10_000
  config.lr_configs.base_learning_rate = 5e-3

  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 768
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.mlp_dim = 3072
  config.model.classifier = 'gap'
  config.model.representation_size = placeholder(int)
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  config.model.stochastic_depth = 0.0  # scenic sets 0.1 but its TokenLearner model ignores it.
  config.model.positional_embedding = 'learned_1d'
  config.model.tokenizer = ml_collections.ConfigDict()
  config.model.tokenizer.type = 'dynamic'
  config.model.tokenizer.patches = ml_collections.ConfigDict({'size': (16, 16)})
  config.model.tokenizer.num_tokens = 16
  config.model.tokenizer.tokenlearner_loc = 9
  config.model.tokenizer.use_v11 = True
  config.model.tokenizer.use_tokenfuse = False
  config.model_dtype_str = 'float32'
  config.loss = 'sigmoid'  # scenic's multilabel sigmoid cross-entropy.
  return config
