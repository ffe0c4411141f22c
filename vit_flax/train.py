"""Trains ViT / TokenLearner classifiers: `train_and_evaluate(config, workdir)` is one whole run.

The run is setup (resolve the config, load the data, build the model and state, resume), the loop
(train up to the next log / eval / checkpoint boundary in one dispatch, then report) and the
summary. The pieces live beside it: `config` (defaults and validation), `steps` (the pure
`train_step` / `eval_step`), `loops` (jitted loops, mesh, runners), `rundir` (the files a run
writes) and `flops` (GFLOP counts).
"""

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from vit_flax import checkpoints
from vit_flax import config as config_lib
from vit_flax import flops
from vit_flax import input_pipeline
from vit_flax import loops
from vit_flax import models
from vit_flax import multihost
from vit_flax import optim
from vit_flax import preemption
from vit_flax import pretrained
from vit_flax import rundir
from vit_flax import steps


class TrainingDivergedError(RuntimeError):
  """The training loss became NaN or infinite."""


class TrainingStopped(Exception):
  """A stop signal ended the run early, after saving a checkpoint at the step reached."""


# At most this many train steps per dispatch, so a stop signal is answered within seconds.
MAX_STEPS_PER_DISPATCH = 100


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
  best_manager: Any  # The best-validation CheckpointManager, or None without checkpoints.
  log: rundir.MetricsLog
  total_steps: int
  start_step: int
  wall_time: Any  # () -> seconds of training so far, resumed segments included.
  period: dict[str, float]  # Train metric sums since the last train log (restored on resume).
  num_params: int
  gflops: float
  segments: list[dict[str, Any]]  # One per start of the run: steps, devices, processes.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates `config`, resuming from WORKDIR/checkpoints; returns the summary dict.

  A run whose last checkpoint is at the final step and has a summary.json is not trained again.
  In a multi-process job every process calls this with the same arguments (a shared workdir);
  only the primary process writes files other than checkpoints.

  Raises:
    config.ConfigError: a bad config (before any data is loaded or anything compiles).
    OSError: a workdir that cannot hold the run (before any data is loaded).
    rundir.WorkdirBusyError: another process is training in the workdir.
    checkpoints.CheckpointMismatchError: the workdir's checkpoints belong to another model.
    TrainingDivergedError: a non-finite loss or parameters (the last good checkpoint is kept).
    TrainingStopped: a stop signal (after saving a checkpoint at the step reached).
  """
  config = config_lib.resolve(config, num_devices=jax.device_count())
  workdir = os.path.abspath(workdir)
  rundir.check_workdir(workdir, checkpoints.size_of(config) if config.checkpoint else 0)
  with _workdir_lock(workdir):
    return _train_and_evaluate(config, workdir)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """The primary process holds WORKDIR/.lock for the run; the others follow its outcome."""
  lock, error = rundir.WorkdirLock(workdir), None
  if multihost.is_primary():
    try:
      lock.__enter__()
    except rundir.WorkdirBusyError as e:
      error = e
  if multihost.any_process(error is not None):
    raise error or rundir.WorkdirBusyError(
        f'{workdir} is in use: the primary process could not lock it.')
  try:
    yield
  finally:
    lock.__exit__()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """train_and_evaluate once the config is resolved and the workdir checked and locked."""
  logging.info('Experiment %r in %s on %d %s device(s) in %d process(es): %s',
               config.experiment_name, workdir, jax.device_count(), jax.default_backend(),
               jax.process_count(), jax.devices())
  ds = input_pipeline.load_dataset(config)
  total_steps = config_lib.num_train_steps(config, ds.num_train)
  if ds.in_memory and ds.num_train < config.batch_size:
    raise config_lib.ConfigError(
        f'batch_size={config.batch_size} exceeds the {ds.num_train} training examples.')
  if multihost.is_primary():
    rundir.write_config(config, workdir)
  summary_path = os.path.join(workdir, 'summary.json')
  manager = (checkpoints.make_manager(workdir, config.max_checkpoint_keep) if config.checkpoint
             else None)
  best_manager = checkpoints.make_best_manager(workdir) if config.checkpoint else None
  run = None
  try:
    if manager and manager.latest_step() == total_steps and os.path.exists(summary_path):
      logging.info('Run in %s already finished at step %d; not training again (delete the '
                   'workdir or pick another to retrain).', workdir, total_steps)
      return rundir.read_json(summary_path)
    run = _setup(config, workdir, ds, manager, best_manager, total_steps)
    step, chunk_times = _train_loop(run)
    summary = _summarise(run, step, chunk_times)
    if multihost.is_primary():
      rundir.write_json(summary_path, summary)
    logging.info('Done: test accuracy %.4f after %d steps, %s of training; summary in %s.',
                 summary['test_accuracy'], step, _duration(summary['wall_time_s']), summary_path)
    return summary
  finally:
    if run:
      run.log.close()
    for m in (manager, best_manager):
      if m:
        m.close()  # Waits for a save in flight.


def _setup(config: ml_collections.ConfigDict, workdir: str, ds: input_pipeline.Dataset,
           manager: Any, best_manager: Any, total_steps: int) -> _Run:
  """Builds the model and train state, resumes from the latest checkpoint, compiles the runners."""
  run_start = time.time()
  mesh = loops.make_mesh()
  replicated = NamedSharding(mesh, P())
  model = models.build_model(config.model, ds.num_classes,
                                 dtype=config_lib.DTYPES[config.model_dtype_str])
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.rng_seed))
  state = steps.create_train_state(init_rng, config, model, (1, *ds.image_shape), total_steps,
                                   replicated, teacher=_teacher(config, ds))
  rng = loops.replicate(rng, mesh)
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  if multihost.is_primary():
    parameter_overview.log_parameter_overview(state.params)
  num_params = int(parameter_overview.count_parameters(state.params))
  gflops = flops.forward_gflops(model, ds.image_shape)
  logging.info('Model: %s parameters, %.4f GFLOPs per image (XLA count, one multiply-add = 2 '
               'FLOPs; scenic reports half).', f'{num_params:,}', gflops)

  start_step, wall_offset, segments = 0, 0.0, []
  period = dict.fromkeys((*loops.TRAIN_SUMS, 'steps', 'seconds'), 0.0)
  restored = checkpoints.restore_latest(manager, state, rng) if manager else None
  if restored is not None:
    state, rng, meta = restored
    _check_same_model(config, meta, workdir)
    start_step, wall_offset = int(meta['step']), float(meta.get('wall_time_s', 0.0))
    period.update(meta.get('period', {}))
    segments = list(meta.get('segments', []))
    logging.info('Resumed from checkpoint step %d (%s of training so far).', start_step,
                 _duration(wall_offset))
  if start_step > total_steps:
    raise ValueError(f'The checkpoint in {workdir} is at step {start_step}, past this '
                     f"config's {total_steps} steps; use another workdir.")
  if restored is None and config.init_from is not None:
    state = _initialise_from(config, state, ds, mesh)
  segments.append({'start_step': start_step, 'end_step': start_step,
                   'devices': jax.device_count(), 'processes': jax.process_count(),
                   'device_kind': jax.devices()[0].device_kind})
  runners = loops.make_runners(ds, config, state, rng, mesh, start_step=start_step)
  log = rundir.MetricsLog(workdir, start_step)
  if start_step == 0:
    log.write(0, 0.0, {'num_params': num_params, 'gflops_per_image': gflops})
  return _Run(config=config, workdir=workdir, ds=ds, state=state, rng=rng, runners=runners,
              manager=manager, best_manager=best_manager, log=log, total_steps=total_steps,
              start_step=start_step,
              wall_time=lambda: wall_offset + time.time() - run_start, period=period,
              num_params=num_params, gflops=gflops, segments=segments)


def _initialise_from(config: ml_collections.ConfigDict, state: steps.TrainState,
                     ds: input_pipeline.Dataset, mesh: Any) -> steps.TrainState:
  """The state with `config.init_from`'s pretrained parameters (scenic's init_from surgery)."""
  f = config.init_from
  params = pretrained.load_pretrained(
      f.checkpoint_path, checkpoint_format=f.checkpoint_format, model_config=config.model,
      num_classes=ds.num_classes, image_size=ds.image_shape[-3:-1],
      num_frames=ds.image_shape[0] if len(ds.image_shape) == 4 else None,
      init_params=jax.device_get(state.params),
      source_model_config=f.model_config.to_dict() if f.model_config else None,
      restore_head=f.restore_head, restore_positional_embedding=f.restore_positional_embedding,
      restore_input_embedding=f.restore_input_embedding,
      positional_embed_size_change=f.positional_embed_size_change,
      posemb_interpolation=f.posemb_interpolation)
  params = loops.replicate(params, mesh)
  logging.info('Initialised from the %s checkpoint %s.', f.checkpoint_format, f.checkpoint_path)
  return state.replace(params=params, ema_params=None if state.ema_params is None else
                       jax.tree.map(jnp.copy, params))


def _teacher(config: ml_collections.ConfigDict, ds: input_pipeline.Dataset
             ) -> tuple[Any, Any] | None:
  """(apply_fn, variables) of `config.distillation`'s teacher run, or None."""
  if config.distillation is None:
    return None
  teacher = checkpoints.load_run(config.distillation.teacher_workdir,
                            config.distillation.teacher_checkpoint)
  model = models.build_model(teacher.config.model, ds.num_classes)
  variables = {'params': teacher.params}
  if teacher.batch_stats is not None:
    variables['batch_stats'] = teacher.batch_stats
  logging.info('Distilling from the teacher in %s (step %d).',
               config.distillation.teacher_workdir, teacher.step)
  return model.apply, jax.tree.map(np.asarray, variables)  # Host arrays: the same in every process.


def _check_same_model(config: ml_collections.ConfigDict, meta: dict[str, Any],
                      workdir: str) -> None:
  """Raises CheckpointMismatchError when the checkpoint was trained with another model config."""
  saved = meta.get('model')
  current = checkpoints.model_meta(config)['model']
  if saved is not None and saved != current:
    raise checkpoints.CheckpointMismatchError(
        f'The checkpoints in {workdir} were trained with another model config (changed: '
        f'{", ".join(rundir.changed_keys(saved, current))}): resume with the config the run '
        'started with, or use another workdir.')


def _next_boundary(run: _Run, step: int) -> int:
  """The first step after `step` at which the loop logs, evaluates, saves, or an epoch ends."""
  c = run.config
  periods = [c.log_summary_steps, c.log_eval_steps]
  periods += [c.checkpoint_steps] if run.manager else []
  periods += [run.ds.num_train // c.batch_size] if run.ds.in_memory else []
  return min([run.total_steps] + [(step // n + 1) * n for n in periods])


def _train_loop(run: _Run) -> tuple[int, list[tuple[int, float]]]:
  """Trains from run.start_step to run.total_steps; returns the final step and chunk timings.

  SIGTERM or SIGINT (Colab's stop button, a TPU preemption, SLURM, Ctrl-C) lets the dispatch in
  flight finish, saves a checkpoint at the step reached, waits for it to be written and raises
  TrainingStopped (see `preemption`). Periodic saves are written in the background; the final one
  is awaited.
  """
  c = run.config
  lr_fn = optim.make_lr_schedule(c.lr_configs.to_dict(), run.total_steps)
  step = run.start_step
  period = run.period  # Train metric sums since the last log, carried across a resume.
  chunk_times = []  # (steps, seconds) of each dispatch, for the steady-state throughput.
  with preemption.StopRequests() as stop:
    dispatch = 0
    while step < run.total_steps:
      num_steps = min(_next_boundary(run, step) - step, MAX_STEPS_PER_DISPATCH)
      t = time.time()
      run.state, sums = run.runners.run_chunk(run.state, step, num_steps)
      sums = jax.device_get(sums)  # The only wait for the device per chunk.
      seconds = time.time() - t
      if not np.isfinite(sums['loss']):
        _diverged(run, step + int(sums['steps']), float(lr_fn(step + int(sums['steps']) - 1)))
      step, dispatch = step + num_steps, dispatch + 1
      run.segments[-1]['end_step'] = step
      chunk_times.append((num_steps, seconds))
      for k in period:
        period[k] += seconds if k == 'seconds' else float(sums[k])
      if step % c.log_summary_steps == 0 or step == run.total_steps:
        _log_train(run, step, period, float(lr_fn(step - 1)))
        period = dict.fromkeys(period, 0.0)
      if step % c.log_eval_steps == 0 or step == run.total_steps:
        valid = _log_eval(run, step, 'valid')
        if valid and run.best_manager:
          _offer_best(run, step, valid[0])
      stopping = stop.requested(dispatch) and step < run.total_steps
      due = step % c.checkpoint_steps == 0 or step == run.total_steps
      if run.manager and (due or stopping):
        if not _all_finite(run.state.params):  # Never save (or call good) exploded parameters.
          _diverged(run, step, float(lr_fn(step - 1)), what='parameters')
        meta = {'wall_time_s': run.wall_time(), 'period': period, 'segments': run.segments,
                **checkpoints.model_meta(c)}
        checkpoints.save(run.manager, step, run.state, run.rng, meta,
                    wait=stopping or step == run.total_steps)
      if stopping:
        where = f'saved a checkpoint at step {step}' if run.manager else 'checkpoints are off'
        raise TrainingStopped(
            f'Stopped by {stop.signal} at step {step}/{run.total_steps}; {where}. Run the same '
            'command again to resume.')
  return step, chunk_times


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _diverged(run: _Run, step: int, learning_rate: float, what: str = 'training loss') -> None:
  """Raises TrainingDivergedError naming the step, the learning rate and the last checkpoint."""
  last = run.manager.latest_step() if run.manager else None
  where = f'step {last} in {run.manager.directory.as_posix()}' if last else 'none'
  raise TrainingDivergedError(
      f'Non-finite {what} at step {step} (learning rate {learning_rate:.3g}): stopping. '
      f'The last good checkpoint is {where}; lower lr_configs.base_learning_rate or set '
      'max_grad_norm, and train in a new workdir (or delete the checkpoints after it).')


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


def _log_eval(run: _Run, step: int, split: str, *, state: steps.TrainState | None = None,
              log: bool = True, label: str | None = None
              ) -> tuple[dict[str, float], float] | None:
  """Evaluates `split` (of `state`, default the run's); logs (and, with `log`, writes) its loss
  and accuracy (and the EMA's); returns them and images/s.

  `label` names what was evaluated in the log line (default `step N`) and leaves out the EMA
  column: a labelled state is a restored checkpoint, whose EMA slot holds its own parameters.
  """
  result = run.runners.evaluate(state or run.state, split)
  if result is None:
    return None
  sums, seconds = result
  count = max(float(sums['count']), 1.0)
  scalars = {f'{split}_loss': float(sums['loss']) / count,
             f'{split}_accuracy': float(sums['correct']) / count}
  if 'ema_correct' in sums:
    scalars.update({f'{split}_ema_loss': float(sums['ema_loss']) / count,
                    f'{split}_ema_accuracy': float(sums['ema_correct']) / count})
  if log:
    run.log.write(step, run.wall_time(), scalars)
  ema = (f' | EMA accuracy {scalars[f"{split}_ema_accuracy"]:.4f}'
         if 'ema_correct' in sums and label is None else '')
  logging.info('%s | %s loss %.4f | %s accuracy %.4f%s | %d images in %.1f s',
               label or f'step {step}', split,
               scalars[f'{split}_loss'], split, scalars[f'{split}_accuracy'], ema, int(count),
               seconds)
  return scalars, count / max(seconds, 1e-9)


def _offer_best(run: _Run, step: int, valid: dict[str, float]) -> None:
  """Saves the evaluated parameters (EMA or raw, whichever scored higher) to WORKDIR/best.

  orbax keeps the step with the highest validation accuracy.
  """
  use_ema = valid.get('valid_ema_accuracy', -1.0) > valid['valid_accuracy']
  accuracy = valid['valid_ema_accuracy'] if use_ema else valid['valid_accuracy']
  params = run.state.ema_params if use_ema else run.state.params
  checkpoints.save_best(run.best_manager, step, params,
                   {'valid_accuracy': accuracy, 'params': 'ema' if use_ema else 'raw',
                    **checkpoints.model_meta(run.config)}, run.state.batch_stats)


def _summarise(run: _Run, step: int, chunk_times: list[tuple[int, float]]) -> dict[str, Any]:
  """Evaluates the test split and returns summary.json's contents."""
  test = _log_eval(run, step, 'test')
  if test is None:
    raise ValueError(f'Dataset {run.ds.name} has no test split to report.')
  steady = chunk_times[1:] or chunk_times  # The first dispatch pays one-off start-up costs.
  ds = run.ds
  records = run.log.records()
  return {
      'test_accuracy': test[0]['test_accuracy'], 'test_loss': test[0]['test_loss'],
      **{k: v for k, v in test[0].items() if k.startswith('test_ema_')},
      'best': _best_summary(run, step),
      'time_to_accuracy': rundir.time_to_accuracy(records, run.config.accuracy_thresholds,
                                           run.config.batch_size),
      'num_params': run.num_params, 'gflops_per_image': run.gflops,
      'gflops_per_image_counting': 'XLA cost analysis, forward pass at batch 1, a multiply-add '
                                   'counts as 2 FLOPs (scenic counts 1)',
      'train_images_per_s': sum(n for n, _ in steady) * run.config.batch_size /
                            max(sum(t for _, t in steady), 1e-9) if steady else None,
      'eval_images_per_s': test[1], 'wall_time_s': run.wall_time(), 'steps': step,
      'dataset': {'name': ds.name, 'source': ds.source, 'num_train': ds.num_train,
                  'num_valid': ds.num_valid, 'num_test': ds.num_test},
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'processes': jax.process_count(), 'segments': run.segments,
      'config': json.loads(run.config.to_json_best_effort()),
      'eval_history': [{k: r[k] for k in ('step', 'wall_time_s', 'valid_accuracy',
                                          'valid_ema_accuracy') if k in r}
                       for r in records if 'valid_accuracy' in r],
  }


def _best_summary(run: _Run, step: int) -> dict[str, Any] | None:
  """The best-validation checkpoint's step, accuracy and test accuracy (None without one)."""
  restored = checkpoints.restore_best(run.best_manager, run.state.params,
                                 run.state.batch_stats) if run.best_manager else None
  if restored is None:
    return None
  params, batch_stats, meta = restored
  state = run.state.replace(params=params, batch_stats=batch_stats)
  if state.ema_params is not None:  # Same tree structure as the compiled evaluation's state.
    state = state.replace(ema_params=params)
  test = _log_eval(run, step, 'test', state=state, log=False,
                   label=f'best-validation checkpoint (step {meta["step"]}, {meta["params"]})')
  return {'step': meta['step'], 'params': meta['params'], 'valid_accuracy': meta['valid_accuracy'],
          'test_accuracy': test[0]['test_accuracy'], 'test_loss': test[0]['test_loss']}


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'
