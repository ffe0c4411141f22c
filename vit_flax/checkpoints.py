"""A run's orbax checkpoints: saving (asynchronous), restoring (surviving damage), loading.

WORKDIR/checkpoints/<step>/{params,opt_state,rng,ema_params,batch_stats,meta} are orbax
checkpoints; WORKDIR/best/<step> holds the best-validation parameters (orbax's `best_fn`).
Parameters, optimizer state and the run's base rng are separate items, so `load_run` restores the
parameters alone (for evaluation, prediction and visualisation) without rebuilding the optimizer.
`meta` is a small JSON item: the step, the accumulated training wall time, the model config the
parameters belong to (`model_meta`) and the run's segments (one per start of the command, with its
device and process count). Periodic saves are asynchronous: `save` returns once the state is
copied on the device, and orbax writes it in the background, atomically. In a multi-process job
every process takes part in saving and restoring.
"""

import json
import logging as std_logging
import os
from typing import Any, NamedTuple

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vit_flax import checkpoint_formats
from vit_flax import config as config_lib
from vit_flax import input_pipeline
from vit_flax import models
from vit_flax import multihost
from vit_flax import rundir


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines per save) from the absl log; keeps warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


STATE_ITEMS = ('params', 'opt_state', 'ema_params', 'batch_stats')  # TrainState fields saved.


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
  """Names a manager's cross-process barriers: the run's two managers can save the same step at
  once, and with orbax's default keys the processes could then meet at the other manager's barrier
  and deadlock (seen as a hung 2-process run)."""
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def make_manager(workdir: str, max_to_keep: int | None = 3, *, asynchronous: bool = True
                 ) -> ocp.CheckpointManager:
  """A CheckpointManager at WORKDIR/checkpoints keeping the newest `max_to_keep` steps.

  With `asynchronous`, `save` returns once the state is copied and orbax writes the files in a
  background thread (atomically: a checkpoint appears under its final name only when complete);
  `wait_until_finished` (and `close`) wait for the write.
  """
  _quiet_orbax()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous,
      multiprocessing_options=_barrier_prefix('checkpoints'))
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  handlers = {name: ocp.StandardCheckpointHandler() for name in (*STATE_ITEMS, 'rng')}
  handlers['meta'] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def make_best_manager(workdir: str, *, asynchronous: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager at WORKDIR/best keeping the one step with the best `valid_accuracy`.

  orbax's `best_fn` ranks the saved steps by the metrics passed to `save_best`.
  """
  _quiet_orbax()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=asynchronous,
      best_fn=lambda metrics: metrics['valid_accuracy'], best_mode='max',
      multiprocessing_options=_barrier_prefix('best'))
  directory = os.path.join(os.path.abspath(workdir), 'best')
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      'params': ocp.StandardCheckpointHandler(), 'batch_stats': ocp.StandardCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler()})


def _quiet_orbax() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())


@jax.jit
def _copy(tree: Any) -> Any:
  """A copy of `tree` on the same devices: the train loop may donate the originals while orbax
  still writes the copy."""
  return jax.tree.map(jnp.copy, tree)


def save(manager: ocp.CheckpointManager, step: int, state: Any, rng: jax.Array,
         meta: dict[str, Any], *, wait: bool = False) -> None:
  """Saves the state's params, opt_state (and ema_params, batch_stats), `rng` and `meta` as `step`.

  Returns once a copy of the state is taken (asynchronous managers write it in the background);
  with `wait`, once it is on disk.
  """
  arrays = _copy({name: getattr(state, name) for name in STATE_ITEMS
                  if getattr(state, name, None) is not None} | {'rng': {'rng': rng}})
  items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
  items['meta'] = ocp.args.JsonSave(dict(meta, step=int(step)))
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  if wait:
    manager.wait_until_finished()


def save_best(manager: ocp.CheckpointManager, step: int, params: Any, meta: dict[str, Any],
              batch_stats: Any = None) -> None:
  """Offers `params` (and `batch_stats`) at `step` to the best-checkpoint manager, ranked by
  meta['valid_accuracy']; asynchronous like `save`.

  A step already there (a resumed run evaluating a step again) is left as it is.
  """
  if step in manager.all_steps():
    return
  items = {'params': ocp.args.StandardSave(_copy(params)),
           'meta': ocp.args.JsonSave(dict(meta, step=int(step)))}
  if batch_stats is not None:
    items['batch_stats'] = ocp.args.StandardSave(_copy(batch_stats))
  manager.save(step, args=ocp.args.Composite(**items),
               metrics={'valid_accuracy': float(meta['valid_accuracy'])}, force=True)


def restore_best(manager: ocp.CheckpointManager, like: Any, batch_stats_like: Any = None
                 ) -> tuple[Any, Any, dict[str, Any]] | None:
  """(params, batch_stats, meta) of the best step, restored into the structure and shardings of
  `like` (and `batch_stats_like`); None when there is none."""
  manager.wait_until_finished()
  step = manager.best_step()
  if step is None:
    return None
  items = {'params': ocp.args.StandardRestore(_abstract(like)), 'meta': ocp.args.JsonRestore()}
  if batch_stats_like is not None:
    items['batch_stats'] = ocp.args.StandardRestore(_abstract(batch_stats_like))
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['params'], restored.get('batch_stats'), dict(restored['meta'])


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with the live arrays' shardings) to restore `tree` in place."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_latest(manager: ocp.CheckpointManager, state: Any, rng: jax.Array
                   ) -> tuple[Any, jax.Array, dict[str, Any]] | None:
  """Restores the newest readable checkpoint into the structure and shardings of `state`, `rng`.

  A checkpoint that cannot be read (truncated or corrupted data, a missing item, a stray numbered
  directory) gets a one-line warning and is moved aside to WORKDIR/checkpoints_unreadable/ (never
  deleted); the next older one is tried. In a multi-process job the processes agree: a step any
  of them cannot read is unreadable. Returns `(state, rng, meta)` with `state.step` set from the
  checkpoint, or None when the directory holds no checkpoint.

  Raises:
    CheckpointMismatchError: a readable checkpoint holds parameters of another model.
    CheckpointError: there are checkpoints, and none of them can be read.
  """
  tried = []
  for step in sorted(manager.all_steps(), reverse=True):
    error, restored = None, None
    try:
      check_params_match(manager.item_metadata(step)['params'], state.params,
                         f'checkpoint step {step} in {manager.directory}')
      restored = _restore(manager, step, state, rng)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore raise many kinds)
      error = e
    if not multihost.any_process(error is not None):
      return restored
    moved = _move_aside(manager, step)
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160] if error else (
        'unreadable in another process')
    logging.warning('Checkpoint step %d cannot be read (%s: %s); moved it to %s and trying the '
                    'next older one.', step, type(error).__name__, reason, moved)
    tried.append(f'{step} (moved to {moved})')
  if tried:
    manager.reload()
    raise CheckpointError(f'No readable checkpoint in {manager.directory}: tried steps '
                          f'{", ".join(tried)}. Start a new workdir or restore a backup.')
  return None


class CheckpointError(RuntimeError):
  """No checkpoint of a run could be read."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters belong to another model than the config describes."""


def check_params_match(saved: Any, target: Any, what: str) -> None:
  """Raises CheckpointMismatchError (one line) unless `saved` has `target`'s parameter shapes.

  `saved` is orbax's metadata tree (or any tree of objects with `.shape`); the message lists the
  paths that are missing, extra or of another shape.
  """
  shape = lambda x: tuple(getattr(x, 'shape', ()))
  saved = {k: shape(v) for k, v in traverse_util.flatten_dict(dict(saved), sep='/').items()}
  target = {k: shape(v) for k, v in traverse_util.flatten_dict(dict(target), sep='/').items()}
  problems = [f'{k} {saved[k]} vs {target[k]}' for k in sorted(set(saved) & set(target))
              if saved[k] != target[k]]
  problems += [f'{k} missing' for k in sorted(set(target) - set(saved))]
  problems += [f'{k} not in this model' for k in sorted(set(saved) - set(target))]
  if problems:
    shown = '; '.join(problems[:6]) + (f'; and {len(problems) - 6} more' if len(problems) > 6
                                       else '')
    raise CheckpointMismatchError(
        f'The parameters of {what} do not fit this model config (saved vs config: {shown}): '
        'use the config the run was trained with, or another workdir.')


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint `step` to WORKDIR/checkpoints_unreadable/<step>[-n]; returns the new path.

  The primary process moves it; every process then reloads the manager.
  """
  source = os.path.join(manager.directory.as_posix(), str(step))
  target_dir = os.path.join(os.path.dirname(manager.directory.as_posix()), 'checkpoints_unreadable')
  target, n = os.path.join(target_dir, str(step)), 1
  while os.path.exists(target):
    target, n = os.path.join(target_dir, f'{step}-{n}'), n + 1
  if multihost.is_primary():
    os.makedirs(target_dir, exist_ok=True)
    os.replace(source, target)
  multihost.barrier(f'vit_flax_move_aside_{step}')
  manager.reload()
  return target


def _restore(manager: ocp.CheckpointManager, step: int, state: Any, rng: jax.Array
             ) -> tuple[Any, jax.Array, dict[str, Any]]:
  """Restores checkpoint `step` (see restore_latest); raises whatever orbax raises."""
  names = [n for n in STATE_ITEMS if getattr(state, n, None) is not None]
  items = {n: ocp.args.StandardRestore(_abstract(getattr(state, n))) for n in names}
  items.update(rng=ocp.args.StandardRestore(_abstract({'rng': rng})),
               meta=ocp.args.JsonRestore())
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  step_array = jnp.asarray(step, jnp.int32)
  if isinstance(state.step, jax.Array):  # Keep the live step's dtype and (global) sharding.
    value = np.asarray(step, state.step.dtype)
    step_array = jax.make_array_from_callback((), state.step.sharding, lambda _: value)
  state = state.replace(step=step_array, **{n: restored[n] for n in names})
  return state, restored['rng']['rng'], dict(restored['meta'])


class Run(NamedTuple):
  """What `load_run` reads from a run directory."""
  config: ml_collections.ConfigDict  # The resolved config the run was trained with.
  params: Any
  step: int
  batch_stats: Any  # BatchNorm statistics, or None.


def load_run(workdir: str, checkpoint: str | int = 'last') -> Run:
  """Reads WORKDIR/config.json and one checkpoint's parameters (no optimizer needed).

  `checkpoint`: 'last' (the newest in WORKDIR/checkpoints), 'best' (WORKDIR/best, the best
  validation accuracy) or a step number. The arrays are placed on the default device.

  Raises:
    FileNotFoundError: the run has no config.json, or not that checkpoint.
    CheckpointMismatchError: config.json describes another model than the checkpoint holds (it
      was edited after training).
  """
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} not found: is {workdir!r} a vit_flax run directory?')
  with open(config_path) as f:
    config = config_lib.resolve(ml_collections.ConfigDict(json.load(f)))
  best = checkpoint == 'best'
  manager = make_best_manager(workdir) if best else make_manager(workdir, None, asynchronous=False)
  try:
    if best:
      step = manager.best_step()
    elif checkpoint == 'last':
      step = manager.latest_step()
    else:
      step = int(checkpoint) if int(checkpoint) in manager.all_steps() else None
    if step is None:
      raise FileNotFoundError(f'no {checkpoint} checkpoint under {manager.directory} (steps: '
                              f'{sorted(manager.all_steps()) or "none"})')
    metadata = manager.item_metadata(step)
    meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])
    saved_model = meta.get('model')
    if saved_model is not None and saved_model != _plain(config.model):
      changed = rundir.changed_keys(saved_model, _plain(config.model))
      raise CheckpointMismatchError(
          f'{config_path} describes another model than checkpoint step {step} holds (changed: '
          f'{", ".join(changed)}): was it edited after training?')
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = lambda tree: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    names = [n for n in ('params', 'batch_stats') if n in metadata and metadata[n] is not None]
    restored = manager.restore(step, args=ocp.args.Composite(
        **{n: ocp.args.StandardRestore(abstract(metadata[n])) for n in names}))
  finally:
    manager.close()
  return Run(config, restored['params'], int(step), restored.get('batch_stats'))


def model_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The checkpoint meta entry that ties saved parameters to their model config."""
  return {'model': _plain(config.model)}


def _plain(tree: Any) -> Any:
  """A ConfigDict (or mapping) as the plain JSON value it round-trips to."""
  return json.loads(json.dumps(tree.to_dict() if hasattr(tree, 'to_dict') else tree,
                               default=list))


def checkpoint_bytes(num_params: int, *, ema: bool, optimizer: str) -> int:
  """About the size of one checkpoint: float32 parameters, the optimizer's moments, the EMA."""
  copies = 1 + (2 if optimizer in ('adam', 'adamw') else 1) + int(ema)
  return 4 * num_params * copies + 2**20  # + metadata


def size_of(config: ml_collections.ConfigDict) -> int:
  """About the size of one checkpoint of a resolved `config` (0 when its dataset is not known by
  name); nothing is computed (`jax.eval_shape`)."""
  info = input_pipeline.DATASETS.get(config.dataset_name.split(':')[0])
  shape = input_pipeline.image_shape(config.dataset_name, config.dataset_configs)
  if info is None or shape is None:
    return 0
  model = models.build_model(config.model, info.num_classes)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)),
                                               train=False))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract['params']))
  return checkpoint_bytes(num_params, ema=bool(config.ema_decay), optimizer=config.optimizer)


def read_as_pretrained(path: str, description: str
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A vit_flax run directory (config.json) or one checkpoint step directory (params/) as a
  pretrained source for `pretrained.read_checkpoint`: (flat params, facts about the model)."""
  config = None
  if os.path.isfile(os.path.join(path, 'config.json')):
    run = load_run(path)
    config, params = run.config, run.params
  elif os.path.isdir(os.path.join(path, 'params')):
    try:
      params = ocp.StandardCheckpointer().restore(os.path.join(path, 'params'))
    except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore raise many kinds)
      raise checkpoint_formats.PretrainedError(
          f'{description}: cannot restore params ({checkpoint_formats.first_line(e)}).') from None
    config_path = os.path.join(path, os.pardir, os.pardir, 'config.json')  # WORKDIR/x/<step>
    if os.path.isfile(config_path):
      config = config_lib.resolve(ml_collections.ConfigDict(rundir.read_json(config_path)))
  else:
    raise checkpoint_formats.PretrainedError(
        f'{description}: neither a vit_flax run directory (config.json) nor a checkpoint step '
        'directory (params/).')
  facts = {}
  if config is not None:
    model = config.model.to_dict()
    facts['model'] = model
    shape = input_pipeline.image_shape(config.dataset_name, config.dataset_configs)
    patch = model['tokenizer']['patches']['size']
    if shape is not None:
      facts['grid_size'] = (shape[-3] // patch[0], shape[-2] // patch[1])  # Of (T,) H, W, C.
  return checkpoint_formats.flatten_params(params), facts
