"""A trained run ready for inference, shared by the `evaluate` and `predict` commands.

Both name a run directory (`--workdir`) and one of its checkpoints (`--checkpoint`): 'last' (the
newest in WORKDIR/checkpoints), 'best' (WORKDIR/best, the best validation accuracy) or a step
number in WORKDIR/checkpoints. `check_run` answers a bad choice in one line (`cli.FlagError`)
from the directory listing alone, before anything loads or compiles; `load` then restores the
parameters (`checkpoints.load_run`) and builds the model they belong to.
"""

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import ml_collections

from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import input_pipeline
from vit_flax import models

CHECKPOINT_NAMES = ('last', 'best')
_CHECKPOINT_DIRS = {'last': 'checkpoints', 'best': 'best'}  # Where each name's steps are saved.


@dataclasses.dataclass
class TrainedModel:
  """A run's model with one checkpoint's variables."""
  config: ml_collections.ConfigDict  # The resolved config the run was trained with.
  model: nn.Module
  variables: dict[str, Any]  # {'params': ...} plus 'batch_stats' for BatchNorm models.
  checkpoint: str  # 'last', 'best' or the step asked for, as given.
  step: int  # The step the parameters were saved at.
  num_classes: int
  class_names: tuple[str, ...]


def saved_steps(workdir: str, name: str) -> list[int]:
  """The steps saved under WORKDIR/checkpoints ('last') or WORKDIR/best ('best'), ascending.

  orbax writes a step under a temporary name and renames it when complete, so a numbered
  directory is a finished checkpoint.
  """
  directory = os.path.join(workdir, _CHECKPOINT_DIRS[name])
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def check_run(workdir: str | None, checkpoint: str) -> dict[str, Any]:
  """Checks that `workdir` is a run directory holding `checkpoint`; returns its config.json.

  The config comes back as the plain dict in the file (not resolved: that needs the imports a
  model needs). Raises cli.FlagError naming the problem; a missing checkpoint lists those there
  are.
  """
  if not workdir:
    raise cli.FlagError('--workdir is required: a run directory (config.json, checkpoints/).')
  if not os.path.isdir(workdir):
    raise cli.FlagError(f'--workdir={workdir} is not a directory.')
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise cli.FlagError(f'--workdir={workdir} has no config.json: is it a vit_flax run '
                        'directory?')
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise cli.FlagError(f'{config_path} cannot be read as JSON ({e}).') from None
  if not isinstance(config, dict) or 'dataset_name' not in config:
    raise cli.FlagError(f'{config_path} is not a vit_flax run config (it has no dataset_name).')
  name = str(checkpoint)
  if name not in CHECKPOINT_NAMES and not name.isdigit():
    raise cli.FlagError(f'--checkpoint must be best, last or a step number, got {name!r}.')
  steps = saved_steps(workdir, 'last')
  found = saved_steps(workdir, name) if name in CHECKPOINT_NAMES else (
      [int(name)] if int(name) in steps else [])
  if not found:
    where = os.path.join(workdir, _CHECKPOINT_DIRS.get(name, 'checkpoints'))
    what = f'{name} checkpoint' if name in CHECKPOINT_NAMES else f'checkpoint step {name}'
    raise cli.FlagError(f'No {what} in {where}; available: {available_checkpoints(workdir)}.')
  return config


def available_checkpoints(workdir: str) -> str:
  """'best (step 20), last (step 40), steps 30, 40', or 'none' for a run without checkpoints."""
  best, steps = saved_steps(workdir, 'best'), saved_steps(workdir, 'last')
  parts = [f'best (step {best[-1]})'] if best else []
  if steps:
    parts += [f'last (step {steps[-1]})', 'steps ' + ', '.join(map(str, steps))]
  return ', '.join(parts) or 'none (was the run trained with checkpoint=False?)'


def known_num_classes(config: dict[str, Any]) -> int | None:
  """The class count of a config's dataset when `input_pipeline.DATASETS` knows it, else None."""
  info = input_pipeline.DATASETS.get(str(config['dataset_name']).split(':')[0])
  return info.num_classes if info else None


def class_names(dataset_name: str, num_classes: int) -> tuple[str, ...]:
  """The dataset's class names from `input_pipeline.DATASETS`, else the label numbers."""
  info = input_pipeline.DATASETS.get(dataset_name.split(':')[0])
  names = info.class_names if info else None
  if names is None or len(names) != num_classes:
    return tuple(str(k) for k in range(num_classes))
  return tuple(names)


def load(workdir: str, checkpoint: str) -> TrainedModel:
  """Restores `checkpoint` of the run in `workdir` (see `check_run`) and builds its model.

  Raises:
    FileNotFoundError, checkpoints.CheckpointMismatchError: from `checkpoints.load_run`.
  """
  name = str(checkpoint)
  run = checkpoints.load_run(workdir, name if name in CHECKPOINT_NAMES else int(name))
  # The head's width is the class count the parameters were trained for.
  num_classes = int(run.params['output_projection']['bias'].shape[-1])
  model = models.build_model(run.config.model, num_classes, dtype=run.config.model_dtype_str)
  variables = {'params': run.params}
  if run.batch_stats is not None:
    variables['batch_stats'] = run.batch_stats
  return TrainedModel(config=run.config, model=model, variables=variables, checkpoint=name,
                      step=run.step, num_classes=num_classes,
                      class_names=class_names(run.config.dataset_name, num_classes))
