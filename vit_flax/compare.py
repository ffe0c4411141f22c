r"""Does TokenLearner help, and what does it cost? Trains a config with and without it side by side.

  python -m vit_flax.compare --config=configs/mnist_tl.py [--workdir=DIR] [--target_accuracy=0.98]
  python -m vit_flax.compare --config=configs/mnist_tl.py --num_tokens=8,16 --tokenlearner_loc=1,2
  python -m vit_flax.compare --config=configs/cifar10_tl.py --benchmark_only

Runs `train.train_and_evaluate` on the config's model as a plain ViT (`tokenizer.type='patch'`,
WORKDIR/vit) and with its TokenLearner (`'dynamic'`, WORKDIR/tl), with the same seed, data order and
number of steps; a sweep over `--num_tokens` / `--tokenlearner_loc` trains one TokenLearner run per
combination instead (WORKDIR/tl_S{n}_L{loc}). Finished runs are reused (the trainer does not
retrain them). From each run's summary.json and metrics.jsonl it writes

* WORKDIR/comparison.md: parameters, GFLOPs per image, train and eval images/s, final test
  accuracy, wall time and the wall time at which an evaluation first reached the target accuracy;
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
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from vit_flax import benchmark
from vit_flax import config as config_lib
from vit_flax import config_files
from vit_flax import flops
from vit_flax import loops
from vit_flax import rundir
from vit_flax import train

NOT_REACHED = 'not reached'


def variants(config: ml_collections.ConfigDict, num_tokens: Sequence[int] = (),
             tokenlearner_locs: Sequence[int] = ()) -> list[tuple[str, ml_collections.ConfigDict]]:
  """[(run name, config)]: the plain ViT, then the TokenLearner model or every sweep point."""
  runs = [('vit', config_lib.with_tokenlearner(config, False))]
  if not num_tokens and not tokenlearner_locs:
    return runs + [('tl', config_lib.with_tokenlearner(config, True))]
  tokenizer = config.model.tokenizer
  for s in num_tokens or [tokenizer.num_tokens]:
    for loc in tokenlearner_locs or [tokenizer.tokenlearner_loc]:
      runs.append((f'tl_S{s}_L{loc}', config_lib.with_tokenlearner(
          config, True, num_tokens=int(s), tokenlearner_loc=int(loc))))
  return runs


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
      _model_fields(name, config), workdir=str(workdir), num_params=summary.get('num_params'),
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
      _model_fields(name, config), num_params=r['num_params'],
      gflops_per_image=flops.forward_gflops(
          config_lib.build_model(config.model, num_classes), image_shape),
      train_images_per_s=r['train_images_per_s'], eval_images_per_s=r.get('eval_images_per_s'),
      train_gflops_per_image=r['xla_train_flops_per_image'] / 1e9
      if r['xla_train_flops_per_image'] else None,
      train_gflops_per_s=r.get('train_gflops_per_s'), batch_size=r['batch_size'])


def _model_fields(name: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  tokenizer = config.model.tokenizer
  dynamic = tokenizer.type == 'dynamic'
  return dict(name=name, tokenizer=tokenizer.type,
              num_tokens=tokenizer.get('num_tokens') if dynamic else None,
              tokenlearner_loc=tokenizer.get('tokenlearner_loc') if dynamic else None)


def run_comparison(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                   num_tokens: Sequence[int] = (), tokenlearner_locs: Sequence[int] = (),
                   target_accuracy: float | None = 0.98, benchmark_only: bool = False,
                   min_time_s: float = 10.0, name: str | None = None) -> dict[str, Any]:
  """Trains (or times) every variant and writes comparison.{md,json} and the plots into workdir.

  `name` titles the table (default: the config's experiment or dataset name).

  Returns the comparison dict (as written to comparison.json) with the output paths under 'files'.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  runs = variants(config, num_tokens, tokenlearner_locs)
  for _, cfg in runs:  # Every sweep point's config, checked before the first run trains.
    config_lib.resolve(cfg, num_devices=jax.device_count())
  sweep = bool(num_tokens or tokenlearner_locs)
  result = dict(config_name=name or _config_name(config), benchmark_only=benchmark_only,
                target_accuracy=None if benchmark_only else target_accuracy,
                machine=_machine(), rows=[])
  if benchmark_only:
    image_shape, num_classes = benchmark.dataset_shape(config_lib.resolve(config))
    peaks = [flops.matmul_peak_gflops()]
    for run, cfg in runs:
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
    plot_accuracy_vs_time(result['rows'], files['accuracy_vs_time'])
    if sweep:
      files['accuracy_vs_gflops'] = workdir / 'accuracy_vs_gflops.png'
      plot_accuracy_vs_gflops(result['rows'], files['accuracy_vs_gflops'])
  files['markdown'].write_text(markdown_table(result))
  result['files'] = {k: str(v) for k, v in files.items()}
  files['json'].write_text(json.dumps(result, indent=2, default=str) + '\n')
  return result


def markdown_table(result: dict[str, Any]) -> str:
  """comparison.md: a heading, the table and what its columns mean."""
  rows, target = result['rows'], result.get('target_accuracy')
  columns = [('model', lambda r: _label(r)),
             ('parameters', lambda r: _fmt(r['num_params'], '{:,}')),
             ('GFLOPs/image', lambda r: _fmt(r['gflops_per_image'], '{:.4g}')),
             ('train images/s', lambda r: _fmt(r['train_images_per_s'], '{:,.0f}')),
             ('eval images/s', lambda r: _fmt(r['eval_images_per_s'], '{:,.0f}'))]
  base = next((r for r in rows if r['tokenizer'] != 'dynamic'), None)
  columns.append(('train speed-up', lambda r: _ratio(r, base, 'train_images_per_s')))
  if not result['benchmark_only']:
    reach = f'time to {target:.2%} (s)' if target is not None else 'time to target (s)'
    columns += [('test accuracy', lambda r: _fmt(r['test_accuracy'], '{:.2%}')),
                ('vs ViT (points)', lambda r: _points(r, base)),
                ('EMA test accuracy', lambda r: _fmt(r.get('test_ema_accuracy'), '{:.2%}')),
                ('best-valid checkpoint: test accuracy (step)', _best_cell),
                ('wall time (s)', lambda r: _fmt(r['wall_time_s'], '{:,.1f}')),
                (reach, lambda r: _fmt(r['time_to_target_s'], '{:,.1f}', NOT_REACHED))]
  else:
    columns += [('share of matmul peak', lambda r: _fmt(r.get('peak_fraction'), '{:.1%}'))]
  lines = [f'# ViT with and without TokenLearner: {result["config_name"]}', '']
  dataset = next((r['dataset'] for r in rows if r.get('dataset')), None)
  if dataset:
    lines += [f'Dataset: {dataset.get("name")} ({dataset.get("source")}), '
              f'{dataset.get("num_train")} train / {dataset.get("num_test")} test images.', '']
  m = result['machine']
  lines += [f'Machine: {m["backend"]} ({m["devices"]} device(s)), {m["cpu_count"]} CPU cores, '
            f'{m["processor"]}; jax {m["jax"]}.', '']
  lines.append('| ' + ' | '.join(c for c, _ in columns) + ' |')
  lines.append('|' + '|'.join(['---'] + ['---:'] * (len(columns) - 1)) + '|')
  for r in rows:
    lines.append('| ' + ' | '.join(f(r) for _, f in columns) + ' |')
  lines.append('')
  if result['benchmark_only']:
    lines.append('Step timings only (no training), median of several windows after compilation. '
                 'GFLOPs/image: the inference forward pass by XLA\'s count (a multiply-add is 2 '
                 'FLOPs). Share of matmul peak: the train step\'s achieved GFLOP/s over an f32 '
                 f'2048² matmul measured in the same run ({result["matmul_peak_gflops"]:.0f} '
                 'GFLOP/s).')
  else:
    lines.append('Parameters, GFLOPs/image (inference forward pass by XLA\'s count; a multiply-add '
                 'is 2 FLOPs), images/s and wall time come from each run\'s summary.json; wall '
                 'time includes compilation and evaluation. Train speed-up and points: against the '
                 'ViT row. Time to target: wall time of the first evaluation (validation, or the '
                 'final test) at or above the target accuracy. Best-valid checkpoint: the '
                 'parameters (raw or EMA) with the highest validation accuracy, tested.')
    lines += ['', *_time_to_accuracy_table(rows)]
  return '\n'.join(lines) + '\n'


def _best_cell(row: dict[str, Any]) -> str:
  best = row.get('best')
  if not best:
    return '—'
  return f'{best["test_accuracy"]:.2%} ({best["step"]:,}, {best["params"]})'


def _time_to_accuracy_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Markdown lines: per model, the wall time and images seen at each accuracy threshold."""
  reports = [(r, r.get('time_to_accuracy')) for r in rows if r.get('time_to_accuracy')]
  if not reports:
    return []
  thresholds = [t['accuracy'] for t in reports[0][1]]
  lines = ['Time to validation accuracy (raw or EMA parameters, whichever first): wall time in '
           's / images seen.', '',
           '| model | ' + ' | '.join(f'{t:.0%}' if t * 100 == int(t * 100) else f'{t:.1%}'
                                     for t in thresholds) + ' |',
           '|---|' + '---:|' * len(thresholds)]
  for row, report in reports:
    cells = [NOT_REACHED if t['wall_time_s'] is None else
             f'{t["wall_time_s"]:,.0f} s / {t["images_seen"]:,}' for t in report]
    lines.append(f'| {_label(row)} | ' + ' | '.join(cells) + ' |')
  return lines


def _label(row: dict[str, Any]) -> str:
  if row['tokenizer'] != 'dynamic':
    return 'ViT'
  return f'ViT + TokenLearner (S={row["num_tokens"]}, loc={row["tokenlearner_loc"]})'


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
  if base is None or row[key] is None or not base[key]:
    return '—'
  return f'{row[key] / base[key]:.2f}×'


def _points(row: dict[str, Any], base: dict[str, Any] | None) -> str:
  if base is None or row['test_accuracy'] is None or base['test_accuracy'] is None:
    return '—'
  return f'{100 * (row["test_accuracy"] - base["test_accuracy"]):+.2f}'


def _fmt(value, spec: str, missing: str = '—') -> str:
  return missing if value is None else spec.format(value)


def plot_accuracy_vs_time(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """Accuracy against wall time (left) and step (right); the final test accuracy as a star."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for row in rows:
    valid = [p for p in row['curve'] if p['split'] == 'valid']
    test = [p for p in row['curve'] if p['split'] == 'test']
    for ax, x in zip(axes, ('wall_time_s', 'step')):
      line, = ax.plot([p[x] for p in valid], [p['accuracy'] for p in valid], marker='.',
                      label=_label(row) + ' (valid)')
      if test:
        ax.plot([p[x] for p in test], [p['accuracy'] for p in test], marker='*', markersize=12,
                linestyle='none', color=line.get_color(), label=_label(row) + ' (test)')
  axes[0].set_xlim(left=0)
  axes[0].set_title('accuracy vs wall time (compilation included)', fontsize=10)
  axes[1].set_title('accuracy vs step', fontsize=10)
  axes[0].set_xlabel('wall time (s)')
  axes[1].set_xlabel('step')
  axes[0].set_ylabel('accuracy')
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_accuracy_vs_gflops(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """Final test accuracy against GFLOPs per image, one labelled point per run."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for row in rows:
    if row['gflops_per_image'] is None or row['test_accuracy'] is None:
      continue
    ax.scatter(row['gflops_per_image'], row['test_accuracy'])
    ax.annotate(row['name'], (row['gflops_per_image'], row['test_accuracy']), fontsize=8,
                xytext=(4, 4), textcoords='offset points')
  ax.set_xlabel('GFLOPs per image')
  ax.set_ylabel('test accuracy')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _config_name(config: ml_collections.ConfigDict) -> str:
  return config.get('experiment_name') or config.get('dataset_name') or 'config'


def _machine() -> dict[str, Any]:
  return dict(backend=jax.default_backend(), devices=jax.device_count(),
              cpu_count=os.cpu_count(), processor=platform.processor() or platform.machine(),
              jax=jax.__version__)


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a script, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output directory (default: runs/compare_<config name>).')
  flags.DEFINE_list('num_tokens', [], 'TokenLearner sizes S to sweep (e.g. 8,16).')
  flags.DEFINE_list('tokenlearner_loc', [], 'TokenLearner positions to sweep (e.g. 1,2).')
  flags.DEFINE_float('target_accuracy', 0.98, 'Accuracy for the time-to-target column.')
  flags.DEFINE_bool('benchmark_only', False, 'Time the steps (benchmark.py) instead of training.')
  flags.DEFINE_float('min_time_s', 10.0, 'With --benchmark_only: timed seconds per model.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  loops.use_one_device_per_cpu_core()  # As `vit_flax.main` does, so the numbers match training.
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError('--config is required.')
  name = pathlib.Path(f['config'].config_filename.split(':')[0]).stem
  result = run_comparison(
      f.config, f.workdir or os.path.join('runs', f'compare_{name}'), name=name,
      num_tokens=[int(s) for s in f.num_tokens],
      tokenlearner_locs=[int(s) for s in f.tokenlearner_loc], target_accuracy=f.target_accuracy,
      benchmark_only=f.benchmark_only, min_time_s=f.min_time_s)
  print(pathlib.Path(result['files']['markdown']).read_text())
  print('Wrote', ', '.join(result['files'].values()))


if __name__ == '__main__':
  _define_flags()
  try:
    _argv = config_files.check_command_line(sys.argv)
  except config_lib.ConfigError as e:
    sys.exit(f'Error: {e}')  # One line on stderr, exit status 1.
  app.run(main, argv=_argv)
