"""DeiT with the distillation token (Touvron et al. 2021, "Training data-efficient image
transformers & distillation through attention"): a ViT with a class and a distillation token.

Parameter tree: `embedding` (patch conv), `cls`, `dist`, `Transformer` (`vit.Encoder` with two
prefix tokens: `posembed_input [1, 2 + N, D]`, `encoderblock_{i}`, `encoder_norm`),
`output_projection` (class head) and `output_projection_dist` (distillation head), both zero-init.
The distillation loss (the teacher's labels on the distillation head) belongs to the trainer:
`return_heads=True` gives it both heads. With `tokenlearner_loc`, both prefix tokens bypass the
learner, as the CLS token does in `vit.ViT`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_flax.layers import Dtype, PatchEmbedding, model_errors, raise_if_invalid
from vit_flax.vit import Encoder


class DeiT(nn.Module):
  """DeiT: NHWC images `[B, H, W, C]` -> logits `[B, num_classes]` (or the two heads' logits).

  patch conv -> [cls, dist, patches] + learned position embedding -> pre-LN blocks ->
  `encoder_norm` -> class head on token 0, distillation head on token 1.
  """
  num_classes: int = 1000
  hidden_size: int = 192  # D.
  num_layers: int = 12
  num_heads: int = 3
  mlp_dim: int | None = None  # None: 4 * hidden_size.
  patch_size: tuple[int, int] = (16, 16)
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Rate of the last block; block i gets i / (L - 1) of it.
  tokenlearner_loc: int | None = None  # None: no TokenLearner; else before block loc.
  num_tokens: int = 8  # S, tokens the learner keeps.
  use_v11: bool = True  # TokenLearnerModuleV11 (else V1).
  use_tokenfuse: bool = False  # Learner -> block -> TokenFuser at every block from loc on.
  approximate_gelu: bool = False  # Exact GELU (DeiT, timm); True: tanh (scenic).
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_heads: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Mean of the two heads' logits (DeiT's inference rule), or `(cls_logits, dist_logits)`."""
    errors = model_errors(self, images.shape, self.patch_size)
    raise_if_invalid('DeiT', errors)
    x = PatchEmbedding(self.hidden_size, self.patch_size, self.dtype,
                       name='embedding')(images)  # [B, h, w, D]
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)  # [B, N, D]
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d), jnp.float32)
    # A random start (timm's trunc-normal 0.02) keeps the two tokens apart from the first step.
    dist = self.param('dist', nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
    prefix = jnp.concatenate([cls, dist], axis=1).astype(x.dtype)  # [1, 2, D]
    x = jnp.concatenate([jnp.tile(prefix, (b, 1, 1)), x], axis=1)  # [B, 2 + N, D]
    x = Encoder(
        self.num_layers, self.mlp_dim or 4 * d, self.num_heads, self.dropout_rate,
        self.attention_dropout_rate, self.stochastic_depth, num_prefix_tokens=2,
        tokenlearner_loc=self.tokenlearner_loc, num_tokens=self.num_tokens, use_v11=self.use_v11,
        use_tokenfuse=self.use_tokenfuse, approximate_gelu=self.approximate_gelu,
        dtype=self.dtype, name='Transformer')(x, grid_hw=(h, w), train=train)  # [B, 2 + K, D]
    head = lambda name: nn.Dense(self.num_classes, dtype=self.dtype,
                                 kernel_init=nn.initializers.zeros, name=name)
    cls_logits = head('output_projection')(x[:, 0])  # [B, num_classes]
    dist_logits = head('output_projection_dist')(x[:, 1])  # [B, num_classes]
    if return_heads:
      return cls_logits, dist_logits
    return (cls_logits + dist_logits) / 2
