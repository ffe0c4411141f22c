"""The jitted loops around the steps, the device mesh, and `make_runners`, the one runner factory.

Parameters are replicated and batches split over a 1-D `Mesh(('data',))` of every device of every
process. Each process feeds only its rows of each global batch (`local_rows`,
`jax.make_array_from_process_local_data`). In-memory datasets (MNIST, CIFAR) go to the devices one
epoch at a time as uint8 batches in the epoch's order (`epoch_order`, from the seed and the epoch),
and `train_chunk` runs many steps per dispatch in a `lax.while_loop`, so the host neither copies
batches nor waits between steps. Streamed datasets (ImageNet) feed host batches, one step per
dispatch. The trainer, `benchmark` and `compare` all run training through `make_runners`.
"""

from collections.abc import Callable
import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_flax import augment
from vit_flax import input_pipeline
from vit_flax import steps

TrainState = steps.TrainState
CPU_MICROBATCH_SIZE = 16


TRAIN_SUMS = ('loss', 'accuracy', 'l2_grads')


def train_chunk(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
                first_batch: jax.Array, num_steps: jax.Array, *, step_fn: Callable,
                preprocess_fn: Callable) -> tuple[TrainState, dict[str, jax.Array]]:
  """Runs up to `num_steps` train steps on one epoch's device-resident batches, in one dispatch.

  images uint8 [S, B, H, W, C] and labels [S, B] are the epoch's S batches in order (see
  `epoch_batches`), the batch axis sharded over the mesh; step i uses batch first_batch + i,
  augmented with fold_in(rng_augment, state.step). Stops early after a non-finite loss. Returns the
  state and the sums of the per-step metrics plus `steps`, the number of steps run.
  """
  dropout_rng, augment_rng = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)

  def cond(carry):
    i, _, _, finite = carry
    return (i < num_steps) & finite

  def body(carry):
    i, state, sums, _ = carry
    x = jax.lax.dynamic_index_in_dim(images, first_batch + i, keepdims=False)  # [B, H, W, C]
    y = jax.lax.dynamic_index_in_dim(labels, first_batch + i, keepdims=False)  # [B]
    x = preprocess_fn(x, jax.random.fold_in(augment_rng, state.step))  # [B, H, W, C] float
    state, metrics = step_fn(state, {'inputs': x, 'label': y}, dropout_rng)
    sums = {k: sums[k] + metrics[k] for k in TRAIN_SUMS}
    return i + 1, state, sums, jnp.isfinite(metrics['loss'])

  zeros = {k: jnp.zeros((), jnp.float32) for k in TRAIN_SUMS}
  num_run, state, sums, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), state, zeros, jnp.array(True)))
  return state, {**sums, 'steps': num_run}


def stream_step(state: TrainState, sums: dict[str, jax.Array], batch: dict[str, jax.Array],
                rng: jax.Array, *, step_fn: Callable) -> tuple[TrainState, dict[str, jax.Array]]:
  """train_step on a device batch, adding its metrics to the running device-side `sums`.

  Dropout uses fold_in(rng, 0), the stream train_chunk uses for it.
  """
  state, metrics = step_fn(state, batch, jax.random.fold_in(rng, 0))
  return state, {**{k: sums[k] + metrics[k] for k in TRAIN_SUMS}, 'steps': sums['steps'] + 1}


def evaluate_arrays(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array, *,
                    eval_fn: Callable, preprocess_fn: Callable) -> dict[str, jax.Array]:
  """eval_step sums over device-resident batches: uint8 images [n, B, H, W, C], labels and mask
  [n, B] (mask 0 on padding), the batch axis sharded over the mesh."""

  def sums(i):
    cut = lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
    return eval_fn(state, {'inputs': preprocess_fn(cut(images)), 'label': cut(labels),
                           'mask': cut(mask)})

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums, 0))
  body = lambda i, total: jax.tree.map(jnp.add, total, sums(i))
  return jax.lax.fori_loop(0, images.shape[0], body, zeros)


def pad_to_batch(images: np.ndarray, labels: np.ndarray, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads to whole batches: images [n, B, ...], labels [n, B] and mask [n, B] (0 on padding)."""
  n = len(images)
  pad = -n % batch_size
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  batches = lambda a: a.reshape(-1, batch_size, *a.shape[1:])  # [n, B, ...]
  return batches(images), batches(labels), batches(mask)


def local_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
  """The rows of a global batch [batch_size, ...] held by this process's devices, in order.

  The process feeds exactly these rows (`jax.make_array_from_process_local_data`), so each loads
  only its share; with one process, every row.
  """
  spans = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows = index[0]
    spans.add((rows.start or 0, batch_size if rows.stop is None else rows.stop))
  return np.concatenate([np.arange(a, b) for a, b in sorted(spans)])


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the train examples in `epoch`: a permutation drawn from (seed, epoch)."""
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


def global_batches(sharding: NamedSharding, local: np.ndarray, batch_size: int) -> jax.Array:
  """A global [n, batch_size, ...] array from this process's rows [n, len(local_rows), ...]."""
  return jax.make_array_from_process_local_data(
      sharding, local, (local.shape[0], batch_size, *local.shape[2:]))


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


def num_microbatches(config: ml_collections.ConfigDict, batch_size: int, num_devices: int,
                     backend: str | None = None) -> int:
  """How many micro-batches a batch of `batch_size` is split into (1: no splitting).

  The micro-batch is the largest size <= `microbatch_size` (default: CPU_MICROBATCH_SIZE on CPU,
  no splitting on GPU/TPU) that divides the batch and is divisible by the device count, e.g. 10
  for an eval batch of 1000 on 2 devices; the whole batch when none is. config.resolve checks that
  an explicit `microbatch_size` divides the train batch.
  """
  limit = config.microbatch_size
  if limit is None:
    if (backend or jax.default_backend()) != 'cpu':
      return 1
    limit = CPU_MICROBATCH_SIZE
  fits = [s for s in range(num_devices, limit + 1, num_devices) if batch_size % s == 0]
  return batch_size // fits[-1] if fits else 1


@dataclasses.dataclass
class Runners:
  """How a run trains and evaluates, whatever the data source.

  run_chunk(state, step, num_steps) -> (state, sums): trains `num_steps` steps from global step
    `step` in as few dispatches as the source allows; `sums` holds device-side sums of TRAIN_SUMS
    over the steps run and 'steps', their count (fewer after a non-finite loss).
  evaluate(state, split) -> (sums, seconds) or None when the dataset lacks `split`: masked sums of
    'loss', 'correct' and 'count' over the whole split, and the seconds the evaluation took
    (compilation excluded).
  """
  run_chunk: Callable[[TrainState, int, int], tuple[TrainState, dict[str, jax.Array]]]
  evaluate: Callable[[TrainState, str], tuple[dict[str, float], float] | None]


def make_runners(ds: input_pipeline.Dataset, config: ml_collections.ConfigDict,
                 state: TrainState, rng: jax.Array, mesh: Mesh, *, start_step: int = 0
                 ) -> Runners:
  """The runners for `ds` under a resolved `config` on `mesh`.

  In-memory datasets compile the train loop here (so its time is not counted as training); streamed
  ones compile on first use, as their shapes come from the stream. `rng` is the run's base key
  (replicated); a resumed stream is reseeded by `start_step`: reproducible, not continued.
  """
  num_devices = mesh.devices.size
  step_fn = functools.partial(
      steps.train_step, num_classes=ds.num_classes, loss=config.loss,
      label_smoothing=config.label_smoothing,
      num_microbatches=num_microbatches(config, config.batch_size, num_devices),
      mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
      ema_decay=config.ema_decay)
  eval_fn = functools.partial(
      steps.eval_step, loss=config.loss,
      num_microbatches=num_microbatches(config, config.eval_batch_size, num_devices))
  if ds.in_memory:
    return _in_memory_runners(ds, config, state, rng, step_fn, eval_fn, mesh)
  return _stream_runners(ds, config, rng, step_fn, eval_fn, mesh, start_step)


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """Host values (arrays, scalars or PRNG keys, equal in every process) as global arrays
  replicated over every device of `mesh` (default: `make_mesh()`)."""
  sharding = NamedSharding(mesh or make_mesh(), P())

  def leaf(value):
    if jax.dtypes.issubdtype(getattr(value, 'dtype', None), jax.dtypes.prng_key):
      data = leaf(np.asarray(jax.random.key_data(value)))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda _: value)

  return jax.tree.map(leaf, tree)


def _in_memory_runners(ds: input_pipeline.Dataset, config: ml_collections.ConfigDict,
                       state: TrainState, rng: jax.Array, step_fn: Callable, eval_fn: Callable,
                       mesh: Mesh) -> Runners:
  """Runners for a dataset small enough to hold; compiles the train loop now.

  At the start of each epoch every process puts its rows of each of the epoch's batches
  (`epoch_order`, then `local_rows`) on its devices, uint8, in one transfer; the jitted loop then
  trains up to the next boundary without host work. Evaluation splits are placed the same way, once.
  """
  replicated = NamedSharding(mesh, P())
  batches = NamedSharding(mesh, P(None, 'data'))  # [n, B, ...]: the batch axis over the mesh.
  dc, batch_size = config.dataset_configs, config.batch_size
  train_preprocess = functools.partial(
      augment.preprocess, train=True, dataset=ds, crop_padding=dc.crop_padding,
      random_flip=dc.random_flip, random_resized_crop=dc.random_resized_crop,
      trivial_augment=dc.trivial_augment, random_erasing=dc.random_erasing)
  normalise = lambda x: augment.preprocess(x, None, train=False, dataset=ds)
  steps_per_epoch = ds.num_train // batch_size
  train_rows = local_rows(NamedSharding(mesh, P('data')), batch_size)

  def epoch_batches(epoch):  # ([S, B, H, W, C] uint8, [S, B] int32), global arrays
    order = epoch_order(config.rng_seed, epoch, ds.num_train)[:steps_per_epoch * batch_size]
    rows = order.reshape(steps_per_epoch, batch_size)[:, train_rows]  # [S, B_local]
    return (global_batches(batches, ds.train_images[rows], batch_size),
            global_batches(batches, ds.train_labels[rows], batch_size))

  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batches)
  scalar = lambda v: replicate(np.int32(v), mesh)
  t = time.time()
  chunk = jax.jit(functools.partial(train_chunk, step_fn=step_fn, preprocess_fn=train_preprocess),
                  donate_argnums=0, out_shardings=replicated)
  chunk = chunk.lower(state, abstract((steps_per_epoch, batch_size, *ds.image_shape), np.uint8),
                      abstract((steps_per_epoch, batch_size), np.int32), rng, scalar(0),
                      scalar(1)).compile()
  logging.info('Compiled the train loop in %.1f s.', time.time() - t)
  current = {}  # The epoch whose batches are on the device(s).

  def run_chunk(state, step, num_steps):
    epoch, batch = divmod(step, steps_per_epoch)
    if current.get('epoch') != epoch:
      current.clear()  # Frees the last epoch's batches first.
      current.update(epoch=epoch, data=epoch_batches(epoch))
    return chunk(state, *current['data'], rng, scalar(batch), scalar(num_steps))

  evaluate_jit = jax.jit(functools.partial(evaluate_arrays, eval_fn=eval_fn,
                                           preprocess_fn=normalise), out_shardings=replicated)
  eval_rows = local_rows(NamedSharding(mesh, P('data')), config.eval_batch_size)
  data, compiled = {}, {}
  for split in ('valid', 'test'):
    if getattr(ds, f'num_{split}'):
      arrays = pad_to_batch(getattr(ds, f'{split}_images'), getattr(ds, f'{split}_labels'),
                            config.eval_batch_size)
      data[split] = [global_batches(batches, a[:, eval_rows], config.eval_batch_size)
                     for a in arrays]

  def evaluate(state, split):
    if split not in data:
      return None
    if split not in compiled:  # Compiled ahead, so the timing below is the evaluation alone.
      compiled[split] = evaluate_jit.lower(state, *data[split]).compile()
    t = time.time()
    sums = jax.device_get(compiled[split](state, *data[split]))
    return sums, time.time() - t

  return Runners(run_chunk, evaluate)


def _stream_runners(ds: input_pipeline.Dataset, config: ml_collections.ConfigDict,
                    rng: jax.Array, step_fn: Callable, eval_fn: Callable, mesh: Mesh,
                    start_step: int) -> Runners:
  """Runners for a streamed dataset: host batches, one step per dispatch.

  Each process streams its own share of the split and feeds its rows of every global batch.
  """
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  stream = jax.jit(functools.partial(stream_step, step_fn=step_fn), donate_argnums=(0, 1),
                   out_shardings=replicated)
  eval_stream = jax.jit(eval_fn, out_shardings=replicated)
  local_batch = len(local_rows(batch_sharding, config.batch_size))
  local_eval_batch = len(local_rows(batch_sharding, config.eval_batch_size))
  batches = ds.train_iter(local_batch, config.rng_seed + start_step)

  def to_global(batch, size):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v, (size, *v.shape[1:]))
            for k, v in batch.items()}

  def run_chunk(state, step, num_steps):
    del step
    sums = replicate({k: np.float32(0) for k in (*TRAIN_SUMS, 'steps')}, mesh)
    for _ in range(num_steps):  # Dispatches run ahead; nothing here waits for the device.
      state, sums = stream(state, sums, to_global(next(batches), config.batch_size), rng)
    return state, sums

  def evaluate(state, split):
    if not getattr(ds, f'num_{split}'):
      return None
    t, sums = time.time(), None
    for batch in ds.eval_iter(split, local_eval_batch):  # Sums stay on device until the end.
      out = eval_stream(state, to_global(batch, config.eval_batch_size))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    return jax.device_get(sums), time.time() - t

  return Runners(run_chunk, evaluate)
