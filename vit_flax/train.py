"""Trains ViT / TokenLearner classifiers: `train_and_evaluate(config, workdir)` is one whole run.

The run is setup (resolve the config, load the data, build the model and state, resume), the loop
(train up to the next log / eval / checkpoint boundary in one dispatch, then report) and the
summary. The pieces live beside it: `config` (defaults and validation), `steps` (the pure
`train_step` / `eval_step`), `loops` (jitted loops, mesh, runners), `rundir` (the files a run
writes) and `flops` (GFLOP counts).
"""

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from vit_flax import config as config_lib
from vit_flax import flops
from vit_flax import input_pipeline
from vit_flax import loops
from vit_flax import optim
from vit_flax import rundir
from vit_flax import steps


class TrainingDivergedError(RuntimeError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class _Run:
  """What the loop needs, built by `_setup`."""
  config: ml_collections.ConfigDict
  workdir: str
  ds: input_pipeline.Dataset
  state: steps.TrainState
  rng: jax.Array
  runners: loops.Runners
  manager: Any  # orbax CheckpointManager, or None without checkpoints.
  log: rundir.MetricsLog
  total_steps: int
  start_step: int
  wall_time: Any  # () -> seconds of training so far, resumed segments included.
  num_params: int
  gflops: float


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config`, resuming from WORKDIR/checkpoints; returns the summary dict.

  A run whose last checkpoint is at the final step and has a summary.json is not trained again.
  Raises config.ConfigError for a bad config (before any data is loaded or anything compiles) and
  TrainingDivergedError on a non-finite loss (keeping the last good checkpoint).
  """
  config = config_lib.resolve(config, num_devices=jax.device_count())
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  logging.info('Experiment %r in %s on %d %s device(s): %s', config.experiment_name, workdir,
               jax.device_count(), jax.default_backend(), jax.devices())
  ds = input_pipeline.load_dataset(config)
  total_steps = config_lib.num_train_steps(config, ds.num_train)
  if ds.in_memory and ds.num_train < config.batch_size:
    raise config_lib.ConfigError(
        f'batch_size={config.batch_size} exceeds the {ds.num_train} training examples.')
  rundir.write_config(config, workdir)
  summary_path = os.path.join(workdir, 'summary.json')
  manager = rundir.make_manager(workdir, config.max_checkpoint_keep) if config.checkpoint else None
  run = None
  try:
    if manager and manager.latest_step() == total_steps and os.path.exists(summary_path):
      logging.info('Run in %s already finished at step %d; not training again (delete the '
                   'workdir or pick another to retrain).', workdir, total_steps)
      return rundir.read_json(summary_path)
    run = _setup(config, workdir, ds, manager, total_steps)
    step, chunk_times = _train_loop(run)
    summary = _summarise(run, step, chunk_times)
    rundir.write_json(summary_path, summary)
    logging.info('Done: test accuracy %.4f after %d steps, %s of training; summary in %s.',
                 summary['test_accuracy'], step, _duration(summary['wall_time_s']), summary_path)
    return summary
  finally:
    if run:
      run.log.close()
    if manager:
      manager.close()


def _setup(config: ml_collections.ConfigDict, workdir: str, ds: input_pipeline.Dataset,
           manager: Any, total_steps: int) -> _Run:
  """Builds the model and train state, resumes from the latest checkpoint, compiles the runners."""
  run_start = time.time()
  mesh = loops.make_mesh()
  replicated = NamedSharding(mesh, P())
  model = config_lib.build_model(config.model, ds.num_classes,
                                 dtype=config_lib.DTYPES[config.model_dtype_str])
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.rng_seed))
  state = steps.create_train_state(init_rng, config, model, (1, *ds.image_shape), total_steps,
                                   replicated)
  rng = jax.device_put(rng, replicated)
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  parameter_overview.log_parameter_overview(state.params)
  num_params = int(parameter_overview.count_parameters(state.params))
  gflops = flops.forward_gflops(model, ds.image_shape)
  logging.info('Model: %s parameters, %.4f GFLOPs per image (XLA count, one multiply-add = 2 '
               'FLOPs; scenic reports half).', f'{num_params:,}', gflops)

  start_step, wall_offset = 0, 0.0
  restored = rundir.restore_latest(manager, state, rng) if manager else None
  if restored is not None:
    state, rng, meta = restored
    start_step, wall_offset = int(meta['step']), float(meta.get('wall_time_s', 0.0))
    logging.info('Resumed from checkpoint step %d (%s of training so far).', start_step,
                 _duration(wall_offset))
  if start_step > total_steps:
    raise ValueError(f'The checkpoint in {workdir} is at step {start_step}, past this '
                     f"config's {total_steps} steps; use another workdir.")
  runners = loops.make_runners(ds, config, state, rng, mesh, start_step=start_step)
  log = rundir.MetricsLog(workdir, start_step)
  if start_step == 0:
    log.writer.write_scalars(0, {'num_params': num_params, 'gflops_per_image': gflops})
  return _Run(config=config, workdir=workdir, ds=ds, state=state, rng=rng, runners=runners,
              manager=manager, log=log, total_steps=total_steps, start_step=start_step,
              wall_time=lambda: wall_offset + time.time() - run_start, num_params=num_params,
              gflops=gflops)


def _next_boundary(run: _Run, step: int) -> int:
  """The first step after `step` at which the loop logs, evaluates, saves, or an epoch ends."""
  c = run.config
  periods = [c.log_summary_steps, c.log_eval_steps]
  periods += [c.checkpoint_steps] if run.manager else []
  periods += [run.ds.num_train // c.batch_size] if run.ds.in_memory else []
  return min([run.total_steps] + [(step // n + 1) * n for n in periods])


def _train_loop(run: _Run) -> tuple[int, list[tuple[int, float]]]:
  """Trains from run.start_step to run.total_steps; returns the final step and chunk timings."""
  c = run.config
  lr_fn = optim.make_lr_schedule(c.lr_configs.to_dict(), run.total_steps)
  step = run.start_step
  period = dict.fromkeys((*loops.TRAIN_SUMS, 'steps', 'seconds'), 0.0)
  chunk_times = []  # (steps, seconds) of each dispatch, for the steady-state throughput.
  while step < run.total_steps:
    num_steps = _next_boundary(run, step) - step
    t = time.time()
    run.state, sums = run.runners.run_chunk(run.state, step, num_steps)
    sums = jax.device_get(sums)  # The only wait for the device per chunk.
    seconds = time.time() - t
    if not np.isfinite(sums['loss']):
      last = run.manager.latest_step() if run.manager else None
      raise TrainingDivergedError(
          f'Non-finite training loss at step {step + int(sums["steps"])}: stopping. The last '
          'good checkpoint is '
          f'{"step " + str(last) + " in " + run.manager.directory.as_posix() if last else "none"}'
          '; lower lr_configs.base_learning_rate or set max_grad_norm and re-run.')
    step += num_steps
    chunk_times.append((num_steps, seconds))
    for k in period:
      period[k] += seconds if k == 'seconds' else float(sums[k])
    if step % c.log_summary_steps == 0 or step == run.total_steps:
      _log_train(run, step, period, float(lr_fn(step - 1)))
      period = dict.fromkeys(period, 0.0)
    if step % c.log_eval_steps == 0 or step == run.total_steps:
      _log_eval(run, step, 'valid')
    if run.manager and (step % c.checkpoint_steps == 0 or step == run.total_steps):
      rundir.save(run.manager, step, run.state, run.rng, {'wall_time_s': run.wall_time()})
  return step, chunk_times


def _log_train(run: _Run, step: int, period: dict[str, float], learning_rate: float) -> None:
  """Writes and logs the train metrics averaged over `period`."""
  n = period['steps']
  images_per_s = n * run.config.batch_size / max(period['seconds'], 1e-9)
  scalars = {'train_loss': period['loss'] / n, 'train_accuracy': period['accuracy'] / n,
             'learning_rate': learning_rate, 'train_images_per_s': images_per_s,
             'l2_grads': period['l2_grads'] / n}
  run.log.write(step, run.wall_time(), scalars)
  eta = (run.total_steps - step) * run.config.batch_size / images_per_s
  logging.info('step %d/%d (%.0f%%) | loss %.4f | accuracy %.4f | lr %.3g | %.0f images/s | '
               'ETA %s', step, run.total_steps, 100 * step / run.total_steps,
               scalars['train_loss'], scalars['train_accuracy'], learning_rate, images_per_s,
               _duration(eta))


def _log_eval(run: _Run, step: int, split: str) -> tuple[dict[str, float], float] | None:
  """Evaluates `split`; writes and logs its loss and accuracy; returns them and images/s."""
  result = run.runners.evaluate(run.state, split)
  if result is None:
    return None
  sums, seconds = result
  count = max(float(sums['count']), 1.0)
  scalars = {f'{split}_loss': float(sums['loss']) / count,
             f'{split}_accuracy': float(sums['correct']) / count}
  run.log.write(step, run.wall_time(), scalars)
  logging.info('step %d | %s loss %.4f | %s accuracy %.4f | %d images in %.1f s', step, split,
               scalars[f'{split}_loss'], split, scalars[f'{split}_accuracy'], int(count), seconds)
  return scalars, count / max(seconds, 1e-9)


def _summarise(run: _Run, step: int, chunk_times: list[tuple[int, float]]) -> dict[str, Any]:
  """Evaluates the test split and returns summary.json's contents."""
  test = _log_eval(run, step, 'test')
  if test is None:
    raise ValueError(f'Dataset {run.ds.name} has no test split to report.')
  steady = chunk_times[1:] or chunk_times  # The first dispatch pays one-off start-up costs.
  ds = run.ds
  return {
      'test_accuracy': test[0]['test_accuracy'], 'test_loss': test[0]['test_loss'],
      'num_params': run.num_params, 'gflops_per_image': run.gflops,
      'gflops_per_image_counting': 'XLA cost analysis, forward pass at batch 1, a multiply-add '
                                   'counts as 2 FLOPs (scenic counts 1)',
      'train_images_per_s': sum(n for n, _ in steady) * run.config.batch_size /
                            max(sum(t for _, t in steady), 1e-9) if steady else None,
      'eval_images_per_s': test[1], 'wall_time_s': run.wall_time(), 'steps': step,
      'dataset': {'name': ds.name, 'source': ds.source, 'num_train': ds.num_train,
                  'num_valid': ds.num_valid, 'num_test': ds.num_test},
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'config': json.loads(run.config.to_json_best_effort()),
      'eval_history': [{k: r[k] for k in ('step', 'wall_time_s', 'valid_accuracy')}
                       for r in run.log.records() if 'valid_accuracy' in r],
  }


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'
