"""Tests for vit_flax.augment: normalisation, crops, flips, TrivialAugment, random erasing, Mixup /
CutMix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_flax import augment
from vit_flax import input_pipeline as ip


def _images(batch=8, size=8, channels=3):
  return np.random.default_rng(1).integers(0, 256, (batch, size, size, channels), dtype=np.uint8)


def test_preprocess_normalises_and_eval_ignores_augmentation():
  images = _images()
  info = ip.DATASETS['cifar10']
  mean, std = np.array(info.mean), np.array(info.std)
  expected = (images / 255.0 - mean) / std
  out = augment.preprocess(images, jax.random.key(0), train=False, dataset='cifar10', crop_padding=4,
                      random_flip=True)
  assert out.shape == images.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  white = augment.preprocess(np.full((1, 2, 2, 1), 255, np.uint8), None, train=True, dataset='mnist')
  np.testing.assert_allclose(white, (1 - 0.1307) / 0.3081, rtol=1e-6)


def test_preprocess_flip_is_per_example_and_deterministic():
  images = _images(batch=32)
  fn = jax.jit(functools.partial(augment.preprocess, train=True, dataset='cifar10', random_flip=True))
  out, again = fn(images, jax.random.key(0)), fn(images, jax.random.key(0))
  np.testing.assert_array_equal(out, again)
  assert not np.array_equal(out, fn(images, jax.random.key(1)))
  plain = augment.preprocess(images, None, train=False, dataset='cifar10')
  close = functools.partial(np.isclose, atol=1e-5)  # jit may round differently from eager.
  same = np.all(close(out, plain), axis=(1, 2, 3))
  mirrored = np.all(close(out, plain[:, :, ::-1]), axis=(1, 2, 3))  # [B, H, W, C]: W flipped.
  assert np.all(same | mirrored) and same.any() and mirrored.any()


@pytest.mark.parametrize('pad_mode', ['constant', 'reflect'])
def test_preprocess_crop_is_a_window_of_the_padded_image(pad_mode):
  images, p = _images(batch=16, channels=1), 2
  out = augment.preprocess(images, jax.random.key(3), train=True, dataset='mnist', crop_padding=p,
                      pad_mode=pad_mode)
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=pad_mode)
  pixels = np.rint((np.asarray(out) * 0.3081 + 0.1307) * 255)  # Back to uint8 values.
  offsets = []
  for x, y in zip(padded, pixels):
    matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
               if np.array_equal(x[dy:dy + 8, dx:dx + 8], y)]
    assert matches
    offsets.append(matches[0])
  assert len(set(offsets)) > 1  # The offset varies per example.


def test_preprocess_accepts_dataset_object():
  ds = ip.Dataset(name='x', source='test', num_classes=2, image_shape=(2, 2, 2), num_train=0,
                  num_valid=0, num_test=0, mean=(0.5, 0.25), std=(0.5, 0.25), in_memory=True)
  out = augment.preprocess(np.full((1, 2, 2, 2), 255, np.uint8), None, train=False, dataset=ds)
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 3.0])


def test_identity_affine_leaves_images_unchanged():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (3, 28, 28, 1)), jnp.float32)
  ops = jnp.full((3,), augment.TRIVIAL_AUGMENT_OPS.index('identity'))
  out = augment.affine_augment(x, jax.random.key(0), None, ops, jnp.full((3,), 0.3))
  np.testing.assert_allclose(out, x, atol=1e-4)  # No crop, and TrivialAugment drew 'identity'.


def test_translate_shifts_by_whole_pixels():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.integers(0, 256, (2, 28, 28, 1)), jnp.float32)
  # magnitude m shifts by MAX_TRANSLATE * (2m - 1) * 28 pixels: 7 pixels here.
  m = (7 / (augment.MAX_TRANSLATE * 28) + 1) / 2
  ops = jnp.array([augment.TRIVIAL_AUGMENT_OPS.index('translate_x'),
                   augment.TRIVIAL_AUGMENT_OPS.index('translate_y')])
  out = augment.affine_augment(x, jax.random.key(0), None, ops, jnp.full((2,), m))
  np.testing.assert_allclose(out[0, :, :-7], x[0, :, 7:], atol=1e-3)  # out(y, x) = in(y, x + 7)
  np.testing.assert_allclose(out[0, :, -7:], 0.0, atol=1e-3)  # From outside the image: 0.
  np.testing.assert_allclose(out[1, :-7], x[1, 7:], atol=1e-3)


def test_rotation_keeps_a_centred_disc():
  yy, xx = np.mgrid[:29, :29] - 14.0
  disc = (np.hypot(yy, xx) <= 8).astype(np.float32)[None, :, :, None] * 255  # [1, 29, 29, 1]
  ops = jnp.array([augment.TRIVIAL_AUGMENT_OPS.index('rotate')])
  out = augment.affine_augment(jnp.asarray(disc), jax.random.key(0), None, ops, jnp.array([0.9]))
  assert np.abs(np.asarray(out) - disc).mean() < 0.02 * 255  # Only the rim is resampled.
  assert abs(float(out.sum()) - disc.sum()) < 0.02 * disc.sum()


def test_random_resized_crop_zooms_in():
  """A crop of area a, resized back, magnifies: a centred disc grows by about 1/sqrt(a)."""
  yy, xx = np.mgrid[:28, :28] - 13.5
  disc = (np.hypot(yy, xx) <= 5).astype(np.float32)[None, :, :, None] * 255
  out = augment.affine_augment(jnp.asarray(np.repeat(disc, 16, 0)), jax.random.key(0), 0.5,
                               None, None)
  grown = np.asarray(out).reshape(16, -1).sum(-1) / disc.sum()
  assert (grown >= 0.99).all() and grown.max() > 1.3  # Area scales by 1/a in [1, 2].


@pytest.mark.parametrize('op,magnitude', [('brightness', 0.5), ('contrast', 0.5),
                                          ('sharpness', 0.5), ('solarize', 0.0),
                                          ('posterize', 0.0), ('identity', 0.7)])
def test_colour_ops_at_neutral_magnitude_are_the_identity(op, magnitude):
  image = jnp.asarray(np.random.default_rng(2).integers(0, 256, (8, 8, 1)), jnp.float32)
  out = augment.colour_op(image, augment.TRIVIAL_AUGMENT_OPS.index(op), magnitude)
  np.testing.assert_allclose(out, image, atol=1e-3)


def test_autocontrast_stretches_to_the_full_range():
  image = jnp.linspace(50.0, 100.0, 64).reshape(8, 8, 1)
  out = augment.colour_op(image, augment.TRIVIAL_AUGMENT_OPS.index('autocontrast'), 0.5)
  assert float(out.min()) == 0.0 and float(out.max()) == pytest.approx(255.0)


def test_trivial_augment_is_per_example_and_in_range():
  images = np.random.default_rng(3).integers(0, 256, (64, 28, 28, 1), np.uint8)
  fn = jax.jit(functools.partial(augment.preprocess, train=True, dataset='mnist',
                                 trivial_augment=True))
  out = np.asarray(fn(images, jax.random.key(0)))
  again = np.asarray(fn(images, jax.random.key(0)))
  np.testing.assert_array_equal(out, again)  # Reproducible from the key.
  plain = np.asarray(augment.preprocess(images, None, train=False, dataset='mnist'))
  changed = (np.abs(out - plain).reshape(64, -1).max(-1) > 1e-3)
  assert 0 < changed.sum() < 64  # Some images drew 'identity' and a near-full crop; most not.
  twins = np.asarray(fn(np.repeat(images[:1], 8, 0), jax.random.key(1)))
  assert len({t.tobytes() for t in twins}) > 1  # One image, eight copies: different draws.
  mean, std = ip.DATASETS['mnist'].mean[0], ip.DATASETS['mnist'].std[0]
  assert out.min() >= (0 - mean) / std - 1e-4 and out.max() <= (1 - mean) / std + 1e-4


def test_random_erase_overwrites_one_rectangle_of_bounded_area():
  """Images held at 300 (outside [0, 255]): any other value was erased; it forms one rectangle."""
  b, h, w = 256, 28, 20
  x = jnp.full((b, h, w, 2), 300.0)
  out = np.asarray(jax.jit(augment.random_erase, static_argnums=2)(x, jax.random.key(0), 0.5))
  erased = out != 300.0  # [B, H, W, C]
  np.testing.assert_array_equal(erased[..., 0], erased[..., 1])  # All channels of a pixel.
  erased = erased[..., 0]
  hit = erased.any(axis=(1, 2))
  assert 0.4 < hit.mean() < 0.6  # About `probability` of the images.
  fills = out[np.broadcast_to(erased[..., None], out.shape)]
  assert fills.min() >= 0 and fills.max() <= 255  # Uniform pixel values.
  sides = []
  for mask in erased[hit]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))  # Contiguous rows ...
    assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1))  # ... and columns ...
    assert mask.sum() == len(rows) * len(cols)  # ... filling their rectangle.
    assert mask.sum() <= augment.ERASE_AREA[1] * h * w * 1.25  # Rounding each side up.
    sides.append((rows[0], cols[0], len(rows), len(cols)))
  assert len(set(sides)) > 0.9 * len(sides)  # Position and size vary per image.


def test_random_erasing_switch_in_preprocess():
  images = _images(batch=64, size=16, channels=1)
  plain = np.asarray(augment.preprocess(images, None, train=True, dataset='mnist'))
  never = augment.preprocess(images, jax.random.key(0), train=True, dataset='mnist',
                             random_erasing=0.0)
  always = np.asarray(augment.preprocess(images, jax.random.key(0), train=True, dataset='mnist',
                                         random_erasing=1.0))
  np.testing.assert_array_equal(never, plain)
  assert np.all(np.abs(always - plain).reshape(64, -1).max(-1) > 1e-3)  # Every image changed.
  eval_out = augment.preprocess(images, jax.random.key(0), train=False, dataset='mnist',
                                random_erasing=1.0)
  np.testing.assert_array_equal(eval_out, plain)


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_images_match_their_soft_targets(mixup_alpha, cutmix_alpha):
  """Image i is constant at value v(label i): its mean after mixing is targets_i . v."""
  labels = jnp.arange(8) % 4
  values = jnp.array([0.0, 10.0, 20.0, 30.0])
  x = jnp.broadcast_to(values[labels][:, None, None, None], (8, 16, 16, 1))
  targets = jax.nn.one_hot(labels, 4)
  for seed in range(4):
    mixed, soft = augment.mix(x, targets, jax.random.key(seed), mixup_alpha=mixup_alpha,
                              cutmix_alpha=cutmix_alpha)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed.mean(axis=(1, 2, 3)), soft @ values, rtol=1e-5, atol=1e-4)


def test_mix_off_is_the_identity():
  x, t = jnp.ones((4, 8, 8, 1)), jnp.eye(4)
  out, soft = augment.mix(x, t, jax.random.key(0))
  assert out is x and soft is t
