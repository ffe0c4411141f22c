r"""Times vit_flax's jitted train step (and eval) on synthetic data; optional PyTorch reference.

  python -m vit_flax.benchmark --preset=mnist [--with_tokenlearner=both|yes|no] [--torch]
  python -m vit_flax.benchmark --config=configs/mnist_tl.py [--config.batch_size=256]

For each model (by default the config's model with and without its TokenLearner) it builds the
train state on the trainer's mesh, makes synthetic data shaped like the config's dataset and times
the trainer's own runners (`loops.make_runners`) for `--min_time_s` seconds split into `--windows`
windows (each ending in `block_until_ready`), reporting the median window. `--loop=chunk` (default)
times the loop the trainer runs for in-memory datasets (`--steps_per_call` steps per dispatch,
batches gathered and augmented on device); `--loop=step` its loop for streamed datasets (a host
batch `device_put` and one jitted step per step). It prints:

* train and eval images/s;
* one train step's FLOPs per image by XLA's cost analysis (a multiply-add is 2 FLOPs) and, beside
  it, `analytic_train_flops` (the forward pass's matmuls, convolutions and attention, times 3);
* the achieved GFLOP/s, and that as a share of an f32 matmul peak (2048 x 2048, best of 5)
  measured in the same run;
* with `--torch`, the train images/s of `benchmarks/torch_vit.py`, the same network in PyTorch
  eager (AdamW, all cores), run in a subprocess right after each JAX model.

Presets use no dropout; `--config` times the model as configured (dropout included).
The machine may be shared: compare numbers from one run, not across runs.
"""

from collections.abc import Callable, Sequence
import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import flags
from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np

from vit_flax import cli
from vit_flax import comparison_report
from vit_flax import config as config_lib
from vit_flax import config_files
from vit_flax import flops
from vit_flax import input_pipeline
from vit_flax import loops
from vit_flax import models
from vit_flax import steps

# The two comparison models of the speed table (train batch 128, 10 classes, no dropout).
PRESETS = {
    'mnist': dict(image_shape=(28, 28, 1), patch=2, hidden_size=64, num_layers=4, num_heads=4,
                  mlp_dim=128, num_tokens=8, tokenlearner_loc=1, config='mnist_patch2_tl.py',
                  dataset='mnist',
                  # The step the README's speed table timed (pad-and-crop, no EMA), not the
                  # config's current training recipe.
                  data=dict(crop_padding=2, random_resized_crop=None, trivial_augment=False),
                  recipe=dict(ema_decay=None, label_smoothing=None)),
    'cifar': dict(image_shape=(32, 32, 3), patch=4, hidden_size=192, num_layers=12, num_heads=3,
                  mlp_dim=768, num_tokens=8, tokenlearner_loc=6, config='cifar10_tl.py',
                  dataset='cifar10', data={}, recipe={}),
}
PRESET_BATCH_SIZE = 128
PRESET_NUM_CLASSES = 10
TORCH_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'torch_vit.py'


def preset_config(name: str) -> tuple[ml_collections.ConfigDict, tuple[int, int, int], int]:
  """(config, image_shape, num_classes) for a preset: a repo config with the preset's model."""
  p = PRESETS[name]
  config = config_files.load_config_file(p['config'])
  config.dataset_name = p['dataset']
  config.dataset_configs.update(p['data'])
  config.update(p['recipe'])
  m = config.model
  m.positional_embedding = 'learned_1d'  # As benchmarks/torch_vit.py's twin.
  m.hidden_size, m.num_layers = p['hidden_size'], p['num_layers']
  m.num_heads, m.mlp_dim = p['num_heads'], p['mlp_dim']
  m.classifier, m.representation_size = 'gap', None
  m.dropout_rate = m.attention_dropout_rate = 0.0
  if 'stochastic_depth' in m:
    m.stochastic_depth = 0.0
  m.tokenizer.patches.size = (p['patch'], p['patch'])
  m.tokenizer.num_tokens, m.tokenizer.tokenlearner_loc = p['num_tokens'], p['tokenlearner_loc']
  m.tokenizer.use_v11, m.tokenizer.use_tokenfuse = True, False
  m.tokenizer.type = 'dynamic'
  if 'variant' in m:
    m.variant = None
  config.batch_size = PRESET_BATCH_SIZE
  return config, p['image_shape'], PRESET_NUM_CLASSES


def dataset_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
  """(image_shape, num_classes) of a resolved config's dataset; loads it unless known by name."""
  shape = input_pipeline.image_shape(config.dataset_name, config.dataset_configs)
  if shape is not None:
    return tuple(shape), input_pipeline.DATASETS[config.dataset_name.split(':')[0]].num_classes
  ds = input_pipeline.load_dataset(config)
  return tuple(ds.image_shape), ds.num_classes


def time_steps(step: Callable[[Any], Any], carry: Any, *, min_time_s: float = 10.0,
               windows: int = 5) -> dict[str, Any]:
  """Runs `carry = step(carry)` in `windows` timed windows after one warm-up call.

  Each window dispatches k calls (k chosen from the warm-up call's time so that all windows
  together take about `min_time_s`, at least one call each) and ends with `block_until_ready`;
  returns the median seconds per call. Compilation is the caller's (compile ahead of time).
  """
  start = time.perf_counter()
  carry = jax.block_until_ready(step(carry))
  first = time.perf_counter() - start
  per_window = max(1, round(min_time_s / windows / max(first, 1e-6)))
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(per_window):
      carry = step(carry)
    carry = jax.block_until_ready(carry)
    times.append((time.perf_counter() - start) / per_window)
  return dict(step_s=statistics.median(times), window_step_s=times, steps_per_window=per_window,
              carry=carry)


def synthetic_dataset(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                      num_classes: int, num_train: int, num_test: int, *, streamed: bool = False
                      ) -> input_pipeline.Dataset:
  """Random uint8 images and labels shaped like the config's data, in memory or as a stream.

  The stream repeats one normalised train batch and covers the test images once per eval, as
  `input_pipeline`'s streamed datasets do (host batches, one `device_put` per step).
  """
  rng = np.random.default_rng(0)
  h, w, c = image_shape
  train_images = rng.integers(0, 256, (num_train, h, w, c), np.uint8)
  train_labels = rng.integers(0, num_classes, (num_train,), np.int32)
  test_images = rng.integers(0, 256, (num_test, h, w, c), np.uint8)
  test_labels = rng.integers(0, num_classes, (num_test,), np.int32)
  info = input_pipeline.DATASETS.get(config.dataset_name.split(':')[0])
  mean, std = (info.mean, info.std) if info and len(info.mean) == c else ((0.5,) * c, (0.25,) * c)
  ds = input_pipeline.Dataset(
      name='synthetic', source='synthetic', num_classes=num_classes, image_shape=(h, w, c),
      num_train=num_train, num_valid=0, num_test=num_test, mean=mean, std=std,
      in_memory=not streamed)
  if not streamed:
    return dataclasses.replace(ds, train_images=train_images, train_labels=train_labels,
                               test_images=test_images, test_labels=test_labels)
  normalise = lambda x: ((x / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)

  def train_iter(batch_size, seed):
    del seed
    batch = {'inputs': normalise(train_images[:batch_size]), 'label': train_labels[:batch_size],
             'mask': np.ones(batch_size, np.float32)}
    while True:
      yield batch

  def eval_iter(split, batch_size):
    del split
    for i in range(0, num_test, batch_size):
      yield {'inputs': normalise(test_images[i:i + batch_size]),
             'label': test_labels[i:i + batch_size], 'mask': np.ones(batch_size, np.float32)}

  return dataclasses.replace(ds, train_iter=train_iter, eval_iter=eval_iter)


def benchmark_model(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                    num_classes: int, *, loop: str = 'chunk', steps_per_call: int = 4,
                    min_time_s: float = 10.0, windows: int = 5, eval_step: bool = True,
                    peak_gflops: float | None = None) -> dict[str, Any]:
  """Times the trainer's own runners (`loops.make_runners`) for `config` on synthetic data.

  Args:
    config: a training config (resolved here).
    image_shape: (H, W, C) of the synthetic images.
    num_classes: classes of the synthetic labels.
    loop: 'chunk' times the trainer's path for in-memory datasets (`steps_per_call` train steps
      per dispatch in a `lax.while_loop`, batches gathered and augmented on device); 'step' its
      path for streamed datasets (one `device_put` of a host batch and one jitted step per step).
    steps_per_call: train steps per timed call.
    min_time_s: timed seconds of training, split into `windows` windows.
    windows: timing windows; the median window is reported.
    eval_step: also time `evaluate` over about as many images as one train call (whole eval
      batches), the median of up to 3 evaluations.
    peak_gflops: the machine's matmul peak, to report the achieved share of it.

  Returns:
    A dict: name (the model's label), family, tokenizer ('dynamic' with a TokenLearner),
    num_params, batch_size, devices, loop, compile_s (building the runners plus the first,
    untimed call), train_step_s, train_images_per_s, train_window_step_s, eval_images_per_s,
    xla_train_flops_per_image (XLA's count for one `train_step`, per image),
    analytic_train_flops_per_image (ViT only, else None), train_gflops_per_s (achieved, by XLA's
    count) and peak_fraction (given `peak_gflops`).
  """
  if loop not in ('chunk', 'step'):
    raise ValueError(f"loop must be 'chunk' or 'step', got {loop!r}.")
  config = config_lib.resolve(config, num_devices=jax.device_count())
  batch_size = config.batch_size
  mesh = loops.make_mesh()
  replicated = NamedSharding(mesh, P())
  model = models.build_model(config.model, num_classes,
                                 dtype=config_lib.DTYPES[config.model_dtype_str])
  state = steps.create_train_state(jax.random.key(config.rng_seed), config, model,
                                   (1, *image_shape), config.num_training_steps or 10_000,
                                   replicated)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  xla_flops = flops.train_flops_per_image(config, model, image_shape)
  images_per_call = batch_size * steps_per_call
  num_test = config.eval_batch_size * max(1, round(images_per_call / config.eval_batch_size))
  ds = synthetic_dataset(config, image_shape, num_classes, images_per_call, num_test,
                         streamed=loop == 'step')
  rng = jax.device_put(jax.random.key(1), replicated)
  start = time.perf_counter()
  runners = loops.make_runners(ds, config, state, rng, mesh)
  run_train = lambda s: runners.run_chunk(s, 0, steps_per_call)[0]
  state = jax.block_until_ready(run_train(state))  # Streamed runners compile on first use.
  compile_s = time.perf_counter() - start
  timing = time_steps(run_train, state, min_time_s=min_time_s, windows=windows)
  state = timing['carry']
  call_s = timing['step_s']
  fields = comparison_report.model_fields(config)
  analytic = flops.analytic_train_flops(config.model, image_shape, num_classes) if (
      fields['family'] == 'vit') else None  # The analytic count knows the ViT only.
  result = dict(
      name=fields['label'], family=fields['family'],
      tokenizer=fields['tokenizer'], num_params=num_params,
      batch_size=batch_size, image_shape=list(image_shape), devices=mesh.devices.size,
      loop=loop, compile_s=compile_s, train_step_s=call_s / steps_per_call,
      train_images_per_s=images_per_call / call_s,
      train_window_step_s=[t / steps_per_call for t in timing['window_step_s']],
      calls_per_window=timing['steps_per_window'], xla_train_flops_per_image=xla_flops,
      analytic_train_flops_per_image=analytic)
  if xla_flops is not None:
    result['train_gflops_per_s'] = xla_flops * result['train_images_per_s'] / 1e9
    if peak_gflops:
      result['peak_fraction'] = result['train_gflops_per_s'] / peak_gflops
  if eval_step:
    runners.evaluate(state, 'test')  # Compiles.
    seconds = statistics.median(runners.evaluate(state, 'test')[1]
                                for _ in range(min(windows, 3)))
    result.update(eval_step_s=seconds * config.eval_batch_size / num_test,
                  eval_images_per_s=num_test / seconds)
  return result


def torch_images_per_s(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                       num_classes: int, *, min_time_s: float = 10.0, windows: int = 5,
                       timeout_s: float = 1800.0) -> dict[str, Any]:
  """Runs benchmarks/torch_vit.py on a resolved `config`'s model in a subprocess; returns its JSON.

  Returns {'error': message} when PyTorch is not installed, the model has no PyTorch equivalent
  there (V1 TokenLearner, TokenFuser, non-GAP/token pooling, representation layer), or it fails.
  """
  if importlib.util.find_spec('torch') is None:
    return dict(error='PyTorch is not installed (pip install torch) - skipped.')
  family = config.model.get('name', 'vit')
  if family != 'vit':
    return dict(error=f'benchmarks/torch_vit.py has no {family!r} model - skipped.')
  m = models.model_kwargs(config.model)
  unsupported = [what for what, bad in (
      ('TokenLearner V1', m.get('tokenlearner_loc') is not None and not m.get('use_v11')),
      ('TokenFuser', m.get('use_tokenfuse')),
      (f"classifier {m['classifier']!r}", m['classifier'] not in ('gap', 'token')),
      ('representation_size', m['representation_size']),
      (f"positional_embedding {m['positional_embedding']!r}",
       m['positional_embedding'] != 'learned_1d'),
      ('stochastic_depth', m['stochastic_depth'])) if bad]
  if unsupported:
    return dict(error='benchmarks/torch_vit.py has no ' + ', '.join(unsupported) + ' - skipped.')
  args = [
      f'--image_shape={",".join(map(str, image_shape))}',
      f'--patch={",".join(map(str, m["patch_size"]))}', f'--hidden_size={m["hidden_size"]}',
      f'--num_layers={m["num_layers"]}', f'--num_heads={m["num_heads"]}',
      f'--mlp_dim={m["mlp_dim"]}', f'--num_classes={num_classes}',
      f'--num_tokens={m["num_tokens"] if m.get("tokenlearner_loc") is not None else 0}',
      f'--tokenlearner_loc={m.get("tokenlearner_loc") or 0}', f'--classifier={m["classifier"]}',
      f'--dropout_rate={m["dropout_rate"]}', f'--batch_size={config.batch_size}',
      f'--min_time_s={min_time_s}', f'--windows={windows}']
  if config.max_grad_norm:
    args.append(f'--max_grad_norm={config.max_grad_norm}')
  try:
    out = subprocess.run([sys.executable, str(TORCH_SCRIPT), *args], capture_output=True,
                         text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return dict(error=f'torch_vit.py timed out after {timeout_s:.0f} s.')
  if out.returncode:
    last = (out.stderr.strip().splitlines() or ['(no output)'])[-1]
    return dict(error=f'torch_vit.py failed (exit {out.returncode}): {last}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_benchmark(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                  num_classes: int, *, with_tl: str = 'both', torch: bool = False,
                  **kwargs) -> dict[str, Any]:
  """Benchmarks each model (and PyTorch's twin, with `torch`) between two matmul-peak measurements.

  The peak is the better of the two (on a shared machine either may be depressed); each model's
  `peak_fraction` is its achieved train GFLOP/s over it. `kwargs` go to `benchmark_model`.
  """
  tl = {'both': (False, True), 'yes': (True,), 'no': (False,)}[with_tl]
  config = config_lib.resolve(config, num_devices=jax.device_count())
  variants = [models.with_tokenlearner(config, enabled) for enabled in tl]
  for cfg in variants:  # Every model checked before the first compile (the matmul peak).
    config_lib.resolve(cfg, num_devices=jax.device_count())
  peaks = [flops.matmul_peak_gflops()]
  results = []
  for cfg in variants:
    r = benchmark_model(cfg, image_shape, num_classes, **kwargs)
    if torch:
      r['torch'] = torch_images_per_s(cfg, image_shape, num_classes,
                                      min_time_s=kwargs.get('min_time_s', 10.0),
                                      windows=kwargs.get('windows', 5))
    results.append(r)
    logging.info('%s', _report_line(r))
  peaks.append(flops.matmul_peak_gflops())
  peak = max(peaks)
  for r in results:
    if 'train_gflops_per_s' in r:
      r['peak_fraction'] = r['train_gflops_per_s'] / peak
  return dict(matmul_peak_gflops=peak, matmul_peak_gflops_runs=peaks,
              backend=jax.default_backend(), devices=jax.device_count(),
              cpu_count=os.cpu_count(), jax=jax.__version__, models=results)


def _report_line(r: dict[str, Any]) -> str:
  return (f'{r["name"]}: {r["train_images_per_s"]:.1f} train images/s'
          + (f', {r["eval_images_per_s"]:.1f} eval images/s' if 'eval_images_per_s' in r else ''))


def format_report(report: dict[str, Any]) -> str:
  """The benchmark's printed table."""
  peaks = ' and '.join(f'{p:.1f}' for p in report['matmul_peak_gflops_runs'])
  lines = [f'{report["backend"]} x {report["devices"]} device(s), {report["cpu_count"]} CPU cores, '
           f'jax {report["jax"]}; f32 matmul peak (2048², best of 5, before and after): '
           f'{peaks} GFLOP/s', '']
  header = ['model', 'params', 'train img/s', 'eval img/s', 'train GFLOP/img (XLA)',
            'analytic', 'GFLOP/s', '% of peak', 'torch img/s']
  rows = []
  for r in report['models']:
    xla = r['xla_train_flops_per_image']
    t = r.get('torch')
    rows.append([
        r['name'], f'{r["num_params"]:,}', f'{r["train_images_per_s"]:.1f}',
        f'{r["eval_images_per_s"]:.1f}' if 'eval_images_per_s' in r else '-',
        f'{xla / 1e9:.4f}' if xla else '-', _gflops(r['analytic_train_flops_per_image']),
        f'{r["train_gflops_per_s"]:.1f}' if 'train_gflops_per_s' in r else '-',
        f'{r["peak_fraction"]:.1%}' if 'peak_fraction' in r else '-',
        '-' if t is None else f'{t["images_per_s"]:.1f}' if 'images_per_s' in t else 'n/a'])
  widths = [max(len(x) for x in col) for col in zip(header, *rows)]
  fmt = lambda cells: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))
  lines += [fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows]
  if len(report['models']) == 2:
    a, b = report['models']
    lines.append(f'\nTokenLearner speed-up (train images/s): '
                 f'{b["train_images_per_s"] / a["train_images_per_s"]:.2f}x')
    if all('images_per_s' in (m.get('torch') or {}) for m in (a, b)):
      lines.append(f'PyTorch speed-up: '
                   f'{b["torch"]["images_per_s"] / a["torch"]["images_per_s"]:.2f}x; '
                   f'JAX / PyTorch: ' + ', '.join(
                       f'{m["train_images_per_s"] / m["torch"]["images_per_s"]:.2f}x'
                       for m in (a, b)) + ' (ViT, TL)')
  for r in report['models']:
    if r.get('torch') and 'error' in r['torch']:
      lines.append(f'torch ({r["name"]}): {r["torch"]["error"]}')
  lines.append(f'\nTiming: {report["models"][0]["loop"]} loop, median of the windows after '
               'compilation; the machine may be shared, so compare ratios within one run.')
  return '\n'.join(lines)


def _gflops(value: float | None) -> str:
  return '-' if value is None else f'{value / 1e9:.4f}'


def check_flags(*, config_given: bool, preset: str | None, min_time_s: float, windows: int,
                steps_per_call: int, json_path: str | None) -> None:
  """Raises cli.FlagError (one line) for flags the benchmark cannot run with."""
  if config_given == (preset is not None):
    raise cli.FlagError('Give exactly one of --config and --preset.')
  cli.check_positive('min_time_s', min_time_s)
  cli.check_positive('windows', windows, integer=True)
  cli.check_positive('steps_per_call', steps_per_call, integer=True)
  cli.check_output_file('json', json_path)


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a script, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_enum('preset', None, list(PRESETS), 'Built-in model (instead of --config).')
  flags.DEFINE_enum('with_tokenlearner', 'both', ['both', 'yes', 'no'],
                    "Time the model with its TokenLearner ('dynamic'), without ('patch') or both.")
  flags.DEFINE_enum('loop', 'chunk', ['chunk', 'step'],
                    "'chunk': the trainer's multi-step loop on device-resident data; 'step': one "
                    'train_step per dispatch.')
  flags.DEFINE_integer('steps_per_call', 4, 'Train steps per dispatch with --loop=chunk.')
  flags.DEFINE_float('min_time_s', 10.0, 'Timed seconds of training per model (all windows).')
  flags.DEFINE_integer('windows', 5, 'Timing windows; the median is reported.')
  flags.DEFINE_bool('eval', True, 'Also time evaluation.')
  flags.DEFINE_bool('torch', False, 'Also time benchmarks/torch_vit.py (PyTorch eager).')
  flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')


# What stops the command with one line: bad flags or configs, missing data (unknown datasets).
USER_ERRORS = (cli.FlagError, config_lib.ConfigError, input_pipeline.DataError)


def main(argv):
  f = flags.FLAGS
  with cli.errors_in_one_line(*USER_ERRORS):
    if len(argv) > 1:
      raise cli.FlagError(f'Unexpected arguments: {" ".join(argv[1:])}')
    check_flags(config_given=f.config is not None, preset=f.preset, min_time_s=f.min_time_s,
                windows=f.windows, steps_per_call=f.steps_per_call, json_path=f.json)
    loops.use_one_device_per_cpu_core()  # As `vit_flax.main` does, so the numbers match training.
    if f.preset:
      config, image_shape, num_classes = preset_config(f.preset)
    else:
      config = f.config
      image_shape, num_classes = dataset_shape(config_lib.resolve(config))
    report = run_benchmark(config, image_shape, num_classes, with_tl=f.with_tokenlearner,
                           torch=f.torch, loop=f.loop, steps_per_call=f.steps_per_call,
                           min_time_s=f.min_time_s, windows=f.windows, eval_step=f.eval)
  print(format_report(report))
  if f.json:
    pathlib.Path(f.json).write_text(json.dumps(report, indent=2) + '\n')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
