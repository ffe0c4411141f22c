"""Moving digits: a video classification task made from real images, deterministically per seed.

Each clip is `num_frames` frames of a black `canvas_size`-square canvas in which one real digit
(MNIST) or garment (Fashion-MNIST), shrunk to `digit_size`, crosses the canvas on a straight line
at a constant speed in one of 8 compass directions. The label is the direction: no single frame
shows it, so a model must compare frames. Train clips take their images from the source's train
split, validation and test clips from its validation and test splits, so no image is shared.
`dataset_name` 'moving_mnist' or 'moving_fashion_mnist'; `dataset_configs.moving_digits` holds
the keys of DEFAULTS.
"""

import dataclasses
from typing import Any

import numpy as np

DATASETS = {'moving_mnist': 'mnist', 'moving_fashion_mnist': 'fashion_mnist'}  # -> images from.
DIRECTIONS = ('E', 'NE', 'N', 'NW', 'W', 'SW', 'S', 'SE')  # Label k: angle 45° * k from east.
DEFAULTS = {
    'num_frames': 8,  # T.
    'canvas_size': 32,  # H = W of every frame.
    'digit_size': 16,  # Side the 28 x 28 source image is shrunk to.
    'min_speed': 1.0,  # Pixels per frame; a clip's speed is uniform in [min_speed, max_speed].
    'max_speed': 2.0,
    'num_train': 16_000,  # Clips per split.
    'num_valid': 2_000,
    'num_test': 4_000,
    'seed': 0,  # Clips of split i come from numpy's default_rng((seed, i)).
}


def clip_shape(options: dict[str, Any]) -> tuple[int, int, int, int]:
  """(T, H, W, C) of the clips `options` (DEFAULTS' keys) describe."""
  return (options['num_frames'], options['canvas_size'], options['canvas_size'], 1)


def check(options: dict[str, Any]) -> list[str]:
  """The problems of `options` (DEFAULTS' keys, all present): sizes a clip cannot have."""
  errors = []
  for key in ('num_frames', 'canvas_size', 'digit_size', 'num_train', 'num_valid', 'num_test'):
    if not (isinstance(options[key], int) and options[key] >= 1):
      errors.append(f'dataset_configs.moving_digits.{key} must be a positive int, got '
                    f'{options[key]!r}')
  if errors:
    return errors
  low, high = options['min_speed'], options['max_speed']
  room = options['canvas_size'] - options['digit_size']
  if not 0 < low <= high:
    errors.append(f'moving_digits speeds must satisfy 0 < min_speed <= max_speed, got {low}, '
                  f'{high}')
  elif high * (options['num_frames'] - 1) > room:
    errors.append(f'moving_digits: a digit of {options["digit_size"]} px at {high} px/frame for '
                  f'{options["num_frames"]} frames leaves a {options["canvas_size"]} px canvas')
  return errors


def shrink(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W, 1] -> uint8 [N, size, size] (bilinear, antialiased)."""
  import jax  # pylint: disable=g-import-not-at-top
  out = jax.image.resize(images[..., 0].astype(np.float32), (len(images), size, size), 'bilinear',
                         antialias=True)
  return np.clip(np.round(np.asarray(out)), 0, 255).astype(np.uint8)


def make_clips(digits: np.ndarray, num_clips: int, rng: np.random.Generator,
               options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(clips uint8 [n, T, S, S, 1], direction labels int32 [n]) from shrunk digits [N, d, d]."""
  t, s, d = options['num_frames'], options['canvas_size'], options['digit_size']
  which = rng.integers(0, len(digits), num_clips)  # [n]
  labels = rng.integers(0, len(DIRECTIONS), num_clips).astype(np.int32)  # [n]
  speed = rng.uniform(options['min_speed'], options['max_speed'], num_clips)  # [n]
  angle = labels * (np.pi / 4)
  velocity = np.stack([-np.sin(angle), np.cos(angle)], axis=-1) * speed[:, None]  # [n, (dy, dx)]
  travel = velocity * (t - 1)  # [n, 2]
  low = np.maximum(0.0, -travel)  # Start so that every frame keeps the digit inside.
  high = (s - d) - np.maximum(0.0, travel)
  start = low + rng.uniform(size=(num_clips, 2)) * (high - low)  # [n, 2]
  clips = np.zeros((num_clips, t, s, s), np.uint8)
  rows = np.arange(num_clips)[:, None, None]
  dy, dx = np.meshgrid(np.arange(d), np.arange(d), indexing='ij')  # [d, d] each
  for frame in range(t):
    y, x = np.round(start + velocity * frame).astype(np.int64).T  # [n] each
    clips[rows, frame, y[:, None, None] + dy, x[:, None, None] + dx] = digits[which]
  return clips[..., None], labels


def moving_digits(source: Any, options: dict[str, Any], name: str) -> Any:
  """The clips dataset (an `input_pipeline.Dataset`) made from the image dataset `source`."""
  splits = {}
  for i, split in enumerate(('train', 'valid', 'test')):
    images = getattr(source, f'{split}_images')
    if not len(images):  # No validation images: the test images' clips stand in.
      images = source.test_images
    rng = np.random.default_rng((options['seed'], i))
    splits[split] = make_clips(shrink(images, options['digit_size']),
                               options[f'num_{split}'], rng, options)
  clips = splits['train'][0]
  mean, std = float(clips.mean()) / 255, float(clips.std()) / 255
  return dataclasses.replace(
      source, name=name, source=f'moving digits of {source.name} ({source.source})',
      num_classes=len(DIRECTIONS), image_shape=clip_shape(options),
      num_train=options['num_train'], num_valid=options['num_valid'],
      num_test=options['num_test'], mean=(mean,), std=(std,),
      train_images=clips, train_labels=splits['train'][1], valid_images=splits['valid'][0],
      valid_labels=splits['valid'][1], test_images=splits['test'][0],
      test_labels=splits['test'][1])
