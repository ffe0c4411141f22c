"""Trains ViT / TokenLearner classifiers: scenic's classification trainer on jit + NamedSharding.

`train_and_evaluate(config, workdir)` is the whole run; `train_step` and `eval_step` are pure
module-level functions. Parameters are replicated and batches split over a 1-D `Mesh(('data',))` of
all devices. In-memory datasets (MNIST, CIFAR) are put on the device(s) once as uint8; each epoch's
order is a permutation derived from (rng, epoch) inside jit, and `train_chunk` runs many steps per
dispatch in a `lax.while_loop`, so the host neither copies batches nor waits between steps. Streamed
datasets (ImageNet) feed host batches with `jax.device_put` one step per dispatch.
"""

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from flax import traverse_util
from flax.training import train_state
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_flax import checkpoint
from vit_flax import input_pipeline
from vit_flax import vit

TrainState = train_state.TrainState
_REQUIRED = object()  # Marks a config key without a default.

# Every top-level config key the trainer reads, with its default (scenic's names and meanings).
CONFIG_KEYS = {
    'experiment_name': '',  # Only logged.
    'dataset_name': _REQUIRED,  # TFDS name: mnist | fashion_mnist | cifar10 | imagenet2012 | ...
    'dataset_configs': {},  # Keys: input_pipeline.DATASET_CONFIG_DEFAULTS.
    'batch_size': _REQUIRED,  # Global train batch, split over devices.
    'eval_batch_size': None,  # None: batch_size.
    'num_training_epochs': None,  # Used when num_training_steps is None.
    'num_training_steps': None,  # Wins over num_training_epochs.
    'log_eval_steps': _REQUIRED,  # Validation every this many steps (and at the end).
    'log_summary_steps': None,  # Train metrics every this many steps; None: log_eval_steps.
    'checkpoint': True,  # Save (and resume from) checkpoints in WORKDIR/checkpoints.
    'checkpoint_steps': None,  # Save every this many steps (and at the end); None: log_eval_steps.
    'max_checkpoint_keep': 3,
    'rng_seed': 0,  # Seeds init, dropout, augmentation and the data order.
    'optimizer': 'adamw',  # adam | adamw | sgd (keys of OPTIMIZER_KEYS).
    'optimizer_configs': {},  # Keys: OPTIMIZER_KEYS[optimizer].
    'max_grad_norm': None,  # Global-norm gradient clipping; None: off.
    'label_smoothing': None,  # Targets y * (1 - ls) + ls / K; None: off.
    'init_head_bias': None,  # Fill value of every output_projection bias; None: zeros.
    'lr_configs': _REQUIRED,  # Keys: LR_FACTOR_KEYS.
    'model': _REQUIRED,  # scenic's model schema, checked by vit.validate_model_config.
    'model_dtype_str': 'float32',  # Compute dtype: float32 | bfloat16 | float16.
    'loss': 'softmax',  # softmax (cross-entropy) | sigmoid (scenic's multilabel loss).
    # Examples per gradient micro-batch (summed inside the step; the update is unchanged).
    # None: CPU_MICROBATCH_SIZE on CPU, where small micro-batches keep activations in cache
    # (2-3x faster on the mnist preset); the whole batch on GPU/TPU.
    'microbatch_size': None,
}
CPU_MICROBATCH_SIZE = 16
# Optimizer -> its optimizer_configs keys with defaults. 'adam' with weight_decay is AdamW, as in
# scenic: decoupled decay scaled by the learning rate, on every parameter unless
# skip_scale_and_bias_regularization masks the 1-D ones (biases, LayerNorm scales).
_ADAM_KEYS = {'beta1': 0.9, 'beta2': 0.999, 'epsilon': 1e-8, 'weight_decay': 0.0,
              'skip_scale_and_bias_regularization': False}
OPTIMIZER_KEYS = {
    'adam': _ADAM_KEYS,
    'adamw': _ADAM_KEYS,
    'sgd': {'momentum': 0.9, 'nesterov': False, 'weight_decay': 0.0,  # wd: L2 added to gradients.
            'skip_scale_and_bias_regularization': False},
}
# lr_configs keys each compound factor reads (scenic's train_lib/lr_schedules.py).
LR_FACTOR_KEYS = {
    'constant': {'base_learning_rate'},
    'linear_warmup': {'warmup_steps', 'warmup_alpha'},
    'cosine_decay': {'warmup_steps', 'steps_per_cycle', 'total_steps', 'alpha'},
    'linear_decay': {'warmup_steps', 'total_steps', 'end_learning_rate'},
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# (H, W, C) and classes of datasets known before loading, so configs are checked before any I/O.
KNOWN_DATASETS = {
    'mnist': ((28, 28, 1), 10), 'fashion_mnist': ((28, 28, 1), 10), 'cifar10': ((32, 32, 3), 10),
    'cifar100': ((32, 32, 3), 100),
    'imagenet2012': (None, 1000),  # None: (image_size, image_size, 3) from dataset_configs.
}


class TrainingDivergedError(RuntimeError):
  """The training loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------
# Config checking and durations.


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  """config[key], or the CONFIG_KEYS default when the config does not set it."""
  value = config.get(key, CONFIG_KEYS[key])
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def dataset_configs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.dataset_configs over input_pipeline.DATASET_CONFIG_DEFAULTS."""
  return {**input_pipeline.DATASET_CONFIG_DEFAULTS, **_get(config, 'dataset_configs')}


def known_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
  """(H, W, C) of the config's dataset when it is known without loading it, else None."""
  shape, _ = KNOWN_DATASETS.get(config.dataset_name, (None, None))
  if shape is None and config.dataset_name in KNOWN_DATASETS:
    size = dataset_configs(config)['image_size']
    shape = (size, size, 3)
  return shape


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    image_shape: tuple[int, ...] | None = None,
                    num_classes: int | None = None) -> None:
  """Raises a one-line ValueError listing everything wrong with `config`.

  Checks that every key is one something reads (CONFIG_KEYS, OPTIMIZER_KEYS, LR_FACTOR_KEYS,
  input_pipeline.DATASET_CONFIG_DEFAULTS, the model schema), value ranges, batch sizes divisible by
  `num_devices`, and the model against the image shape (known datasets need no loading).
  """
  errors = []
  given = config.to_dict()
  errors += [f'unknown key {k!r} (nothing reads it)' for k in sorted(set(given) - set(CONFIG_KEYS))]
  errors += [f'missing key {k!r}' for k, v in CONFIG_KEYS.items()
             if v is _REQUIRED and given.get(k) is None]
  if errors:
    raise ValueError('Invalid config: ' + '; '.join(errors) + '.')

  unknown = set(_get(config, 'dataset_configs')) - set(input_pipeline.DATASET_CONFIG_DEFAULTS)
  known = ', '.join(sorted(input_pipeline.DATASET_CONFIG_DEFAULTS))
  errors += [f'unknown key dataset_configs.{k} (known: {known})' for k in sorted(unknown)]
  for key in ('batch_size', 'eval_batch_size', 'num_training_steps', 'log_eval_steps',
              'log_summary_steps', 'checkpoint_steps', 'max_checkpoint_keep'):
    value = _get(config, key)
    if value is not None and (not isinstance(value, int) or value < 1):
      errors.append(f'{key} must be a positive int or None, got {value!r}')
  epochs = _get(config, 'num_training_epochs')
  if _get(config, 'num_training_steps') is None and (epochs is None or epochs <= 0):
    errors.append('set num_training_steps or a positive num_training_epochs')
  if num_devices:
    for key in ('batch_size', 'eval_batch_size'):
      value = _get(config, key)
      if isinstance(value, int) and value % num_devices:
        errors.append(f'{key}={value} is not divisible by the {num_devices} devices')
  micro = _get(config, 'microbatch_size')
  if micro is not None:
    if not isinstance(micro, int) or micro < 1:
      errors.append(f'microbatch_size must be a positive int or None, got {micro!r}')
    else:
      for key in ('batch_size', 'eval_batch_size'):
        value = _get(config, key) or _get(config, 'batch_size')
        if isinstance(value, int) and value % micro:
          errors.append(f'microbatch_size={micro} does not divide {key}={value}')
      if num_devices and micro % num_devices:
        errors.append(f'microbatch_size={micro} is not divisible by the {num_devices} devices')

  optimizer = _get(config, 'optimizer')
  if optimizer not in OPTIMIZER_KEYS:
    errors.append(f'optimizer must be one of {sorted(OPTIMIZER_KEYS)}, got {optimizer!r}')
  else:
    unread = set(_get(config, 'optimizer_configs')) - set(OPTIMIZER_KEYS[optimizer])
    errors += [f'optimizer_configs.{k} is not read by optimizer {optimizer!r} (it reads '
               f'{", ".join(sorted(OPTIMIZER_KEYS[optimizer]))})' for k in sorted(unread)]
  errors += _lr_config_errors(_get(config, 'lr_configs'))
  for key in ('max_grad_norm', 'label_smoothing'):
    value = _get(config, key)
    if value is not None and not value > 0:
      errors.append(f'{key} must be positive or None, got {value!r}')
  if _get(config, 'model_dtype_str') not in DTYPES:
    errors.append(f'model_dtype_str must be one of {sorted(DTYPES)}, got '
                  f'{_get(config, "model_dtype_str")!r}')
  if _get(config, 'loss') not in ('softmax', 'sigmoid'):
    errors.append(f"loss must be 'softmax' or 'sigmoid', got {_get(config, 'loss')!r}")

  image_shape = image_shape or known_image_shape(config)
  num_classes = num_classes or KNOWN_DATASETS.get(config.dataset_name, (None, 1))[1]
  try:
    vit.validate_model_config(config.model, image_shape, num_classes)
  except ValueError as e:
    errors.append(f'model: {e}'.rstrip('.'))
  if errors:
    raise ValueError('Invalid config: ' + '; '.join(errors) + '.')


def _lr_config_errors(lr_configs: dict[str, Any]) -> list[str]:
  """Problems with lr_configs: unknown factors and keys that no requested factor reads."""
  if lr_configs.get('learning_rate_schedule', 'compound') != 'compound':
    return [f"lr_configs.learning_rate_schedule must be 'compound', got "
            f"{lr_configs['learning_rate_schedule']!r}"]
  factors = [f.strip() for f in str(lr_configs.get('factors', '')).split('*')]
  unknown = [f for f in factors if f not in LR_FACTOR_KEYS]
  if unknown:
    return [f'lr_configs.factors has unknown factors {unknown} (known: {sorted(LR_FACTOR_KEYS)})']
  read = {'learning_rate_schedule', 'factors'}.union(*(LR_FACTOR_KEYS[f] for f in factors))
  errors = [f'lr_configs.{k} is not read by factors {lr_configs["factors"]!r}'
            for k in sorted(set(lr_configs) - read)]
  for factor, key in (('constant', 'base_learning_rate'), ('linear_warmup', 'warmup_steps')):
    if factor in factors and lr_configs.get(key) is None:
      errors.append(f'lr_configs.{key} is needed by factor {factor!r}')
  return errors


def num_microbatches(config: ml_collections.ConfigDict, batch_size: int, num_devices: int,
                     backend: str | None = None) -> int:
  """How many micro-batches a batch of `batch_size` is split into (1: no splitting).

  An explicit `microbatch_size` must divide the batch and be divisible by the device count
  (validate_config checks). The CPU default is the largest size <= CPU_MICROBATCH_SIZE that does
  both (e.g. 10 for an eval batch of 1000 on 2 devices), else the whole batch.
  """
  size = _get(config, 'microbatch_size')
  if size is None:
    if (backend or jax.default_backend()) != 'cpu':
      return 1
    fits = [s for s in range(num_devices, CPU_MICROBATCH_SIZE + 1, num_devices)
            if batch_size % s == 0]
    size = fits[-1] if fits else batch_size
  return batch_size // size


def total_train_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
  """num_training_steps, else num_training_epochs * (num_train // batch_size) (scenic)."""
  if _get(config, 'num_training_steps') is not None:
    return int(config.num_training_steps)
  return int(config.num_training_epochs * (num_train // config.batch_size))


# ------------------------------------------------------------------------------------------------
# Optimizer, schedule, losses, state.


def make_lr_schedule(lr_configs: dict[str, Any], total_steps: int) -> Callable[[Any], jax.Array]:
  """scenic's compound schedule, a product of `factors` like 'constant*linear_warmup*cosine_decay'.

  `step` is the number of updates done so far. Factors, applied in order to ratio = 1:
    constant: * base_learning_rate.
    linear_warmup: * min(1, alpha + step * (1 - alpha) / warmup_steps) (warmup_alpha, default 0).
    cosine_decay: * (1 - alpha) * max(0, (1 + cos(pi * (p % 1))) / 2) + alpha, where
      p = max(0, step - warmup) / (steps_per_cycle - int(warmup / (total / steps_per_cycle))).
    linear_decay: ratio = (ratio - end) * max(0, 1 - max(0, step - warmup) / (total - warmup))
      + end, with end = end_learning_rate (absolute).
  lr_configs.total_steps None means the run's `total_steps`; steps_per_cycle None means total.
  A cosine cycle is at least 1 step, so runs shorter than their warmup stay finite.
  """
  cfg = dict(lr_configs)
  factors = [f.strip() for f in cfg['factors'].split('*')]
  total = cfg.get('total_steps') or total_steps
  warmup = cfg.get('warmup_steps') or 0
  if 'linear_decay' in factors and total <= warmup:  # scenic asserts this too.
    raise ValueError(f'linear_decay needs total_steps ({total}) > lr_configs.warmup_steps '
                     f'({warmup}).')

  def lr_fn(step):
    step = jnp.asarray(step, jnp.float32)
    ratio = jnp.ones((), jnp.float32)
    for name in factors:
      if name == 'constant':
        ratio *= cfg['base_learning_rate']
      elif name == 'linear_warmup' and warmup > 0:
        alpha = cfg.get('warmup_alpha') or 0.0
        ratio *= jnp.minimum(1.0, alpha + step * (1.0 - alpha) / warmup)
      elif name == 'cosine_decay':
        cycle = cfg.get('steps_per_cycle') or total
        cycle -= int(warmup / (total / cycle))  # scenic: every cycle loses its share of warmup.
        cycle = max(cycle, 1)  # A run shorter than its warmup (scenic would divide by <= 0).
        alpha = cfg.get('alpha') or 0.0
        progress = jnp.maximum(0.0, step - warmup) / cycle
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
        ratio *= (1.0 - alpha) * cosine + alpha
      elif name == 'linear_decay':
        end = cfg.get('end_learning_rate') or 0.0
        progress = jnp.maximum(0.0, (step - warmup) / (total - warmup))
        ratio = (ratio - end) * jnp.maximum(1.0 - progress, 0.0) + end
    return ratio

  return lr_fn


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm(max_grad_norm) -> adam(w) | sgd(momentum), with the compound schedule."""
  lr = make_lr_schedule(_get(config, 'lr_configs'), total_steps)
  name = _get(config, 'optimizer')
  oc = {**OPTIMIZER_KEYS[name], **_get(config, 'optimizer_configs')}
  mask = None  # scenic decays every parameter ...
  if oc['skip_scale_and_bias_regularization']:  # ... unless asked to skip the 1-D ones.
    mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if name in ('adam', 'adamw'):
    tx = optax.adamw(lr, b1=oc['beta1'], b2=oc['beta2'], eps=oc['epsilon'],
                     weight_decay=oc['weight_decay'], mask=mask)
  else:
    tx = optax.chain(optax.add_decayed_weights(oc['weight_decay'], mask=mask),
                     optax.sgd(lr, momentum=oc['momentum'] or None, nesterov=oc['nesterov']))
  if _get(config, 'max_grad_norm') is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)
  return tx


def _targets(labels: jax.Array, num_classes: int, label_smoothing: float | None) -> jax.Array:
  """One-hot [B, K] targets, smoothed to y * (1 - ls) + ls / K."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  return onehot


def example_losses(logits: jax.Array, labels: jax.Array, *, loss: str = 'softmax',
                   label_smoothing: float | None = None) -> jax.Array:
  """Per-example losses [B] from logits [B, K] and int labels [B].

  softmax: -sum_k y_k log_softmax(z)_k. sigmoid (scenic's multilabel loss): the sum over classes
  of -[y log sigmoid(z) + (1 - y) log sigmoid(-z)].
  """
  logits = logits.astype(jnp.float32)
  y = _targets(labels, logits.shape[-1], label_smoothing)
  if loss == 'softmax':
    return -jnp.sum(y * jax.nn.log_softmax(logits), axis=-1)
  return -jnp.sum(y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits), axis=-1)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: vit.ViT,
                       input_shape: tuple[int, ...], total_steps: int,
                       sharding: NamedSharding | None = None) -> TrainState:
  """Initialises parameters (init_head_bias fills output_projection's bias) and the optimizer.

  Runs under jit with `sharding` for every output (replicated over the mesh in training).
  """
  tx = make_optimizer(config, total_steps)
  head_bias = _get(config, 'init_head_bias')

  def init(rng):
    params = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)['params']
    if head_bias is not None:
      flat = traverse_util.flatten_dict(params)
      flat = {k: jnp.full_like(v, head_bias) if k[-2:] == ('output_projection', 'bias') else v
              for k, v in flat.items()}
      params = traverse_util.unflatten_dict(flat)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  return jax.jit(init, out_shardings=sharding)(rng)


# ------------------------------------------------------------------------------------------------
# Steps (pure, module level) and the jitted loops around them.


def _microbatches(a: jax.Array, num_microbatches: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...], micro-batch j holding examples j, j + M, j + 2M, ...

  The strided split keeps every device busy on every micro-batch (a device holds a contiguous block
  of the batch) and does not depend on the number of devices.
  """
  b = a.shape[0]
  return a.reshape(b // num_microbatches, num_microbatches, *a.shape[1:]).swapaxes(0, 1)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               loss: str = 'softmax', label_smoothing: float | None = None,
               num_microbatches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on batch {'inputs' [B, H, W, C] float, 'label' [B] int}.

  Dropout uses fold_in(rng, state.step) (and fold_in(that, j) for micro-batch j). With
  `num_microbatches` M > 1 the gradient of the batch-mean loss is accumulated over M micro-batches
  in a scan: the same update, with activations small enough to stay in the CPU's caches.
  Returns the new state and the batch's mean `loss`, `accuracy` and the pre-clipping gradient norm
  `l2_grads`.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  batch_size = batch['label'].shape[0]

  def loss_fn(params, inputs, labels, rng):
    logits = state.apply_fn({'params': params}, inputs, train=True, rngs={'dropout': rng})
    losses = example_losses(logits, labels, loss=loss, label_smoothing=label_smoothing)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return jnp.sum(losses) / batch_size, correct

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (mean_loss, correct), grads = grad_fn(state.params, batch['inputs'], batch['label'],
                                          dropout_rng)
  else:
    def accumulate(carry, micro):
      j, inputs, labels = micro
      out = grad_fn(state.params, inputs, labels, jax.random.fold_in(dropout_rng, j))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = ((jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
             jax.tree.map(jnp.zeros_like, state.params))
    ((mean_loss, correct), grads), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(num_microbatches),
                            _microbatches(batch['inputs'], num_microbatches),
                            _microbatches(batch['label'], num_microbatches)))
  metrics = {'loss': mean_loss, 'accuracy': correct.astype(jnp.float32) / batch_size,
             'l2_grads': optax.tree.norm(grads)}
  return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, loss: str = 'softmax',
              num_microbatches: int = 1) -> dict[str, jax.Array]:
  """Masked sums over batch {'inputs', 'label', 'mask' [B] (0 = padding)}: loss, correct, count.

  With `num_microbatches` M > 1 the forward pass runs over M micro-batches in sequence (faster on
  CPU, the same logits).
  """
  apply = lambda x: state.apply_fn({'params': state.params}, x, train=False)
  if num_microbatches == 1:
    logits = apply(batch['inputs'])
  else:
    logits = jax.lax.map(apply, _microbatches(batch['inputs'], num_microbatches))  # [M, B/M, K]
    logits = logits.swapaxes(0, 1).reshape(-1, logits.shape[-1])  # [B, K]
  mask = batch['mask'].astype(jnp.float32)
  losses = example_losses(logits, batch['label'], loss=loss)
  correct = (jnp.argmax(logits, axis=-1) == batch['label']).astype(jnp.float32)
  return {'loss': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


_TRAIN_SUMS = ('loss', 'accuracy', 'l2_grads')


def train_chunk(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
                epoch: jax.Array, first_batch: jax.Array, num_steps: jax.Array, *,
                batch_size: int, step_fn: Callable, preprocess_fn: Callable,
                batch_sharding: NamedSharding) -> tuple[TrainState, dict[str, jax.Array]]:
  """Runs up to `num_steps` train steps on device-resident data, in one dispatch.

  images uint8 [N, H, W, C] and labels [N] are the whole train split. The epoch's order is
  permutation(fold_in(rng_shuffle, epoch)); step i uses batch first_batch + i of it, augmented with
  fold_in(rng_augment, state.step). Stops early after a non-finite loss. Returns the state and the
  sums of the per-step metrics plus `steps`, the number of steps run.
  """
  dropout_rng, augment_rng, shuffle_rng = (jax.random.fold_in(rng, i) for i in range(3))
  perm = jax.random.permutation(jax.random.fold_in(shuffle_rng, epoch), images.shape[0])  # [N]

  def cond(carry):
    i, _, _, finite = carry
    return (i < num_steps) & finite

  def body(carry):
    i, state, sums, _ = carry
    idx = jax.lax.dynamic_slice_in_dim(perm, (first_batch + i) * batch_size, batch_size)  # [B]
    x = jax.lax.with_sharding_constraint(images[idx], batch_sharding)  # [B, H, W, C] uint8
    y = jax.lax.with_sharding_constraint(labels[idx], batch_sharding)  # [B]
    x = preprocess_fn(x, jax.random.fold_in(augment_rng, state.step))  # [B, H, W, C] float
    state, metrics = step_fn(state, {'inputs': x, 'label': y}, dropout_rng)
    sums = {k: sums[k] + metrics[k] for k in _TRAIN_SUMS}
    return i + 1, state, sums, jnp.isfinite(metrics['loss'])

  zeros = {k: jnp.zeros((), jnp.float32) for k in _TRAIN_SUMS}
  steps, state, sums, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), state, zeros, jnp.array(True)))
  return state, {**sums, 'steps': steps}


def _stream_step(state: TrainState, sums: dict[str, jax.Array], batch: dict[str, jax.Array],
                 rng: jax.Array, *, step_fn: Callable) -> tuple[TrainState, dict[str, jax.Array]]:
  """train_step on a device batch, adding its metrics to the running device-side `sums`.

  Dropout uses fold_in(rng, 0), the stream train_chunk uses for it.
  """
  state, metrics = step_fn(state, batch, jax.random.fold_in(rng, 0))
  return state, {**{k: sums[k] + metrics[k] for k in _TRAIN_SUMS}, 'steps': sums['steps'] + 1}


def evaluate_arrays(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
                    batch_size: int, eval_fn: Callable, preprocess_fn: Callable,
                    batch_sharding: NamedSharding) -> dict[str, jax.Array]:
  """eval_step sums over device-resident uint8 images [n * batch_size, ...], padding masked out."""

  def body(i, sums):
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size)
    x = preprocess_fn(jax.lax.with_sharding_constraint(cut(images), batch_sharding))
    out = eval_fn(state, {'inputs': x, 'label': cut(labels), 'mask': cut(mask)})
    return jax.tree.map(jnp.add, sums, out)

  zeros = {k: jnp.zeros((), jnp.float32) for k in ('loss', 'correct', 'count')}
  return jax.lax.fori_loop(0, images.shape[0] // batch_size, body, zeros)


def _padded(images: np.ndarray, labels: np.ndarray, batch_size: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads to a multiple of batch_size; returns (images, labels, mask) with mask 0 on padding."""
  n = len(images)
  pad = -n % batch_size
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  return images, labels, mask


# ------------------------------------------------------------------------------------------------
# Reporting helpers.


def gflops_per_image(model: vit.ViT, params: Any, image_shape: tuple[int, ...]) -> float:
  """XLA's FLOP count of one inference forward pass at batch 1, in GFLOPs.

  XLA counts a multiply-add as 2 FLOPs; scenic's reported GFLOPs count it as 1 (half this value).
  """
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  cost = forward.lower(abstract, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) / 1e9


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class _MetricsLog:
  """WORKDIR/metrics.jsonl (one JSON object per line) plus clu TensorBoard scalars."""

  def __init__(self, workdir: str, resume_step: int):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    self.path = os.path.join(workdir, 'metrics.jsonl')
    # Drop records past the checkpoint we resume from: those steps are trained again.
    records = self.records()
    with open(self.path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records if r['step'] <= resume_step and
                   not any(k.startswith('test_') for k in r))
    self.writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))

  def records(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def write(self, step: int, wall_time_s: float, scalars: dict[str, float]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'wall_time_s': round(wall_time_s, 3), **scalars}) + '\n')
    self.writer.write_scalars(step, scalars)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def _write_json(path: str, obj: Any) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(path + '.tmp', path)


# ------------------------------------------------------------------------------------------------
# The run.


def use_one_device_per_cpu_core() -> int:
  """Splits the host CPU into one XLA device per core; returns the count. Call before JAX runs.

  XLA executes most of a CPU program on one thread, so a 2-core machine sits half idle; with one
  device per core the batch is sharded over the cores (about 2x here). Leaves an explicit choice
  (XLA_FLAGS' --xla_force_host_platform_device_count or jax_num_cpu_devices) alone; on GPU/TPU it
  only adds idle host devices.
  """
  if ('xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
      or jax.config.jax_num_cpu_devices != -1):
    return jax.config.jax_num_cpu_devices
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  try:
    jax.config.update('jax_num_cpu_devices', cores or 1)
  except RuntimeError:  # The backend already started (e.g. in a notebook): keep its devices.
    logging.warning('JAX already started; not splitting the CPU into one device per core.')
  return cores or 1


def make_mesh() -> Mesh:
  """A 1-D mesh of every device on axis 'data' (Auto axis type)."""
  return Mesh(np.array(jax.devices()), ('data',), axis_types=(AxisType.Auto,))


def _in_memory_runners(ds: input_pipeline.Dataset, config: ml_collections.ConfigDict,
                       state: TrainState, rng: jax.Array, step_fn: Callable, eval_fn: Callable,
                       mesh: Mesh) -> tuple[Callable, Callable]:
  """(run_chunk, evaluate) for a dataset held on the device(s); compiles the train loop now."""
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  dc = dataset_configs(config)
  augment = functools.partial(input_pipeline.preprocess, train=True, dataset=ds,
                              crop_padding=dc['crop_padding'], random_flip=dc['random_flip'])
  normalise = lambda x: input_pipeline.preprocess(x, None, train=False, dataset=ds)
  images = jax.device_put(ds.train_images, replicated)  # Once: the whole split, uint8.
  labels = jax.device_put(ds.train_labels, replicated)
  scalar = lambda v: jax.device_put(np.int32(v), replicated)
  t = time.time()
  chunk = jax.jit(functools.partial(
      train_chunk, batch_size=config.batch_size, step_fn=step_fn, preprocess_fn=augment,
      batch_sharding=batch_sharding), donate_argnums=0, out_shardings=replicated)
  chunk = chunk.lower(state, images, labels, rng, scalar(0), scalar(0), scalar(1)).compile()
  logging.info('Compiled the train loop in %.1f s.', time.time() - t)
  steps_per_epoch = ds.num_train // config.batch_size

  def run_chunk(state, step, num_steps):
    epoch, batch = divmod(step, steps_per_epoch)
    return chunk(state, images, labels, rng, scalar(epoch), scalar(batch), scalar(num_steps))

  eval_batch_size = _get(config, 'eval_batch_size') or config.batch_size
  evaluate_jit = jax.jit(functools.partial(
      evaluate_arrays, batch_size=eval_batch_size, eval_fn=eval_fn, preprocess_fn=normalise,
      batch_sharding=batch_sharding), out_shardings=replicated)
  data, compiled = {}, {}
  for split in ('valid', 'test'):
    if getattr(ds, f'num_{split}'):
      arrays = _padded(getattr(ds, f'{split}_images'), getattr(ds, f'{split}_labels'),
                       eval_batch_size)
      data[split] = jax.device_put(arrays, replicated)

  def evaluate(state, split):
    if split not in data:
      return None
    if split not in compiled:  # Compiled ahead, so the timing below is the evaluation alone.
      compiled[split] = evaluate_jit.lower(state, *data[split]).compile()
    t = time.time()
    sums = jax.device_get(compiled[split](state, *data[split]))
    return sums, time.time() - t

  return run_chunk, evaluate


def _stream_runners(ds: input_pipeline.Dataset, config: ml_collections.ConfigDict,
                    state: TrainState, rng: jax.Array, step_fn: Callable, eval_fn: Callable,
                    mesh: Mesh, *, start_step: int) -> tuple[Callable, Callable]:
  """(run_chunk, evaluate) for a streamed dataset: host batches, one step per dispatch."""
  del state  # Compiled on first use: shapes come from the stream.
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  stream = jax.jit(functools.partial(_stream_step, step_fn=step_fn), donate_argnums=(0, 1),
                   out_shardings=replicated)
  eval_stream = jax.jit(eval_fn, out_shardings=replicated)
  # A resumed stream is reseeded by its start step: its order is reproducible, not continued.
  batches = ds.train_iter(config.batch_size, _get(config, 'rng_seed') + start_step)
  eval_batch_size = _get(config, 'eval_batch_size') or config.batch_size

  def run_chunk(state, step, num_steps):
    del step
    sums = jax.device_put({k: np.float32(0) for k in (*_TRAIN_SUMS, 'steps')}, replicated)
    for _ in range(num_steps):  # Dispatches run ahead; nothing here waits for the device.
      state, sums = stream(state, sums, jax.device_put(next(batches), batch_sharding), rng)
    return state, sums

  def evaluate(state, split):
    if not getattr(ds, f'num_{split}'):
      return None
    t, sums = time.time(), None
    for batch in ds.eval_iter(split, eval_batch_size):  # Sums stay on device until the end.
      out = eval_stream(state, jax.device_put(batch, batch_sharding))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return jax.device_get(sums), time.time() - t

  return run_chunk, evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config`, resuming from WORKDIR/checkpoints; returns the summary dict.

  A run whose last checkpoint is at the final step and has a summary.json is not trained again.
  Raises ValueError for a bad config (before anything compiles) and TrainingDivergedError on a
  non-finite loss (keeping the last good checkpoint).
  """
  num_devices = jax.device_count()
  validate_config(config, num_devices=num_devices)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  logging.info('Experiment %r in %s on %d %s device(s): %s', _get(config, 'experiment_name'),
               workdir, num_devices, jax.default_backend(), jax.devices())

  ds = input_pipeline.load_dataset(config)
  validate_config(config, num_devices=num_devices, image_shape=ds.image_shape,
                  num_classes=ds.num_classes)
  run_start = time.time()
  total_steps = total_train_steps(config, ds.num_train)
  batch_size = config.batch_size
  log_eval_steps = config.log_eval_steps
  log_summary_steps = _get(config, 'log_summary_steps') or log_eval_steps
  checkpoint_steps = _get(config, 'checkpoint_steps') or log_eval_steps
  steps_per_epoch = ds.num_train // batch_size
  if ds.in_memory and steps_per_epoch < 1:
    raise ValueError(f'batch_size={batch_size} exceeds the {ds.num_train} training examples.')
  _write_config(config, workdir)
  summary_path = os.path.join(workdir, 'summary.json')
  manager = checkpoint.make_manager(workdir, _get(config, 'max_checkpoint_keep')) \
      if _get(config, 'checkpoint') else None
  log = None
  try:
    if manager and manager.latest_step() == total_steps and os.path.exists(summary_path):
      logging.info('Run in %s already finished at step %d; not training again (delete the '
                   'workdir or pick another to retrain).', workdir, total_steps)
      with open(summary_path) as f:
        return json.load(f)

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    model = vit.build_model(config.model, ds.num_classes,
                            dtype=DTYPES[_get(config, 'model_dtype_str')])
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(_get(config, 'rng_seed')))
    state = create_train_state(init_rng, config, model, (1, *ds.image_shape), total_steps,
                               replicated)
    train_rng = jax.device_put(train_rng, replicated)
    from clu import parameter_overview  # pylint: disable=g-import-not-at-top
    parameter_overview.log_parameter_overview(state.params)
    num_params = int(parameter_overview.count_parameters(state.params))
    gflops = gflops_per_image(model, state.params, ds.image_shape)
    logging.info('Model: %s parameters, %.4f GFLOPs per image (XLA count, one multiply-add = 2 '
                 'FLOPs; scenic reports half).', f'{num_params:,}', gflops)

    start_step, wall_offset = 0, 0.0
    restored = checkpoint.restore_latest(manager, state, train_rng) if manager else None
    if restored is not None:
      state, train_rng, meta = restored
      start_step, wall_offset = int(meta['step']), float(meta.get('wall_time_s', 0.0))
      logging.info('Resumed from checkpoint step %d (%s of training so far).', start_step,
                   _duration(wall_offset))
    if start_step > total_steps:
      raise ValueError(f'The checkpoint in {workdir} is at step {start_step}, past this '
                       f'config\'s {total_steps} steps; use another workdir.')
    wall_time = lambda: wall_offset + time.time() - run_start
    lr_fn = make_lr_schedule(_get(config, 'lr_configs'), total_steps)
    step_fn = functools.partial(
        train_step, loss=_get(config, 'loss'), label_smoothing=_get(config, 'label_smoothing'),
        num_microbatches=num_microbatches(config, batch_size, num_devices))
    eval_fn = functools.partial(eval_step, loss=_get(config, 'loss'), num_microbatches=(
        num_microbatches(config, _get(config, 'eval_batch_size') or batch_size, num_devices)))
    make_runners = _in_memory_runners if ds.in_memory else \
        functools.partial(_stream_runners, start_step=start_step)
    run_chunk, evaluate = make_runners(ds=ds, config=config, state=state, rng=train_rng,
                                       step_fn=step_fn, eval_fn=eval_fn, mesh=mesh)
    log = _MetricsLog(workdir, start_step)
    if start_step == 0:
      log.writer.write_scalars(0, {'num_params': num_params, 'gflops_per_image': gflops})

    def log_eval(state, step, split):
      result = evaluate(state, split)
      if result is None:
        return None
      sums, seconds = result
      count = max(float(sums['count']), 1.0)
      scalars = {f'{split}_loss': float(sums['loss']) / count,
                 f'{split}_accuracy': float(sums['correct']) / count}
      log.write(step, wall_time(), scalars)
      logging.info('step %d | %s loss %.4f | %s accuracy %.4f | %d images in %.1f s', step,
                   split, scalars[f'{split}_loss'], split, scalars[f'{split}_accuracy'],
                   int(count), seconds)
      return scalars, count / max(seconds, 1e-9)

    step = start_step
    period = dict.fromkeys((*_TRAIN_SUMS, 'steps', 'seconds'), 0.0)
    chunk_times = []  # (steps, seconds) of each dispatch, for the steady-state throughput.
    while step < total_steps:
      boundaries = [total_steps] + [(step // n + 1) * n for n in (
          log_summary_steps, log_eval_steps, checkpoint_steps if manager else None,
          steps_per_epoch if ds.in_memory else None) if n]
      num_steps = min(boundaries) - step
      t = time.time()
      state, sums = run_chunk(state, step, num_steps)
      sums = jax.device_get(sums)  # The only wait for the device per chunk.
      seconds = time.time() - t
      if not np.isfinite(sums['loss']):
        last = manager.latest_step() if manager else None
        raise TrainingDivergedError(
            f'Non-finite training loss at step {step + int(sums["steps"])}: stopping. The last '
            'good checkpoint is '
            f'{"step " + str(last) + " in " + manager.directory.as_posix() if last else "none"}; '
            'lower lr_configs.base_learning_rate or set max_grad_norm and re-run.')
      step += num_steps
      chunk_times.append((num_steps, seconds))
      for k in period:
        period[k] += seconds if k == 'seconds' else float(sums[k])
      if step % log_summary_steps == 0 or step == total_steps:
        n = period['steps']
        images_per_s = n * batch_size / max(period['seconds'], 1e-9)
        scalars = {'train_loss': period['loss'] / n, 'train_accuracy': period['accuracy'] / n,
                   'learning_rate': float(lr_fn(step - 1)), 'train_images_per_s': images_per_s,
                   'l2_grads': period['l2_grads'] / n}
        log.write(step, wall_time(), scalars)
        logging.info('step %d/%d (%.0f%%) | loss %.4f | accuracy %.4f | lr %.3g | %.0f '
                     'images/s | ETA %s', step, total_steps, 100 * step / total_steps,
                     scalars['train_loss'], scalars['train_accuracy'], scalars['learning_rate'],
                     images_per_s, _duration((total_steps - step) * batch_size / images_per_s))
        period = dict.fromkeys(period, 0.0)
      if step % log_eval_steps == 0 or step == total_steps:
        log_eval(state, step, 'valid')
      if manager and (step % checkpoint_steps == 0 or step == total_steps):
        checkpoint.save(manager, step, state, train_rng, {'wall_time_s': wall_time()})

    test = log_eval(state, step, 'test')
    if test is None:
      raise ValueError(f'Dataset {ds.name} has no test split to report.')
    steady = chunk_times[1:] or chunk_times  # The first dispatch pays one-off start-up costs.
    summary = {
        'test_accuracy': test[0]['test_accuracy'], 'test_loss': test[0]['test_loss'],
        'num_params': num_params, 'gflops_per_image': gflops,
        'gflops_per_image_counting': 'XLA cost analysis, forward pass at batch 1, a multiply-add '
                                     'counts as 2 FLOPs (scenic counts 1)',
        'train_images_per_s': sum(n for n, _ in steady) * batch_size /
                              max(sum(t for _, t in steady), 1e-9) if steady else None,
        'eval_images_per_s': test[1], 'wall_time_s': wall_time(), 'steps': step,
        'dataset': {'name': ds.name, 'source': ds.source, 'num_train': ds.num_train,
                    'num_valid': ds.num_valid, 'num_test': ds.num_test},
        'devices': f'{num_devices} x {jax.devices()[0].device_kind}',
        'config': json.loads(config.to_json_best_effort()),
        'eval_history': [{k: r[k] for k in ('step', 'wall_time_s', 'valid_accuracy')}
                         for r in log.records() if 'valid_accuracy' in r],
    }
    _write_json(summary_path, summary)
    logging.info('Done: test accuracy %.4f after %d steps, %s of training; summary in %s.',
                 summary['test_accuracy'], step, _duration(summary['wall_time_s']), summary_path)
    return summary
  finally:
    if log:
      log.close()
    if manager:
      manager.close()


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json, warning when it replaces a different config of the same run."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != new:
      flat_old = traverse_util.flatten_dict(old, sep='.')
      flat_new = traverse_util.flatten_dict(new, sep='.')
      changed = sorted(k for k in set(flat_old) | set(flat_new)
                       if flat_old.get(k) != flat_new.get(k))
      logging.warning('config.json in %s differs from this config in %s; resuming anyway.',
                      workdir, changed)
  _write_json(path, new)
