"""On-device preprocessing of uint8 image batches: normalisation and train-time augmentation.

Everything here is jnp and runs inside the jitted train loop, per example, from one PRNG key per
batch, so augmentation costs no host work and is reproducible from the run's seed. The geometric
augmentations (random-resized crop and TrivialAugment's rotate / shear / translate) are composed
into one affine map per image and applied with a single bilinear resampling.

TrivialAugment (Müller & Hutter, 2021) applies one operation, drawn uniformly, at a magnitude drawn
uniformly, to each image. Random erasing (Zhong et al., 2020) overwrites a random rectangle of
some images with random pixels. Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) mix each
batch with itself rolled by one example, with soft targets.
"""

import math

import jax
import jax.numpy as jnp

from vit_flax import input_pipeline

# TrivialAugment's operations here, with the magnitude range each maps [0, 1] onto (the standard
# RandAugment ranges, scaled to small images: translate is a fraction of the side). Equalize and
# colour (saturation) are left out: equalize needs a per-image histogram, colour is a no-op on
# grayscale.
TRIVIAL_AUGMENT_OPS = ('identity', 'rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y',
                       'brightness', 'contrast', 'sharpness', 'solarize', 'posterize',
                       'autocontrast')
_GEOMETRIC = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # Of the image side.
MAX_ENHANCE = 0.9  # brightness / contrast / sharpness factors in [1 - 0.9, 1 + 0.9].
# Random erasing's rectangle (Zhong et al.'s defaults): area fraction in [0.02, 0.4], aspect ratio
# log-uniform in [0.3, 1 / 0.3], each side clipped to the image.
ERASE_AREA = (0.02, 0.4)
ERASE_LOG_RATIO = (math.log(0.3), -math.log(0.3))


def preprocess(images: jax.Array, rng: jax.Array | None, *, train: bool,
               dataset: input_pipeline.Dataset | str, crop_padding: int = 0,
               random_flip: bool = False, random_resized_crop: float | None = None,
               trivial_augment: bool = False, random_erasing: float = 0.0,
               pad_mode: str = 'constant') -> jax.Array:
  """uint8 [B, H, W, C] -> normalised float32 [B, H, W, C]; augments per example when `train`.

  Args:
    images: uint8 (or [0, 255] float) images.
    rng: PRNG key; only needed when train and an augmentation is on.
    train: apply the augmentations (eval only normalises).
    dataset: a `Dataset`, or a name in `input_pipeline.DATASETS`, giving mean and std.
    crop_padding: pad each side by this many pixels, then crop back to H x W at a random offset.
    random_flip: flip each image left-right with probability 1/2.
    random_resized_crop: the smallest area fraction of an Inception-style crop (aspect ratio in
      [3/4, 4/3]) resized back to H x W; None: off.
    trivial_augment: apply one random TRIVIAL_AUGMENT_OPS operation at a random magnitude.
    random_erasing: the probability of overwriting a random rectangle of each image with uniform
      random pixels, after the other augmentations; 0: off.
    pad_mode: 'constant' (zero pixels) or 'reflect', for crop_padding.

  Returns:
    float32 images `(x / 255 - mean) / std`.
  """
  if isinstance(dataset, str):
    mean, std = input_pipeline.DATASETS[dataset].mean, input_pipeline.DATASETS[dataset].std
  else:
    mean, std = dataset.mean, dataset.std
  x = images.astype(jnp.float32)
  if train and (crop_padding or random_flip or random_resized_crop or trivial_augment
                or random_erasing):
    if rng is None:
      raise ValueError('preprocess(train=True) with augmentation needs an rng.')
    crop_rng, affine_rng, flip_rng, op_rng, erase_rng = jax.random.split(rng, 5)
    if crop_padding:
      x = pad_and_crop(x, crop_rng, crop_padding, pad_mode)
    ops = magnitudes = None
    if trivial_augment:
      op_key, magnitude_key = jax.random.split(op_rng)
      ops = jax.random.randint(op_key, (x.shape[0],), 0, len(TRIVIAL_AUGMENT_OPS))  # [B]
      magnitudes = jax.random.uniform(magnitude_key, (x.shape[0],))  # [B] in [0, 1)
    if random_resized_crop or trivial_augment:
      x = affine_augment(x, affine_rng, random_resized_crop, ops, magnitudes)
    if random_flip:
      x = flip_left_right(x, flip_rng)
    if trivial_augment:
      x = jax.vmap(colour_op)(x, ops, magnitudes)
    if random_erasing:
      x = random_erase(x, erase_rng, random_erasing)
  return (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def pad_and_crop(x: jax.Array, rng: jax.Array, padding: int, mode: str = 'constant'
                 ) -> jax.Array:
  """Pads [B, H, W, C] by `padding` on each side, then crops H x W at a random offset each."""
  b, h, w, c = x.shape
  p = padding
  x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode=mode)  # [B, H+2p, W+2p, C]
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * p + 1)  # [B, (dy, dx)]
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(x, offsets)  # [B, H, W, C]


def flip_left_right(x: jax.Array, rng: jax.Array) -> jax.Array:
  """Mirrors each image of [B, H, W, C] left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def random_erase(x: jax.Array, rng: jax.Array, probability: float) -> jax.Array:
  """Overwrites, with probability `probability`, a random rectangle of each image of [B, H, W, C].

  The rectangle's area fraction and aspect ratio are drawn from ERASE_AREA and ERASE_LOG_RATIO,
  its position uniformly among those that fit; its pixels become uniform in [0, 255].
  """
  b, h, w, c = x.shape
  apply_rng, area_rng, ratio_rng, pos_rng, fill_rng = jax.random.split(rng, 5)
  apply = jax.random.bernoulli(apply_rng, probability, (b,))  # [B]
  area = jax.random.uniform(area_rng, (b,), minval=ERASE_AREA[0], maxval=ERASE_AREA[1]) * h * w
  ratio = jnp.exp(jax.random.uniform(ratio_rng, (b,), minval=ERASE_LOG_RATIO[0],
                                     maxval=ERASE_LOG_RATIO[1]))  # Height / width.
  size = jnp.stack([jnp.sqrt(area * ratio), jnp.sqrt(area / ratio)], axis=-1)  # [B, (h, w)]
  size = jnp.clip(jnp.round(size), 1, jnp.array([h, w])).astype(jnp.int32)
  start = jnp.floor(jax.random.uniform(pos_rng, (b, 2)) * (jnp.array([h, w]) - size + 1))
  start = start.astype(jnp.int32)  # [B, (y0, x0)]
  rows = jnp.arange(h)[None, :] - start[:, :1]  # [B, H]: row offset into the rectangle.
  cols = jnp.arange(w)[None, :] - start[:, 1:]  # [B, W]
  in_rows = (rows >= 0) & (rows < size[:, :1])  # [B, H]
  in_cols = (cols >= 0) & (cols < size[:, 1:])  # [B, W]
  box = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]  # [B, H, W]
  fill = jax.random.uniform(fill_rng, x.shape, maxval=255.0)  # [B, H, W, C]
  return jnp.where(box[..., None], fill, x)


def affine_augment(x: jax.Array, rng: jax.Array, min_crop_area: float | None,
                   ops: jax.Array | None, magnitudes: jax.Array | None) -> jax.Array:
  """One bilinear resampling per image of [B, H, W, C] through a random affine map.

  The map composes an Inception-style random-resized crop (area in [min_crop_area, 1], aspect
  ratio in [3/4, 4/3]) with TrivialAugment's geometric operation for that image, if `ops` says
  so. Pixels mapped from outside the image are 0.
  """
  b, h, w, _ = x.shape
  eye = jnp.broadcast_to(jnp.eye(2), (b, 2, 2))
  matrix, offset = eye, jnp.zeros((b, 2))  # Output (y, x) -> input (y, x), about the centre.
  if min_crop_area:
    area_rng, ratio_rng, pos_rng = jax.random.split(rng, 3)
    area = jax.random.uniform(area_rng, (b,), minval=min_crop_area, maxval=1.0)
    log_ratio = jax.random.uniform(ratio_rng, (b,), minval=math.log(3 / 4),
                                   maxval=math.log(4 / 3))
    scale_h = jnp.minimum(jnp.sqrt(area / jnp.exp(log_ratio)), 1.0)  # Crop side / image side.
    scale_w = jnp.minimum(jnp.sqrt(area * jnp.exp(log_ratio)), 1.0)
    room = jnp.stack([(1 - scale_h) * h, (1 - scale_w) * w], axis=-1) / 2  # [B, 2]
    offset = jax.random.uniform(pos_rng, (b, 2), minval=-1.0, maxval=1.0) * room
    matrix = eye * jnp.stack([scale_h, scale_w], axis=-1)[:, :, None]
  if ops is not None:
    op_matrix, op_offset = jax.vmap(_geometric_op, in_axes=(0, 0, None))(ops, magnitudes, (h, w))
    matrix = matrix @ op_matrix  # The op acts on output coordinates, then the crop.
    offset = offset + jnp.einsum('bij,bj->bi', matrix, op_offset)  # [B, 2]
  return jax.vmap(_warp)(x, matrix, offset)


def _geometric_op(op: jax.Array, magnitude: jax.Array, hw: tuple[int, int]
                  ) -> tuple[jax.Array, jax.Array]:
  """(2x2 matrix, offset) of TrivialAugment geometric op `op` (identity for the others)."""
  signed = 2.0 * magnitude - 1.0  # [-1, 1): the direction is part of the draw.
  angle = jnp.deg2rad(MAX_ROTATE_DEG) * signed
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  shear = MAX_SHEAR * signed
  shift = MAX_TRANSLATE * signed
  name = lambda n: op == TRIVIAL_AUGMENT_OPS.index(n)
  eye = jnp.eye(2)
  matrix = jnp.select(
      [name('rotate'), name('shear_x'), name('shear_y')],
      [jnp.array([[cos, -sin], [sin, cos]]), jnp.array([[1.0, 0.0], [shear, 1.0]]),
       jnp.array([[1.0, shear], [0.0, 1.0]])], eye)
  offset = jnp.select([name('translate_y'), name('translate_x')],
                      [jnp.array([shift * hw[0], 0.0]), jnp.array([0.0, shift * hw[1]])],
                      jnp.zeros(2))
  return matrix, offset


def _warp(image: jax.Array, matrix: jax.Array, offset: jax.Array) -> jax.Array:
  """Samples [H, W, C] at matrix @ (p - centre) + centre + offset for every output pixel p."""
  h, w, c = image.shape
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2])
  grid = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij'), -1)  # [H, W, 2]
  source = (grid - centre) @ matrix.T + centre + offset  # [H, W, 2] input (y, x)
  coords = [source[..., 0], source[..., 1]]
  channel = lambda im: jax.scipy.ndimage.map_coordinates(im, coords, order=1, mode='constant')
  return jax.vmap(channel, in_axes=2, out_axes=2)(image)  # [H, W, C]


def colour_op(image: jax.Array, op: jax.Array, magnitude: jax.Array) -> jax.Array:
  """TrivialAugment colour op `op` on one [H, W, C] image in [0, 255] (identity for the rest)."""
  factor = 1.0 + MAX_ENHANCE * (2.0 * magnitude - 1.0)  # [0.1, 1.9)
  gray_mean = jnp.mean(image)
  kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's SMOOTH.
  smooth = jax.vmap(lambda ch: jax.scipy.signal.convolve2d(ch, kernel, mode='same'),
                    in_axes=2, out_axes=2)(image)
  low, high = jnp.min(image), jnp.max(image)
  bits = jnp.round(8.0 - 4.0 * magnitude)  # 8 .. 4 bits kept.
  step = 2.0 ** (8.0 - bits)
  name = lambda n: op == TRIVIAL_AUGMENT_OPS.index(n)
  out = jnp.select(
      [name('brightness'), name('contrast'), name('sharpness'), name('solarize'),
       name('posterize'), name('autocontrast')],
      [image * factor, gray_mean + factor * (image - gray_mean), smooth + factor * (image - smooth),
       jnp.where(image >= 256.0 * (1.0 - magnitude), 255.0 - image, image),
       jnp.floor(image / step) * step,
       (image - low) * 255.0 / jnp.maximum(high - low, 1.0)],
      image)
  return jnp.clip(out, 0.0, 255.0)


def mix(x: jax.Array, targets: jax.Array, rng: jax.Array, *, mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Mixup or CutMix of a batch with itself rolled by one example; soft targets mixed alike.

  Args:
    x: images [B, H, W, C].
    targets: soft or one-hot targets [B, K].
    rng: PRNG key.
    mixup_alpha: Beta(a, a) for mixup's weight; 0: off.
    cutmix_alpha: Beta(a, a) for CutMix's kept area; 0: off. With both on, each batch picks one
      with probability 1/2.

  Returns:
    (images, targets): lam * own + (1 - lam) * partner's, with CutMix's lam the exact area kept.
  """
  if not (mixup_alpha or cutmix_alpha):
    return x, targets
  b, h, w, _ = x.shape
  choose_rng, mixup_rng, cutmix_rng, box_rng = jax.random.split(rng, 4)
  partner_x, partner_t = jnp.roll(x, 1, axis=0), jnp.roll(targets, 1, axis=0)
  outputs = []
  if mixup_alpha:
    lam = jax.random.beta(mixup_rng, mixup_alpha, mixup_alpha)
    outputs.append((lam * x + (1 - lam) * partner_x, lam))
  if cutmix_alpha:
    lam = jax.random.beta(cutmix_rng, cutmix_alpha, cutmix_alpha)
    cut_h, cut_w = h * jnp.sqrt(1 - lam), w * jnp.sqrt(1 - lam)
    cy, cx = jax.random.uniform(box_rng, (2,)) * jnp.array([h, w])
    ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    y0, y1 = jnp.clip(jnp.round(cy - cut_h / 2), 0, h), jnp.clip(jnp.round(cy + cut_h / 2), 0, h)
    x0, x1 = jnp.clip(jnp.round(cx - cut_w / 2), 0, w), jnp.clip(jnp.round(cx + cut_w / 2), 0, w)
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # [H, W]
    kept = 1.0 - jnp.mean(box.astype(jnp.float32))
    outputs.append((jnp.where(box[None, :, :, None], partner_x, x), kept))
  if len(outputs) == 2:
    use_mixup = jax.random.bernoulli(choose_rng, 0.5)
    (mx, ml), (cx_, cl) = outputs
    images, lam = jnp.where(use_mixup, mx, cx_), jnp.where(use_mixup, ml, cl)
  else:
    images, lam = outputs[0]
  return images, lam * targets + (1 - lam) * partner_t
