"""Transformer building blocks with scenic's parameter names and initialisers.

Every module computes in `dtype` and keeps float32 parameters (`param_dtype`), so `dtype=bfloat16`
is mixed precision. LayerNorms use flax's default epsilon 1e-6 and GELU is flax's default tanh
approximation, as in scenic (`approximate_gelu=False` gives the exact form timm uses).
The extras the other model families need (LayerScale, talking heads, an additive logits bias,
queries from the first tokens only) are off by default, so scenic's trees and outputs stay as they
are.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

XAVIER = nn.initializers.xavier_uniform()
TINY_NORMAL = nn.initializers.normal(stddev=1e-6)  # Scenic's MLP bias init.


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding `[1, h*w, dim]`, scenic's formula (row-major grid).

  Channels are [sin(x), cos(x), sin(y), cos(y)], each `dim // 4` wide, frequencies
  temperature**(-k / (dim // 4)); x is the column and y the row of a token.
  """
  if dim % 4:
    raise ValueError(f'sinusoidal_2d needs hidden_size divisible by 4, got {dim}.')
  omega = 1.0 / temperature**(np.arange(dim // 4) / (dim // 4))  # [dim/4]
  y, x = np.mgrid[:h, :w]  # [h, w] each
  x = np.einsum('m,d->md', x.reshape(-1), omega)  # [h*w, dim/4]
  y = np.einsum('m,d->md', y.reshape(-1), omega)  # [h*w, dim/4]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)  # [h*w, dim]
  return pe[None].astype(np.float32)  # [1, h*w, dim]


class PatchEmbedding(nn.Module):
  """Non-overlapping patches to tokens: `[B, *S, C]` -> `[B, *S/p, D]` (S: H, W or T, H, W).

  The same function and parameters as `nn.Conv(D, p, strides=p, padding='VALID')` (kernel
  `[*p, C, D]`, lecun-normal init, zero bias), computed as a reshape and one matmul: on a CPU that
  is faster than XLA's convolution, most of all in its backward pass. Sizes must divide by `p`.
  """
  features: int
  patch_size: tuple[int, ...]  # (ph, pw) for images; (pt, ph, pw) for clips.
  dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()  # nn.Conv's default.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, c = tuple(self.patch_size), x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (*p, c, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    sizes = x.shape[1:-1]
    if len(sizes) != len(p) or any(s % q for s, q in zip(sizes, p)):
      raise ValueError(f'Input sizes {sizes} are not divisible by the patch size {p}.')
    b, nd = x.shape[0], len(p)
    grid = tuple(s // q for s, q in zip(sizes, p))
    x = x.reshape(b, *(d for g, q in zip(grid, p) for d in (g, q)), c)  # [B, g0, p0, g1, p1, .., C]
    order = (0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
    x = x.transpose(order).reshape(b, *grid, math.prod(p) * c)  # [B, g0, g1, .., p0*p1*..*C]
    w = kernel.reshape(-1, self.features).astype(self.dtype)  # [p0*p1*..*C, D]
    return x.astype(self.dtype) @ w + bias.astype(self.dtype)  # [B, *grid, D]


class ShiftedConv(nn.Module):
  """A k x k convolution `[B, H, W, C]` -> `[B, H', W', F]` with `nn.Conv`'s parameters (kernel
  `[k, k, C or 1, F]`, bias `[F]`, the same inits), padding k // 2 on every side, computed from
  the k * k shifted (strided) slices of the padded input: one matmul, or for a depthwise
  convolution (`depthwise`, F = C) a weighted sum. On a CPU XLA's own convolution is many times
  slower, above all depthwise and in the backward pass.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  depthwise: bool = False  # feature_group_count = C.
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, c = self.kernel_size, self.strides, x.shape[-1]
    if self.depthwise and self.features != c:
      raise ValueError(f'A depthwise convolution keeps the {c} channels, got features='
                       f'{self.features}.')
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, 1 if self.depthwise else c, self.features), jnp.float32)
    p = k // 2
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H+2p, W+2p, C]
    ho, wo = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
    shifted = [x[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s]  # [B, H', W', C] each
               for i in range(k) for j in range(k)]
    w = kernel.astype(self.dtype)
    if self.depthwise:
      y = sum(a * w[i // k, i % k, 0] for i, a in enumerate(shifted))  # [B, H', W', C]
    else:
      y = jnp.concatenate(shifted, axis=-1) @ w.reshape(k * k * c, -1)  # [B, H', W', F]
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32
                         ).astype(self.dtype)
    return y


class AddPositionEmbs(nn.Module):
  """Adds a learned `pos_embedding` `[1, N, D]` (init normal(0.02)) to `[B, N, D]` inputs."""
  posemb_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param('pos_embedding', self.posemb_init, (1, *x.shape[1:]), jnp.float32)
    return x + pe.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dropout -> Dense -> Dropout: `[..., C]` -> `[..., out_dim or C]`."""
  mlp_dim: int
  out_dim: int | None = None  # None: the input width.
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True  # tanh GELU (flax's, scenic's); False: exact erf GELU (timm's).

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    dense = lambda n: nn.Dense(n, dtype=self.dtype, kernel_init=XAVIER, bias_init=TINY_NORMAL)
    out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
    x = nn.gelu(dense(self.mlp_dim)(x), approximate=self.approximate_gelu)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = dense(out_dim)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention `[..., N, D]` -> `[..., Q, D]` with flax's parameter tree (query/key/value/out).

  Parameters: `{query,key,value}/kernel [D, heads, D/heads]`, `bias [heads, D/heads]`,
  `out/kernel [heads, D/heads, D]`, `out/bias [D]`; xavier-uniform kernels, zero biases, so a
  scenic or flax `MultiHeadDotProductAttention` checkpoint loads unchanged. The softmax runs in
  float32. Sows the softmax weights `[..., heads, Q, N]` (before dropout) as
  `intermediates/.../attention_weights` (a no-op unless that collection is mutable).
  Attention dropout is per element (scenic's `broadcast_dropout=False`). Any leading axes are
  batch axes (Swin passes `[B, windows, N, D]`). Call options, all off by default:
  `logits_bias` (broadcast to `[..., heads, Q, N]`, added to the float32 logits: Swin's relative
  position bias and shift mask) and `num_queries` (queries from the first Q tokens only, Q = N
  otherwise: CaiT's class attention).
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  # Talking heads (Shazeer et al. 2020, as in CaiT): Dense layers over the heads axis mix the
  # logits before the softmax (`talking_heads_logits`) and the weights after it
  # (`talking_heads_weights`); the sown weights are the softmax's, before that second mix.
  talking_heads: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, logits_bias: jax.Array | None = None,
               num_queries: int | None = None) -> jax.Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by num_heads={self.num_heads}.')
    if num_queries is not None and not 1 <= num_queries <= x.shape[-2]:
      raise ValueError(f'num_queries must be in [1, {x.shape[-2]}], got {num_queries}.')
    head_dim = d // self.num_heads
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, kernel_init=XAVIER, name=name)

    def mix_heads(a, name):  # A Dense layer (with bias) across the heads axis.
      a = jnp.moveaxis(a, -3, -1)  # [..., Q, N, H]
      a = nn.Dense(self.num_heads, dtype=self.dtype, kernel_init=XAVIER, name=name)(a)
      return jnp.moveaxis(a, -1, -3)  # [..., H, Q, N]

    queries = x if num_queries is None else x[..., :num_queries, :]  # [..., Q, D]
    q = proj('query')(queries) * jnp.asarray(head_dim**-0.5, self.dtype)  # [..., Q, H, Dh]
    k = proj('key')(x)  # [..., N, H, Dh]
    v = proj('value')(x)  # [..., N, H, Dh]
    logits = jnp.einsum('...qhd,...khd->...hqk', q, k)  # [..., H, Q, N]
    if self.talking_heads:
      logits = mix_heads(logits, 'talking_heads_logits')  # [..., H, Q, N]
    logits = logits.astype(jnp.float32)
    if logits_bias is not None:
      logits = logits + logits_bias.astype(jnp.float32)  # [..., H, Q, N]
    weights = jax.nn.softmax(logits, axis=-1)  # [..., H, Q, N]
    self.sow('intermediates', 'attention_weights', weights)
    if self.talking_heads:
      weights = mix_heads(weights, 'talking_heads_weights')  # [..., H, Q, N]
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
    out = jnp.einsum('...hqk,...khd->...qhd', weights.astype(self.dtype), v)  # [..., Q, H, Dh]
    return nn.DenseGeneral(
        d, axis=(-2, -1), dtype=self.dtype, kernel_init=XAVIER, name='out')(out)  # [..., Q, D]


class StochasticDepth(nn.Module):
  """Drops whole examples with probability `rate` (rescaling the rest by 1/(1-rate)) in training."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    # One keep/drop decision per example: the mask is broadcast over all non-batch axes.
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=not train)


class LayerScale(nn.Module):
  """LayerScale (Touvron et al. 2021, CaiT): `x * scale`, a per-channel `scale [D]`."""
  init_value: float = 1e-5  # Every channel's scale at init.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block `[B, N, D]` -> `[B, N, D]` (scenic's `Encoder1DBlock`).

  `y = x + SD(LS_0(Dropout(MHSA(LN_0(x)))))`, `out = y + SD(LS_1(MLP(LN_1(y))))`, where the
  LayerScales `LS_i` (`LayerScale_0/1`) exist only with `layerscale_init` (CaiT).
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Per-example drop rate of both residual branches.
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True  # See MlpBlock.
  layerscale_init: float | None = None  # None: no LayerScale (scenic's block).
  talking_heads: bool = False  # See MultiHeadDotProductAttention.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    scale = (lambda y: y) if self.layerscale_init is None else (
        lambda y: LayerScale(self.layerscale_init)(y))
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.dtype, self.talking_heads,
        name='MultiHeadDotProductAttention_0')(y, train=train)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + StochasticDepth(self.stochastic_depth)(scale(y), train=train)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                 approximate_gelu=self.approximate_gelu, name='MlpBlock_0')(y, train=train)
    return x + StochasticDepth(self.stochastic_depth)(scale(y), train=train)


# Size checks the model families share, so each raises one clear line before computing.

def raise_if_invalid(model: str, errors: Sequence[str]) -> None:
  """Raises one one-line `ValueError('Invalid <model>: a; b.')` if `errors` is not empty."""
  if errors:
    raise ValueError(f'Invalid {model}: ' + '; '.join(errors) + '.')


def model_errors(m: nn.Module, shape: Sequence[int], patch_size: Sequence[int]) -> list[str]:
  """The problems the model families share: NHWC input, patch sizes, class count, rates, learner.

  `m` is read by field name (`num_classes`, the optional `dropout_rate`, `attention_dropout_rate`,
  `stochastic_depth`, `tokenlearner_loc` / `num_tokens` / `num_layers`, and an int `num_heads`
  that must divide `hidden_size`), so any family can use it.
  """
  errors = []
  if len(shape) != 4:
    errors.append(f'expected NHWC images [B, H, W, C], got shape {tuple(shape)}')
  if len(patch_size) != 2 or min(patch_size) < 1:
    errors.append(f'patch size must be two positive ints, got {tuple(patch_size)}')
  elif len(shape) == 4 and (shape[1] % patch_size[0] or shape[2] % patch_size[1]):
    errors.append(f'image size {tuple(shape[1:3])} is not divisible by the patch size '
                  f'{tuple(patch_size)}')
  if m.num_classes < 1:
    errors.append(f'num_classes must be >= 1, got {m.num_classes}')
  for name in ('dropout_rate', 'attention_dropout_rate', 'stochastic_depth'):
    if not 0.0 <= getattr(m, name, 0.0) < 1.0:
      errors.append(f'{name} must be in [0, 1), got {getattr(m, name)}')
  heads = getattr(m, 'num_heads', None)
  if isinstance(heads, int) and heads > 0 and m.hidden_size % heads:
    errors.append(f'hidden_size {m.hidden_size} is not divisible by num_heads {heads}')
  loc = getattr(m, 'tokenlearner_loc', None)
  if loc is not None:
    if not 0 <= loc < m.num_layers:
      errors.append(f'tokenlearner_loc must be in [0, num_layers={m.num_layers}), got {loc}')
    if m.num_tokens < 1:
      errors.append(f'num_tokens must be >= 1, got {m.num_tokens}')
  return errors
