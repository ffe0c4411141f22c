"""The pure step functions: train state creation, `train_step` and `eval_step`.

Each is a module-level function of arrays (jit it, or call it inside a jitted loop; see `loops`).
Batches are {'inputs' [B, H, W, C] float, 'label' [B] int, 'mask' [B] (eval only, 0 = padding)}.
"""

from collections.abc import Callable
from typing import Any

import flax
from flax import traverse_util
from flax.training import train_state
import jax
from jax.sharding import NamedSharding
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_flax import augment
from vit_flax import optim



class TrainState(train_state.TrainState):
  """flax's TrainState plus what some runs carry besides the parameters.

  ema_params: an exponential moving average of `params`, or None.
  batch_stats: BatchNorm running statistics of models that have them (XCiT), or None.
  teacher_variables / teacher_apply_fn: the variables ({'params': ...[, 'batch_stats': ...]}) and
    apply function of a frozen teacher for DeiT's distillation token, or None
    (carried, never updated or checkpointed).
  """
  ema_params: Any = None
  batch_stats: Any = None
  teacher_variables: Any = None
  teacher_apply_fn: Any = flax.struct.field(pytree_node=False, default=None)


def host_key_data(rng: jax.Array) -> np.ndarray:
  """A PRNG key (typed, or raw uint32 as from `PRNGKey`) as host key data: host inputs to jit are
  the same in every process, so no process-local array enters a computation on the global mesh."""
  data = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return data if isinstance(data, jax.core.Tracer) else np.asarray(data)  # Traced: eval_shape.


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: Any,
                       input_shape: tuple[int, ...], total_steps: int,
                       sharding: NamedSharding | None = None, *,
                       teacher: tuple[Callable, Any] | None = None) -> TrainState:
  """Initialises parameters (init_head_bias fills output_projection's bias), BatchNorm statistics
  if the model has any, the optimizer and, with `config.ema_decay`, the parameter average.

  Runs under jit with `sharding` for every output (replicated over the mesh in training).
  `teacher` is (apply_fn, variables) of a trained model whose predictions DeiT's distillation head
  learns (see `train_step`).
  """
  tx = optim.make_optimizer(config, total_steps)
  head_bias = config.init_head_bias

  def init(key_data, teacher_variables):
    variables = model.init(jax.random.wrap_key_data(key_data), jnp.zeros(input_shape, jnp.float32),
                           train=False)
    params = variables['params']
    if head_bias is not None:
      flat = traverse_util.flatten_dict(params)
      flat = {k: jnp.full_like(v, head_bias) if k[-1] == 'bias' and
              k[-2].startswith('output_projection') else v for k, v in flat.items()}
      params = traverse_util.unflatten_dict(flat)
    ema = jax.tree.map(jnp.copy, params) if config.ema_decay else None
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=tx, ema_params=ema,
        batch_stats=variables.get('batch_stats'), teacher_variables=teacher_variables,
        teacher_apply_fn=teacher[0] if teacher else None)

  teacher_variables = teacher[1] if teacher else None
  return jax.jit(init, out_shardings=sharding)(host_key_data(rng), teacher_variables)


def _microbatches(a: jax.Array, num_microbatches: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...], micro-batch j holding examples j, j + M, j + 2M, ...

  The strided split keeps every device busy on every micro-batch (a device holds a contiguous block
  of the batch) and does not depend on the number of devices.
  """
  b = a.shape[0]
  return a.reshape(b // num_microbatches, num_microbatches, *a.shape[1:]).swapaxes(0, 1)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               num_classes: int | None = None, loss: str = 'softmax',
               label_smoothing: float | None = None,
               num_microbatches: int = 1, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
               ema_decay: float | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on batch {'inputs' [B, H, W, C] float, 'label' [B] int}.

  Targets are the one-hot labels, smoothed by `label_smoothing`, then mixed with Mixup / CutMix
  (`augment.mix`) when an alpha is set. Dropout uses fold_in(rng, state.step) (and fold_in(that,
  j) for micro-batch j). With `num_microbatches` M > 1 the gradient of the batch-mean loss is
  accumulated over M micro-batches in a scan: the same update, with activations small enough to
  stay in the CPU's caches (BatchNorm statistics then come from each micro-batch, in turn). With
  `ema_decay`, `ema_params` moves towards the new parameters at rate
  min(ema_decay, (1 + step) / (10 + step)) (a short warm-up, as TF's ExponentialMovingAverage).
  With a teacher in the state (DeiT), the model returns (class head, distillation head) logits and
  the loss is the mean of the class head's loss on the targets and the distillation head's loss on
  the teacher's hard labels for the same (augmented, mixed) images (Touvron et al. 2021, eq. 3).
  Returns the new state and the batch's mean `loss`, `accuracy` (against the unmixed labels; of
  the averaged heads for DeiT) and the pre-clipping gradient norm `l2_grads`.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  dropout_rng, mix_rng = jax.random.split(step_rng)
  labels = batch['label']
  batch_size = labels.shape[0]
  if num_classes is None:  # The width of the classifier head (`output_projection`).
    num_classes = state.params['output_projection']['bias'].shape[-1]
  targets = optim.targets(labels, num_classes, label_smoothing)  # [B, K]
  inputs, targets = augment.mix(batch['inputs'], targets, mix_rng, mixup_alpha=mixup_alpha,
                                cutmix_alpha=cutmix_alpha)
  distill = state.teacher_apply_fn is not None

  def loss_fn(params, batch_stats, inputs, targets, labels, rng):
    kwargs = {'return_heads': True} if distill else {}
    if batch_stats is None:
      logits = state.apply_fn({'params': params}, inputs, train=True, rngs={'dropout': rng},
                              **kwargs)
      new_stats = None
    else:
      logits, updates = state.apply_fn(
          {'params': params, 'batch_stats': batch_stats}, inputs, train=True,
          rngs={'dropout': rng}, mutable=['batch_stats'], **kwargs)
      new_stats = updates['batch_stats']
    if distill:
      teacher_logits = state.teacher_apply_fn(state.teacher_variables, inputs,
                                              train=False)
      teacher_targets = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), num_classes)  # [B, K]
      losses = 0.5 * (optim.losses_from_targets(logits[0], targets, loss=loss)
                      + optim.losses_from_targets(logits[1], teacher_targets, loss=loss))
      logits = 0.5 * (logits[0] + logits[1])  # The inference rule.
    else:
      losses = optim.losses_from_targets(logits, targets, loss=loss)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return jnp.sum(losses) / batch_size, (correct, new_stats)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (mean_loss, (correct, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, inputs, targets, labels, dropout_rng)
  else:
    def accumulate(carry, micro):
      (loss_sum, correct_sum, batch_stats), grad_sum = carry
      j, *parts = micro
      (loss_j, (correct_j, batch_stats)), grads_j = grad_fn(
          state.params, batch_stats, *parts, jax.random.fold_in(dropout_rng, j))
      return ((loss_sum + loss_j, correct_sum + correct_j, batch_stats),
              jax.tree.map(jnp.add, grad_sum, grads_j)), None

    zeros = ((jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), state.batch_stats),
             jax.tree.map(jnp.zeros_like, state.params))
    ((mean_loss, correct, batch_stats), grads), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(num_microbatches),
                            *(_microbatches(a, num_microbatches) for a in (inputs, targets,
                                                                           labels))))
  metrics = {'loss': mean_loss, 'accuracy': correct.astype(jnp.float32) / batch_size,
             'l2_grads': optax.tree.norm(grads)}
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if ema_decay:
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    new_state = new_state.replace(ema_params=jax.tree.map(
        lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_state.params))
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, loss: str = 'softmax',
              num_microbatches: int = 1) -> dict[str, jax.Array]:
  """Masked sums over batch {'inputs', 'label', 'mask' [B] (0 = padding)}: loss, correct, count.

  With `ema_params` in the state, also `ema_loss` and `ema_correct` of the averaged parameters.
  With `num_microbatches` M > 1 the forward pass runs over M micro-batches in sequence (faster on
  CPU, the same logits). BatchNorm uses its running statistics.
  """
  mask = batch['mask'].astype(jnp.float32)

  def sums(params, prefix):
    variables = {'params': params}
    if state.batch_stats is not None:
      variables['batch_stats'] = state.batch_stats
    apply = lambda x: state.apply_fn(variables, x, train=False)
    if num_microbatches == 1:
      logits = apply(batch['inputs'])
    else:
      logits = jax.lax.map(apply, _microbatches(batch['inputs'], num_microbatches))  # [M, B/M, K]
      logits = logits.swapaxes(0, 1).reshape(-1, logits.shape[-1])  # [B, K]
    losses = optim.example_losses(logits, batch['label'], loss=loss)
    correct = (jnp.argmax(logits, axis=-1) == batch['label']).astype(jnp.float32)
    return {f'{prefix}loss': jnp.sum(losses * mask), f'{prefix}correct': jnp.sum(correct * mask)}

  out = {**sums(state.params, ''), 'count': jnp.sum(mask)}
  if state.ema_params is not None:
    out.update(sums(state.ema_params, 'ema_'))
  return out
