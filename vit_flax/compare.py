r"""Trains models side by side: a config with and without its TokenLearner, a sweep over the
learner's size and place, or any list of configs as shipped.

  python -m vit_flax.compare --config=configs/mnist_tl.py [--workdir=DIR] [--target_accuracy=0.98]
  python -m vit_flax.compare --config=configs/mnist_tl.py --num_tokens=8,16 --tokenlearner_loc=1,2
  python -m vit_flax.compare --configs=mnist_vit.py,mnist_tl.py,configs/my_mixer.py
  python -m vit_flax.compare --config=configs/cifar10_tl.py --benchmark_only

`--config` runs `train.train_and_evaluate` on the config's model without its TokenLearner (ViT:
`tokenizer.type='patch'`, WORKDIR/vit) and with it (`'dynamic'`, WORKDIR/tl), with the same seed,
data order and number of steps; a sweep over `--num_tokens` / `--tokenlearner_loc` trains one
TokenLearner run per combination instead (WORKDIR/tl_S{n}_L{loc}). `--configs` trains each config
as it is, in WORKDIR/<config name> (a name that is not a file names a shipped config, as in
`vit_flax.main`). Every config is checked before the first run trains; finished runs are reused
(the trainer does not retrain them). From each run's summary.json and metrics.jsonl it writes
(`comparison_report`), one row per run, the first being the baseline:

* WORKDIR/comparison.md: the model, parameters, GFLOPs per image, train and eval images/s, final
  test accuracy (raw, EMA, best-validation checkpoint), wall time and the wall time at which an
  evaluation first reached the target accuracy, then the time-to-accuracy table;
* WORKDIR/comparison.json: the same rows, plus each run's accuracy curve;
* WORKDIR/accuracy_vs_time.png: accuracy against wall time and against step, every run;
* WORKDIR/accuracy_vs_gflops.png (sweeps): final test accuracy against GFLOPs per image.

`--benchmark_only` trains nothing: it times the train and eval steps of every model with
`benchmark.benchmark_model` and writes the table without the accuracy columns.
"""

from collections.abc import Sequence
import json
import os
import pathlib
import platform
import time
from typing import Any

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from vit_flax import benchmark
from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import comparison_report as report
from vit_flax import config as config_lib
from vit_flax import config_files
from vit_flax import flops
from vit_flax import input_pipeline
from vit_flax import loops
from vit_flax import models
from vit_flax import pretrained
from vit_flax import rundir
from vit_flax import train


def variants(config: ml_collections.ConfigDict, num_tokens: Sequence[int] = (),
             tokenlearner_locs: Sequence[int] = ()) -> list[tuple[str, ml_collections.ConfigDict]]:
  """[(run name, config)]: the model without its TokenLearner, then with it or every sweep point."""
  runs = [('vit', models.with_tokenlearner(config, False))]
  if not num_tokens and not tokenlearner_locs:
    return runs + [('tl', models.with_tokenlearner(config, True))]
  model = models.resolve_model(config.model)
  learner = model['tokenizer'] if model['name'] == 'vit' else model  # Flat for other families.
  for s in num_tokens or [learner['num_tokens']]:
    for loc in tokenlearner_locs or [learner['tokenlearner_loc']]:
      runs.append((f'tl_S{s}_L{loc}', models.with_tokenlearner(  # A loc of None: resolve says.
          config, True, num_tokens=int(s), tokenlearner_loc=None if loc is None else int(loc))))
  return runs


def load_configs(specs: Sequence[str]) -> list[tuple[str, ml_collections.ConfigDict]]:
  """[(name, config)] of `--configs`' PATH[:ARG] entries, each named by its file name.

  Raises ConfigError (one line) for a missing or broken file, or two files of the same name (each
  run trains in WORKDIR/<name>).
  """
  named = []
  for spec in specs:
    checked, = config_files.check_command_line([f'--config={spec}'])  # Exists and loads.
    path, sep, arg = checked[len('--config='):].partition(':')
    name = pathlib.Path(path).stem
    if name in dict(named):
      raise config_lib.ConfigError(f'--configs names two configs {name!r}; each trains in '
                                   'WORKDIR/<config name>, so their file names must differ.')
    named.append((name, config_files.load_config_file(path, arg if sep else None)))
  return named


def accuracy_curve(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """[{step, wall_time_s, accuracy, split}] of the validation evals and the final test eval.

  With an EMA, `accuracy` is the better of the raw and the averaged parameters.
  """
  curve = []
  for r in records:
    for split in ('valid', 'test'):
      if f'{split}_accuracy' in r:
        accuracy = max(r[f'{split}_accuracy'], r.get(f'{split}_ema_accuracy', -1.0))
        curve.append(dict(step=r['step'], wall_time_s=r['wall_time_s'], accuracy=accuracy,
                          split=split))
  return curve


def time_to_target(curve: Sequence[dict[str, Any]], target: float) -> tuple[float, int] | None:
  """(wall time, step) of the first evaluation with accuracy >= target, or None."""
  for point in curve:
    if point['accuracy'] >= target:
      return point['wall_time_s'], point['step']
  return None


def train_row(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path,
              target: float | None) -> dict[str, Any]:
  """Trains (or reuses) one run and returns its table row."""
  logging.info('compare: run %r in %s', name, workdir)
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, str(workdir))  # Returns at once if finished.
  curve = accuracy_curve(rundir.read_metrics(str(workdir)))
  reached = time_to_target(curve, target) if target is not None else None
  return dict(
      name=name, **report.model_fields(config), workdir=str(workdir),
      num_params=summary.get('num_params'),
      gflops_per_image=summary.get('gflops_per_image'),
      train_images_per_s=summary.get('train_images_per_s'),
      eval_images_per_s=summary.get('eval_images_per_s'),
      test_accuracy=summary.get('test_accuracy'), test_loss=summary.get('test_loss'),
      wall_time_s=summary.get('wall_time_s'), steps=summary.get('steps'),
      target_accuracy=target, time_to_target_s=reached[0] if reached else None,
      step_to_target=reached[1] if reached else None, dataset=summary.get('dataset'),
      test_ema_accuracy=summary.get('test_ema_accuracy'), best=summary.get('best'),
      time_to_accuracy=summary.get('time_to_accuracy'),
      this_call_s=time.perf_counter() - start, curve=curve)


def benchmark_row(name: str, config: ml_collections.ConfigDict, image_shape, num_classes: int,
                  min_time_s: float) -> dict[str, Any]:
  """Times one model's steps (no training) and returns its table row."""
  r = benchmark.benchmark_model(config, image_shape, num_classes, min_time_s=min_time_s)
  return dict(
      name=name, **report.model_fields(config), num_params=r['num_params'],
      gflops_per_image=flops.forward_gflops(
          models.build_model(config.model, num_classes), image_shape),
      train_images_per_s=r['train_images_per_s'], eval_images_per_s=r.get('eval_images_per_s'),
      train_gflops_per_image=r['xla_train_flops_per_image'] / 1e9
      if r['xla_train_flops_per_image'] else None,
      train_gflops_per_s=r.get('train_gflops_per_s'), batch_size=r['batch_size'])


def run_comparison(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                   num_tokens: Sequence[int] = (), tokenlearner_locs: Sequence[int] = (),
                   name: str | None = None, **kwargs) -> dict[str, Any]:
  """`config` without and with its TokenLearner, or the sweep: see `compare_runs` (`kwargs`).

  `name` titles the table (default: the config's experiment or dataset name).
  """
  sweep = bool(num_tokens or tokenlearner_locs)
  return compare_runs(variants(config, num_tokens, tokenlearner_locs), workdir,
                      kind='sweep' if sweep else 'tokenlearner',
                      name=name or _config_name(config), **kwargs)


def run_configs(named_configs: Sequence[tuple[str, ml_collections.ConfigDict]],
                workdir: str | os.PathLike, **kwargs) -> dict[str, Any]:
  """[(name, config)] as they are, each in WORKDIR/<name>: see `compare_runs` (`kwargs`)."""
  return compare_runs(named_configs, workdir, kind='configs',
                      name=', '.join(n for n, _ in named_configs), **kwargs)


def compare_runs(runs: Sequence[tuple[str, ml_collections.ConfigDict]],
                 workdir: str | os.PathLike, *, kind: str, name: str,
                 target_accuracy: float | None = 0.98, benchmark_only: bool = False,
                 min_time_s: float = 10.0) -> dict[str, Any]:
  """Trains (or times) every (run name, config) and writes comparison.{md,json} and the plots.

  Every config is resolved (and, to train, its WORKDIR/<run> checked) before the first run
  trains, so a bad one is a one-line ConfigError or OSError with nothing trained. `kind` is
  'tokenlearner', 'sweep' or 'configs' (see `comparison_report`).

  Returns the comparison dict (as written to comparison.json) with the output paths under 'files'.
  """
  workdir = pathlib.Path(workdir)
  resolved = [config_lib.resolve(cfg, num_devices=jax.device_count()) for _, cfg in runs]
  if benchmark_only:  # Unknown datasets are loaded here, so missing data fails before timing.
    shapes = [benchmark.dataset_shape(cfg) for cfg in resolved]
  else:
    for run, _ in runs:
      rundir.check_workdir(str((workdir / run).absolute()))
  workdir.mkdir(parents=True, exist_ok=True)
  result = dict(kind=kind, config_name=name, benchmark_only=benchmark_only,
                target_accuracy=None if benchmark_only else target_accuracy,
                machine=_machine(), rows=[])
  if benchmark_only:
    peaks = [flops.matmul_peak_gflops()]
    for (run, cfg), (image_shape, num_classes) in zip(runs, shapes):
      result['rows'].append(benchmark_row(run, cfg, image_shape, num_classes, min_time_s))
    peaks.append(flops.matmul_peak_gflops())
    result['matmul_peak_gflops'] = peak = max(peaks)  # The less disturbed of before and after.
    for row in result['rows']:
      row['peak_fraction'] = row['train_gflops_per_s'] / peak if row['train_gflops_per_s'] else None
  else:
    for run, cfg in runs:
      result['rows'].append(train_row(run, cfg, workdir / run, target_accuracy))

  files = dict(markdown=workdir / 'comparison.md', json=workdir / 'comparison.json')
  if not benchmark_only:
    files['accuracy_vs_time'] = workdir / 'accuracy_vs_time.png'
    report.plot_accuracy_vs_time(result['rows'], files['accuracy_vs_time'])
    if kind == 'sweep':
      files['accuracy_vs_gflops'] = workdir / 'accuracy_vs_gflops.png'
      report.plot_accuracy_vs_gflops(result['rows'], files['accuracy_vs_gflops'])
  files['markdown'].write_text(report.markdown_table(result))
  result['files'] = {k: str(v) for k, v in files.items()}
  files['json'].write_text(json.dumps(result, indent=2, default=str) + '\n')
  return result


def _config_name(config: ml_collections.ConfigDict) -> str:
  return config.get('experiment_name') or config.get('dataset_name') or 'config'


def _machine() -> dict[str, Any]:
  return dict(backend=jax.default_backend(), devices=jax.device_count(),
              cpu_count=os.cpu_count(), processor=platform.processor() or platform.machine(),
              jax=jax.__version__)


def check_flags(*, config_given: bool, configs: Sequence[str], num_tokens: Sequence[str],
                tokenlearner_locs: Sequence[str], target_accuracy: float, min_time_s: float
                ) -> tuple[list[int], list[int]]:
  """Raises cli.FlagError (one line) for flags compare cannot run with; returns the sweep as ints.

  Checks the flags only; the config files are `load_configs`' and `config.resolve`'s.
  """
  if config_given == bool(configs):
    raise cli.FlagError('Give exactly one of --config (with and without its TokenLearner) and '
                        '--configs (a list of configs).')
  if configs and (num_tokens or tokenlearner_locs):
    raise cli.FlagError('--num_tokens and --tokenlearner_loc sweep the TokenLearner of --config; '
                        '--configs trains each config as it is.')
  if any(not spec for spec in configs):
    raise cli.FlagError(f'--configs has an empty entry: {",".join(configs)!r}.')
  sizes = _ints('num_tokens', num_tokens, 1, 'positive integers (e.g. 8,16)')
  locs = _ints('tokenlearner_loc', tokenlearner_locs, 0, 'block indices >= 0 (e.g. 1,2)')
  if not 0.0 < target_accuracy <= 1.0:
    raise cli.FlagError(f'--target_accuracy must be in (0, 1], got {target_accuracy:g}.')
  cli.check_positive('min_time_s', min_time_s)
  return sizes, locs


def _ints(name: str, values: Sequence[str], lowest: int, what: str) -> list[int]:
  """`values` as ints >= `lowest`, else cli.FlagError naming the flag and the first bad value."""
  for value in values:
    if not value.strip().lstrip('-').isdigit() or int(value) < lowest:
      raise cli.FlagError(f'--{name} must be {what}, got {value!r}.')
  return [int(v) for v in values]


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a script, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file: trained without and with its TokenLearner. '
      '--config.x=... overrides apply to this config only (not to --configs).', lock_config=True)
  flags.DEFINE_list('configs', [], 'Config files (or shipped config names) to train as they are, '
                    'each in WORKDIR/<config name>; the first is the baseline. Not with --config.')
  flags.DEFINE_string('workdir', None, 'Output directory (default: runs/compare_<config name(s)>).')
  flags.DEFINE_list('num_tokens', [], 'With --config: TokenLearner sizes S to sweep (e.g. 8,16).')
  flags.DEFINE_list('tokenlearner_loc', [],
                    'With --config: TokenLearner positions to sweep (e.g. 1,2).')
  flags.DEFINE_float('target_accuracy', 0.98, 'Accuracy in (0, 1] for the time-to-target column.')
  flags.DEFINE_bool('benchmark_only', False, 'Time the steps (benchmark.py) instead of training.')
  flags.DEFINE_float('min_time_s', 10.0, 'With --benchmark_only: timed seconds per model (> 0).')


# What stops the command with one line: bad flags or configs, missing data, an unusable workdir.
USER_ERRORS = (cli.FlagError, config_lib.ConfigError, input_pipeline.DataError, OSError,
               pretrained.PretrainedError, rundir.WorkdirBusyError,
               checkpoints.CheckpointMismatchError, checkpoints.CheckpointError,
               train.TrainingDivergedError)


def main(argv):
  try:
    with cli.errors_in_one_line(*USER_ERRORS):
      result = _compare_from_flags(argv)
  except train.TrainingStopped as e:
    print(e)  # One line: where the run stopped; the same command resumes it.
    return
  print(pathlib.Path(result['files']['markdown']).read_text())
  print('Wrote', ', '.join(result['files'].values()))


def _compare_from_flags(argv) -> dict[str, Any]:
  f = flags.FLAGS
  if len(argv) > 1:
    raise cli.FlagError(f'Unexpected arguments: {" ".join(argv[1:])}')
  num_tokens, locs = check_flags(
      config_given=f.config is not None, configs=f.configs, num_tokens=f.num_tokens,
      tokenlearner_locs=f.tokenlearner_loc, target_accuracy=f.target_accuracy,
      min_time_s=f.min_time_s)
  options = dict(target_accuracy=f.target_accuracy, benchmark_only=f.benchmark_only,
                 min_time_s=f.min_time_s)
  named = load_configs(f.configs) if f.configs else None
  loops.use_one_device_per_cpu_core()  # As `vit_flax.main` does, so the numbers match training.
  if named:
    workdir = f.workdir or os.path.join('runs', 'compare_' + '_'.join(n for n, _ in named))
    return run_configs(named, workdir, **options)
  name = pathlib.Path(f['config'].config_filename.split(':')[0]).stem
  return run_comparison(f.config, f.workdir or os.path.join('runs', f'compare_{name}'), name=name,
                        num_tokens=num_tokens, tokenlearner_locs=locs, **options)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
