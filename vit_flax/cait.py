"""CaiT (Touvron et al. 2021, "Going deeper with image transformers"): LayerScale, talking heads
and class attention.

Two stages: `Transformer`, a `vit.Encoder` of talking-heads blocks with LayerScale over the patch
tokens only (no class token there, learned position embedding `[1, N, D]`, no final norm), then
`classblock_{i}`, class-attention blocks where the class token `cls` attends over
[cls, patches] and only it is updated; `encoder_norm` and the zero-init `output_projection` read
the class token. As in the paper's code (timm's models/cait.py): every self-attention block
drops with the full `stochastic_depth` rate, and the class-attention blocks use no dropout.
With `tokenlearner_loc`, the learner runs inside the self-attention stage, so the class token
attends over the S learned tokens.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_flax.layers import (Dtype, LayerScale, MlpBlock, MultiHeadDotProductAttention,
                             PatchEmbedding, model_errors, raise_if_invalid)
from vit_flax.vit import Encoder


class ClassAttentionBlock(nn.Module):
  """CaiT's class-attention block `[B, 1 + N, D]` -> `[B, 1 + N, D]`: only token 0 changes.

  `c = c + LS_0(CA(LN_0([c, x])))`, `c = c + LS_1(MLP(LN_1(c)))`, where CA takes its query from
  the class token and its keys and values from all tokens; the patch tokens pass through.
  """
  mlp_dim: int
  num_heads: int
  layerscale_init: float = 1e-5
  approximate_gelu: bool = False  # See MlpBlock.
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)  # [B, 1 + N, D]
    y = MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype)(
        y, num_queries=1)  # [B, 1, D]
    cls = x[:, :1] + LayerScale(self.layerscale_init)(y)  # [B, 1, D]
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, approximate_gelu=self.approximate_gelu)(
        nn.LayerNorm(dtype=self.dtype)(cls))  # [B, 1, D]
    cls = cls + LayerScale(self.layerscale_init)(y)  # [B, 1, D]
    return jnp.concatenate([cls, x[:, 1:]], axis=1)  # [B, 1 + N, D]


class CaiT(nn.Module):
  """CaiT: NHWC images `[B, H, W, C]` -> logits `[B, num_classes]`."""
  num_classes: int = 1000
  hidden_size: int = 192  # D.
  num_layers: int = 24  # Self-attention (talking-heads) blocks.
  num_class_layers: int = 2  # Class-attention blocks.
  num_heads: int = 4
  mlp_dim: int | None = None  # None: 4 * hidden_size (both stages).
  patch_size: tuple[int, int] = (16, 16)
  layerscale_init: float = 1e-5  # LayerScale's initial value (1e-5 for depth 24, 1e-6 deeper).
  dropout_rate: float = 0.0  # Self-attention stage only.
  attention_dropout_rate: float = 0.0  # Self-attention stage only.
  stochastic_depth: float = 0.0  # Every self-attention block's rate (CaiT's uniform rule).
  tokenlearner_loc: int | None = None  # None: no TokenLearner; else before SA block loc.
  num_tokens: int = 8  # S, tokens the learner keeps.
  use_v11: bool = True  # TokenLearnerModuleV11 (else V1).
  use_tokenfuse: bool = False  # Learner -> block -> TokenFuser at every SA block from loc on.
  approximate_gelu: bool = False  # Exact GELU (CaiT, timm); True: tanh (scenic).
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    errors = model_errors(self, images.shape, self.patch_size)
    if self.num_class_layers < 1:
      errors.append(f'num_class_layers must be >= 1, got {self.num_class_layers}')
    raise_if_invalid('CaiT', errors)
    x = PatchEmbedding(self.hidden_size, self.patch_size, self.dtype,
                       name='embedding')(images)  # [B, h, w, D]
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)  # [B, N, D]
    mlp_dim = self.mlp_dim or 4 * d
    x = Encoder(
        self.num_layers, mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
        self.stochastic_depth, tokenlearner_loc=self.tokenlearner_loc, num_tokens=self.num_tokens,
        use_v11=self.use_v11, use_tokenfuse=self.use_tokenfuse,
        approximate_gelu=self.approximate_gelu, final_norm=False,
        layerscale_init=self.layerscale_init, talking_heads=True, uniform_stochastic_depth=True,
        dtype=self.dtype, name='Transformer')(x, grid_hw=(h, w), train=train)  # [B, K, D]
    cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)  # [B, 1 + K, D]
    for i in range(self.num_class_layers):
      x = ClassAttentionBlock(mlp_dim, self.num_heads, self.layerscale_init,
                              self.approximate_gelu, self.dtype, name=f'classblock_{i}')(x)
    x = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x[:, 0])  # [B, D]
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='output_projection')(x)  # [B, num_classes]
