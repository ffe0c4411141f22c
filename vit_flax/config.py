"""The training config: its defaults, the one validation pass, model construction and loading.

A config is an `ml_collections.ConfigDict` in scenic's schema (see `DEFAULTS`). `resolve(config)`
fills every default, checks every key and value in one pass (the dataset's image shape and class
count come from `input_pipeline.DATASETS`, so nothing is loaded), and returns a locked copy that the
trainer and the tools read as plain `config.x`. `build_model(config.model, num_classes)` builds
the model of `config.model.name` (a key of `models.MODELS`; 'vit' maps scenic's schema onto
`vit.ViT`'s fields, the other families take their fields as they are).
"""

import copy
import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_flax import input_pipeline
from vit_flax import models
from vit_flax import vit

REQUIRED = '<required>'  # Marks a key without a default.

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
    'model': REQUIRED,  # scenic's model schema: MODEL_DEFAULTS and TOKENIZER_DEFAULTS.
    'model_dtype_str': 'float32',  # Compute dtype: float32 | bfloat16 | float16.
    'loss': 'softmax',  # softmax (cross-entropy) | sigmoid (scenic's multilabel loss).
    # Examples per gradient micro-batch (summed inside the step; the update is unchanged).
    # None: loops.CPU_MICROBATCH_SIZE on CPU, where small micro-batches keep activations in cache;
    # the whole batch on GPU/TPU. Eval batches use the largest size up to it that divides them.
    'microbatch_size': None,
    # DeiT's hard-label distillation: keys DISTILLATION_DEFAULTS; None: off. Needs a model with a
    # distillation head (model.name 'deit').
    'distillation': None,
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
MODEL_DEFAULTS = {
    'name': 'vit',  # A key of models.MODELS; the others have a flat schema (models.field_defaults).
    'variant': None,  # e.g. 'B/16': fills the four sizes and the patch size; explicit keys win.
    'hidden_size': None, 'num_layers': None, 'num_heads': None, 'mlp_dim': None,
    'classifier': 'gap', 'representation_size': None, 'dropout_rate': 0.1,
    'attention_dropout_rate': 0.1, 'stochastic_depth': 0.0, 'positional_embedding': 'learned_1d',
    'tokenizer': None,
    'approximate_gelu': True,  # tanh GELU (scenic, vit_jax, big_vision); False: exact (timm).
    'pooled_norm': False,  # The final LayerNorm on the pooled vector (timm's fc_norm).
}
TOKENIZER_DEFAULTS = {'type': 'patch', 'patches': None}
# tokenizer keys read when type == 'dynamic' (allowed, and unread, for 'patch', so one config can
# switch its learner off with --config.model.tokenizer.type=patch).
LEARNER_DEFAULTS = {
    'num_tokens': 8, 'tokenlearner_loc': None, 'use_v11': True, 'use_tokenfuse': False}
LEARNER_KEYS = tuple(LEARNER_DEFAULTS)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
_POSITIVE_INTS = ('batch_size', 'eval_batch_size', 'num_training_steps', 'log_eval_steps',
                  'log_summary_steps', 'checkpoint_steps', 'max_checkpoint_keep',
                  'microbatch_size')


class ConfigError(ValueError):
  """A config that cannot run; the message is one line listing every problem."""


def _as_dict(cfg: Any) -> dict[str, Any]:
  """A ConfigDict / FrozenConfigDict / Mapping (or None) as a plain nested dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
  raise ConfigError(f'Expected a ConfigDict or mapping, got {type(cfg).__name__}.')


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any], prefix: str,
           errors: list[str]) -> dict[str, Any]:
  """`given` over `defaults` (one level); unknown and missing required keys go to `errors`."""
  for key in sorted(set(given) - set(defaults)):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    errors.append(f'unknown key {prefix}{key}' + (f' (did you mean {prefix}{close[0]}?)'
                                                  if close else ' (nothing reads it)'))
  merged = {k: given.get(k, v) for k, v in defaults.items()}
  errors += [f'missing key {prefix}{k}' for k, v in merged.items() if v is REQUIRED]
  return merged


def resolve_model(model_config: Any, errors: list[str] | None = None) -> dict[str, Any]:
  """scenic's `config.model` with every default filled and `variant` expanded.

  Sizes absent from the config come from `variant`; patches.size becomes a 2-tuple. With `errors`
  given, problems are appended to it; otherwise the first batch raises ConfigError.
  """
  own = errors is None
  errors = [] if own else errors
  given = _as_dict(model_config)
  if given.get('name', 'vit') != 'vit':
    model = _resolve_family(given, errors)
    if own and errors:
      raise ConfigError('Invalid model config: ' + '; '.join(errors) + '.')
    return model
  model = _merge(MODEL_DEFAULTS, given, 'model.', errors)
  tokenizer = _as_dict(model['tokenizer'])
  tok_type = tokenizer.get('type', 'patch')
  tokenizer = _merge(dict(TOKENIZER_DEFAULTS, **LEARNER_DEFAULTS), tokenizer, 'model.tokenizer.',
                     errors)
  if tok_type == 'dynamic' and tokenizer['tokenlearner_loc'] is None:
    errors.append("model.tokenizer.tokenlearner_loc is needed by tokenizer.type 'dynamic'")
  if tok_type not in vit.TOKENIZER_TYPES:
    errors.append(f'model.tokenizer.type must be one of {vit.TOKENIZER_TYPES}, got {tok_type!r}')
  patches = _merge({'size': None}, _as_dict(tokenizer['patches']), 'model.tokenizer.patches.',
                   errors)
  sizes = {}
  if model['variant']:
    try:
      sizes = vit.decode_variant(model['variant'])
    except ValueError as e:
      errors.append(str(e).rstrip('.'))
  for key in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
    if model[key] is None:
      model[key] = sizes.get(key)
  size = patches['size'] if patches['size'] is not None else sizes.get('patch_size')
  if isinstance(size, int):
    size = (size, size)
  patches['size'] = tuple(size) if size is not None else None
  missing = [k for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim') if model[k] is None]
  missing += ['tokenizer.patches.size'] if patches['size'] is None else []
  if missing:
    errors.append(f'model lacks {", ".join(missing)} (give them, or a variant like "B/16")')
  tokenizer['patches'] = patches
  model['tokenizer'] = tokenizer
  if own and errors:
    raise ConfigError('Invalid model config: ' + '; '.join(errors) + '.')
  return model


def _resolve_family(given: dict[str, Any], errors: list[str]) -> dict[str, Any]:
  """A flat `config.model` of a family other than 'vit': its class's fields, defaults filled."""
  name = given['name']
  if name not in models.MODELS:
    errors.append(f'model.name must be one of {sorted(models.MODELS)}, got {name!r}')
    return given
  model = _merge({'name': name, **models.field_defaults(name)}, given, 'model.', errors)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}


def model_kwargs(model_config: Any) -> dict[str, Any]:
  """The model class's fields (all but num_classes and dtype) for `config.model`: scenic's
  schema mapped onto `vit.ViT`, or a family's flat fields as they are."""
  m = resolve_model(model_config)
  if m['name'] != 'vit':
    return {k: v for k, v in m.items() if k != 'name'}
  tok = m['tokenizer']
  kw = {k: m[k] for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'classifier',
                          'representation_size', 'positional_embedding', 'approximate_gelu',
                          'pooled_norm')}
  kw.update(patch_size=tuple(int(s) for s in tok['patches']['size']),
            dropout_rate=float(m['dropout_rate']),
            attention_dropout_rate=float(m['attention_dropout_rate']),
            stochastic_depth=float(m['stochastic_depth']))
  if tok['type'] == 'dynamic':
    kw.update(tokenlearner_loc=int(tok['tokenlearner_loc']), num_tokens=int(tok['num_tokens']),
              use_v11=bool(tok['use_v11']), use_tokenfuse=bool(tok['use_tokenfuse']))
  return kw


def build_model(model_config: Any, num_classes: int, *, dtype: Any = jnp.float32) -> nn.Module:
  """The model `config.model` describes: `models.MODELS[model.name]` (default 'vit', scenic's
  schema with the defaults of MODEL_DEFAULTS; the other families take their fields flat).

  `dtype` (e.g. jnp.bfloat16 or 'bfloat16') is the compute dtype; parameters stay float32.
  Raises ConfigError for a config that cannot be built.
  """
  name = resolve_model(model_config)['name']
  try:
    model = models.MODELS[name](num_classes=num_classes, dtype=jnp.dtype(dtype),
                                **model_kwargs(model_config))
    if name == 'vit':
      vit.check_vit(model)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  return model


def check_model(model_config: Any, num_classes: int, image_shape: tuple[int, ...] | None
                ) -> None:
  """Raises ValueError (one line) for a model that cannot run on images of `image_shape`.

  A ViT is checked from its fields; another family is traced (`jax.eval_shape`, nothing is
  compiled), so its own size checks run.
  """
  model = build_model(model_config, num_classes)
  if isinstance(model, vit.ViT):
    vit.check_vit(model, image_shape)
  elif image_shape is not None:
    key = jax.random.key(0)
    jax.eval_shape(lambda: model.init(key, jnp.zeros((1, *image_shape)), train=False))


def with_tokenlearner(config: ml_collections.ConfigDict, enabled: bool, *,
                      num_tokens: int | None = None,
                      tokenlearner_loc: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` whose model has its TokenLearner (ViT: tokenizer 'dynamic') or not
  ('patch'); for the other families, `tokenlearner_loc` set or None.

  Nothing else changes: a 'patch' model keeps (and ignores) the learner's tokenizer keys.
  """
  config = copy.deepcopy(config)  # Keeps placeholders, so CLI overrides still type-check.
  with config.unlocked():
    if config.model.get('name', 'vit') != 'vit':
      if 'tokenlearner_loc' not in models.field_defaults(config.model.name):
        raise ConfigError(f'model.name {config.model.name!r} has no TokenLearner option.')
      loc = tokenlearner_loc if tokenlearner_loc is not None else config.model.get(
          'tokenlearner_loc')
      if enabled and loc is None:
        raise ConfigError('model.tokenlearner_loc is needed to add a TokenLearner.')
      config.model.tokenlearner_loc = loc if enabled else None
      if num_tokens is not None:
        config.model.num_tokens = num_tokens
      return config
    tokenizer = config.model.tokenizer
    tokenizer.type = 'dynamic' if enabled else 'patch'
    if num_tokens is not None:
      tokenizer.num_tokens = num_tokens
    if tokenlearner_loc is not None:
      tokenizer.tokenlearner_loc = tokenlearner_loc
  return config


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
  c = _merge(DEFAULTS, _as_dict(config), '', errors)
  if errors:  # The rest reads these keys.
    raise ConfigError('Invalid config: ' + '; '.join(errors) + '.')
  c['dataset_configs'] = _merge(input_pipeline.DATASET_CONFIG_DEFAULTS,
                                _as_dict(c['dataset_configs']), 'dataset_configs.', errors)
  if c['optimizer'] in OPTIMIZER_DEFAULTS:
    c['optimizer_configs'] = _merge(OPTIMIZER_DEFAULTS[c['optimizer']],
                                    _as_dict(c['optimizer_configs']), 'optimizer_configs.', errors)
  else:
    errors.append(f'optimizer must be one of {sorted(OPTIMIZER_DEFAULTS)}, got {c["optimizer"]!r}')
  c['lr_configs'] = _resolve_lr_configs(_as_dict(c['lr_configs']), errors)
  if c['distillation'] is not None:
    c['distillation'] = _merge(DISTILLATION_DEFAULTS, _as_dict(c['distillation']),
                               'distillation.', errors)
  c['model'] = resolve_model(c['model'], errors)
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
  lr = _merge(defaults, lr, 'lr_configs.', errors)
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
  crop = dc.get('random_resized_crop')
  if crop is not None and not (isinstance(crop, (int, float)) and 0.0 < crop <= 1.0):
    errors.append(f'dataset_configs.random_resized_crop must be in (0, 1] or None, got {crop!r}')
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
    check_model(c['model'], info.num_classes if info else 1, image_shape)
  except (ValueError, TypeError) as e:  # TypeError: a size given as a string, say.
    errors.append(f'model: {str(e).splitlines()[0]}'.rstrip('.'))
  if c['distillation'] is not None and c['model']['name'] != 'deit':
    errors.append(f"distillation needs a model with a distillation head (model.name 'deit'), "
                  f"got {c['model']['name']!r}")


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
