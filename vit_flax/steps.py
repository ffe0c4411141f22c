"""The pure step functions: train state creation, `train_step` and `eval_step`.

Each is a module-level function of arrays (jit it, or call it inside a jitted loop; see `loops`).
Batches are {'inputs' [B, H, W, C] float, 'label' [B] int, 'mask' [B] (eval only, 0 = padding)}.
"""

from typing import Any

from flax import traverse_util
from flax.training import train_state
import jax
from jax.sharding import NamedSharding
import jax.numpy as jnp
import ml_collections
import optax

from vit_flax import optim

TrainState = train_state.TrainState


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: Any,
                       input_shape: tuple[int, ...], total_steps: int,
                       sharding: NamedSharding | None = None) -> TrainState:
  """Initialises parameters (init_head_bias fills output_projection's bias) and the optimizer.

  Runs under jit with `sharding` for every output (replicated over the mesh in training).
  """
  tx = optim.make_optimizer(config, total_steps)
  head_bias = config.init_head_bias

  def init(rng):
    params = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)['params']
    if head_bias is not None:
      flat = traverse_util.flatten_dict(params)
      flat = {k: jnp.full_like(v, head_bias) if k[-2:] == ('output_projection', 'bias') else v
              for k, v in flat.items()}
      params = traverse_util.unflatten_dict(flat)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  return jax.jit(init, out_shardings=sharding)(rng)


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
    losses = optim.example_losses(logits, labels, loss=loss, label_smoothing=label_smoothing)
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
  losses = optim.example_losses(logits, batch['label'], loss=loss)
  correct = (jnp.argmax(logits, axis=-1) == batch['label']).astype(jnp.float32)
  return {'loss': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}
