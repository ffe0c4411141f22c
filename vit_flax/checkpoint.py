"""Orbax checkpoints of a training run: WORKDIR/checkpoints/<step>/{params,opt_state,rng,meta}.

Parameters, optimizer state and the run's base rng are separate items, so `load_run` restores the
parameters alone (for visualisation and comparison) without rebuilding the optimizer. `meta` is a
small JSON item: the step and the accumulated training wall time.
"""

import json
import logging as std_logging
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp


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
    config = ml_collections.ConfigDict(json.load(f))
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
