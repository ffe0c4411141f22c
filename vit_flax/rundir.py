"""A run directory's files: orbax checkpoints, config.json, metrics.jsonl and summary.json.

WORKDIR/checkpoints/<step>/{params,opt_state,rng,meta} are orbax checkpoints.
Parameters, optimizer state and the run's base rng are separate items, so `load_run` restores the
parameters alone (for visualisation and comparison) without rebuilding the optimizer. `meta` is a
small JSON item: the step and the accumulated training wall time.
"""

import json
import logging as std_logging
import os
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
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  handlers = {name: ocp.StandardCheckpointHandler() for name in ('params', 'opt_state', 'rng')}
  handlers['meta'] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, rng: jax.Array,
         meta: dict[str, Any]) -> None:
  """Writes `state.params`, `state.opt_state`, `rng` and the JSON `meta` as checkpoint `step`."""
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      rng=ocp.args.StandardSave({'rng': rng}),
      meta=ocp.args.JsonSave(dict(meta, step=int(step)))), force=True)
  manager.wait_until_finished()


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with the live arrays' shardings) to restore `tree` in place."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_latest(manager: ocp.CheckpointManager, state: Any, rng: jax.Array
                   ) -> tuple[Any, jax.Array, dict[str, Any]] | None:
  """Restores the latest checkpoint into the structure and shardings of `state` and `rng`.

  Returns `(state, rng, meta)` with `state.step` set from the checkpoint, or None when the
  directory holds no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(state.params)),
      opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
      rng=ocp.args.StandardRestore(_abstract({'rng': rng})),
      meta=ocp.args.JsonRestore()))
  step_array = jax.numpy.asarray(step, jax.numpy.int32)
  if isinstance(state.step, jax.Array):  # Keep the live step's dtype and sharding.
    step_array = jax.device_put(step_array.astype(state.step.dtype), state.step.sharding)
  state = state.replace(step=step_array, params=restored['params'],
                        opt_state=restored['opt_state'])
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
