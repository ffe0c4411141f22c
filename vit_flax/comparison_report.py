"""What `compare` writes: each model's label, comparison.md and the accuracy plots.

A comparison is a dict (as written to comparison.json): `kind` ('tokenlearner': a config with and
without its TokenLearner; 'sweep': over TokenLearner sizes and places; 'configs': a list of
configs as shipped), `config_name`, `benchmark_only`, `target_accuracy`, `machine` and `rows`, one
per run, the first being the baseline of the speed-up and points columns.
"""

from collections.abc import Sequence
import pathlib
from typing import Any

import ml_collections

from vit_flax import models

NOT_REACHED = 'not reached'
# config.model.name -> how a table names the family.
FAMILY_NAMES = {'vit': 'ViT', 'deit': 'DeiT', 'cait': 'CaiT', 'mixer': 'Mixer', 'xcit': 'XCiT',
                'swin': 'Swin'}


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A row's model columns: family, label, tokenizer ('dynamic' with a TokenLearner, else
  'patch'), num_tokens and tokenlearner_loc (None without a learner).

  'vit' reads scenic's `model.tokenizer`; the other families their flat `tokenlearner_loc`.
  """
  model = models.resolve_model(config.model)
  family = model['name']
  learner = model['tokenizer'] if family == 'vit' else model
  if family == 'vit':  # Images: the 'dynamic' tokenizer; clips: 'video' with a learner's place.
    has_learner = learner['type'] == 'dynamic' or (
        learner['type'] == 'video' and learner['tokenlearner_loc'] is not None)
  else:
    has_learner = learner.get('tokenlearner_loc') is not None
  label = 'ViViT' if family == 'vit' and learner['type'] == 'video' else FAMILY_NAMES.get(family,
                                                                                          family)
  if family == 'deit' and config.get('distillation'):
    label += ' (distilled)'
  if has_learner:
    version = '' if learner.get('use_v11', True) else ' V1'
    fuser = ' + TokenFuser' if learner.get('use_tokenfuse') else ''
    label += (f' + TokenLearner{version}{fuser} (S={learner["num_tokens"]}, '
              f'loc={learner["tokenlearner_loc"]})')
  return dict(family=family, label=label, tokenizer='dynamic' if has_learner else 'patch',
              num_tokens=learner['num_tokens'] if has_learner else None,
              tokenlearner_loc=learner['tokenlearner_loc'] if has_learner else None)


def legend_labels(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Each row's label; with the run name added to all when two rows share a label."""
  labels = [r['label'] for r in rows]
  if len(set(labels)) == len(labels):
    return labels
  return [f'{label} [{r["name"]}]' for label, r in zip(labels, rows)]


def markdown_table(result: dict[str, Any]) -> str:
  """comparison.md: a heading, the table and what its columns mean."""
  rows, target = result['rows'], result.get('target_accuracy')
  configs = result.get('kind') == 'configs'
  base = rows[0] if rows else None
  columns = [('config', lambda r: r['name'])] if configs else []
  columns += [('model', lambda r: r['label']),
              ('parameters', lambda r: _fmt(r['num_params'], '{:,}')),
              ('GFLOPs/image', lambda r: _fmt(r['gflops_per_image'], '{:.4g}')),
              ('train images/s', lambda r: _fmt(r['train_images_per_s'], '{:,.0f}')),
              ('eval images/s', lambda r: _fmt(r['eval_images_per_s'], '{:,.0f}')),
              ('train speed-up', lambda r: _ratio(r, base, 'train_images_per_s'))]
  if not result['benchmark_only']:
    reach = f'time to {target:.2%} (s)' if target is not None else 'time to target (s)'
    columns += [('test accuracy', lambda r: _fmt(r['test_accuracy'], '{:.2%}')),
                (f'vs {base["label"] if base else "first"} (points)', lambda r: _points(r, base)),
                ('EMA test accuracy', lambda r: _fmt(r.get('test_ema_accuracy'), '{:.2%}')),
                ('best-valid checkpoint: test accuracy (step)', _best_cell),
                ('wall time (s)', lambda r: _fmt(r['wall_time_s'], '{:,.1f}')),
                (reach, lambda r: _fmt(r['time_to_target_s'], '{:,.1f}', NOT_REACHED))]
  else:
    columns += [('share of matmul peak', lambda r: _fmt(r.get('peak_fraction'), '{:.1%}'))]
  lines = [f'# {_title(result)}: {result["config_name"]}', '']
  dataset = next((r['dataset'] for r in rows if r.get('dataset')), None)
  if dataset:
    lines += [f'Dataset: {dataset.get("name")} ({dataset.get("source")}), '
              f'{dataset.get("num_train")} train / {dataset.get("num_test")} test images.', '']
  m = result['machine']
  lines += [f'Machine: {m["backend"]} ({m["devices"]} device(s)), {m["cpu_count"]} CPU cores, '
            f'{m["processor"]}; jax {m["jax"]}.', '']
  lines.append('| ' + ' | '.join(c for c, _ in columns) + ' |')
  lines.append('|' + '|'.join(['---'] * (1 + configs) + ['---:'] * (len(columns) - 1 - configs))
               + '|')
  for r in rows:
    lines.append('| ' + ' | '.join(f(r) for _, f in columns) + ' |')
  lines.append('')
  baseline = f'the first row ({base["label"]})' if base else 'the first row'
  if result['benchmark_only']:
    lines.append('Step timings only (no training), median of several windows after compilation. '
                 'GFLOPs/image: the inference forward pass by XLA\'s count (a multiply-add is 2 '
                 f'FLOPs). Train speed-up: against {baseline}. Share of matmul peak: the train '
                 'step\'s achieved GFLOP/s over an f32 2048² matmul measured in the same run '
                 f'({result["matmul_peak_gflops"]:.0f} GFLOP/s).')
  else:
    lines.append('Parameters, GFLOPs/image (inference forward pass by XLA\'s count; a multiply-add '
                 'is 2 FLOPs), images/s and wall time come from each run\'s summary.json; wall '
                 f'time includes compilation and evaluation. Train speed-up and points: against '
                 f'{baseline}. Time to target: wall time of the first evaluation (validation, or '
                 'the final test) at or above the target accuracy. Best-valid checkpoint: the '
                 'parameters (raw or EMA) with the highest validation accuracy, tested.')
    lines += ['', *_time_to_accuracy_table(rows)]
  return '\n'.join(lines) + '\n'


def _title(result: dict[str, Any]) -> str:
  if result.get('kind') == 'configs' or not result['rows']:
    return 'Model comparison'
  return f'{FAMILY_NAMES.get(result["rows"][0]["family"], "ViT")} with and without TokenLearner'


def _best_cell(row: dict[str, Any]) -> str:
  best = row.get('best')
  if not best:
    return '—'
  return f'{best["test_accuracy"]:.2%} ({best["step"]:,}, {best["params"]})'


def _time_to_accuracy_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Markdown lines: per model, the wall time and images seen at each accuracy threshold."""
  reports = [(label, r['time_to_accuracy']) for label, r in zip(legend_labels(rows), rows)
             if r.get('time_to_accuracy')]
  if not reports:
    return []
  thresholds = [t['accuracy'] for t in reports[0][1]]
  lines = ['Time to validation accuracy (raw or EMA parameters, whichever first): wall time in '
           's / images seen.', '',
           '| model | ' + ' | '.join(f'{t:.0%}' if t * 100 == int(t * 100) else f'{t:.1%}'
                                     for t in thresholds) + ' |',
           '|---|' + '---:|' * len(thresholds)]
  for label, report in reports:
    cells = [NOT_REACHED if t['wall_time_s'] is None else
             f'{t["wall_time_s"]:,.0f} s / {t["images_seen"]:,}' for t in report]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return lines


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
  for row, label in zip(rows, legend_labels(rows)):
    valid = [p for p in row['curve'] if p['split'] == 'valid']
    test = [p for p in row['curve'] if p['split'] == 'test']
    for ax, x in zip(axes, ('wall_time_s', 'step')):
      line, = ax.plot([p[x] for p in valid], [p['accuracy'] for p in valid], marker='.',
                      label=label + ' (valid)')
      if test:
        ax.plot([p[x] for p in test], [p['accuracy'] for p in test], marker='*', markersize=12,
                linestyle='none', color=line.get_color(), label=label + ' (test)')
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
