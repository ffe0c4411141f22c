"""Vision Transformer with optional TokenLearner (V1 / V1.1) and TokenFuser; scenic's param tree.

`config.build_model(config.model, num_classes)` turns a scenic-schema model config into a `ViT`:
`tokenizer.type='patch'` is a plain ViT, `'dynamic'` adds TokenLearner before block
`tokenizer.tokenlearner_loc` (and, with `use_tokenfuse`, a learner + fuser pair around every block
from there on). Differences from scenic, all deliberate:
  * `stochastic_depth` is applied (scenic's TokenLearner model silently ignores it): block i drops
    whole examples from its residual branches with rate i / max(L - 1, 1) * stochastic_depth.
  * `classifier='token'` works with TokenLearner: the CLS token bypasses the learner (and fuser) and
    is put back in front of the learned tokens (scenic raises KeyError).
  * Bad configs and inputs raise ValueError before anything is computed (scenic silently drops a
    TokenLearner whose loc is out of range, and crops images that are not a multiple of the patch).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_flax import video
from vit_flax.layers import (AddPositionEmbs, Dtype, Encoder1DBlock, PatchEmbedding,
                             posemb_sincos_2d)
from vit_flax.tokenlearner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11

CLASSIFIERS = ('gap', 'gmp', 'gsp', 'token')
POSITIONAL_EMBEDDINGS = ('learned_1d', 'sinusoidal_2d', 'none')
TOKENIZER_TYPES = ('patch', 'dynamic', 'video')

# name: (hidden_size, num_layers, num_heads, mlp_dim), as in scenic's and vit_jax's configs.
_VARIANTS = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """Decodes a ViT variant: 'B/16' -> hidden_size, num_layers, num_heads, mlp_dim, patch_size.

  E.g. dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=(16, 16)).
  The patch part is optional ('B' gives no `patch_size`).
  """
  name, _, patch = variant.partition('/')
  if name not in _VARIANTS or (patch and not patch.isdigit()):
    raise ValueError(f'Unknown variant {variant!r}; expected one of {list(_VARIANTS)} optionally '
                     'followed by /<patch>, e.g. "B/16".')
  out = dict(zip(('hidden_size', 'num_layers', 'num_heads', 'mlp_dim'), _VARIANTS[name]))
  if patch:
    out['patch_size'] = (int(patch), int(patch))
  return out


def token_learner(num_tokens: int, use_v11: bool = True, dropout_rate: float = 0.0,
                  dtype: Dtype = jnp.float32) -> Callable[..., nn.Module]:
  """A factory of the learner the Encoder uses: V1.1 (with `dropout_rate`) or V1 with S tokens."""
  if use_v11:
    return functools.partial(TokenLearnerModuleV11, num_tokens, dropout_rate=dropout_rate,
                             dtype=dtype)
  return functools.partial(TokenLearnerModule, num_tokens, dtype=dtype)


class Encoder(nn.Module):
  """Scenic's `Transformer` encoder `[B, c + T*N, D]` -> `[B, c + T*K, D]` (c prefix tokens).

  posemb -> dropout -> blocks -> `encoder_norm`. With `tokenlearner_loc = k` and no fuser, the
  learner runs once before block k and blocks k.. see K = S tokens per frame. With `use_tokenfuse`,
  every block i >= k runs as learner -> block -> fuser + residual, so K = N. The position embedding
  is added once, before any learner. Learners and fusers work per frame
  ([B, T*N, D] <-> [B*T, N, D]); the c prefix tokens (CLS, DeiT's distillation token) bypass them.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  positional_embedding: str = 'learned_1d'
  has_cls_token: bool = False
  num_prefix_tokens: int | None = None  # c; None: 1 with has_cls_token, else 0.
  tokenlearner_loc: int | None = None  # None: no TokenLearner.
  num_tokens: int = 8
  use_v11: bool = True
  use_tokenfuse: bool = False
  temporal_dimensions: int = 1  # T frames, each an [h, w] grid (1 for images).
  approximate_gelu: bool = True  # tanh GELU in the blocks' MLPs (scenic); False: exact (timm).
  final_norm: bool = True  # End with `encoder_norm` (False: the caller normalises, e.g. fc_norm).
  layerscale_init: float | None = None  # LayerScale in every block (CaiT); None: none.
  talking_heads: bool = False  # Talking-heads attention in every block (CaiT).
  # False: block i drops with rate i / (L - 1) * stochastic_depth (scenic); True: every block
  # with the full rate (CaiT's and XCiT's rule).
  uniform_stochastic_depth: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, grid_hw: tuple[int, int], train: bool = False) -> jax.Array:
    b, _, d = x.shape
    c = int(self.has_cls_token) if self.num_prefix_tokens is None else self.num_prefix_tokens
    t, (h, w) = self.temporal_dimensions, grid_hw
    if x.shape[1] != c + t * h * w:
      raise ValueError(f'Encoder got {x.shape[1]} tokens, expected {c} + {t} * {h} * {w}.')
    loc = self.tokenlearner_loc
    if loc is not None and not 0 <= loc < self.num_layers:
      raise ValueError(f'tokenlearner_loc must be in [0, {self.num_layers}), got {loc}.')

    def split(x):  # [B, c + T*n, D] -> ([B, c, D], [B*T, n, D])
      return x[:, :c], x[:, c:].reshape(b * t, -1, d)

    def join(cls, frames):  # ([B, c, D], [B*T, n, D]) -> [B, c + T*n, D]
      x = frames.reshape(b, -1, d)
      return jnp.concatenate([cls, x], axis=1) if c else x

    if self.positional_embedding == 'learned_1d':
      x = AddPositionEmbs(name='posembed_input')(x)
    elif self.positional_embedding == 'sinusoidal_2d':
      if t != 1:
        raise ValueError('sinusoidal_2d position embeddings support images only (T = 1).')
      pe = np.pad(posemb_sincos_2d(h, w, d), ((0, 0), (c, 0), (0, 0)))  # [1, c + h*w, D], CLS: 0
      x = x + jnp.asarray(pe, x.dtype)
    elif self.positional_embedding != 'none':
      raise ValueError(f'Unknown positional_embedding {self.positional_embedding!r}.')
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    learner = token_learner(self.num_tokens, self.use_v11, self.dropout_rate, self.dtype)
    for i in range(self.num_layers):
      depth_rate = 1.0 if self.uniform_stochastic_depth else i / max(self.num_layers - 1, 1)
      block = Encoder1DBlock(
          self.mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
          stochastic_depth=depth_rate * self.stochastic_depth, dtype=self.dtype,
          approximate_gelu=self.approximate_gelu, layerscale_init=self.layerscale_init,
          talking_heads=self.talking_heads, name=f'encoderblock_{i}')
      if loc is None or i < loc or (i > loc and not self.use_tokenfuse):
        x = block(x, train=train)
        continue
      cls, frames = split(x)  # frames: [B*T, h*w, D]
      x = join(cls, learner()(frames, grid_hw=(h, w), train=train))  # [B, c + T*S, D]
      x = block(x, train=train)
      if self.use_tokenfuse:
        cls, learned = split(x)  # learned: [B*T, S, D]
        fused = TokenFuser(dropout_rate=self.dropout_rate, dtype=self.dtype)(
            learned, frames, train=train)  # [B*T, h*w, D]
        x = join(cls, fused + frames)  # [B, c + T*h*w, D]
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x) if self.final_norm else x


class ViT(nn.Module):
  """ViT classifier: NHWC images `[B, H, W, C]` -> logits `[B, num_classes]` (dtype `dtype`).

  `embedding` conv (kernel = stride = patch) -> [`cls`] -> `Transformer` (Encoder) -> pool
  (gap | gmp | gsp | token) -> [`pre_logits` Dense + tanh] -> zero-kernel `output_projection`.
  Dropout, attention dropout and stochastic depth all draw from the 'dropout' rng stream.
  With `mutable=['intermediates']`, `apply` also returns what the modules sow:
  `intermediates/Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/attention_weights`
  (a 1-tuple of float32 softmax weights `[B, heads, K, K]`) and
  `intermediates/Transformer/TokenLearnerModuleV11_{k}/token_maps` (or `TokenLearnerModule_{k}`;
  a 1-tuple of float32 spatial weights `[B*T, S, h, w]`).
  """
  num_classes: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: tuple[int, int] = (16, 16)
  classifier: str = 'gap'  # gap | gmp | gsp | token.
  representation_size: int | None = None  # Width of the tanh `pre_logits` layer, if any.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Rate of the last block; block i gets i / (L - 1) of it.
  positional_embedding: str = 'learned_1d'  # learned_1d | sinusoidal_2d | none.
  tokenlearner_loc: int | None = None  # None: plain ViT (scenic tokenizer.type 'patch').
  num_tokens: int = 8  # S, tokens learned per frame.
  use_v11: bool = True  # TokenLearnerModuleV11 (else V1 TokenLearnerModule).
  use_tokenfuse: bool = False
  approximate_gelu: bool = True  # tanh GELU (scenic, vit_jax, big_vision); False: exact (timm).
  pooled_norm: bool = False  # LayerNorm `fc_norm` on the pooled vector (timm) instead of tokens.
  # Clips [B, T, H, W, C] (scenic tokenizer.type 'video', see `video`): '3d_conv' (tubelets of
  # tubelet_frames x patch_size) | 'temporal_sampling' (n_sampled_frames frames, 2-D patches);
  # None: images [B, H, W, C].
  temporal_encoding: str | None = None
  tubelet_frames: int = 2  # ft of a '3d_conv' tubelet.
  n_sampled_frames: int = 8  # Frames 'temporal_sampling' keeps.
  kernel_init_method: str | None = None  # '3d_conv' kernel init (video.KERNEL_INIT_METHODS).
  use_concat_final: bool = False  # The head sees the final tokens concatenated, not pooled.
  dtype: Dtype = jnp.float32  # Compute dtype; parameters stay float32.

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    clip = self.temporal_encoding is not None
    if images.ndim != (5 if clip else 4):
      expected = 'clips [B, T, H, W, C]' if clip else 'NHWC images [B, H, W, C]'
      raise ValueError(f'ViT expects {expected}, got shape {images.shape}.')
    check_vit(self, images.shape[1:])
    if not self.is_initializing():
      kernel = self.variables.get('params', {}).get('embedding', {}).get('kernel')
      if kernel is not None and kernel.shape[-2] != images.shape[-1]:
        raise ValueError(f'Inputs have {images.shape[-1]} channels but the `embedding` kernel '
                         f'expects {kernel.shape[-2]}.')
    if clip:
      x, t, (h, w) = video.temporal_encode(
          images, method=self.temporal_encoding, patch_size=self.patch_size,
          tubelet_frames=self.tubelet_frames, n_sampled_frames=self.n_sampled_frames,
          hidden_size=self.hidden_size, kernel_init_method=self.kernel_init_method,
          dtype=self.dtype)  # [B, t*h*w, D]
      b, _, d = x.shape
    else:
      x = PatchEmbedding(self.hidden_size, self.patch_size, self.dtype,
                         name='embedding')(images)  # [B, h, w, D]
      b, h, w, d = x.shape
      x, t = x.reshape(b, h * w, d), 1  # [B, h*w, D]
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)  # [B, 1+h*w, D]
    x = Encoder(
        self.num_layers, self.mlp_dim, self.num_heads, self.dropout_rate,
        self.attention_dropout_rate, self.stochastic_depth, self.positional_embedding,
        has_cls_token=self.classifier == 'token', tokenlearner_loc=self.tokenlearner_loc,
        num_tokens=self.num_tokens, use_v11=self.use_v11, use_tokenfuse=self.use_tokenfuse,
        temporal_dimensions=t, approximate_gelu=self.approximate_gelu,
        final_norm=not self.pooled_norm, dtype=self.dtype,
        name='Transformer')(x, grid_hw=(h, w), train=train)  # [B, K, D]
    if self.use_concat_final:
      x = x.reshape(b, -1)  # [B, K*D]: every final token, in order.
    elif self.classifier == 'token':
      x = x[:, 0]  # [B, D]
    else:
      x = {'gap': jnp.mean, 'gmp': jnp.max, 'gsp': jnp.sum}[self.classifier](x, axis=1)  # [B, D]
    if self.pooled_norm:
      x = nn.LayerNorm(dtype=self.dtype, name='fc_norm')(x)  # [B, D]
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name='pre_logits')(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='output_projection')(x)  # [B, num_classes]


def check_vit(m: ViT, image_shape: tuple[int, ...] | None = None) -> None:
  """Raises ValueError for an inconsistent ViT (and, given (H, W[, C]), for an unusable image)."""
  errors = []
  if m.num_classes < 1:
    errors.append(f'num_classes must be >= 1, got {m.num_classes}')
  for name in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
    if getattr(m, name) < 1:
      errors.append(f'{name} must be >= 1, got {getattr(m, name)}')
  if m.num_heads >= 1 and m.hidden_size % m.num_heads:
    errors.append(f'hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}')
  if len(m.patch_size) != 2 or min(m.patch_size) < 1:
    errors.append(f'patch size must be two positive ints, got {m.patch_size}')
  if m.classifier not in CLASSIFIERS:
    errors.append(f'unknown classifier {m.classifier!r}; expected one of {CLASSIFIERS}')
  if m.positional_embedding not in POSITIONAL_EMBEDDINGS:
    errors.append(f'unknown positional_embedding {m.positional_embedding!r}; expected one of '
                  f'{POSITIONAL_EMBEDDINGS}')
  elif m.positional_embedding == 'sinusoidal_2d' and m.hidden_size % 4:
    errors.append(f'sinusoidal_2d needs hidden_size divisible by 4, got {m.hidden_size}')
  if m.representation_size is not None and m.representation_size < 1:
    errors.append(f'representation_size must be None or >= 1, got {m.representation_size}')
  for name in ('dropout_rate', 'attention_dropout_rate', 'stochastic_depth'):
    if not 0.0 <= getattr(m, name) < 1.0:
      errors.append(f'{name} must be in [0, 1), got {getattr(m, name)}')
  if m.tokenlearner_loc is not None:
    if not 0 <= m.tokenlearner_loc < m.num_layers:
      errors.append(f'tokenlearner_loc must be in [0, num_layers={m.num_layers}), got '
                    f'{m.tokenlearner_loc}')
    if m.num_tokens < 1:
      errors.append(f'num_tokens must be >= 1, got {m.num_tokens}')
  errors += _video_errors(m, image_shape)
  frame_shape = image_shape
  if image_shape is not None and m.temporal_encoding is not None:
    frame_shape = image_shape[1:] if len(image_shape) == 4 else None
  if frame_shape is not None:
    if len(frame_shape) not in (2, 3):
      errors.append(f'image shape must be (H, W) or (H, W, C), got {tuple(image_shape)}')
    elif len(m.patch_size) == 2 and (frame_shape[0] % m.patch_size[0] or
                                     frame_shape[1] % m.patch_size[1]):
      errors.append(f'image size {tuple(frame_shape[:2])} is not divisible by the patch size '
                    f'{tuple(m.patch_size)}')
  if errors:
    raise ValueError('Invalid ViT configuration: ' + '; '.join(errors) + '.')


def _video_errors(m: ViT, shape: tuple[int, ...] | None) -> list[str]:
  """The problems of a video ViT (or of a clip given to an image ViT) with inputs of `shape`."""
  if m.temporal_encoding is None:
    return [f'a clip {tuple(shape)} needs a video tokenizer (tokenizer.type "video")'] if (
        shape is not None and len(shape) == 4) else []
  errors = []
  if m.temporal_encoding not in video.TEMPORAL_ENCODINGS:
    errors.append(f'temporal encoding method must be one of {video.TEMPORAL_ENCODINGS}, got '
                  f'{m.temporal_encoding!r}')
  if m.kernel_init_method not in (None, *video.KERNEL_INIT_METHODS):
    errors.append(f'kernel_init_method must be None or one of {video.KERNEL_INIT_METHODS}, got '
                  f'{m.kernel_init_method!r}')
  if m.tubelet_frames < 1 or m.n_sampled_frames < 1:
    errors.append('tubelet and sampled frame counts must be >= 1')
  if m.positional_embedding == 'sinusoidal_2d':
    errors.append('sinusoidal_2d position embeddings are for images; clips need learned_1d')
  if shape is not None and len(shape) != 4:
    errors.append(f'a video ViT takes clips [B, T, H, W, C], got per-example shape {tuple(shape)}')
  elif (shape is not None and m.temporal_encoding == '3d_conv' and
        shape[0] % max(m.tubelet_frames, 1)):
    errors.append(f'clips of {shape[0]} frames do not divide into tubelets of '
                  f'{m.tubelet_frames} frames (tokenizer.patches.size[2])')
  return errors
