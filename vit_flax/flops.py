"""FLOP counts of a model: XLA's cost analysis of the compiled program, and an analytic count.

Both count a multiply-add as 2 FLOPs; scenic's reported GFLOPs count it as 1 (half these values).
`matmul_peak_gflops` measures the machine's f32 matmul rate, to put achieved GFLOP/s in context.
"""

from collections.abc import Sequence
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections

from vit_flax import config as config_lib
from vit_flax import models
from vit_flax import steps

TL_BOTTLENECK = 64  # TokenLearner V1.1 / TokenFuser `token_masking` width (scenic's fixed value).


def analytic_train_flops(model_config: ml_collections.ConfigDict, image_shape: Sequence[int],
                         num_classes: int) -> float:
  """FLOPs of one train step per image: 3 x the forward matmuls/convs/attention (1 MAC = 2 FLOPs).

  Counts the patch embedding, Q/K/V/out projections, both attention products, the MLPs, the
  TokenLearner (V1.1: C -> 64 -> S MLP and the weighted sum; V1: four 3x3 convs and the pooling),
  the TokenFuser, pre-logits and head. Elementwise work (softmax, LayerNorm, GELU, the optimizer)
  is left out; it adds a few percent on small models.
  """
  m = models.model_kwargs(model_config)
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


def _cost_flops(lowered_or_compiled) -> float | None:
  """FLOPs from XLA's cost analysis (a lowered module counts the whole, unpartitioned batch)."""
  cost = lowered_or_compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def forward_gflops(model, image_shape: Sequence[int]) -> float:
  """XLA's FLOP count of one inference forward pass at batch 1, in GFLOPs (nothing is compiled)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                train=False))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return (_cost_flops(forward.lower(variables, x)) or 0.0) / 1e9


def train_flops_per_image(config: ml_collections.ConfigDict, model, image_shape: Sequence[int]
                          ) -> float | None:
  """XLA's FLOP count of one `steps.train_step` per image on the resolved `config`'s batch.

  Traced and lowered, not compiled. The step is counted unsplit: XLA's cost analysis counts a
  loop body once, so micro-batching would hide all but one micro-batch.
  """
  key = jax.random.key(0)
  state = jax.eval_shape(lambda: steps.create_train_state(
      key, config, model, (1, *image_shape), 1))
  step_fn = functools.partial(steps.train_step, num_classes=model.num_classes, loss=config.loss,
                              label_smoothing=config.label_smoothing)
  batch = {'inputs': jax.ShapeDtypeStruct((config.batch_size, *image_shape), jnp.float32),
           'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  flops = _cost_flops(jax.jit(step_fn).lower(state, batch, rng))
  return flops / config.batch_size if flops is not None else None
