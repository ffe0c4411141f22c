"""Resampling for transfer: position embeddings to a new grid or clip, patch kernels to 3-D.

Pure numpy, as scenic's `init_posemb` / ViViT's `init_embedding` and timm's
`resample_abs_pos_embed`: 'bilinear' reproduces `scipy.ndimage.zoom(order=1)` (vit_jax, scenic,
big_vision), 'bicubic' torch's antialiased bicubic `F.interpolate` (timm).
"""

import numpy as np

from vit_flax.checkpoint_formats import PretrainedError

SIZE_CHANGES = ('resize', 'tile', 'resize_tile')  # scenic's init_from.positional_embed_size_change
INTERPOLATIONS = ('bilinear', 'bicubic')
KERNEL_INITIALIZERS = ('average_frame_initializer', 'central_frame_initializer')


def resize_posemb(posemb: np.ndarray, source_grid: tuple[int, int], target_grid: tuple[int, int],
                  *, source_has_cls: bool, target_has_cls: bool, num_frames: int = 1,
                  size_change: str = 'resize', interpolation: str = 'bilinear') -> np.ndarray:
  """`[1, c + h*w, D]` -> `[1, c' + T*h'*w', D]` for a target grid (h', w') of T frames.

  The CLS row (c = 1) is dropped for a target without one and kept for a target with one (a zero
  row when the source has none). The grid rows, as scenic's `init_posemb`: 'resize' resamples
  (h, w) to (h', w') (T must be 1; the identity when the grids are equal); 'tile' repeats the
  source rows T*h'*w' / (h*w) times; 'resize_tile' resamples to (h', w') and repeats that for
  each of the T frames (frame-major, the encoder's token order).
  """
  c = int(source_has_cls)
  cls, rows = posemb[:, :c], posemb[0, c:]  # [1, c, D], [h*w, D]
  h, w = source_grid
  if rows.shape[0] != h * w:
    raise PretrainedError(f'A position embedding of {rows.shape[0]} grid rows does not fit the '
                          f'grid {tuple(source_grid)}.')
  n_target = num_frames * target_grid[0] * target_grid[1]
  if size_change == 'resize':
    if num_frames != 1:
      raise PretrainedError(f"positional_embed_size_change='resize' maps one grid; a target of "
                            f"{num_frames} frames needs 'tile' or 'resize_tile'.")
    rows = resample_grid(rows.reshape(h, w, -1), target_grid, interpolation)  # [h', w', D]
  elif size_change == 'tile':
    if n_target % (h * w):
      raise PretrainedError(f'Cannot tile {h * w} position rows to {n_target}.')
    rows = np.tile(rows, (n_target // (h * w), 1))  # [T*h'*w', D]
  elif size_change == 'resize_tile':
    rows = resample_grid(rows.reshape(h, w, -1), target_grid, interpolation)  # [h', w', D]
    rows = np.tile(rows.reshape(-1, rows.shape[-1]), (num_frames, 1))  # [T*h'*w', D]
  else:
    raise PretrainedError(f'positional_embed_size_change must be one of {SIZE_CHANGES}, got '
                          f'{size_change!r}.')
  rows = rows.reshape(n_target, -1)  # [T*h'*w', D]
  if target_has_cls and not c:
    cls = np.zeros((1, 1, posemb.shape[2]), posemb.dtype)  # The target's CLS gets no offset.
  parts = [cls] if target_has_cls else []
  return np.concatenate(parts + [rows[None]], axis=1)  # [1, c' + T*h'*w', D]


def resample_grid(grid: np.ndarray, size: tuple[int, int],
                  interpolation: str = 'bilinear') -> np.ndarray:
  """Resamples `[h, w, D]` to `[h', w', D]`; the identity when the sizes are equal.

  'bilinear' is `scipy.ndimage.zoom(grid, (h'/h, w'/w, 1), order=1)` (corners aligned), as
  vit_jax and scenic resize; 'bicubic' is `torch.nn.functional.interpolate(mode='bicubic',
  antialias=True, align_corners=False)`, as timm resizes, in numpy.
  """
  if interpolation not in INTERPOLATIONS:
    raise PretrainedError(f'interpolation must be one of {INTERPOLATIONS}, got '
                          f'{interpolation!r}.')
  if tuple(grid.shape[:2]) == tuple(size):
    return grid
  weights = _linear_weights if interpolation == 'bilinear' else _bicubic_antialias_weights
  rows, cols = weights(grid.shape[0], size[0]), weights(grid.shape[1], size[1])  # [h', h], [w', w]
  out = np.einsum('ih,hwd,jw->ijd', rows, grid.astype(np.float64), cols)  # [h', w', D]
  return out.astype(grid.dtype)


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` linear interpolation with the end points aligned (scipy's zoom, order 1)."""
  step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  position = np.arange(n_out) * step  # Source coordinate of each output sample.
  low = np.minimum(np.floor(position).astype(int), n_in - 1)
  high = np.minimum(low + 1, n_in - 1)
  frac = position - low
  weights = np.zeros((n_out, n_in))
  np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
  np.add.at(weights, (np.arange(n_out), high), frac)
  return weights


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic_antialias_weights(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` weights of torch's antialiased bicubic resampling (half-pixel centres).

  As torch's `_upsample_bicubic2d_aa` (and Pillow, which it follows): the kernel is Keys' cubic
  with a = -0.5 (not the -0.75 of torch's plain bicubic), stretched by the scale when
  downsampling, truncated at the borders and normalised to sum to 1.
  """
  scale = n_in / n_out
  stretch = max(scale, 1.0)
  weights = np.zeros((n_out, n_in))
  for i in range(n_out):
    centre = scale * (i + 0.5)
    low = max(int(centre - 2.0 * stretch + 0.5), 0)
    high = min(int(centre + 2.0 * stretch + 0.5), n_in)
    w = _cubic((np.arange(low, high) - centre + 0.5) / stretch, -0.5)
    weights[i, low:high] = w / w.sum()
  return weights


def inflate_patch_kernel(kernel: np.ndarray, temporal_size: int,
                         method: str = 'average_frame_initializer') -> np.ndarray:
  """A 2-D patch kernel `[ph, pw, C, D]` as a 3-D one `[pt, ph, pw, C, D]` (scenic's ViViT).

  'average_frame_initializer': the kernel on every frame, divided by pt (a clip of identical
  frames embeds as the image did); 'central_frame_initializer': the kernel at frame pt // 2 and
  zeros elsewhere (the clip embeds as its central frame).
  """
  if method == 'average_frame_initializer':
    return np.repeat(kernel[None], temporal_size, axis=0) / temporal_size  # [pt, ph, pw, C, D]
  if method == 'central_frame_initializer':
    out = np.zeros((temporal_size, *kernel.shape), kernel.dtype)  # [pt, ph, pw, C, D]
    out[temporal_size // 2] = kernel
    return out
  raise PretrainedError(f'method must be one of {KERNEL_INITIALIZERS}, got {method!r}.')
