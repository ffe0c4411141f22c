r"""Times vit_flax's jitted train step (and eval) on synthetic data; optional PyTorch reference.

  python -m vit_flax.benchmark --preset=mnist [--with_tokenlearner=both|yes|no] [--torch]
  python -m vit_flax.benchmark --config=configs/mnist_tl.py [--config.batch_size=256]

For each model (by default the config's model with and without its TokenLearner) it builds the
train state with `train.create_train_state` on the trainer's mesh, puts synthetic data on the
device(s), compiles the trainer's own step ahead of time and runs it for `--min_time_s` seconds
split into `--windows` windows (each ending in `block_until_ready`), reporting the median window.
`--loop=chunk` (default) times `train.train_chunk`, the loop the trainer runs for in-memory datasets
(`--steps_per_call` steps of `train.train_step` per dispatch, batches gathered and augmented on
device); `--loop=step` times one jitted `train.train_step` per dispatch on a batch already on the
device(s). It prints:

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
import functools
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np

from vit_flax import input_pipeline
from vit_flax import train
from vit_flax import vit

# The two comparison models (train batch 128, 10 classes, no dropout).
PRESETS = {
    'mnist': dict(image_shape=(28, 28, 1), patch=2, hidden_size=64, num_layers=4, num_heads=4,
                  mlp_dim=128, num_tokens=8, tokenlearner_loc=1, config='mnist_tl.py',
                  dataset='mnist'),
    'cifar': dict(image_shape=(32, 32, 3), patch=4, hidden_size=192, num_layers=12, num_heads=3,
                  mlp_dim=768, num_tokens=8, tokenlearner_loc=6, config='cifar10_tl.py',
                  dataset='cifar10'),
}
PRESET_BATCH_SIZE = 128
PRESET_NUM_CLASSES = 10
TORCH_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'torch_vit.py'
TL_BOTTLENECK = 64  # TokenLearner V1.1 / TokenFuser `token_masking` width (scenic's fixed value).


def analytic_train_flops(model_config: ml_collections.ConfigDict, image_shape: Sequence[int],
                         num_classes: int) -> float:
  """FLOPs of one train step per image: 3 x the forward matmuls/convs/attention (1 MAC = 2 FLOPs).

  Counts the patch embedding, Q/K/V/out projections, both attention products, the MLPs, the
  TokenLearner (V1.1: C -> 64 -> S MLP and the weighted sum; V1: four 3x3 convs and the pooling),
  the TokenFuser, pre-logits and head. Elementwise work (softmax, LayerNorm, GELU, the optimizer)
  is left out; it adds a few percent on small models.
  """
  m = vit.model_kwargs(model_config)
  h, w, c = image_shape
  ph, pw = m['patch_size']
  n = (h // ph) * (w // pw)  # Patch tokens.
  d, loc, s = m['hidden_size'], m.get('tokenlearner_loc'), m.get('num_tokens')
  extra = 1 if m['classifier'] == 'token' else 0  # The CLS token.
  flops = 2 * n * (ph * pw * c) * d  # Patch embedding conv.

  def block(tokens):  # Q, K, V, out projections + MLP, then QK^T and AV.
    return 2 * tokens * d * (4 * d + 2 * m['mlp_dim']) + 4 * tokens * tokens * d

  def learner():
    if not m.get('use_v11', True):  # V1: 3x3 convs C->S, then 3 x S->S; sigmoid-weighted sum.
      return 2 * n * 9 * s * (d + 3 * s) + 2 * s * n * d
    return 2 * n * TL_BOTTLENECK * (d + s) + 2 * s * n * d  # MLP C->64->S, weighted sum.

  def fuser():  # Token mixing S->S, mask MLP C->64->S, then M @ Y.
    return 2 * d * s * s + 2 * n * TL_BOTTLENECK * (d + s) + 2 * n * s * d

  tokens = n
  for layer in range(m['num_layers']):
    if loc is not None and m.get('use_tokenfuse') and layer >= loc:
      flops += learner() + block(s + extra) + fuser()
      continue
    if loc is not None and layer == loc:
      flops += learner()
      tokens = s
    flops += block(tokens + extra)
  width = m['representation_size'] or d
  if m['representation_size']:
    flops += 2 * d * width
  flops += 2 * width * num_classes
  return 3.0 * flops


def with_tokenlearner(config: ml_collections.ConfigDict, enabled: bool, *,
                      num_tokens: int | None = None,
                      tokenlearner_loc: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` whose model is 'dynamic' (TokenLearner) or 'patch' (plain ViT)."""
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked deep copy.
  config.model.tokenizer.type = 'dynamic' if enabled else 'patch'
  if num_tokens is not None:
    config.model.tokenizer.num_tokens = num_tokens
  if tokenlearner_loc is not None:
    config.model.tokenizer.tokenlearner_loc = tokenlearner_loc
  return config


def preset_config(name: str) -> tuple[ml_collections.ConfigDict, tuple[int, int, int], int]:
  """(config, image_shape, num_classes) for a preset: a repo config with the preset's model."""
  p = PRESETS[name]
  configs_dir = pathlib.Path(__file__).resolve().parent.parent / 'configs'
  path = configs_dir / p['config']
  if not path.exists():  # Training settings barely matter for speed; tiny.py always exists.
    path = configs_dir / 'tiny.py'
  config = ml_collections.ConfigDict(_load_config_file(path).to_dict())
  config.dataset_name = p['dataset']
  m = config.model
  m.hidden_size, m.num_layers = p['hidden_size'], p['num_layers']
  m.num_heads, m.mlp_dim = p['num_heads'], p['mlp_dim']
  m.classifier, m.representation_size = 'gap', None
  m.dropout_rate = m.attention_dropout_rate = 0.0
  if 'stochastic_depth' in m:
    m.stochastic_depth = 0.0
  m.tokenizer.patches.size = [p['patch'], p['patch']]
  m.tokenizer.num_tokens, m.tokenizer.tokenlearner_loc = p['num_tokens'], p['tokenlearner_loc']
  m.tokenizer.use_v11, m.tokenizer.use_tokenfuse = True, False
  m.tokenizer.type = 'dynamic'
  if 'variant' in m:
    m.variant = None
  config.batch_size = PRESET_BATCH_SIZE
  return config, p['image_shape'], PRESET_NUM_CLASSES


def _load_config_file(path: pathlib.Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f'_vit_flax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def dataset_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
  """(image_shape, num_classes) of the config's dataset; loads it only if the trainer can't."""
  shape = train.known_image_shape(config)
  if shape is not None:
    return tuple(shape), train.KNOWN_DATASETS[config.dataset_name][1]
  ds = input_pipeline.load_dataset(config)
  return tuple(ds.image_shape), ds.num_classes


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` f32 `[n, n] @ [n, n]` GFLOP/s with jnp on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


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


def _cost_flops(lowered_or_compiled) -> float | None:
  """FLOPs from XLA's cost analysis (a lowered module counts the whole, unpartitioned batch)."""
  cost = lowered_or_compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def forward_flops(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                  num_classes: int) -> float:
  """XLA's FLOP count of one inference forward pass at batch 1 (the trainer's gflops_per_image)."""
  model = vit.build_model(config.model, num_classes)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return _cost_flops(forward.lower(params, x)) or 0.0


def xla_train_flops(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                    num_classes: int) -> float | None:
  """XLA's FLOP count of one `train.train_step` per image (traced and lowered, not compiled)."""
  model = vit.build_model(config.model, num_classes,
                          dtype=train.DTYPES[config.get('model_dtype_str', 'float32')])
  state = jax.eval_shape(lambda: train.create_train_state(
      jax.random.key(0), config, model, (1, *image_shape), config.get('num_training_steps') or 1))
  step_fn = functools.partial(train.train_step, loss=config.get('loss', 'softmax'),
                              label_smoothing=config.get('label_smoothing'))
  return _step_flops(state, step_fn, config.batch_size, image_shape)


def _step_flops(state, step_fn, batch_size: int, image_shape: Sequence[int]) -> float | None:
  """Per-image FLOPs of `step_fn`; the lowered (unpartitioned) module counts the global batch."""
  batch = {'inputs': jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  flops = _cost_flops(jax.jit(step_fn).lower(state, batch, rng))
  return flops / batch_size if flops is not None else None


def benchmark_model(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                    num_classes: int, *, loop: str = 'chunk', steps_per_call: int = 4,
                    min_time_s: float = 10.0, windows: int = 5, eval_step: bool = True,
                    peak_gflops: float | None = None) -> dict[str, Any]:
  """Compiles and times the trainer's train step (and eval) for `config` on synthetic data.

  Args:
    config: a training config (model, batch sizes, optimizer as the trainer reads them).
    image_shape: (H, W, C) of the synthetic images.
    num_classes: classes of the synthetic labels.
    loop: 'chunk' times `train.train_chunk`, the trainer's loop for in-memory datasets
      (`steps_per_call` train steps per dispatch in a `lax.while_loop`, batches gathered and
      preprocessed on device from a uint8 dataset of `steps_per_call` batches); 'step' times one
      jitted `train.train_step` per dispatch on a normalised float batch already on the device(s)
      (the trainer's path for streamed datasets).
    steps_per_call: train steps per dispatch with loop='chunk'.
    min_time_s: timed seconds of training (eval gets half), split into `windows` windows.
    windows: timing windows; the median window is reported.
    eval_step: also time evaluation (`evaluate_arrays` over about as many images as one train
      call, whole eval batches, with 'chunk'; one jitted `eval_step` per dispatch with 'step'),
      for half of `min_time_s` in at most 3 windows.
    peak_gflops: the machine's matmul peak, to report the achieved share of it.

  Returns:
    A dict: name, tokenizer, num_params, batch_size, devices, loop, compile_s, train_step_s,
    train_images_per_s, train_window_step_s, eval_images_per_s, xla_train_flops_per_image
    (XLA's count for one `train_step`, per image), analytic_train_flops_per_image,
    train_gflops_per_s (achieved, by XLA's count) and peak_fraction (given `peak_gflops`).
  """
  if loop not in ('chunk', 'step'):
    raise ValueError(f"loop must be 'chunk' or 'step', got {loop!r}.")
  batch_size = config.batch_size
  eval_batch_size = config.get('eval_batch_size') or batch_size
  mesh = train.make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  dtype = train.DTYPES[config.get('model_dtype_str', 'float32')]
  model = vit.build_model(config.model, num_classes, dtype=dtype)
  rng = jax.random.key(config.get('rng_seed', 0))
  state = train.create_train_state(rng, config, model, (1, *image_shape),
                                   config.get('num_training_steps') or 10_000, replicated)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  loss = config.get('loss', 'softmax')
  step_fn = functools.partial(train.train_step, loss=loss,
                              label_smoothing=config.get('label_smoothing'))
  # XLA's cost analysis counts a loop body once, so FLOPs come from the unsplit step; the timed
  # steps split batches into micro-batches exactly as the trainer does.
  xla_flops = _step_flops(state, step_fn, batch_size, image_shape)
  num_devices = jax.device_count()
  step_fn = functools.partial(
      step_fn, num_microbatches=train.num_microbatches(config, batch_size, num_devices))
  eval_fn = functools.partial(
      train.eval_step, loss=loss,
      num_microbatches=train.num_microbatches(config, eval_batch_size, num_devices))
  train_rng = jax.device_put(jax.random.key(1), replicated)

  data_rng = np.random.default_rng(0)
  start = time.perf_counter()
  if loop == 'chunk':
    n = batch_size * steps_per_call
    images = jax.device_put(data_rng.integers(0, 256, (n, *image_shape), np.uint8), replicated)
    labels = jax.device_put(data_rng.integers(0, num_classes, (n,), np.int32), replicated)
    dc = train.dataset_configs(config)
    augment = functools.partial(input_pipeline.preprocess, train=True, dataset=_stats(config),
                                crop_padding=dc['crop_padding'], random_flip=dc['random_flip'])
    scalar = lambda v: jax.device_put(np.int32(v), replicated)
    args = (images, labels, train_rng, scalar(0), scalar(0), scalar(steps_per_call))
    chunk = jax.jit(functools.partial(
        train.train_chunk, batch_size=batch_size, step_fn=step_fn, preprocess_fn=augment,
        batch_sharding=batch_sharding), donate_argnums=0, out_shardings=replicated)
    compiled = chunk.lower(state, *args).compile()
    run_train = lambda s: compiled(s, *args)[0]
    images_per_call = n
  else:
    batch = jax.device_put({
        'inputs': data_rng.standard_normal((batch_size, *image_shape), np.float32),
        'label': data_rng.integers(0, num_classes, (batch_size,), np.int32)}, batch_sharding)
    compiled = jax.jit(step_fn, donate_argnums=0, out_shardings=replicated).lower(
        state, batch, train_rng).compile()
    run_train = lambda s: compiled(s, batch, train_rng)[0]
    images_per_call = batch_size
  compile_s = time.perf_counter() - start
  timing = time_steps(run_train, state, min_time_s=min_time_s, windows=windows)
  state = timing['carry']
  call_s = timing['step_s']
  result = dict(
      name=_model_name(config), tokenizer=config.model.tokenizer.type, num_params=num_params,
      batch_size=batch_size, image_shape=list(image_shape), devices=len(mesh.devices.flat),
      loop=loop, compile_s=compile_s, train_step_s=call_s * batch_size / images_per_call,
      train_images_per_s=images_per_call / call_s,
      train_window_step_s=[t * batch_size / images_per_call for t in timing['window_step_s']],
      calls_per_window=timing['steps_per_window'], xla_train_flops_per_image=xla_flops,
      analytic_train_flops_per_image=analytic_train_flops(config.model, image_shape, num_classes))
  if xla_flops is not None:
    result['train_gflops_per_s'] = xla_flops * result['train_images_per_s'] / 1e9
    if peak_gflops:
      result['peak_fraction'] = result['train_gflops_per_s'] / peak_gflops
  if eval_step:
    eval_batches = max(1, round(images_per_call / eval_batch_size))
    result.update(_time_eval(state, eval_fn, loop, eval_batch_size, eval_batches, image_shape,
                             num_classes, _stats(config), replicated, batch_sharding,
                             min_time_s / 2, min(windows, 3)))
  return result


def _time_eval(state, eval_fn, loop, batch_size, num_batches, image_shape, num_classes, stats,
               replicated, batch_sharding, min_time_s, windows) -> dict[str, float]:
  """Eval images/s: the trainer's `evaluate_arrays` ('chunk') or one `eval_step` per dispatch."""
  data_rng = np.random.default_rng(1)
  n = batch_size * (num_batches if loop == 'chunk' else 1)
  images = data_rng.integers(0, 256, (n, *image_shape), np.uint8)
  labels = data_rng.integers(0, num_classes, (n,), np.int32)
  mask = np.ones((n,), np.float32)
  if loop == 'chunk':
    normalise = lambda x: input_pipeline.preprocess(x, None, train=False, dataset=stats)
    data = jax.device_put((images, labels, mask), replicated)
    compiled = jax.jit(functools.partial(
        train.evaluate_arrays, batch_size=batch_size, eval_fn=eval_fn, preprocess_fn=normalise,
        batch_sharding=batch_sharding), out_shardings=replicated).lower(state, *data).compile()
    run = lambda s: (s, compiled(s, *data))
  else:
    batch = jax.device_put({'inputs': (images / 255.0).astype(np.float32), 'label': labels,
                            'mask': mask}, batch_sharding)
    compiled = jax.jit(eval_fn, out_shardings=replicated).lower(state, batch).compile()
    run = lambda s: (s, compiled(s, batch))
  # Each call's result is blocked on (the carry holds it), so calls never overlap.
  timing = time_steps(lambda c: jax.block_until_ready(run(c[0])), (state, None),
                      min_time_s=min_time_s, windows=windows)
  return dict(eval_step_s=timing['step_s'] * batch_size / n,
              eval_images_per_s=n / timing['step_s'])


def _stats(config: ml_collections.ConfigDict) -> str:
  """The dataset whose mean/std normalise the synthetic images (any works for timing)."""
  return config.dataset_name if config.dataset_name in input_pipeline.MEAN_STD else 'mnist'


def _model_name(config: ml_collections.ConfigDict) -> str:
  tok = config.model.tokenizer
  if tok.type != 'dynamic':
    return 'ViT'
  version = 'V1.1' if tok.get('use_v11', True) else 'V1'
  fuser = ' + TokenFuser' if tok.get('use_tokenfuse', False) else ''
  return f'ViT + TokenLearner {version}{fuser} (S={tok.num_tokens}, loc={tok.tokenlearner_loc})'


def torch_images_per_s(config: ml_collections.ConfigDict, image_shape: Sequence[int],
                       num_classes: int, *, min_time_s: float = 10.0, windows: int = 5,
                       timeout_s: float = 1800.0) -> dict[str, Any]:
  """Runs benchmarks/torch_vit.py on `config`'s model in a subprocess; returns its JSON result.

  Returns {'error': message} when PyTorch is not installed, the model has no PyTorch equivalent
  there (V1 TokenLearner, TokenFuser, non-GAP/token pooling, representation layer), or it fails.
  """
  if importlib.util.find_spec('torch') is None:
    return dict(error='PyTorch is not installed (pip install torch) - skipped.')
  m = vit.model_kwargs(config.model)
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
  if config.get('max_grad_norm'):
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
  peaks = [matmul_peak_gflops()]
  results = []
  for enabled in tl:
    cfg = with_tokenlearner(config, enabled)
    r = benchmark_model(cfg, image_shape, num_classes, **kwargs)
    if torch:
      r['torch'] = torch_images_per_s(cfg, image_shape, num_classes,
                                      min_time_s=kwargs.get('min_time_s', 10.0),
                                      windows=kwargs.get('windows', 5))
    results.append(r)
    logging.info('%s', _report_line(r))
  peaks.append(matmul_peak_gflops())
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
        f'{xla / 1e9:.4f}' if xla else '-', f'{r["analytic_train_flops_per_image"] / 1e9:.4f}',
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.use_one_device_per_cpu_core()  # As `vit_flax.main` does, so the numbers match training.
  f = flags.FLAGS
  if (f.config is None) == (f.preset is None):
    raise app.UsageError('Give exactly one of --config and --preset.')
  if f.preset:
    config, image_shape, num_classes = preset_config(f.preset)
  else:
    config = f.config
    image_shape, num_classes = dataset_shape(config)
  report = run_benchmark(config, image_shape, num_classes, with_tl=f.with_tokenlearner,
                         torch=f.torch, loop=f.loop, steps_per_call=f.steps_per_call,
                         min_time_s=f.min_time_s, windows=f.windows, eval_step=f.eval)
  print(format_report(report))
  if f.json:
    pathlib.Path(f.json).write_text(json.dumps(report, indent=2) + '\n')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
