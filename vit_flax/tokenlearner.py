"""TokenLearner V1 / V1.1 and TokenFuser (Ryoo et al., NeurIPS 2021), scenic's math and names.

Both learners share one call signature, `learner(x, *, grid_hw, train) -> [B, S, C]`, where `x` is
`[B, N, C]` (or `[B, h, w, C]`) and `grid_hw = (h, w)` with `h * w = N`; both sow their spatial
weights `[B, S, h, w]` as `intermediates/.../token_maps` (free unless that collection is mutable).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_flax.layers import Dtype, MlpBlock, ShiftedConv


def _tokens_and_grid(x: jax.Array, grid_hw: tuple[int, int] | None) -> tuple[jax.Array, int, int]:
  """Validates `x` ([B, N, C] or [B, h, w, C]) against `grid_hw`; returns `[B, N, C]`, h, w."""
  if x.ndim == 4:
    if grid_hw is not None and tuple(grid_hw) != x.shape[1:3]:
      raise ValueError(f'grid_hw={grid_hw} does not match the input grid {x.shape[1:3]}.')
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c), h, w  # [B, N, C]
  if x.ndim != 3:
    raise ValueError(f'TokenLearner expects [B, N, C] or [B, h, w, C], got shape {x.shape}.')
  n = x.shape[1]
  if grid_hw is None:  # Only a square grid can be inferred.
    h = w = math.isqrt(n)
    if h * w != n:
      raise ValueError(f'{n} tokens do not form a square grid; pass grid_hw=(h, w).')
  else:
    h, w = grid_hw
    if h * w != n:
      raise ValueError(f'grid_hw={grid_hw} has {h * w} cells but the input has {n} tokens.')
  return x, h, w


class TokenLearnerModule(nn.Module):
  """TokenLearner V1: `[B, N, C]` -> `[B, S, C]` by S sigmoid spatial maps from a small conv net.

  LN -> 3 x (3x3 conv to S channels, no bias, GELU) -> 3x3 conv -> sigmoid -> weighted sum (or
  mean) over space of the *unnormalised* input. Unlike scenic, any (h, w) grid works when
  `grid_hw` is given, and the grid is validated before the reshape.
  """
  num_tokens: int
  use_sum_pooling: bool = True  # Scenic's default; False divides by h*w (mean pooling).
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, grid_hw: tuple[int, int] | None = None,
               train: bool = False) -> jax.Array:
    del train  # V1 is deterministic.
    x, h, w = _tokens_and_grid(x, grid_hw)  # [B, N, C]
    b, n, c = x.shape
    a = nn.LayerNorm(dtype=self.dtype)(x).reshape(b, h, w, c)  # [B, h, w, C]
    conv = lambda i: ShiftedConv(self.num_tokens, use_bias=False, dtype=self.dtype,
                                 name=f'Conv_{i}')  # nn.Conv(S, (3, 3), 'SAME')'s tree.
    for i in range(3):
      a = nn.gelu(conv(i)(a))  # [B, h, w, S]
    a = conv(3)(a)  # [B, h, w, S]
    maps = jax.nn.sigmoid(a.astype(jnp.float32).reshape(b, n, self.num_tokens))  # [B, N, S]
    maps = maps.transpose(0, 2, 1)  # [B, S, N]
    self.sow('intermediates', 'token_maps', maps.reshape(b, self.num_tokens, h, w))
    out = jnp.einsum('bsn,bnc->bsc', maps.astype(self.dtype), x)  # [B, S, C]
    return out if self.use_sum_pooling else out / n


class TokenLearnerModuleV11(nn.Module):
  """TokenLearner V1.1: `[B, N, C]` -> `[B, S, C]`, each token a softmax-weighted mean of the input.

  LN -> MLP `token_masking` (C -> bottleneck -> S, GELU, dropout) -> softmax over the N positions
  -> weighted sum of the unnormalised input. Works on any grid; `grid_hw` only shapes the sown maps.
  """
  num_tokens: int
  bottleneck_dim: int = 64
  dropout_rate: float = 0.0  # Inside `token_masking`; scenic passes the model's dropout_rate.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, grid_hw: tuple[int, int] | None = None,
               train: bool = False) -> jax.Array:
    x, h, w = _tokens_and_grid(x, grid_hw)  # [B, N, C]
    b = x.shape[0]
    a = nn.LayerNorm(dtype=self.dtype)(x)  # [B, N, C]
    a = MlpBlock(self.bottleneck_dim, self.num_tokens, self.dropout_rate, self.dtype,
                 name='token_masking')(a, train=train)  # [B, N, S]
    maps = jax.nn.softmax(a.astype(jnp.float32).transpose(0, 2, 1), axis=-1)  # [B, S, N]
    self.sow('intermediates', 'token_maps', maps.reshape(b, self.num_tokens, h, w))
    return jnp.einsum('bsn,bnc->bsc', maps.astype(self.dtype), x)  # [B, S, C]


class TokenFuser(nn.Module):
  """TokenFuser: maps processed tokens `[B, S, C]` back onto the original `[B, N, C]` grid.

  Y = LN2(token-mixing Dense over S (zero init)(LN1(tokens))); M = sigmoid(MLP(LN(original)))
  `[B, N, S]`; out = M @ Y, then dropout. The output is exactly 0 at init (the zero Dense feeds
  `fuser_mix_norm2`, whose bias is 0), so `original + fuser(...)` starts as the identity.
  """
  use_normalization: bool = True
  bottleneck_dim: int = 64
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, original: jax.Array, *, train: bool = False) -> jax.Array:
    if original.ndim == 4:
      b, h, w, c = original.shape
      original = original.reshape(b, h * w, c)  # [B, N, C]
    if tokens.ndim != 3 or original.ndim != 3 or tokens.shape[::2] != original.shape[::2]:
      raise ValueError(f'TokenFuser expects tokens [B, S, C] and original [B, N, C] with the same '
                       f'B and C, got {tokens.shape} and {original.shape}.')
    s = tokens.shape[1]
    if self.use_normalization:
      tokens = nn.LayerNorm(dtype=self.dtype, name='fuser_mix_norm1')(tokens)
    y = nn.Dense(s, dtype=self.dtype, kernel_init=nn.initializers.zeros)(
        tokens.transpose(0, 2, 1))  # [B, C, S]
    y = y.transpose(0, 2, 1)  # [B, S, C]
    if self.use_normalization:
      y = nn.LayerNorm(dtype=self.dtype, name='fuser_mix_norm2')(y)
    m = nn.LayerNorm(dtype=self.dtype)(original)  # [B, N, C]
    m = MlpBlock(self.bottleneck_dim, s, self.dropout_rate, self.dtype,
                 name='token_masking')(m, train=train)  # [B, N, S]
    m = nn.sigmoid(m)
    out = jnp.einsum('bsc,bns->bnc', y, m)  # [B, N, C]
    return nn.Dropout(self.dropout_rate)(out, deterministic=not train)
