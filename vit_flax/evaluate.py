"""Evaluates one checkpoint of a trained run on a whole split: metrics JSON and confusion matrix.

  python -m vit_flax.evaluate --workdir=DIR [--split=test|valid] [--checkpoint=best|last|STEP]
      [--output=PATH]

loads the run's config.json and checkpoint (`inference`), the dataset as the run loaded it, and
evaluates the split the way the trainer does: the same eval batch size, padding, mesh, micro-batches
and `steps.eval_step`, so the accuracy is the one the trainer reported for that checkpoint
(summary.json's `test_accuracy` for the last step, `best.test_accuracy` for the best checkpoint).
Writes PATH (default WORKDIR/eval_<split>_<checkpoint>.json) with the accuracy, loss, top-5
accuracy (more than 5 classes), per-class accuracy and the confusion matrix (rows: true class,
columns: predicted), and a picture of the matrix beside it (<PATH stem>_confusion.png).
"""

from collections.abc import Sequence
import functools
import os
from typing import Any

from absl import flags
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
from matplotlib import figure as mpl_figure
import numpy as np

from vit_flax import augment
from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import config as config_lib
from vit_flax import inference
from vit_flax import input_pipeline
from vit_flax import loops
from vit_flax import rundir
from vit_flax import steps

SPLITS = ('test', 'valid')
TOP_K = 5  # Top-k accuracy is reported for datasets with more than this many classes.
MAX_LABELLED_CLASSES = 30  # More classes: the confusion picture has no tick labels.
MAX_ANNOTATED_CLASSES = 20  # Up to this many classes the picture prints each cell's count.


def eval_sums(state: steps.TrainState, batch: dict[str, jax.Array], *, loss: str,
              num_microbatches: int, num_classes: int, top_k: int) -> dict[str, jax.Array]:
  """`steps.eval_step`'s masked sums (loss, correct, count) plus `confusion` [K, K] int32 (rows:
  true class, columns: predicted) and `top_k_correct`, over batch {'inputs', 'label', 'mask'}.

  The confusion matrix counts the argmax of the same logits, so its trace is `correct`.
  """
  sums = steps.eval_step(state, batch, loss=loss, num_microbatches=num_microbatches)
  logits = _logits(state, batch['inputs'], num_microbatches)  # [B, K]
  labels, mask = batch['label'], batch['mask'] > 0
  predictions = jnp.argmax(logits, axis=-1)  # [B]
  confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, predictions].add(
      mask.astype(jnp.int32))  # Padding (mask 0) adds nothing.
  _, top = jax.lax.top_k(logits, top_k)  # [B, k]
  hits = jnp.any(top == labels[:, None], axis=-1) & mask
  return {**sums, 'confusion': confusion, 'top_k_correct': jnp.sum(hits.astype(jnp.float32))}


def _logits(state: steps.TrainState, inputs: jax.Array, num_microbatches: int) -> jax.Array:
  """The logits [B, K] exactly as `steps.eval_step` computes them (same micro-batches), so XLA
  computes the forward pass once for both."""
  variables = {'params': state.params}
  if state.batch_stats is not None:
    variables['batch_stats'] = state.batch_stats
  apply = lambda x: state.apply_fn(variables, x, train=False)
  if num_microbatches == 1:
    return apply(inputs)
  b, m = inputs.shape[0], num_microbatches
  micro = inputs.reshape(b // m, m, *inputs.shape[1:]).swapaxes(0, 1)  # [M, B/M, H, W, C]
  logits = jax.lax.map(apply, micro)  # [M, B/M, K]
  return logits.swapaxes(0, 1).reshape(b, -1)  # [B, K]


def _mesh(batch_size: int) -> Mesh:
  """The trainer's 1-D 'data' mesh, on as many devices as divide `batch_size` (all of them when
  the run was trained on this many)."""
  n = max(d for d in range(1, jax.device_count() + 1) if batch_size % d == 0)
  return Mesh(np.array(jax.devices()[:n]), ('data',), axis_types=(AxisType.Auto,))


def evaluate_split(trained: inference.TrainedModel, ds: input_pipeline.Dataset,
                   split: str) -> dict[str, np.ndarray]:
  """`eval_sums` over the whole `split`, on host: placed and batched as the trainer's runners do
  (`loops.make_runners`), one dispatch for in-memory data, one per batch for streamed data."""
  config = trained.config
  batch_size = config.eval_batch_size
  mesh = _mesh(batch_size)
  replicated = NamedSharding(mesh, P())
  eval_fn = functools.partial(
      eval_sums, loss=config.loss, num_classes=trained.num_classes,
      num_microbatches=loops.num_microbatches(config, batch_size, mesh.devices.size),
      top_k=min(TOP_K, trained.num_classes))
  state = loops.replicate(steps.TrainState(
      step=0, apply_fn=trained.model.apply, params=trained.variables['params'], tx=None,
      opt_state=None, batch_stats=trained.variables.get('batch_stats')), mesh)
  rows = loops.local_rows(NamedSharding(mesh, P('data')), batch_size)
  if ds.in_memory:
    arrays = loops.pad_to_batch(getattr(ds, f'{split}_images'), getattr(ds, f'{split}_labels'),
                                batch_size)
    data = [loops.global_batches(NamedSharding(mesh, P(None, 'data')), a[:, rows], batch_size)
            for a in arrays]
    normalise = lambda x: augment.preprocess(x, None, train=False, dataset=ds)
    run = jax.jit(functools.partial(loops.evaluate_arrays, eval_fn=eval_fn,
                                    preprocess_fn=normalise), out_shardings=replicated)
    return jax.device_get(run(state, *data))
  step = jax.jit(eval_fn, out_shardings=replicated)
  batch_sharding = NamedSharding(mesh, P('data'))
  sums = None
  for batch in ds.eval_iter(split, len(rows)):  # Already normalised; sums stay on device.
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v, (batch_size,
                                                                           *v.shape[1:]))
             for k, v in batch.items()}
    out = step(state, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return jax.device_get(sums)


def metrics_from_sums(sums: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
  """Accuracy and loss (computed as the trainer logs them), top-k accuracy, per-class counts and
  accuracies (None for a class without examples) and the confusion matrix, from `eval_sums`."""
  count = max(float(sums['count']), 1.0)  # As train._log_eval, so the floats are the same.
  confusion = np.asarray(sums['confusion'], np.int64)
  per_class = confusion.sum(axis=1)
  metrics = {'count': int(sums['count']), 'accuracy': float(sums['correct']) / count,
             'loss': float(sums['loss']) / count}
  if len(class_names) > TOP_K:
    metrics[f'top{TOP_K}_accuracy'] = float(sums['top_k_correct']) / count
  return {**metrics, 'class_names': list(class_names), 'per_class_count': per_class.tolist(),
          'per_class_accuracy': [float(confusion[k, k] / n) if n else None
                                 for k, n in enumerate(per_class)],
          'confusion_matrix': confusion.tolist(),
          'confusion_matrix_axes': 'rows: true class, columns: predicted class'}


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str],
                          title: str = 'Confusion matrix') -> mpl_figure.Figure:
  """The matrix coloured by the fraction of each true class (row), counts printed on small ones."""
  confusion = np.asarray(confusion)
  k = len(confusion)
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  side = min(max(4.5, 0.45 * k + 2.0), 14.0)
  fig = mpl_figure.Figure(figsize=(side + 1.2, side), layout='constrained')
  ax = fig.subplots()
  im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
  if k <= MAX_LABELLED_CLASSES:
    ax.set_xticks(np.arange(k), class_names, rotation=45, ha='right', fontsize=8)
    ax.set_yticks(np.arange(k), class_names, fontsize=8)
  if k <= MAX_ANNOTATED_CLASSES:
    for i in range(k):
      for j in range(k):
        ax.text(j, i, str(confusion[i, j]), ha='center', va='center', fontsize=7,
                color='white' if rates[i, j] > 0.5 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  fig.colorbar(im, ax=ax, label='fraction of the true class', shrink=0.8)
  ax.set_title(title, fontsize=9, wrap=True)
  return fig


def default_output(workdir: str, split: str, checkpoint: str) -> str:
  return os.path.join(workdir, f'eval_{split}_{checkpoint}.json')


def figure_path(output: str) -> str:
  """The confusion picture beside the metrics file: PATH stem + '_confusion.png'."""
  return os.path.splitext(output)[0] + '_confusion.png'


def check_flags(workdir: str | None, *, split: str = 'test', checkpoint: str = 'last',
                output: str | None = None) -> None:
  """Raises cli.FlagError (one line) unless the flags name a split and a checkpoint of a trained
  run, and an output file that can be written. Reads only the file system."""
  if split not in SPLITS:
    raise cli.FlagError(f'--split must be one of {", ".join(SPLITS)}, got {split!r}.')
  inference.check_run(workdir, checkpoint)
  cli.check_output_file('output', output)


def evaluate_run(workdir: str | None, *, split: str = 'test', checkpoint: str = 'last',
                 output: str | None = None) -> dict[str, Any]:
  """Evaluates `checkpoint` of the run in `workdir` on `split`; writes the metrics JSON and the
  confusion picture and returns the metrics (with 'files': the two paths).

  Raises:
    cli.FlagError: a bad flag (before anything loads), or a split the run's dataset lacks.
    FileNotFoundError, checkpoints.CheckpointMismatchError, input_pipeline.DataError,
      config.ConfigError: the run or its data cannot be loaded.
  """
  checkpoint = str(checkpoint)
  check_flags(workdir, split=split, checkpoint=checkpoint, output=output)
  output = output or default_output(workdir, split, checkpoint)
  trained = inference.load(workdir, checkpoint)
  ds = input_pipeline.load_dataset(trained.config)
  if not getattr(ds, f'num_{split}'):
    raise cli.FlagError(f'--split={split}: the run\'s dataset {ds.name} ({ds.source}) has no '
                        f'{split} images.')
  if ds.num_classes != trained.num_classes:
    raise checkpoints.CheckpointMismatchError(
        f'Checkpoint {checkpoint} in {workdir} has {trained.num_classes} classes; the dataset '
        f'{ds.name} has {ds.num_classes}.')
  sums = evaluate_split(trained, ds, split)
  metrics = metrics_from_sums(sums, trained.class_names)
  kind = checkpoint if checkpoint in inference.CHECKPOINT_NAMES else 'step'
  result = {'workdir': os.path.abspath(workdir), 'split': split,
            'checkpoint': {'kind': kind, 'step': trained.step},
            'dataset': {'name': ds.name, 'source': ds.source}, **metrics,
            'files': {'metrics': output, 'confusion_matrix': figure_path(output)}}
  run = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  fig = plot_confusion_matrix(
      np.asarray(sums['confusion']), trained.class_names,
      title=f'{run}: {split} split, checkpoint {_describe(result["checkpoint"])}; accuracy '
            f'{metrics["accuracy"]:.4f} on {metrics["count"]:,} images')
  fig.savefig(result['files']['confusion_matrix'], dpi=100)
  rundir.write_json(output, result)
  return result


def summary_line(result: dict[str, Any]) -> str:
  """'test accuracy 0.9871 (9871/10000), loss 0.0412, top-5 0.9990 | checkpoint best (step
  4000) | wrote PATH, PNG'."""
  m = result
  correct = round(m['accuracy'] * m['count'])
  top = f', top-{TOP_K} {m[f"top{TOP_K}_accuracy"]:.4f}' if f'top{TOP_K}_accuracy' in m else ''
  return (f'{m["split"]} accuracy {m["accuracy"]:.4f} ({correct}/{m["count"]}), loss '
          f'{m["loss"]:.4f}{top} | checkpoint {_describe(m["checkpoint"])} | wrote '
          f'{m["files"]["metrics"]}, {m["files"]["confusion_matrix"]}')


def _describe(checkpoint: dict[str, Any]) -> str:
  """'best (step 40)', 'last (step 40)' or 'step 30'."""
  kind, step = checkpoint['kind'], checkpoint['step']
  return f'step {step}' if kind == 'step' else f'{kind} (step {step})'


# ------------------------------------------------------------------------------------------------
# Command line.

# What stops the command with one line: bad flags, and a run that cannot be evaluated (config.json
# edited to another model or to bad values, missing data, an unwritable output).
USER_ERRORS = (cli.FlagError, config_lib.ConfigError, checkpoints.CheckpointMismatchError,
               checkpoints.CheckpointError, input_pipeline.DataError, OSError)


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  with cli.errors_in_one_line(*USER_ERRORS):
    if len(argv) > 1:
      raise cli.FlagError(f'Unexpected arguments: {" ".join(argv[1:])}')
    loops.use_one_device_per_cpu_core()  # As `vit_flax.main` does, so the batches shard alike.
    result = evaluate_run(f.workdir, split=f.split, checkpoint=f.checkpoint, output=f.output)
  print(summary_line(result))


def _define_flags() -> None:
  """The command-line flags; defined only when run as a script, so importing defines none."""
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/, best/); '
                      'required.')
  flags.DEFINE_string('split', 'test', f'Split to evaluate: {" | ".join(SPLITS)}.')
  flags.DEFINE_string('checkpoint', 'last', 'best | last | a step number in WORKDIR/checkpoints.')
  flags.DEFINE_string('output', None, 'Metrics JSON to write (default: '
                      'WORKDIR/eval_<split>_<checkpoint>.json); the PNG goes beside it.')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
