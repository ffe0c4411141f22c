"""Tests for vit_flax.visualize: rollout maths, similarity, PCA, figures, and the CLI end to end."""

import pathlib
import subprocess
import sys

import jax
import matplotlib.image
import ml_collections
import numpy as np
import pytest

import helpers
from vit_flax import analysis
from vit_flax import checkpoints
from vit_flax import config as config_lib
from vit_flax import config_files
from vit_flax import models
from vit_flax import rundir
from vit_flax import visualize
from vit_flax import vit

def _softmax_attention(rng, b, heads, n):
  logits = rng.normal(size=(b, heads, n, n)) * 2
  e = np.exp(logits)
  return e / e.sum(axis=-1, keepdims=True)  # [B, heads, N, N]


def _assert_png_not_blank(path):
  pixels = matplotlib.image.imread(path)  # [H, W, 3 or 4] floats
  assert pixels.size > 0
  assert pixels.std() > 0.02, f'{path} looks blank'
  assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20, f'{path} looks blank'


# ---- attention rollout ------------------------------------------------------------------------


@pytest.mark.parametrize('head_fusion', ['mean', 'max', 'min'])
@pytest.mark.parametrize('discard_ratio', [0.0, 0.5, 0.9])
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio):
  rng = np.random.default_rng(0)
  atts = [_softmax_attention(rng, 2, 3, 10) for _ in range(4)]
  r = analysis.attention_rollout(atts, head_fusion, discard_ratio, keep_first=True)
  assert r.shape == (2, 10, 10)
  np.testing.assert_allclose(r.sum(axis=-1), 1.0, atol=1e-12)
  assert (r >= 0).all()


def test_rollout_of_identity_attention_is_identity():
  atts = [np.broadcast_to(np.eye(6), (2, 4, 6, 6)) for _ in range(3)]
  np.testing.assert_allclose(analysis.attention_rollout(atts),
                             np.broadcast_to(np.eye(6), (2, 6, 6)))


def test_rollout_one_uniform_block_is_half_identity_half_uniform():
  n = 5
  atts = [np.full((1, 2, n, n), 1 / n)]
  expected = 0.5 * np.eye(n) + 0.5 / n
  np.testing.assert_allclose(analysis.attention_rollout(atts)[0], expected)


def test_rollout_multiplies_blocks_last_on_the_left():
  rng = np.random.default_rng(1)
  a1, a2 = _softmax_attention(rng, 1, 1, 4), _softmax_attention(rng, 1, 1, 4)
  step = lambda a: (a[0, 0] + np.eye(4)) / 2
  np.testing.assert_allclose(analysis.attention_rollout([a1, a2])[0], step(a2) @ step(a1))


def test_head_fusions():
  heads = np.stack([np.eye(3), np.full((3, 3), 1 / 3)])[None]  # [1, 2, 3, 3]
  for fusion, fused in (('mean', heads.mean(1)), ('max', heads.max(1)), ('min', heads.min(1))):
    a = fused[0] + np.eye(3)
    np.testing.assert_allclose(analysis.attention_rollout([heads], fusion)[0],
                               a / a.sum(-1, keepdims=True))


def test_discard_keeps_diagonal_and_cls():
  a = np.array([[0.10, 0.20, 0.30, 0.40],
                [0.40, 0.30, 0.20, 0.10],
                [0.05, 0.25, 0.30, 0.40],
                [0.05, 0.05, 0.10, 0.80]])[None, None]  # [1, 1, 4, 4]
  # With 3 candidates per row and ratio 0.5, the single weakest one per row goes.
  kept = analysis.discard_lowest(a[:, 0], 0.5, keep_first=False)[0]
  np.testing.assert_allclose(kept, [[0.10, 0.00, 0.30, 0.40],
                                    [0.40, 0.30, 0.20, 0.00],
                                    [0.00, 0.25, 0.30, 0.40],
                                    [0.00, 0.05, 0.10, 0.80]])
  kept = analysis.discard_lowest(a[:, 0], 0.5, keep_first=True)[0]
  assert (kept[:, 0] == a[0, 0, :, 0]).all()
  assert (np.diag(kept) == np.diag(a[0, 0])).all()


def test_rollout_rejects_bad_arguments():
  att = np.full((1, 1, 3, 3), 1 / 3)
  with pytest.raises(ValueError, match='head_fusion'):
    analysis.attention_rollout([att], 'median')
  with pytest.raises(ValueError, match='discard_ratio'):
    analysis.attention_rollout([att], discard_ratio=1.0)
  with pytest.raises(ValueError, match='block 1'):
    analysis.attention_rollout([att, np.full((1, 1, 4, 4), 0.25)])


@pytest.mark.parametrize('has_cls', [False, True])
def test_rollout_maps_plain(has_cls):
  rng = np.random.default_rng(2)
  atts = [_softmax_attention(rng, 2, 2, 12 + has_cls) for _ in range(3)]
  heat, per_token = analysis.rollout_maps(atts, (3, 4), has_cls=has_cls)
  assert heat.shape == (2, 3, 4) and per_token is None
  np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0)


@pytest.mark.parametrize('has_cls', [False, True])
@pytest.mark.parametrize('fused', [False, True])
def test_rollout_maps_tokenlearner(has_cls, fused):
  rng = np.random.default_rng(3)
  b, s, h, w = 2, 3, 3, 4
  maps = rng.random((b, s, h, w))
  maps /= maps.sum(axis=(2, 3), keepdims=True)
  atts = ([_softmax_attention(rng, b, 2, h * w + has_cls) for _ in range(2)]
          + [_softmax_attention(rng, b, 2, s + has_cls) for _ in range(2)])
  heat, per_token = analysis.rollout_maps(atts, (h, w), has_cls=has_cls, token_maps=maps,
                                           learner_loc=2, fused=fused)
  assert heat.shape == (b, h, w) and per_token.shape == (b, s, h, w)
  np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0)
  np.testing.assert_allclose(per_token.sum(axis=(2, 3)), 1.0)


def test_rollout_maps_learner_first_gives_its_maps():
  rng = np.random.default_rng(4)
  maps = rng.random((1, 2, 2, 2))
  atts = [_softmax_attention(rng, 1, 2, 2)]
  heat, per_token = analysis.rollout_maps(atts, (2, 2), token_maps=maps, learner_loc=0)
  np.testing.assert_allclose(per_token, maps / maps.sum(axis=(2, 3), keepdims=True))
  # Whole model: the mean over the learned tokens of their maps, mixed by the later rollout, whose
  # rows are distributions, so the mean over rows of (rollout @ maps) = mean column-weighted maps.
  r_post = analysis.attention_rollout(atts)[0]
  expected = (r_post @ (maps[0] / maps[0].sum(axis=(1, 2), keepdims=True)).reshape(2, 4)).mean(0)
  np.testing.assert_allclose(heat[0].reshape(-1), expected)


def test_rollout_maps_checks_blocks_before_the_learner():
  att = np.full((1, 1, 3, 3), 1 / 3)
  with pytest.raises(ValueError, match='precedes the learner'):
    analysis.rollout_maps([att, att], (2, 2), token_maps=np.ones((1, 3, 2, 2)), learner_loc=1)


# ---- position embeddings and filters ----------------------------------------------------------


@pytest.mark.parametrize('has_cls', [False, True])
def test_position_embedding_similarity(has_cls):
  rng = np.random.default_rng(5)
  pe = rng.normal(size=(1, 6 + has_cls, 16))
  sim = analysis.position_embedding_similarity(pe, (2, 3), has_cls=has_cls)
  assert sim.shape == (2, 3, 2, 3)
  flat = sim.reshape(6, 6)
  np.testing.assert_allclose(np.diag(flat), 1.0)
  np.testing.assert_allclose(flat, flat.T)
  assert np.abs(flat).max() <= 1 + 1e-12
  with pytest.raises(ValueError, match='expected 6'):
    analysis.position_embedding_similarity(pe[0, :5], (2, 3))


def test_patch_embedding_pcs():
  rng = np.random.default_rng(6)
  kernel = rng.normal(size=(4, 4, 3, 64))
  pcs = analysis.patch_embedding_pcs(kernel)
  assert pcs.shape == (28, 4, 4, 3)
  flat = pcs.reshape(28, -1)
  np.testing.assert_allclose(flat @ flat.T, np.eye(28), atol=1e-10)  # Orthonormal.
  # Capped by the number of filters, and by the patch dimension.
  assert analysis.patch_embedding_pcs(kernel[..., :10]).shape == (10, 4, 4, 3)
  assert analysis.patch_embedding_pcs(rng.normal(size=(2, 2, 1, 64))).shape == (4, 2, 2, 1)


def test_patch_embedding_pcs_finds_the_dominant_direction():
  rng = np.random.default_rng(7)
  direction = rng.normal(size=12)
  direction /= np.linalg.norm(direction)
  filters = np.outer(direction, rng.normal(size=50) * 10) + rng.normal(size=(12, 50)) * 0.01
  pcs = analysis.patch_embedding_pcs(filters.reshape(2, 2, 3, 50), n=1)
  assert abs(pcs.reshape(-1) @ direction) > 0.999


# ---- figures ----------------------------------------------------------------------------------


def test_figures_are_written_and_not_blank(tmp_path):
  rng = np.random.default_rng(8)
  images = (rng.random((2, 16, 16, 1)) * 255).astype(np.uint8)
  maps = rng.random((2, 3, 4, 4))
  atts = [_softmax_attention(rng, 2, 2, 16)] + [_softmax_attention(rng, 2, 2, 3)]
  heat, per_token = analysis.rollout_maps(atts, (4, 4), token_maps=maps, learner_loc=1)
  records = [{'step': i, 'train_loss': 2 / (i + 1), 'train_accuracy': i / 10,
              'learning_rate': 1e-3 * min(1, i / 3)} for i in range(1, 10)]
  records += [{'step': 9, 'valid_loss': 0.5, 'valid_accuracy': 0.7},
              {'step': 9, 'test_loss': 0.6, 'test_accuracy': 0.65}]
  figures = {
      'token_maps': visualize.plot_token_maps(images, maps, [1, 2], [1, 0]),
      'rollout': visualize.plot_attention_rollout(images, heat, per_token, [1, 2], [1, 0],
                                                  class_names=['a', 'b', 'c']),
      'rollout_plain': visualize.plot_attention_rollout(images.repeat(3, -1), heat),
      'pos': visualize.plot_position_embedding_similarity(
          analysis.position_embedding_similarity(rng.normal(size=(16, 8)), (4, 4))),
      'pcs': visualize.plot_patch_embedding_pcs(
          analysis.patch_embedding_pcs(rng.normal(size=(4, 4, 3, 32)))),
      'curves': visualize.plot_training_curves(records),
  }
  for name, fig in figures.items():
    path = tmp_path / f'{name}.png'
    fig.savefig(path, dpi=50)
    _assert_png_not_blank(path)


# ---- on a real (tiny, untrained) model ----------------------------------------------------------


def _tiny_model(classifier='gap', **tokenizer):
  model_config = dict(hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32,
                      classifier=classifier, dropout_rate=0.0, attention_dropout_rate=0.0,
                      tokenizer=dict(patches=dict(size=[4, 4]), **tokenizer))
  model = models.build_model(model_config, num_classes=5)
  images = np.random.default_rng(0).normal(size=(2, 16, 12, 1)).astype(np.float32)  # grid 4 x 3
  return model, _random_params(model, images), images


def _random_params(model, images):
  return helpers.random_variables(model, images, scale=0.3)['params']


def test_collect_intermediates_plain():
  model, params, images = _tiny_model(type='patch', classifier='token')
  logits, atts, maps = analysis.collect_intermediates(model, params, images)
  assert logits.shape == (2, 5) and maps == []
  assert [a.shape for a in atts] == [(2, 2, 13, 13)] * 3
  np.testing.assert_allclose(atts[0].sum(-1), 1.0, atol=1e-5)
  heat, _ = analysis.rollout_maps(atts, (4, 3), has_cls=True)
  np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0)
  r = analysis.attention_rollout(atts, keep_first=True, discard_ratio=0.3)
  np.testing.assert_allclose(r.sum(-1), 1.0)


def test_collect_intermediates_tokenlearner_v11():
  model, params, images = _tiny_model(type='dynamic', num_tokens=3, tokenlearner_loc=1)
  logits, atts, maps = analysis.collect_intermediates(model, params, images)
  assert logits.shape == (2, 5)
  assert [a.shape for a in atts] == [(2, 2, 12, 12), (2, 2, 3, 3), (2, 2, 3, 3)]
  assert len(maps) == 1 and maps[0].shape == (2, 3, 4, 3)
  np.testing.assert_allclose(maps[0].sum(axis=(2, 3)), 1.0, atol=1e-5)  # Softmax over space.
  heat, per_token = analysis.rollout_maps(atts, (4, 3), token_maps=maps[0], learner_loc=1)
  np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0)
  np.testing.assert_allclose(per_token.sum(axis=(2, 3)), 1.0)


def test_collect_intermediates_v1_tokenfuser_with_cls():
  model, params, images = _tiny_model(type='dynamic', num_tokens=3, tokenlearner_loc=1,
                                      use_v11=False, use_tokenfuse=True, classifier='token')
  _, atts, maps = analysis.collect_intermediates(model, params, images)
  assert [a.shape for a in atts] == [(2, 2, 13, 13), (2, 2, 4, 4), (2, 2, 4, 4)]
  assert [m.shape for m in maps] == [(2, 3, 4, 3)] * 2  # One learner per fused block, in order.
  assert ((maps[0] > 0) & (maps[0] < 1)).all()  # V1: sigmoids.
  heat, per_token = analysis.rollout_maps(atts, (4, 3), has_cls=True, token_maps=maps[0],
                                           learner_loc=1, fused=True)
  assert heat.shape == (2, 4, 3) and per_token.shape == (2, 3, 4, 3)


# ---- end to end: a briefly trained tiny run ----------------------------------------------------


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A run directory of configs/tiny.py trained for 2 steps (offline MNIST)."""
  from vit_flax import train  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  config = helpers.tiny_config()
  config.num_training_steps = 2
  config.log_summary_steps = 1
  config.log_eval_steps = 2
  config.checkpoint_steps = 2
  workdir = tmp_path_factory.mktemp('tiny_run')
  train.train_and_evaluate(config, str(workdir))
  return workdir


def test_cli_end_to_end(tiny_run):
  """`python -m vit_flax.visualize` on a trained run writes every figure and prints the paths."""
  result = subprocess.run(
      [sys.executable, '-m', 'vit_flax.visualize', f'--workdir={tiny_run}', '--num_images=3',
       '--head_fusion=max', '--discard_ratio=0.5'],
      cwd=pathlib.Path(__file__).parents[1], capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  paths = result.stdout.split()
  assert sorted(pathlib.Path(p).name for p in paths) == [
      'attention_rollout.png', 'patch_embedding_filters.png', 'position_embedding_similarity.png',
      'token_maps.png', 'training_curves.png']
  for path in paths:
    assert pathlib.Path(path).parent == tiny_run / 'plots'
    _assert_png_not_blank(path)


def test_write_plots_other_model(tmp_path, monkeypatch):
  """Branches the tiny run does not reach: CLS token, sin-cos position embedding, V1, fuser."""
  config = helpers.tiny_config()
  config.model = ml_collections.ConfigDict(dict(
      hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, classifier='token',
      positional_embedding='sinusoidal_2d',
      tokenizer=dict(patches=dict(size=(7, 7)), type='dynamic', tokenlearner_loc=0, num_tokens=3,
                     use_v11=False, use_tokenfuse=True)))
  config = config_lib.resolve(config)
  params = _random_params(models.build_model(config.model, 10),
                          np.zeros((1, 28, 28, 1), np.float32))
  monkeypatch.setattr(checkpoints, 'load_run',
                      lambda workdir, checkpoint='last': checkpoints.Run(config, params, 0, None))
  paths = visualize.write_plots(str(tmp_path), num_images=2)
  names = {p.rsplit('/', 1)[-1] for p in paths}
  assert names == {'attention_rollout.png', 'patch_embedding_filters.png', 'token_maps.png',
                   'position_embedding_similarity.png'}  # No metrics.jsonl: no training curves.
  for path in paths:
    _assert_png_not_blank(path)


def test_a_video_run_gets_its_token_maps_frame_by_frame(tmp_path, monkeypatch):
  """A moving-digits clip model: frames x tokens figures of the learner's per-frame maps."""
  config = config_files.load_config_file(helpers.CONFIG_DIR / 'moving_fashion_mnist_tl.py')
  config.dataset_name = 'moving_mnist'  # The offline 5k MNIST sample: no Debian files needed.
  config.dataset_configs.moving_digits.update(num_train=16, num_valid=8, num_test=8)
  config.model.update(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
  config.model.tokenizer.num_tokens = 3
  config = config_lib.resolve(config)
  params = _random_params(models.build_model(config.model, 8),
                          np.zeros((1, 8, 32, 32, 1), np.float32))
  monkeypatch.setattr(checkpoints, 'load_run',
                      lambda workdir, checkpoint='last': checkpoints.Run(config, params, 0, None))
  paths = visualize.write_plots(str(tmp_path), num_images=2)
  assert sorted(p.rsplit('/', 1)[-1] for p in paths) == ['token_maps_clip0.png',
                                                         'token_maps_clip1.png']
  for path in paths:
    _assert_png_not_blank(path)
  frames = np.zeros((8, 32, 32, 1), np.uint8)
  fig = visualize.plot_frame_token_maps(frames, np.ones((4, 3, 8, 8)), frames_per_map=2)
  assert len(fig.axes) == 4 * (3 + 1) and fig.axes[4].get_title() == 'frames 2-3'
