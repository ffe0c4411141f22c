"""Transformer building blocks with scenic's parameter names and initialisers.

Every module computes in `dtype` and keeps float32 parameters (`param_dtype`), so `dtype=bfloat16`
is mixed precision. LayerNorms use flax's default epsilon 1e-6 and GELU is flax's default tanh
approximation, as in scenic.
"""

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

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    dense = lambda n: nn.Dense(n, dtype=self.dtype, kernel_init=XAVIER, bias_init=TINY_NORMAL)
    out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
    x = nn.gelu(dense(self.mlp_dim)(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = dense(out_dim)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention `[B, N, D]` -> `[B, N, D]` with flax's parameter tree (query/key/value/out).

  Parameters: `{query,key,value}/kernel [D, heads, D/heads]`, `bias [heads, D/heads]`,
  `out/kernel [heads, D/heads, D]`, `out/bias [D]`; xavier-uniform kernels, zero biases, so a
  scenic or flax `MultiHeadDotProductAttention` checkpoint loads unchanged. The softmax runs in
  float32. Sows the softmax weights `[B, heads, N, N]` (before dropout) as
  `intermediates/.../attention_weights` (a no-op unless that collection is mutable).
  Attention dropout is per element (scenic's `broadcast_dropout=False`).
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by num_heads={self.num_heads}.')
    head_dim = d // self.num_heads
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, kernel_init=XAVIER, name=name)
    q = proj('query')(x) * jnp.asarray(head_dim**-0.5, self.dtype)  # [B, N, H, Dh]
    k = proj('key')(x)  # [B, N, H, Dh]
    v = proj('value')(x)  # [B, N, H, Dh]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)  # [B, H, N, N]
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, H, N, N]
    self.sow('intermediates', 'attention_weights', weights)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(self.dtype), v)  # [B, N, H, Dh]
    return nn.DenseGeneral(
        d, axis=(-2, -1), dtype=self.dtype, kernel_init=XAVIER, name='out')(out)  # [B, N, D]


class StochasticDepth(nn.Module):
  """Drops whole examples with probability `rate` (rescaling the rest by 1/(1-rate)) in training."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    # One keep/drop decision per example: the mask is broadcast over all non-batch axes.
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=not train)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block `[B, N, D]` -> `[B, N, D]` (scenic's `Encoder1DBlock`).

  `y = x + SD(Dropout(MHSA(LN_0(x))))`, `out = y + SD(MLP(LN_1(y)))`.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Per-example drop rate of both residual branches.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.dtype,
        name='MultiHeadDotProductAttention_0')(y, train=train)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + StochasticDepth(self.stochastic_depth)(y, train=train)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                 name='MlpBlock_0')(y, train=train)
    return x + StochasticDepth(self.stochastic_depth)(y, train=train)
