"""Streamed datasets (ImageNet-sized): tf.data with scenic's Inception-crop preprocessing.

`streamed` turns a prepared TFDS builder into an `input_pipeline.Dataset` whose iterators yield
normalised host batches (scenic's dataset_lib/imagenet_dataset.py: Inception crop, bicubic resize
and flip for training; a central crop for evaluation). In a multi-process job each process reads
its own part of every split (`tfds.even_splits`) and the evaluation iterators of all processes
yield the same number of batches. Labels are checked batch by batch.
"""

from collections.abc import Iterator
import math

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_flax.input_pipeline import DATASETS, STREAMED_IMAGE_SIZE, DataError, Dataset


def streamed(builder, splits: dict, dc: dict, source: str, image_key: str, label_key: str,
              num_classes: int) -> Dataset:
  """A tf.data Dataset with scenic's ImageNet preprocessing (dataset_lib/imagenet_dataset.py)."""
  size, v = dc['image_size'] or STREAMED_IMAGE_SIZE, dc['validation_size']
  name = builder.name
  if getattr(builder.info.features[image_key], 'encoding_format', None) != 'jpeg':
    raise DataError(f'{name}: streaming supports JPEG-encoded images only (its image shape '
                     f'{builder.info.features[image_key].shape} is too large to load in memory).')
  if splits['valid'] is None:
    splits = {**splits, 'train': f'train[:-{v}]' if v else 'train',
              'valid': f'train[-{v}:]' if v else None}
  info = DATASETS.get(name, DATASETS['imagenet2012'])
  mean, std = info.mean, info.std
  mean255, std255 = tf.constant(mean) * 255.0, tf.constant(std) * 255.0
  decoders = {image_key: tfds.decode.SkipDecoding()}  # Decode only the crop window.

  def count(split):
    try:
      return builder.info.splits[split].num_examples if split else 0
    except (KeyError, ValueError):  # Splits unknown (e.g. under tfds.testing.mock_data).
      return 0

  def finish(image, label):  # image [size, size, 3] float in [0, 255]
    return {'inputs': (image - mean255) / std255, 'label': tf.cast(label, tf.int32)}

  def train_example(ex, seed):  # seed [2] int64: stateless ops make the stream reproducible
    jpeg = ex[image_key]
    shape = tf.io.extract_jpeg_shape(jpeg)  # [H, W, C]
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seed,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    failed = tf.reduce_all(tf.equal(crop[:2], shape[:2]))  # Sampler gave up: whole image.
    window = tf.cond(failed, lambda: _center_window(shape, size),
                     lambda: tf.stack([begin[0], begin[1], crop[0], crop[1]]))
    image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [size, size], method='bicubic')
    image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return finish(image, ex[label_key])

  def eval_example(ex):
    jpeg = ex[image_key]
    window = _center_window(tf.io.extract_jpeg_shape(jpeg), size)
    image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
    return finish(tf.image.resize(image, [size, size], method='bicubic'), ex[label_key])

  # Each process of a multi-process job reads its own part of every split (`tfds.even_splits`).
  process, processes = jax.process_index(), jax.process_count()
  share = lambda split: tfds.even_splits(split, n=processes)[process] if processes > 1 else split

  def train_iter(batch_size: int, seed: int):  # batch_size: this process's rows of a batch.
    seed = seed + 1_000_003 * process  # Each process its own crops and order.
    ds = builder.as_dataset(split=share(splits['train']), shuffle_files=True, decoders=decoders,
                            read_config=tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.repeat().shuffle(16 * batch_size, seed=seed)
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds)).map(train_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda b: {**b, 'mask': tf.ones_like(b['label'], tf.float32)})
    return _checked_labels(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)), name, 'train',
                           num_classes)

  def eval_iter(split: str, batch_size: int):  # batch_size: this process's rows of a batch.
    if split not in ('valid', 'test') or splits[split] is None:
      raise DataError(f'No {split!r} split for {name} (splits: {splits}).')
    ds = builder.as_dataset(split=share(splits[split]), decoders=decoders)
    ds = ds.map(eval_example, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

    def pad(b):  # The last batch: pad to batch_size, mask marks the real examples.
      n = tf.shape(b['label'])[0]
      padded = {k: tf.pad(x, [[0, batch_size - n]] + [[0, 0]] * (len(x.shape) - 1))
                for k, x in b.items()}
      return {**padded, 'mask': tf.cast(tf.range(batch_size) < n, tf.float32)}

    batches = _checked_labels(tfds.as_numpy(ds.map(pad).prefetch(tf.data.AUTOTUNE)), name, split,
                              num_classes)
    # Every process runs as many eval steps as the largest share needs (padding: mask 0).
    largest_share = math.ceil(count(splits[split]) / processes)
    return _padded_to(batches, math.ceil(largest_share / batch_size) if largest_share else None)

  return Dataset(
      name=name, source=source, num_classes=num_classes, image_shape=(size, size, 3),
      num_train=count(splits['train']), num_valid=count(splits['valid']),
      num_test=count(splits['test']), mean=mean, std=std, in_memory=False,
      train_iter=train_iter, eval_iter=eval_iter)


def _checked_labels(batches: Iterator[dict[str, np.ndarray]], name: str, split: str,
                    num_classes: int) -> Iterator[dict[str, np.ndarray]]:
  """`batches`, raising DataError at the first label outside [0, num_classes)."""
  for batch in batches:
    labels = batch['label'][batch['mask'] > 0]
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise DataError(f'{name} {split}: labels outside [0, {num_classes}), e.g. {int(bad[0])}.')
    yield batch


def _padded_to(batches: Iterator[dict[str, np.ndarray]], num_batches: int | None
               ) -> Iterator[dict[str, np.ndarray]]:
  """`batches`, followed by all-padding batches (mask 0) up to `num_batches` in all."""
  last, n = None, 0
  for last in batches:
    n += 1
    yield last
  while last is not None and num_batches is not None and n < num_batches:
    n += 1
    yield {k: np.zeros_like(v) for k, v in last.items()}


def _center_window(shape, size: int):
  """[y, x, h, w] of the center crop of side size / (size + 32) * short side (scenic eval)."""
  h, w = shape[0], shape[1]
  side = tf.cast(size / (size + 32) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
