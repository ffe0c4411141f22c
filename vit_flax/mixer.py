"""MLP-Mixer (Tolstikhin et al. 2021, "MLP-Mixer: An all-MLP Architecture for Vision").

Scenic's names (projects/baselines/mixer.py): `embedding` (patch conv), `mixerblock_{i}` with
`token_mixing` and `channel_mixing` MLPs, `pre_logits_norm`, a zero-init `output_projection` on
the mean token. The optional LayerScale scales both branches' outputs (scenic's code scales the
residual input of the channel-mixing branch instead).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_flax.layers import (Dtype, LayerScale, MlpBlock, PatchEmbedding, StochasticDepth,
                             model_errors, raise_if_invalid)


class MixerBlock(nn.Module):
  """Token mixing then channel mixing, each pre-LN with a residual: `[B, N, D]` -> `[B, N, D]`."""
  sequence_mlp_dim: int  # Hidden width of the token-mixing MLP (over the N axis).
  channels_mlp_dim: int  # Hidden width of the channel-mixing MLP (over the D axis).
  dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Per-example drop rate of both residual branches.
  layerscale_init: float | None = None  # None: no LayerScale.
  approximate_gelu: bool = False  # See MlpBlock.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    scale = (lambda y: y) if self.layerscale_init is None else (
        lambda y: LayerScale(self.layerscale_init)(y))
    mlp = lambda dim, name: MlpBlock(dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                                     approximate_gelu=self.approximate_gelu, name=name)
    y = nn.LayerNorm(dtype=self.dtype)(x).transpose(0, 2, 1)  # [B, D, N]
    y = mlp(self.sequence_mlp_dim, 'token_mixing')(y, train=train).transpose(0, 2, 1)  # [B, N, D]
    x = x + StochasticDepth(self.stochastic_depth)(scale(y), train=train)
    y = mlp(self.channels_mlp_dim, 'channel_mixing')(nn.LayerNorm(dtype=self.dtype)(x),
                                                      train=train)  # [B, N, D]
    return x + StochasticDepth(self.stochastic_depth)(scale(y), train=train)


class Mixer(nn.Module):
  """MLP-Mixer: NHWC images `[B, H, W, C]` -> logits `[B, num_classes]`."""
  num_classes: int = 1000
  hidden_size: int = 768  # D, the channel width.
  num_layers: int = 12
  sequence_mlp_dim: int | None = None  # None: hidden_size // 2 (the paper's B/16: 384).
  channels_mlp_dim: int | None = None  # None: 4 * hidden_size.
  patch_size: tuple[int, int] = (16, 16)
  dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Rate of the last block; block i gets i / (L - 1) of it.
  layerscale_init: float | None = None  # None: no LayerScale (the paper's Mixer).
  approximate_gelu: bool = False  # Exact GELU (timm); True: tanh (scenic, big_vision).
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    errors = model_errors(self, images.shape, self.patch_size)
    if self.hidden_size < 2 or self.num_layers < 1:
      errors.append(f'hidden_size must be >= 2 and num_layers >= 1, got {self.hidden_size} and '
                    f'{self.num_layers}')
    raise_if_invalid('Mixer', errors)
    x = PatchEmbedding(self.hidden_size, self.patch_size, self.dtype,
                       name='embedding')(images)  # [B, h, w, D]
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)  # [B, N, D]
    for i in range(self.num_layers):
      x = MixerBlock(
          self.sequence_mlp_dim or d // 2, self.channels_mlp_dim or 4 * d, self.dropout_rate,
          i / max(self.num_layers - 1, 1) * self.stochastic_depth, self.layerscale_init,
          self.approximate_gelu, self.dtype, name=f'mixerblock_{i}')(x, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name='pre_logits_norm')(x).mean(axis=1)  # [B, D]
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='output_projection')(x)  # [B, num_classes]
