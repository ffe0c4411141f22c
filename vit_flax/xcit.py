"""XCiT (El-Nouby et al. 2021, "XCiT: Cross-Covariance Image Transformers").

conv stem (`embedding`: log2(patch) stride-2 3x3 convs with BatchNorm) -> Fourier position
encoding (`posembed_input`) -> `encoderblock_{i}` (cross-covariance attention, LPI, MLP, each
with LayerScale) -> `classblock_{i}` (class attention, the class token `cls` prepended) ->
`encoder_norm` on the class token -> zero-init `output_projection`. BatchNorm (stem and LPI)
keeps running statistics in the 'batch_stats' collection: pass `mutable=['batch_stats']` when
training. Every encoder block drops with the full `stochastic_depth` rate (XCiT's rule); the
class-attention blocks have no stochastic depth.

TokenLearner: with `tokenlearner_loc = k` the learner turns the h*w patch tokens into S tokens
before block k. The learned tokens have no grid, so blocks k.. skip LPI (they keep attention and
MLP, and hold no LPI parameters); the class-attention blocks attend over the S tokens.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_flax.layers import (Dtype, LayerScale, MlpBlock, MultiHeadDotProductAttention,
                             ShiftedConv, StochasticDepth, XAVIER, model_errors,
                             raise_if_invalid)
from vit_flax.vit import token_learner


def _batch_norm(train: bool, dtype: Dtype) -> nn.BatchNorm:
  """PyTorch's BatchNorm2d defaults (momentum 0.1, eps 1e-5), as XCiT trains with."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


def fourier_features(h: int, w: int, dim: int = 32, temperature: float = 10_000.0) -> np.ndarray:
  """XCiT's Fourier features of an h x w grid, `[h*w, 2 * dim]`: [y channels, x channels].

  Rows and columns are numbered 1.. and scaled to (0, 2 pi]; channel pair (2k, 2k+1) is
  (sin, cos) of the position over temperature**(2k / dim).
  """
  eps = 1e-6
  y = np.arange(1, h + 1, dtype=np.float64) / (h + eps) * 2 * math.pi  # [h]
  x = np.arange(1, w + 1, dtype=np.float64) / (w + eps) * 2 * math.pi  # [w]
  freq = temperature**(2 * (np.arange(dim) // 2) / dim)  # [dim]
  def encode(pos):  # [n] -> [n, dim], sin on even channels, cos on odd ones.
    a = pos[:, None] / freq  # [n, dim]
    return np.where(np.arange(dim) % 2 == 0, np.sin(a), np.cos(a))
  fy = np.broadcast_to(encode(y)[:, None], (h, w, dim))  # [h, w, dim]
  fx = np.broadcast_to(encode(x)[None], (h, w, dim))  # [h, w, dim]
  features = np.concatenate([fy, fx], axis=-1)  # [h, w, 2 * dim]
  return features.reshape(h * w, 2 * dim).astype(np.float32)  # [h*w, 2 * dim]


class ConvStem(nn.Module):
  """`[B, H, W, C]` -> `[B, H/p, W/p, D]` by log2(p) stride-2 3x3 convs (no bias) + BatchNorm.

  Widths double up to D (D/8, D/4, D/2, D for p = 16), GELU between the convs.
  """
  hidden_size: int
  patch_size: int = 16  # A power of 2, >= 2.
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    n = int(math.log2(self.patch_size))
    for i in range(n):
      if i:
        x = nn.gelu(x, approximate=self.approximate_gelu)
      x = ShiftedConv(self.hidden_size // 2**(n - 1 - i), strides=2, use_bias=False,
                      dtype=self.dtype, name=f'Conv_{i}')(x)  # [B, h, w, D']
      x = _batch_norm(train, self.dtype)(x)
    return x


class LPI(nn.Module):
  """Local patch interaction `[B, h, w, D]` -> `[B, h, w, D]`: depthwise 3x3 conv, GELU, BN,
  depthwise 3x3 conv (with biases)."""
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    d = x.shape[-1]
    conv = lambda i: ShiftedConv(d, depthwise=True, dtype=self.dtype, name=f'Conv_{i}')
    x = nn.gelu(conv(0)(x), approximate=self.approximate_gelu)
    return conv(1)(_batch_norm(train, self.dtype)(x))


class XCA(nn.Module):
  """Cross-covariance attention `[B, N, D]` -> `[B, N, D]`: attention between channels.

  Per head, queries and keys are L2-normalised over the N tokens, the map is
  softmax(temperature * q^T k), `[B, heads, Dh, Dh]` whatever N, and mixes the value channels.
  The q/k/v/out parameters are laid out as layers.MultiHeadDotProductAttention's, plus a
  learned `temperature [heads]` (init 1). Sows the map as `intermediates/.../attention_weights`.
  """
  num_heads: int
  dropout_rate: float = 0.0  # On the attention map.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by num_heads={self.num_heads}.')
    head_dim = d // self.num_heads
    proj = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, kernel_init=XAVIER, name=name)
    normalise = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    q = normalise(proj('query')(x).astype(jnp.float32))  # [B, N, H, Dh]
    k = normalise(proj('key')(x).astype(jnp.float32))  # [B, N, H, Dh]
    v = proj('value')(x)  # [B, N, H, Dh]
    temperature = self.param('temperature', nn.initializers.ones, (self.num_heads,), jnp.float32)
    logits = jnp.einsum('bnhd,bnhe->bhde', q, k) * temperature[:, None, None]  # [B, H, Dh, Dh]
    weights = jax.nn.softmax(logits, axis=-1)  # [B, H, Dh, Dh]
    self.sow('intermediates', 'attention_weights', weights)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
    out = jnp.einsum('bhde,bnhe->bnhd', weights.astype(self.dtype), v)  # [B, N, H, Dh]
    return nn.DenseGeneral(
        d, axis=(-2, -1), dtype=self.dtype, kernel_init=XAVIER, name='out')(out)  # [B, N, D]


class XCABlock(nn.Module):
  """XCiT's block `[B, N, D]` -> `[B, N, D]`: `x += SD(LS(branch(LN(x))))` for XCA, LPI, MLP.

  Without `grid_hw` (after a TokenLearner) the LPI branch is left out.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  layerscale_init: float = 1.0
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, grid_hw: tuple[int, int] | None,
               train: bool = False) -> jax.Array:
    b, n, d = x.shape
    def residual(x, y):
      return x + StochasticDepth(self.stochastic_depth)(LayerScale(self.layerscale_init)(y),
                                                        train=train)
    y = XCA(self.num_heads, self.attention_dropout_rate, self.dtype)(
        nn.LayerNorm(dtype=self.dtype)(x), train=train)  # [B, N, D]
    x = residual(x, nn.Dropout(self.dropout_rate)(y, deterministic=not train))
    if grid_hw is not None:
      y = nn.LayerNorm(dtype=self.dtype)(x).reshape(b, *grid_hw, d)  # [B, h, w, D]
      y = LPI(self.approximate_gelu, self.dtype)(y, train=train)  # [B, h, w, D]
      x = residual(x, y.reshape(b, n, d))  # [B, N, D]
    y = MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                 approximate_gelu=self.approximate_gelu)(
                     nn.LayerNorm(dtype=self.dtype)(x), train=train)  # [B, N, D]
    return residual(x, y)


class ClassAttentionBlock(nn.Module):
  """XCiT's class-attention block `[B, 1 + N, D]` -> `[B, 1 + N, D]`, as the original code.

  The class token gets `LS_0(CA(LN_0(x)))` and then, after `LN_1`, `LS_1(MLP(.))`. Unlike CaiT's
  block (cait.py), and as in facebookresearch/xcit (and timm's models/xcit.py), the patch tokens
  change too: they take `LS_0(LN_0(x))` as their first branch, and with `tokens_norm` are
  normalised by `LN_1` and doubled by the second residual. Only the class token reaches the head.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layerscale_init: float = 1.0
  tokens_norm: bool = True  # LN_1 over all tokens (else the class token only).
  approximate_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    xn = nn.LayerNorm(dtype=self.dtype)(x)  # [B, 1 + N, D]
    cls = MultiHeadDotProductAttention(self.num_heads, self.attention_dropout_rate, self.dtype)(
        xn, train=train, num_queries=1)  # [B, 1, D]
    cls = nn.Dropout(self.dropout_rate)(cls, deterministic=not train)
    x = x + LayerScale(self.layerscale_init)(jnp.concatenate([cls, xn[:, 1:]], axis=1))
    norm = nn.LayerNorm(dtype=self.dtype)
    x = norm(x) if self.tokens_norm else jnp.concatenate([norm(x[:, :1]), x[:, 1:]], axis=1)
    cls = MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                   approximate_gelu=self.approximate_gelu)(x[:, :1], train=train)  # [B, 1, D]
    return x + jnp.concatenate([LayerScale(self.layerscale_init)(cls), x[:, 1:]], axis=1)


class PositionProjection(nn.Module):
  """XCiT's position encoding: fixed Fourier features `[N, 2F]` -> `[N, D]` by `token_projection`
  (a 1x1 conv in the original, i.e. a Dense with bias)."""
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    return nn.Dense(self.hidden_size, dtype=self.dtype, name='token_projection')(features)


class XCiT(nn.Module):
  """XCiT: NHWC images `[B, H, W, C]` -> logits `[B, num_classes]`."""
  num_classes: int = 1000
  hidden_size: int = 192  # D.
  num_layers: int = 12  # XCA blocks.
  num_class_layers: int = 2  # Class-attention blocks.
  num_heads: int = 4
  mlp_dim: int | None = None  # None: 4 * hidden_size (both stages).
  patch_size: int = 16  # Square patches, a power of 2: the stem has log2(patch) convs.
  layerscale_init: float = 1.0  # LayerScale's initial value (XCiT's eta).
  tokens_norm: bool = True  # See ClassAttentionBlock (True in XCiT's tiny/small/medium/large).
  fourier_dim: int = 32  # Fourier features per axis, projected to D by `token_projection`.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Every XCA block's rate (XCiT's uniform rule).
  tokenlearner_loc: int | None = None  # None: no TokenLearner; else before XCA block loc.
  num_tokens: int = 8  # S, tokens the learner keeps.
  use_v11: bool = True  # TokenLearnerModuleV11 (else V1).
  approximate_gelu: bool = False  # Exact GELU (XCiT, timm); True: tanh (scenic).
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    p = self.patch_size
    if not isinstance(p, int):
      raise ValueError(f'Invalid XCiT: patch_size is one int (square patches), got {p!r}.')
    errors = model_errors(self, images.shape, (p, p))
    if p < 2 or p & (p - 1):
      errors.append(f'patch_size must be a power of 2 (>= 2) for the conv stem, got {p}')
    elif self.hidden_size % (p // 2):
      errors.append(f'hidden_size {self.hidden_size} must be divisible by patch_size / 2 = '
                    f'{p // 2} (the stem halves the width per conv)')
    if self.num_class_layers < 1:
      errors.append(f'num_class_layers must be >= 1, got {self.num_class_layers}')
    raise_if_invalid('XCiT', errors)
    x = ConvStem(self.hidden_size, p, self.approximate_gelu, self.dtype,
                 name='embedding')(images, train=train)  # [B, h, w, D]
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)  # [B, N, D]
    features = jnp.asarray(fourier_features(h, w, self.fourier_dim), self.dtype)  # [N, 2F]
    x = x + PositionProjection(d, self.dtype, name='posembed_input')(features)  # [B, N, D]
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    mlp_dim, loc = self.mlp_dim or 4 * d, self.tokenlearner_loc
    learner = token_learner(self.num_tokens, self.use_v11, self.dropout_rate, self.dtype)
    for i in range(self.num_layers):
      if i == loc:
        x = learner()(x, grid_hw=(h, w), train=train)  # [B, S, D]
      x = XCABlock(mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
                   self.stochastic_depth, self.layerscale_init, self.approximate_gelu,
                   self.dtype, name=f'encoderblock_{i}')(
                       x, grid_hw=None if loc is not None and i >= loc else (h, w), train=train)
    cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)  # [B, 1 + K, D]
    for i in range(self.num_class_layers):
      x = ClassAttentionBlock(
          mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
          self.layerscale_init, self.tokens_norm, self.approximate_gelu, self.dtype,
          name=f'classblock_{i}')(x, train=train)  # [B, 1 + K, D]
    x = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x[:, 0])  # [B, D]
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='output_projection')(x)  # [B, num_classes]

