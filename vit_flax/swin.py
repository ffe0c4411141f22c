"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows").

`embedding` (patch conv) + `embedding_norm` -> stages; stage s > 0 starts with `merging_{s}`
(2x2 patch merging: LN over 4C, then a bias-free Dense to 2C), then `stage_{s}_block_{j}`
(window attention with a learned `relative_position_bias_table`; odd blocks shift the windows by
half a window and mask pairs that the shift brought together) -> `encoder_norm` -> mean over
tokens -> zero-init `output_projection`.

Sizes, as in timm's models/swin_transformer.py: a stage whose grid is no larger than the window
along an axis uses the whole axis as its window and does not shift along it; merging pads an odd
grid with zeros (bottom/right). Any other grid that is not a multiple of the window raises
ValueError (timm would pad it). Stochastic depth grows linearly over all blocks (0 first).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_flax.layers import (Dtype, MlpBlock, MultiHeadDotProductAttention, PatchEmbedding,
                             StochasticDepth, model_errors, raise_if_invalid)

LN_EPSILON = 1e-5  # Swin's LayerNorms use PyTorch's default epsilon (the other families 1e-6).
MASKED = -1e9  # Added to the logits of masked pairs (float32): exp underflows to exactly 0.


def stage_geometry(grid: tuple[int, int], window_size: int, num_stages: int
                   ) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
  """(grid, window, shift) per stage, each an (h, w) pair; the grid halves (rounding up)."""
  out = []
  for s in range(num_stages):
    if s:
      grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    window = tuple(min(g, window_size) for g in grid)
    shift = tuple(0 if g <= window_size else window_size // 2 for g in grid)
    out.append((grid, window, shift))
  return out


def relative_position_index(wh: int, ww: int) -> np.ndarray:
  """`[wh*ww, wh*ww]` row of the bias table for each (query, key) pair of a window."""
  rows, cols = np.divmod(np.arange(wh * ww), ww)  # [n] each
  dr = rows[:, None] - rows[None, :] + wh - 1  # [n, n] in [0, 2 wh - 2]
  dc = cols[:, None] - cols[None, :] + ww - 1  # [n, n] in [0, 2 ww - 2]
  return dr * (2 * ww - 1) + dc


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """`[B, H, W, C]` -> `[B, nW, wh*ww, C]`, windows in row-major order."""
  b, h, w, c = x.shape
  (wh, ww) = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c)  # [B, H/wh, wh, W/ww, ww, C]
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, wh * ww, c)  # [B, nW, wh*ww, C]


def window_merge(x: jax.Array, window: tuple[int, int], grid: tuple[int, int]) -> jax.Array:
  """The inverse of `window_partition`: `[B, nW, wh*ww, C]` -> `[B, H, W, C]`."""
  b, _, _, c = x.shape
  (wh, ww), (h, w) = window, grid
  x = x.reshape(b, h // wh, w // ww, wh, ww, c)  # [B, H/wh, W/ww, wh, ww, C]
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)  # [B, H, W, C]


def shift_mask(grid: tuple[int, int], window: tuple[int, int],
               shift: tuple[int, int]) -> np.ndarray:
  """`[nW, n, n]` additive mask of the shifted windows: MASKED where the cyclic shift put two
  tokens from different image regions into one window, 0 elsewhere."""
  region = np.zeros(grid, np.int32)  # [H, W], label of each token's region in shifted coords.
  for axis in range(2):
    g, wd, s = grid[axis], window[axis], shift[axis]
    labels = np.zeros(g, np.int32)
    if s:
      labels[g - wd:g - s], labels[g - s:] = 1, 2
    region = region * 3 + (labels[:, None] if axis == 0 else labels[None, :])
  (h, w), (wh, ww) = grid, window
  ids = region.reshape(h // wh, wh, w // ww, ww).transpose(0, 2, 1, 3)  # [H/wh, W/ww, wh, ww]
  ids = ids.reshape(-1, wh * ww)  # [nW, n], windows as in window_partition.
  return np.where(ids[:, :, None] == ids[:, None, :], 0.0, MASKED).astype(np.float32)


class SwinBlock(nn.Module):
  """(Shifted-)window attention then MLP, each pre-LN with a residual: `[B, H, W, C]` -> same."""
  num_heads: int
  window: tuple[int, int]  # (wh, ww), dividing the grid.
  shift: tuple[int, int] = (0, 0)  # Cyclic shift of the windows; 0: plain windows.
  mlp_dim: int | None = None  # None: 4 * C.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  approximate_gelu: bool = False  # See MlpBlock.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    b, h, w, c = x.shape
    (wh, ww), shift = self.window, tuple(self.shift)
    if h % wh or w % ww:
      raise ValueError(f'Swin block grid {(h, w)} is not divisible by its window {(wh, ww)}.')
    n = wh * ww
    table = self.param('relative_position_bias_table', nn.initializers.normal(0.02),
                       ((2 * wh - 1) * (2 * ww - 1), self.num_heads), jnp.float32)
    bias = table[relative_position_index(wh, ww).reshape(-1)]  # [n*n, heads]
    bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)[None]  # [1, heads, n, n]
    y = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype)(x)
    if any(shift):
      y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
      bias = bias + jnp.asarray(shift_mask((h, w), (wh, ww), shift))[:, None]  # [nW, heads, n, n]
    y = window_partition(y, (wh, ww))  # [B, nW, n, C]
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.dtype,
        name='MultiHeadDotProductAttention_0')(y, train=train, logits_bias=bias)  # [B, nW, n, C]
    y = window_merge(y, (wh, ww), (h, w))  # [B, H, W, C]
    if any(shift):
      y = jnp.roll(y, shift, axis=(1, 2))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + StochasticDepth(self.stochastic_depth)(y, train=train)
    y = MlpBlock(self.mlp_dim or 4 * c, dropout_rate=self.dropout_rate, dtype=self.dtype,
                 approximate_gelu=self.approximate_gelu, name='MlpBlock_0')(
                     nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype)(x), train=train)
    return x + StochasticDepth(self.stochastic_depth)(y, train=train)


class PatchMerging(nn.Module):
  """2x2 neighbours to one token: `[B, H, W, C]` -> `[B, ceil(H/2), ceil(W/2), out_dim]`.

  Channels are concatenated as Swin's (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
  x[1::2, 1::2]), then `norm` (LN over 4C) and the bias-free `reduction` Dense.
  """
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))  # [B, H', W', C], H' and W' even.
    h, w = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(b, h, 2, w, 2, c)  # [B, H/2, dh, W/2, dw, C]
    x = x.transpose(0, 1, 3, 4, 2, 5).reshape(b, h, w, 4 * c)  # [B, H/2, W/2, (dw, dh, C)]
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='norm')(x)
    return nn.Dense(self.out_dim, use_bias=False, dtype=self.dtype, name='reduction')(x)


class Swin(nn.Module):
  """Swin Transformer: NHWC images `[B, H, W, C]` -> logits `[B, num_classes]`."""
  num_classes: int = 1000
  hidden_size: int = 96  # Stage-0 width C; stage s has C * 2**s.
  depths: tuple[int, ...] = (2, 2, 6, 2)  # Blocks per stage.
  num_heads: tuple[int, ...] = (3, 6, 12, 24)  # Heads per stage.
  window_size: int = 7  # Square windows (clipped to smaller grids).
  patch_size: tuple[int, int] = (4, 4)
  mlp_ratio: float = 4.0  # MLP width / stage width.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Rate of the last block; block i of all L gets i / (L - 1).
  approximate_gelu: bool = False  # Exact GELU (Swin, timm); True: tanh (scenic).
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    geometry = self._check(images.shape)
    x = PatchEmbedding(self.hidden_size, self.patch_size, self.dtype,
                       name='embedding')(images)  # [B, h, w, C]
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='embedding_norm')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    total, i = sum(self.depths), 0
    for s, (depth, heads, (_, window, shift)) in enumerate(
        zip(self.depths, self.num_heads, geometry)):
      width = self.hidden_size * 2**s
      if s:
        x = PatchMerging(width, self.dtype, name=f'merging_{s}')(x)  # [B, h', w', width]
      for j in range(depth):
        x = SwinBlock(
            heads, window, shift if j % 2 else (0, 0), int(self.mlp_ratio * width),
            self.dropout_rate, self.attention_dropout_rate,
            i / max(total - 1, 1) * self.stochastic_depth, self.approximate_gelu, self.dtype,
            name=f'stage_{s}_block_{j}')(x, train=train)  # [B, h', w', width]
        i += 1
    x = nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='encoder_norm')(x)
    x = x.mean(axis=(1, 2))  # [B, C_last]
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='output_projection')(x)  # [B, num_classes]

  def _check(self, shape: tuple[int, ...]) -> list:
    """Raises ValueError for inconsistent sizes; returns `stage_geometry` of the input."""
    errors = model_errors(self, shape, self.patch_size)
    if len(self.depths) != len(self.num_heads) or not self.depths or min(self.depths) < 1:
      errors.append(f'depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} need '
                    'the same length and depths >= 1')
    for s, heads in enumerate(self.num_heads):
      if heads < 1 or (self.hidden_size * 2**s) % heads:
        errors.append(f'stage {s} width {self.hidden_size * 2**s} is not divisible by '
                      f'{heads} heads')
    if self.window_size < 1:
      errors.append(f'window_size must be >= 1, got {self.window_size}')
    if errors:
      raise_if_invalid('Swin', errors)
    grid = (shape[1] // self.patch_size[0], shape[2] // self.patch_size[1])
    geometry = stage_geometry(grid, self.window_size, len(self.depths))
    for s, (g, window, _) in enumerate(geometry):
      if g[0] % window[0] or g[1] % window[1]:
        errors.append(f'stage {s} grid {g} is not divisible by the window {window}')
    raise_if_invalid('Swin', errors)
    return geometry
