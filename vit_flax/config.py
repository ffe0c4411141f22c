"""The training config: its defaults, the one validation pass, model construction and loading.

A config is an `ml_collections.ConfigDict` in scenic's schema (see `DEFAULTS`). `resolve(config)`
fills every default, checks every key and value in one pass (the dataset's image shape and class
count come from `input_pipeline.DATASETS`, so nothing is loaded), and returns a locked copy that the
trainer and the tools read as plain `config.x`. `build_model(config.model, num_classes)` builds
the model of `config.model.name` (a key of `models.MODELS`; 'vit' maps scenic's schema onto
`vit.ViT`'s fields, the other families take their fields as they are).
"""

import math
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from vit_flax import checkpoint_formats
from vit_flax import input_pipeline
from vit_flax import models
from vit_flax import moving_digits
from vit_flax import resample
from vit_flax import schema
from vit_flax.schema import REQUIRED, ConfigError


# Every top-level key the trainer reads, with its default (scenic's names and meanings).
DEFAULTS = {
    'experiment_name': '',  # Only logged.
    'dataset_name': REQUIRED,  # TFDS name: mnist | fashion_mnist | cifar10 | imagenet2012 | ...
    'dataset_configs': input_pipeline.DATASET_CONFIG_DEFAULTS,
    'batch_size': REQUIRED,  # Global train batch, split over devices.
    'eval_batch_size': None,  # None: batch_size.
    'num_training_epochs': None,  # Used when num_training_steps is None.
    'num_training_steps': None,  # Wins over num_training_epochs.
    'log_eval_steps': REQUIRED,  # Validation every this many steps (and at the end).
    'log_summary_steps': None,  # Train metrics every this many steps; None: log_eval_steps.
    'checkpoint': True,  # Save (and resume from) checkpoints in WORKDIR/checkpoints.
    'checkpoint_steps': None,  # Save every this many steps (and at the end); None: log_eval_steps.
    'max_checkpoint_keep': 3,
    'rng_seed': 0,  # Seeds init, dropout, augmentation and the data order.
    'optimizer': 'adamw',  # adam | adamw | sgd (keys of OPTIMIZER_DEFAULTS).
    'optimizer_configs': None,  # Keys: OPTIMIZER_DEFAULTS[optimizer].
    'max_grad_norm': None,  # Global-norm gradient clipping; None: off.
    'label_smoothing': None,  # Targets y * (1 - ls) + ls / K; None: off.
    'mixup_alpha': 0.0,  # Mixup's Beta(a, a) on the train batch (soft targets); 0: off.
    'cutmix_alpha': 0.0,  # CutMix's Beta(a, a); with mixup on too, each batch picks one.
    'ema_decay': None,  # Keep and evaluate an EMA of the parameters with this decay; None: off.
    # Validation accuracies whose first crossing (wall time, images seen) summary.json reports.
    'accuracy_thresholds': (0.5, 0.8, 0.9, 0.92, 0.93, 0.95, 0.98, 0.99),
    'init_head_bias': None,  # Fill value of every output_projection bias; None: zeros.
    'lr_configs': REQUIRED,  # Keys: LR_FACTOR_KEYS of its factors.
    'model': REQUIRED,  # models.MODEL_DEFAULTS (scenic's schema), or a family's flat fields.
    'model_dtype_str': 'float32',  # Compute dtype: float32 | bfloat16 | float16.
    'loss': 'softmax',  # softmax (cross-entropy) | sigmoid (scenic's multilabel loss).
    # Examples per gradient micro-batch (summed inside the step; the update is unchanged).
    # None: loops.CPU_MICROBATCH_SIZE on CPU, where small micro-batches keep activations in cache;
    # the whole batch on GPU/TPU. Eval batches use the largest size up to it that divides them.
    'microbatch_size': None,
    # DeiT's hard-label distillation: keys DISTILLATION_DEFAULTS; None: off. Needs a model with a
    # distillation head (model.name 'deit').
    'distillation': None,
    'init_from': None,  # Keys INIT_FROM_DEFAULTS; None: from scratch.
}
# Fine-tuning from a pretrained checkpoint (scenic's init_from block): used when a run starts (not
# on resume); keys INIT_FROM_DEFAULTS. None: train from scratch.
INIT_FROM_DEFAULTS = {
    'checkpoint_path': REQUIRED,  # A file or directory of checkpoint_format.
    # vit_flax (a run directory or one checkpoint step) | scenic | vit_jax | big_vision | timm
    'checkpoint_format': 'vit_flax',
    'model_config': None,  # What the file cannot tell about the source model (config.model keys).
    'restore_head': False,  # Keep a source head of the same shape (scenic: always a fresh head).
    'restore_positional_embedding': True,
    'restore_input_embedding': True,
    'positional_embed_size_change': 'resize',  # resize | tile | resize_tile (video)
    'posemb_interpolation': 'bilinear',  # bilinear (vit_jax, scenic) | bicubic (timm, antialiased)
}
DISTILLATION_DEFAULTS = {
    'teacher_workdir': REQUIRED,  # A vit_flax run directory (any trained model on the same data).
    'teacher_checkpoint': 'best',  # best | last | a step number.
}
# Optimizer -> its optimizer_configs keys with defaults. 'adam' with weight_decay is AdamW, as in
# scenic: decoupled decay scaled by the learning rate, on every parameter unless
# skip_scale_and_bias_regularization masks the 1-D ones (biases, LayerNorm scales).
_ADAM_DEFAULTS = {'beta1': 0.9, 'beta2': 0.999, 'epsilon': 1e-8, 'weight_decay': 0.0,
                  'skip_scale_and_bias_regularization': False}
OPTIMIZER_DEFAULTS = {
    'adam': _ADAM_DEFAULTS,
    'adamw': _ADAM_DEFAULTS,
    'sgd': {'momentum': 0.9, 'nesterov': False, 'weight_decay': 0.0,  # wd: L2 added to gradients.
            'skip_scale_and_bias_regularization': False},
}
# lr_configs keys each compound factor reads (scenic's train_lib/lr_schedules.py).
LR_FACTOR_KEYS = {
    'constant': ('base_learning_rate',),
    'linear_warmup': ('warmup_steps', 'warmup_alpha'),
    'cosine_decay': ('warmup_steps', 'steps_per_cycle', 'total_steps', 'alpha'),
    'linear_decay': ('warmup_steps', 'total_steps', 'end_learning_rate'),
}
# config.model keys with scenic's defaults (sizes come from `variant` or are required).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
_POSITIVE_INTS = ('batch_size', 'eval_batch_size', 'num_training_steps', 'log_eval_steps',
                  'log_summary_steps', 'checkpoint_steps', 'max_checkpoint_keep',
                  'microbatch_size')


def resolve(config: ml_collections.ConfigDict, *, num_devices: int | None = None
            ) -> ml_collections.ConfigDict:
  """Fills every default, validates everything at once and returns a locked copy.

  Checks unknown keys (with the closest known name), value ranges, batch sizes against
  `num_devices` and the micro-batch size, the optimizer and schedule keys, and the model against
  the dataset's image shape and class count when `input_pipeline.DATASETS` knows them. Idempotent.

  Raises:
    ConfigError: one line listing every problem found.
  """
  errors = []
  c = schema.merge(DEFAULTS, schema.as_dict(config), '', errors)
  if errors:  # The rest reads these keys.
    raise ConfigError('Invalid config: ' + '; '.join(errors) + '.')
  c['dataset_configs'] = schema.merge(input_pipeline.DATASET_CONFIG_DEFAULTS,
                                schema.as_dict(c['dataset_configs']), 'dataset_configs.', errors)
  if c['dataset_name'] in moving_digits.DATASETS:
    c['dataset_configs']['moving_digits'] = schema.merge(
        moving_digits.DEFAULTS, schema.as_dict(c['dataset_configs']['moving_digits']),
        'dataset_configs.moving_digits.', errors)
  if c['optimizer'] in OPTIMIZER_DEFAULTS:
    c['optimizer_configs'] = schema.merge(OPTIMIZER_DEFAULTS[c['optimizer']],
                                          schema.as_dict(c['optimizer_configs']),
                                          'optimizer_configs.', errors)
  else:
    errors.append(f'optimizer must be one of {sorted(OPTIMIZER_DEFAULTS)}, got {c["optimizer"]!r}')
  c['lr_configs'] = _resolve_lr_configs(schema.as_dict(c['lr_configs']), errors)
  if c['distillation'] is not None:
    c['distillation'] = schema.merge(DISTILLATION_DEFAULTS, schema.as_dict(c['distillation']),
                               'distillation.', errors)
  if c['init_from'] is not None:
    c['init_from'] = schema.merge(INIT_FROM_DEFAULTS, schema.as_dict(c['init_from']),
                                  'init_from.', errors)
  c['model'] = models.resolve_model(c['model'], errors)
  for key in ('eval_batch_size',):
    c[key] = c[key] or c['batch_size']
  c['log_summary_steps'] = c['log_summary_steps'] or c['log_eval_steps']
  c['checkpoint_steps'] = c['checkpoint_steps'] or c['log_eval_steps']
  _check_values(c, num_devices, errors)
  if errors:
    raise ConfigError('Invalid config: ' + '; '.join(errors) + '.')
  resolved = ml_collections.ConfigDict(c)
  resolved.lock()
  return resolved


def _resolve_lr_configs(lr: dict[str, Any], errors: list[str]) -> dict[str, Any]:
  """lr_configs with its factors' keys defaulted to None; unread keys are errors."""
  if lr.get('learning_rate_schedule', 'compound') != 'compound':
    errors.append(f"lr_configs.learning_rate_schedule must be 'compound', got "
                  f"{lr['learning_rate_schedule']!r}")
    return lr
  factors = [f.strip() for f in str(lr.get('factors', '')).split('*')]
  unknown = [f for f in factors if f not in LR_FACTOR_KEYS]
  if unknown:
    errors.append(f'lr_configs.factors has unknown factors {unknown} (known: '
                  f'{sorted(LR_FACTOR_KEYS)})')
    return lr
  defaults = {'learning_rate_schedule': 'compound', 'factors': lr.get('factors')}
  defaults.update({k: None for f in factors for k in LR_FACTOR_KEYS[f]})
  lr = schema.merge(defaults, lr, 'lr_configs.', errors)
  for factor, key in (('constant', 'base_learning_rate'), ('linear_warmup', 'warmup_steps')):
    if factor in factors and lr.get(key) is None:
      errors.append(f'lr_configs.{key} is needed by factor {factor!r}')
  return lr


def _check_values(c: dict[str, Any], num_devices: int | None, errors: list[str]) -> None:
  """Appends to `errors` every out-of-range value of the merged config `c`."""
  if not (isinstance(c['dataset_name'], str) and c['dataset_name']):
    errors.append(f'dataset_name must be a TFDS name, got {c["dataset_name"]!r}')
  for key in _POSITIVE_INTS:
    value = c[key]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      errors.append(f'{key} must be a positive int or None, got {value!r}')
  epochs = c['num_training_epochs']
  if c['num_training_steps'] is None and not (isinstance(epochs, (int, float)) and epochs > 0):
    errors.append('set num_training_steps or a positive num_training_epochs')
  micro = c['microbatch_size']
  for key in ('batch_size', 'eval_batch_size'):
    value = c[key]
    if isinstance(value, int) and num_devices and value % num_devices:
      errors.append(f'{key}={value} is not divisible by the {num_devices} devices')
  if isinstance(micro, int) and micro > 0 and isinstance(c['batch_size'], int) and \
      c['batch_size'] % micro:
    errors.append(f'microbatch_size={micro} does not divide batch_size={c["batch_size"]}')
  if isinstance(micro, int) and micro > 0 and num_devices and micro % num_devices:
    errors.append(f'microbatch_size={micro} is not divisible by the {num_devices} devices')
  _check_optimizer_values(c, errors)
  for key in ('mixup_alpha', 'cutmix_alpha'):
    if not (isinstance(c[key], (int, float)) and math.isfinite(c[key]) and c[key] >= 0):
      errors.append(f'{key} must be >= 0, got {c[key]!r}')
  ema = c['ema_decay']
  if ema is not None and not (isinstance(ema, float) and 0.0 < ema < 1.0):
    errors.append(f'ema_decay must be in (0, 1) or None, got {ema!r}')
  dc = c['dataset_configs']
  padding = dc.get('crop_padding')
  if not (isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0):
    errors.append(f'dataset_configs.crop_padding must be an int >= 0, got {padding!r}')
  if c['dataset_name'] in moving_digits.DATASETS:
    errors += moving_digits.check(dc['moving_digits'])
    image_ops = ('crop_padding', 'random_flip', 'random_resized_crop', 'trivial_augment',
                 'random_erasing', 'image_size')
    errors += [f'dataset_configs.{k} is for images; clips ({c["dataset_name"]}) take none'
               for k in image_ops if dc.get(k)]
    errors += [f'{k} is for images; clips ({c["dataset_name"]}) take none'
               for k in ('mixup_alpha', 'cutmix_alpha') if c[k]]
  elif dc.get('moving_digits') is not None:
    errors.append(f'dataset_configs.moving_digits is for {sorted(moving_digits.DATASETS)}, not '
                  f'{c["dataset_name"]!r}')
  size = dc.get('image_size')
  if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
    errors.append(f'dataset_configs.image_size must be a positive int or None, got {size!r}')
  crop = dc.get('random_resized_crop')
  if crop is not None and not (isinstance(crop, (int, float)) and 0.0 < crop <= 1.0):
    errors.append(f'dataset_configs.random_resized_crop must be in (0, 1] or None, got {crop!r}')
  erasing = dc.get('random_erasing')
  if not (isinstance(erasing, (int, float)) and not isinstance(erasing, bool)
          and 0.0 <= erasing <= 1.0):
    errors.append(f'dataset_configs.random_erasing must be a probability in [0, 1], got '
                  f'{erasing!r}')
  for key in ('max_grad_norm', 'label_smoothing'):
    value = c[key]
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                  and value > 0):
      errors.append(f'{key} must be positive or None, got {value!r}')
  if c['model_dtype_str'] not in DTYPES:
    errors.append(f'model_dtype_str must be one of {sorted(DTYPES)}, got '
                  f'{c["model_dtype_str"]!r}')
  if c['loss'] not in ('softmax', 'sigmoid'):
    errors.append(f"loss must be 'softmax' or 'sigmoid', got {c['loss']!r}")
  _check_init_from(c['init_from'], errors)
  teacher = (c['distillation'] or {}).get('teacher_workdir')
  if c['distillation'] is not None and not (
      isinstance(teacher, str) and os.path.isfile(os.path.join(teacher, 'config.json'))):
    errors.append(f'distillation.teacher_workdir={teacher!r} is not a vit_flax run directory '
                  '(it has no config.json)')
  if errors:  # The model check below needs well-formed sizes.
    return
  info = input_pipeline.DATASETS.get(c['dataset_name'].split(':')[0])
  image_shape = input_pipeline.image_shape(c['dataset_name'], c['dataset_configs'])
  try:
    models.check_model(c['model'], info.num_classes if info else 1, image_shape)
  except (ValueError, TypeError) as e:  # TypeError: a size given as a string, say.
    errors.append(f'model: {str(e).splitlines()[0]}'.rstrip('.'))
  if c['distillation'] is not None and c['model']['name'] != 'deit':
    errors.append(f"distillation needs a model with a distillation head (model.name 'deit'), "
                  f"got {c['model']['name']!r}")


def _check_init_from(init_from: dict[str, Any] | None, errors: list[str]) -> None:
  """Appends to `errors` what is wrong with an `init_from` block (before anything is loaded)."""
  if init_from is None:
    return
  path, fmt = init_from['checkpoint_path'], init_from['checkpoint_format']
  if not (isinstance(path, str) and os.path.exists(path)):
    errors.append(f'init_from.checkpoint_path={path!r} does not exist')
  choices = {'checkpoint_format': checkpoint_formats.FORMATS,
             'positional_embed_size_change': resample.SIZE_CHANGES,
             'posemb_interpolation': resample.INTERPOLATIONS}
  for key, allowed in choices.items():
    if init_from[key] not in allowed:
      errors.append(f'init_from.{key} must be one of {allowed}, got {init_from[key]!r}')
  for key in ('restore_head', 'restore_positional_embedding', 'restore_input_embedding'):
    if not isinstance(init_from[key], bool):
      errors.append(f'init_from.{key} must be True or False, got {init_from[key]!r}')
  if fmt == 'vit_flax' and isinstance(path, str) and os.path.isdir(path) and not (
      os.path.isfile(os.path.join(path, 'config.json')) or
      os.path.isdir(os.path.join(path, 'params'))):
    errors.append(f'init_from.checkpoint_path={path} is not a vit_flax run directory (no '
                  'config.json) or checkpoint step (no params/)')


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer_values(c: dict[str, Any], errors: list[str]) -> None:
  """Appends to `errors` every out-of-range optimizer or schedule value of the merged config."""
  oc, lr = c['optimizer_configs'] or {}, c['lr_configs'] or {}
  for key in ('beta1', 'beta2', 'momentum'):
    if key in oc and not (_is_number(oc[key]) and 0.0 <= oc[key] < 1.0):
      errors.append(f'optimizer_configs.{key} must be in [0, 1), got {oc[key]!r}')
  if 'epsilon' in oc and not (_is_number(oc['epsilon']) and oc['epsilon'] > 0):
    errors.append(f'optimizer_configs.epsilon must be > 0, got {oc["epsilon"]!r}')
  if 'weight_decay' in oc and not (_is_number(oc['weight_decay']) and oc['weight_decay'] >= 0):
    errors.append(f'optimizer_configs.weight_decay must be >= 0, got {oc["weight_decay"]!r}')
  base = lr.get('base_learning_rate')
  if base is not None and not (_is_number(base) and base > 0):
    errors.append(f'lr_configs.base_learning_rate must be a finite number > 0, got {base!r}')
  for key in ('warmup_steps', 'steps_per_cycle', 'total_steps'):
    value = lr.get(key)
    if value is not None and not (_is_number(value) and value >= 0):
      errors.append(f'lr_configs.{key} must be >= 0, got {value!r}')
  for key in ('warmup_alpha', 'alpha', 'end_learning_rate'):
    value = lr.get(key)
    if value is not None and not (_is_number(value) and value >= 0):
      errors.append(f'lr_configs.{key} must be a finite number >= 0, got {value!r}')


def num_train_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """num_training_steps, else num_training_epochs * (num_train // batch_size) (scenic)."""
  if config.num_training_steps is not None:
    return int(config.num_training_steps)
  return int(config.num_training_epochs * (num_train // config.batch_size))
