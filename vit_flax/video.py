"""Video tokenization: ViViT's temporal encoding (scenic's projects/vivit/model.py), for clips.

A clip `[B, T, H, W, C]` becomes frame-major tokens `[B, t*h*w, D]` (all of frame 0, then frame
1, ...) in one of two ways:
  * '3d_conv': tubelets, a patch embedding with kernel = stride = (ft, fh, fw), kernel
    `embedding/kernel [ft, fh, fw, C, D]` as scenic's `nn.Conv`; t = T / ft;
  * 'temporal_sampling': `n_sampled_frames` frames picked uniformly, each cut into 2-D patches
    (kernel `[fh, fw, C, D]`); t = the frames kept. (scenic stacks the frames along the height
    and embeds once; patches never cross frames, so that is the same computation.)
The tubelet kernel can start from scenic's initializers: 'central_frame_initializer' (lecun
normal at the central frame, zeros elsewhere) or 'average_frame_initializer' (one frame's lecun
normal draw repeated over time). Deliberately unlike ViViT's model_utils, whose central-frame
initializer zeroes along the kernel's width axis instead of its time axis.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_flax.layers import Dtype, PatchEmbedding

TEMPORAL_ENCODINGS = ('3d_conv', 'temporal_sampling')
KERNEL_INIT_METHODS = ('central_frame_initializer', 'average_frame_initializer')


def central_frame_initializer() -> Callable[..., jax.Array]:
  """Kernel init `[ft, fh, fw, C, D]`: lecun normal at time index ft // 2, zeros at the others."""

  def init(key, shape, dtype=jnp.float32):
    kernel = nn.initializers.lecun_normal()(key, shape, dtype)
    centre = np.zeros((shape[0],) + (1,) * (len(shape) - 1), np.float32)  # [ft, 1, 1, 1, 1]
    centre[shape[0] // 2] = 1.0
    return kernel * jnp.asarray(centre, dtype)

  return init


def average_frame_initializer() -> Callable[..., jax.Array]:
  """Kernel init `[ft, fh, fw, C, D]`: frame 0 of a lecun-normal draw, repeated over time (the
  draw's fan-in counts all ft frames, so the scale is right)."""

  def init(key, shape, dtype=jnp.float32):
    kernel = nn.initializers.lecun_normal()(key, shape, dtype)
    return jnp.repeat(kernel[:1], shape[0], axis=0)  # [ft, fh, fw, C, D]

  return init


def sampled_frame_indices(num_frames: int, n_sampled_frames: int) -> np.ndarray:
  """scenic's uniform frame sampling: start and spacing T / (n + 1), rounded and clipped; every
  frame when n >= T."""
  if n_sampled_frames >= num_frames:
    return np.arange(num_frames)
  spacing = num_frames / (n_sampled_frames + 1)
  indices = np.round(spacing + spacing * np.arange(n_sampled_frames)).astype(np.int32)
  return np.clip(indices, 0, num_frames - 1)


def temporal_encode(clips: jax.Array, *, method: str, patch_size: tuple[int, int],
                    tubelet_frames: int, n_sampled_frames: int, hidden_size: int,
                    kernel_init_method: str | None, dtype: Dtype
                    ) -> tuple[jax.Array, int, tuple[int, int]]:
  """Tokens `[B, t*h*w, D]`, t and (h, w) of clips `[B, T, H, W, C]`.

  Call inside a compact module: the patch embedding is created there as `embedding`, the name
  scenic's checkpoints use.
  """
  b, num_frames = clips.shape[:2]
  if method == 'temporal_sampling':
    clips = clips[:, sampled_frame_indices(num_frames, n_sampled_frames)]  # [B, t, H, W, C]
    t = clips.shape[1]
    frames = clips.reshape(b * t, *clips.shape[2:])  # [B*t, H, W, C]
    x = PatchEmbedding(hidden_size, patch_size, dtype, name='embedding')(frames)  # [B*t, h, w, D]
    _, h, w, d = x.shape
    return x.reshape(b, t * h * w, d), t, (h, w)  # [B, t*h*w, D]
  init = {'central_frame_initializer': central_frame_initializer,
          'average_frame_initializer': average_frame_initializer}.get(
              kernel_init_method, nn.initializers.lecun_normal)()
  x = PatchEmbedding(hidden_size, (tubelet_frames, *patch_size), dtype, kernel_init=init,
                     name='embedding')(clips)  # [B, t, h, w, D]
  _, t, h, w, d = x.shape
  return x.reshape(b, t * h * w, d), t, (h, w)  # [B, t*h*w, D]
