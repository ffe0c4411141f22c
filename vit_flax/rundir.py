"""A run directory's files: orbax checkpoints, config.json, metrics.jsonl and summary.json.

WORKDIR/checkpoints/<step>/{params,opt_state,rng,meta} are orbax checkpoints.
Parameters, optimizer state and the run's base rng are separate items, so `load_run` restores the
parameters alone (for visualisation and comparison) without rebuilding the optimizer. `meta` is a
small JSON item: the step and the accumulated training wall time.
"""

import json
import logging as std_logging
import os
import socket
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp

from vit_flax import config as config_lib


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO chatter (dozens of lines per save) from the absl log; keeps warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def make_manager(workdir: str, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
  """A CheckpointManager at WORKDIR/checkpoints keeping the newest `max_to_keep` steps.

  Saving is synchronous: the train step donates the state's buffers right after a save, so the
  arrays must be on disk (not merely queued) before `save` returns.
  """
  _quiet_orbax()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  handlers = {name: ocp.StandardCheckpointHandler()
              for name in ('params', 'opt_state', 'rng', 'ema_params')}
  handlers['meta'] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def make_best_manager(workdir: str) -> ocp.CheckpointManager:
  """A CheckpointManager at WORKDIR/best keeping the one step with the best `valid_accuracy`.

  orbax's `best_fn` ranks the saved steps by the metrics passed to `save_best`.
  """
  _quiet_orbax()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=False,
      best_fn=lambda metrics: metrics['valid_accuracy'], best_mode='max')
  directory = os.path.join(os.path.abspath(workdir), 'best')
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      'params': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})


def _quiet_orbax() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())


def save(manager: ocp.CheckpointManager, step: int, state: Any, rng: jax.Array,
         meta: dict[str, Any]) -> None:
  """Writes the state's params, opt_state (and ema_params), `rng` and `meta` as step `step`."""
  items = dict(params=ocp.args.StandardSave(state.params),
               opt_state=ocp.args.StandardSave(state.opt_state),
               rng=ocp.args.StandardSave({'rng': rng}),
               meta=ocp.args.JsonSave(dict(meta, step=int(step))))
  if getattr(state, 'ema_params', None) is not None:
    items['ema_params'] = ocp.args.StandardSave(state.ema_params)
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()


def save_best(manager: ocp.CheckpointManager, step: int, params: Any,
              meta: dict[str, Any]) -> None:
  """Offers `params` at `step` to the best-checkpoint manager, ranked by meta['valid_accuracy'].

  A step already there (a resumed run evaluating a step again) is left as it is.
  """
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta, step=int(step)))),
      metrics={'valid_accuracy': float(meta['valid_accuracy'])}, force=True)
  manager.wait_until_finished()


def restore_best(manager: ocp.CheckpointManager, like: Any) -> tuple[Any, dict[str, Any]] | None:
  """(params, meta) of the best step, restored into the structure and shardings of `like`."""
  step = manager.best_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore()))
  return restored['params'], dict(restored['meta'])


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with the live arrays' shardings) to restore `tree` in place."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_latest(manager: ocp.CheckpointManager, state: Any, rng: jax.Array
                   ) -> tuple[Any, jax.Array, dict[str, Any]] | None:
  """Restores the newest readable checkpoint into the structure and shardings of `state`, `rng`.

  A checkpoint that cannot be read (truncated or corrupted data, a missing item, a stray numbered
  directory) gets a one-line warning and is moved aside to WORKDIR/checkpoints_unreadable/ (never
  deleted); the next older one is tried. Returns `(state, rng, meta)` with `state.step` set from
  the checkpoint, or None when the directory holds no checkpoint.

  Raises:
    CheckpointError: there are checkpoints, and none of them can be read.
  """
  tried = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _restore(manager, step, state, rng)
    except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore raise many kinds)
      moved = _move_aside(manager, step)
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
      logging.warning('Checkpoint step %d cannot be read (%s: %s); moved it to %s and trying the '
                      'next older one.', step, type(e).__name__, reason, moved)
      tried.append(f'{step} (moved to {moved})')
  if tried:
    manager.reload()
    raise CheckpointError(f'No readable checkpoint in {manager.directory}: tried steps '
                          f'{", ".join(tried)}. Start a new workdir or restore a backup.')
  return None


class CheckpointError(RuntimeError):
  """No checkpoint of a run could be read."""


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint `step` to WORKDIR/checkpoints_unreadable/<step>[-n]; returns the new path."""
  source = os.path.join(manager.directory.as_posix(), str(step))
  target_dir = os.path.join(os.path.dirname(manager.directory.as_posix()), 'checkpoints_unreadable')
  os.makedirs(target_dir, exist_ok=True)
  target, n = os.path.join(target_dir, str(step)), 1
  while os.path.exists(target):
    target, n = os.path.join(target_dir, f'{step}-{n}'), n + 1
  os.replace(source, target)
  manager.reload()
  return target


def _restore(manager: ocp.CheckpointManager, step: int, state: Any, rng: jax.Array
             ) -> tuple[Any, jax.Array, dict[str, Any]]:
  """Restores checkpoint `step` (see restore_latest); raises whatever orbax raises."""
  items = dict(params=ocp.args.StandardRestore(_abstract(state.params)),
               opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
               rng=ocp.args.StandardRestore(_abstract({'rng': rng})),
               meta=ocp.args.JsonRestore())
  has_ema = getattr(state, 'ema_params', None) is not None
  if has_ema:
    items['ema_params'] = ocp.args.StandardRestore(_abstract(state.ema_params))
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  step_array = jax.numpy.asarray(step, jax.numpy.int32)
  if isinstance(state.step, jax.Array):  # Keep the live step's dtype and sharding.
    step_array = jax.device_put(step_array.astype(state.step.dtype), state.step.sharding)
  state = state.replace(step=step_array, params=restored['params'],
                        opt_state=restored['opt_state'])
  if has_ema:
    state = state.replace(ema_params=restored['ema_params'])
  return state, restored['rng']['rng'], dict(restored['meta'])


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, Any, int]:
  """Reads WORKDIR/config.json and the latest checkpoint's parameters (no optimizer needed).

  Returns `(config, params, step)`; the parameters are placed on the default device.
  Raises FileNotFoundError when the run has no config.json or no checkpoint.
  """
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} not found: is {workdir!r} a vit_flax run directory?')
  with open(config_path) as f:
    config = config_lib.resolve(ml_collections.ConfigDict(json.load(f)))
  manager = make_manager(workdir, max_to_keep=None)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {os.path.join(workdir, "checkpoints")}')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  metadata = manager.item_metadata(step)['params']
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract)))
  manager.close()
  return config, restored['params'], int(step)


class MetricsLog:
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
    return read_metrics(os.path.dirname(self.path))

  def write(self, step: int, wall_time_s: float, scalars: dict[str, float]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'wall_time_s': round(wall_time_s, 3), **scalars}) + '\n')
    self.writer.write_scalars(step, scalars)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON atomically (a temporary file, then a rename)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(path + '.tmp', path)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
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
  write_json(path, new)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl, one dict per line (empty if there is none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class WorkdirBusyError(RuntimeError):
  """Another live process is training in this workdir."""


class WorkdirLock:
  """WORKDIR/.lock, holding the pid and host of the process training there.

  Taking it fails with a one-line WorkdirBusyError naming the holder while that process lives; a
  lock left by a dead process on this host is taken over with a warning. Released on exit.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self.held = False

  def __enter__(self) -> 'WorkdirLock':
    me = {'pid': os.getpid(), 'host': socket.gethostname()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        holder = self._holder()
        if holder.get('host') == me['host'] and not _alive(holder.get('pid')):
          logging.warning('Taking over the stale lock %s of process %s, which is gone.',
                          self.path, holder.get('pid'))
          os.remove(self.path)
          continue
        raise WorkdirBusyError(
            f'{os.path.dirname(self.path)} is in use by process {holder.get("pid")} on '
            f'{holder.get("host")} (lock file {self.path}); use another --workdir, or delete the '
            'lock if that process is gone.') from None
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirBusyError(f'Could not take the lock {self.path}.')

  def _holder(self) -> dict[str, Any]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def __exit__(self, *exc) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False


def _alive(pid: Any) -> bool:
  """Whether process `pid` exists on this host."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def check_workdir(workdir: str) -> None:
  """Raises a one-line OSError unless `workdir` can hold a run: writable, `checkpoints` a dir."""
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise OSError(f'Cannot write to workdir {workdir}.')
  for name in ('checkpoints', 'best'):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and not os.path.isdir(path):
      raise OSError(f'{path} exists and is not a directory: move it away or pick another workdir.')
