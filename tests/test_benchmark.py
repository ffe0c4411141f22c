"""Tests for vit_flax.benchmark: FLOP counts (XLA vs analytic), the timing API, the torch twin."""

import importlib.util
import math
import sys

import pytest

from helpers import tiny_config
from vit_flax import benchmark
from vit_flax import config as config_lib
from vit_flax import flops
from vit_flax import models

SHAPE = (32, 32, 3)  # 8 x 8 = 64 patch tokens with 4 x 4 patches.


def _tiny_config(**overrides):
  """configs/tiny.py at width 96 / MLP 384 (matmuls dominate), 4 x 4 patches, no dropout."""
  config = tiny_config()
  config.batch_size = 8
  m = config.model
  m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim = 96, 2, 2, 384
  m.dropout_rate = 0.0
  m.tokenizer.patches.size = (4, 4)
  m.tokenizer.num_tokens, m.tokenizer.tokenlearner_loc = 8, 1
  for key, value in overrides.items():
    if key.startswith('tokenizer_'):
      m.tokenizer[key[len('tokenizer_'):]] = value
    else:
      m[key] = value
  return config


@pytest.mark.parametrize('overrides', [
    dict(tokenizer_type='patch'),
    dict(),  # V1.1 before block 1.
    dict(tokenizer_use_v11=False),
    dict(tokenizer_use_tokenfuse=True),
    dict(classifier='token', representation_size=32),
], ids=['vit', 'tl_v11', 'tl_v1', 'tl_fuser', 'cls_token_prelogits'])
def test_xla_flops_match_analytic_count(overrides):
  config = config_lib.resolve(_tiny_config(**overrides))
  xla = flops.train_flops_per_image(config, models.build_model(config.model, 10), SHAPE)
  analytic = flops.analytic_train_flops(config.model, SHAPE, 10)
  # XLA also counts elementwise work (softmax, LayerNorm, GELU, AdamW) that the formula leaves out.
  assert analytic <= xla <= 1.05 * analytic, (xla, analytic, xla / analytic)


def test_analytic_flops_by_hand():
  # One block on 64 tokens of width 96 (MLP 384), 4 x 4 x 3 patches, 10 classes.
  config = _tiny_config(tokenizer_type='patch', num_layers=1)
  n, d, m = 64, 96, 384
  forward = (2 * n * 48 * d  # embedding
             + 2 * n * d * 4 * d  # q, k, v, out
             + 2 * 2 * n * n * d  # q k^T and weights v
             + 2 * 2 * n * d * m  # MLP
             + 2 * d * 10)  # head
  assert flops.analytic_train_flops(config.model, SHAPE, 10) == 3 * forward


def test_tokenlearner_reduces_flops_like_the_presets():
  # XLA's counts for the presets: mnist 0.285 (ViT) / 0.083 (TL) GFLOP per image; cifar 2.18 / 1.23.
  expected = {'mnist': (0.285e9, 0.083e9), 'cifar': (2.18e9, 1.23e9)}
  for name, (vit_flops, tl_flops) in expected.items():
    config, shape, num_classes = benchmark.preset_config(name)
    vit = flops.analytic_train_flops(
        models.with_tokenlearner(config, False).model, shape, num_classes)
    tl = flops.analytic_train_flops(config.model, shape, num_classes)
    assert vit == pytest.approx(vit_flops, rel=0.06) and tl == pytest.approx(tl_flops, rel=0.06)


@pytest.mark.parametrize('loop', ['chunk', 'step'])
def test_benchmark_model_returns_sane_numbers(loop):
  config = tiny_config()
  config.batch_size = config.eval_batch_size = 16
  r = benchmark.benchmark_model(config, (28, 28, 1), 10, loop=loop, steps_per_call=2,
                                min_time_s=0.3, windows=2, peak_gflops=100.0)
  assert r['loop'] == loop
  assert r['num_params'] > 0 and r['batch_size'] == 16 and r['tokenizer'] == 'dynamic'
  for key in ('train_images_per_s', 'eval_images_per_s', 'xla_train_flops_per_image',
              'analytic_train_flops_per_image', 'train_gflops_per_s', 'peak_fraction'):
    assert math.isfinite(r[key]) and r[key] > 0, key
  assert r['train_images_per_s'] == pytest.approx(16 / r['train_step_s'])
  assert len(r['train_window_step_s']) == 2
  assert r['peak_fraction'] == pytest.approx(r['train_gflops_per_s'] / 100.0)


def test_time_steps_counts_calls():
  calls = []
  out = benchmark.time_steps(lambda c: calls.append(c) or c + 1, 0, min_time_s=0.01, windows=3)
  assert out['carry'] == len(calls) == 1 + 3 * out['steps_per_window']
  assert len(out['window_step_s']) == 3 and out['step_s'] >= 0


def test_preset_models():
  config, shape, num_classes = benchmark.preset_config('mnist')
  assert (shape, num_classes, config.batch_size) == ((28, 28, 1), 10, 128)
  m = config.model
  assert (m.hidden_size, m.num_layers, m.num_heads, m.mlp_dim, m.classifier) == (64, 4, 4, 128,
                                                                                   'gap')
  assert (m.tokenizer.patches.size, m.tokenizer.num_tokens, m.tokenizer.tokenlearner_loc) == (
      (2, 2), 8, 1)
  assert models.with_tokenlearner(config, False).model.tokenizer.type == 'patch'
  assert config.model.tokenizer.type == 'dynamic'  # with_tokenlearner copies.
  # The step the README's speed table timed, whatever the training config's recipe is now.
  assert m.positional_embedding == 'learned_1d'  # Like the PyTorch twin.
  dc = config.dataset_configs
  assert (dc.crop_padding, dc.random_resized_crop, dc.trivial_augment) == (2, None, False)
  assert (config.ema_decay, config.label_smoothing) == (None, None)


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='PyTorch not installed')
@pytest.mark.parametrize('tokenlearner', [False, True])
def test_torch_twin_has_the_same_parameter_count(tokenlearner):
  sys.path.insert(0, str(benchmark.TORCH_SCRIPT.parent))
  try:
    import torch_vit  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  config, shape, num_classes = benchmark.preset_config('mnist')
  config = models.with_tokenlearner(config, tokenlearner)
  torch_model = torch_vit.ViT(
      image_shape=shape, patch=(2, 2), width=64, num_layers=4, num_heads=4, mlp_dim=128,
      num_classes=num_classes, num_tokens=8 if tokenlearner else None, tokenlearner_loc=1)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(lambda: models.build_model(config.model, num_classes).init(
      jax.random.key(0), jnp.zeros((1, *shape)))['params'])
  flax_count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  assert sum(p.numel() for p in torch_model.parameters()) == flax_count


def test_format_report_shows_speedups_and_torch_errors():
  model = dict(name='ViT', num_params=1000, train_images_per_s=100.0, eval_images_per_s=300.0,
               xla_train_flops_per_image=2.9e8, analytic_train_flops_per_image=2.8e8,
               train_gflops_per_s=29.0, peak_fraction=0.16, loop='chunk',
               torch=dict(images_per_s=200.0))
  tl = dict(model, name='ViT + TL', train_images_per_s=300.0, torch=dict(images_per_s=500.0))
  report = dict(backend='cpu', devices=1, cpu_count=2, jax='0', matmul_peak_gflops=180.0,
                matmul_peak_gflops_runs=[170.0, 180.0], models=[model, tl])
  text = benchmark.format_report(report)
  assert 'TokenLearner speed-up (train images/s): 3.00x' in text
  assert 'PyTorch speed-up: 2.50x; JAX / PyTorch: 0.50x, 0.60x (ViT, TL)' in text
  tl['torch'] = dict(error='PyTorch is not installed')
  assert 'torch (ViT + TL): PyTorch is not installed' in benchmark.format_report(report)


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='PyTorch not installed')
def test_torch_twin_runs_in_a_subprocess():
  config = config_lib.resolve(tiny_config())
  r = benchmark.torch_images_per_s(config, (28, 28, 1), 10, min_time_s=0.2, windows=2)
  assert r['images_per_s'] > 0 and len(r['window_step_s']) == 2 and r['threads'] >= 1
  config.model.tokenizer.use_tokenfuse = True
  assert 'TokenFuser' in benchmark.torch_images_per_s(config, (28, 28, 1), 10)['error']
