"""Optimizers, learning-rate schedules and losses (scenic's train_lib/optimizers.py and
lr_schedules.py).

Every function reads a config resolved by `config.resolve`, so all keys are present.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


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
  lr = make_lr_schedule(config.lr_configs.to_dict(), total_steps)
  name = config.optimizer
  oc = config.optimizer_configs
  mask = None  # scenic decays every parameter ...
  if oc['skip_scale_and_bias_regularization']:  # ... unless asked to skip the 1-D ones.
    mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if name in ('adam', 'adamw'):
    tx = optax.adamw(lr, b1=oc['beta1'], b2=oc['beta2'], eps=oc['epsilon'],
                     weight_decay=oc['weight_decay'], mask=mask)
  else:
    tx = optax.chain(optax.add_decayed_weights(oc['weight_decay'], mask=mask),
                     optax.sgd(lr, momentum=oc['momentum'] or None, nesterov=oc['nesterov']))
  if config.max_grad_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), tx)
  return tx


def targets(labels: jax.Array, num_classes: int, label_smoothing: float | None) -> jax.Array:
  """One-hot [B, K] targets, smoothed to y * (1 - ls) + ls / K."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  return onehot


def losses_from_targets(logits: jax.Array, targets: jax.Array, *, loss: str = 'softmax'
                        ) -> jax.Array:
  """Per-example losses [B] from logits [B, K] and soft targets [B, K].

  softmax: -sum_k y_k log_softmax(z)_k. sigmoid (scenic's multilabel loss): the sum over classes
  of -[y log sigmoid(z) + (1 - y) log sigmoid(-z)].
  """
  logits = logits.astype(jnp.float32)
  if loss == 'softmax':
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
  return -jnp.sum(targets * jax.nn.log_sigmoid(logits)
                  + (1.0 - targets) * jax.nn.log_sigmoid(-logits), axis=-1)


def example_losses(logits: jax.Array, labels: jax.Array, *, loss: str = 'softmax',
                   label_smoothing: float | None = None) -> jax.Array:
  """Per-example losses [B] from logits [B, K] and int labels [B] (see losses_from_targets)."""
  return losses_from_targets(logits, targets(labels, logits.shape[-1], label_smoothing),
                             loss=loss)
