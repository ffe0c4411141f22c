"""On-device preprocessing of uint8 image batches: normalisation and train-time augmentation.

Everything here is jnp and runs inside the jitted train loop, per example, from one PRNG key per
batch, so augmentation costs no host work and is reproducible from the run's seed.
"""

import jax
import jax.numpy as jnp

from vit_flax import input_pipeline


def preprocess(images: jax.Array, rng: jax.Array | None, *, train: bool,
               dataset: input_pipeline.Dataset | str, crop_padding: int = 0,
               random_flip: bool = False, pad_mode: str = 'constant') -> jax.Array:
  """uint8 [B, H, W, C] -> normalised float32 [B, H, W, C]; augments per example when `train`.

  Args:
    images: uint8 (or [0, 255] float) images.
    rng: PRNG key; only needed when train and an augmentation is on.
    train: apply the augmentations (eval only normalises).
    dataset: a `Dataset`, or a name in `input_pipeline.DATASETS`, giving mean and std.
    crop_padding: pad each side by this many pixels, then crop back to H x W at a random offset.
    random_flip: flip each image left-right with probability 1/2.
    pad_mode: 'constant' (zero pixels) or 'reflect'.

  Returns:
    float32 images `(x / 255 - mean) / std`.
  """
  if isinstance(dataset, str):
    mean, std = input_pipeline.DATASETS[dataset].mean, input_pipeline.DATASETS[dataset].std
  else:
    mean, std = dataset.mean, dataset.std
  x = images.astype(jnp.float32)
  if train and (crop_padding or random_flip):
    if rng is None:
      raise ValueError('preprocess(train=True) with augmentation needs an rng.')
    crop_rng, flip_rng = jax.random.split(rng)
    if crop_padding:
      x = pad_and_crop(x, crop_rng, crop_padding, pad_mode)
    if random_flip:
      x = flip_left_right(x, flip_rng)
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
