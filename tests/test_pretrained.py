"""Transfer surgery (head, pre_logits, position embeddings, learners, channels) and its errors.

Tiny random checkpoints written on the fly (tests/pretrained_sources.py); nothing is downloaded.
"""

import builtins

from flax.traverse_util import flatten_dict
import jax
import numpy as np
import pytest
from scipy import ndimage

import helpers
import pretrained_sources as src
from pretrained_sources import CLASSES, D, GRID, IMG
from vit_flax import config as config_lib
from vit_flax import models
from vit_flax import resample
from vit_flax.checkpoint_formats import POSEMB, PretrainedError, read_safetensors
from vit_flax.pretrained import export_vit_jax, load_pretrained, read_checkpoint

POSEMB_PATH = tuple(POSEMB.split('/'))


def _vit_jax_file(tmp_path, *, cls=True, rep=None, seed=0, **shape_kw):
  """A vit_jax .npz of the tiny ViT; returns (path, its arrays)."""
  arrays = src.random_arrays(src.flax_family_shapes(
      'vit_jax', cls=cls, representation_size=rep, **shape_kw), seed)
  path = tmp_path / f'vit_jax_{seed}.npz'
  np.savez(path, **arrays)
  return path, arrays


def _init(cfg, num_classes=CLASSES, size=IMG, channels=3, seed=1):
  model = models.build_model(cfg, num_classes)
  return helpers.random_variables(model, src.images(size=size, channels=channels),
                                  seed=seed)['params']


def _load(path, cfg, fmt='vit_jax', num_classes=CLASSES, size=IMG, init='random', **kw):
  """load_pretrained with random numpy init_params (cheap: no init compile) unless given."""
  if isinstance(init, str):
    init = _init(cfg, num_classes, size, kw.get('num_channels') or 3)
  return load_pretrained(path, checkpoint_format=fmt, model_config=cfg, num_classes=num_classes,
                         image_size=size, init_params=init, **kw)


def _flat(params):
  return {'/'.join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


# ------------------------------------------------------------------------------------------------
# Position embeddings and patch kernels.


def _smooth_grid(h, w, d=D):
  y, x = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
  return np.stack([np.sin(2 * x + k) * np.cos(3 * y - k) for k in range(d)], -1)  # [h, w, D]


@pytest.mark.parametrize('interpolation', resample.INTERPOLATIONS)
def test_resize_to_the_same_grid_is_the_identity(interpolation):
  posemb = np.random.default_rng(0).standard_normal((1, 1 + 12, D)).astype(np.float32)
  out = resample.resize_posemb(posemb, (3, 4), (3, 4), source_has_cls=True, target_has_cls=True,
                               interpolation=interpolation)
  np.testing.assert_array_equal(out, posemb)


@pytest.mark.parametrize('interpolation', resample.INTERPOLATIONS)
def test_smooth_embedding_resized_up_then_down_stays_close(interpolation):
  grid = _smooth_grid(7, 5)
  up = resample.resample_grid(grid, (14, 10), interpolation)
  back = resample.resample_grid(up, (7, 5), interpolation)
  assert up.shape == (14, 10, D)
  assert np.abs(back - grid).max() < 0.05 < np.abs(grid).max()


def test_bilinear_resize_matches_scipy_zoom_order_1():
  rng = np.random.default_rng(0)
  for (h, w), (nh, nw) in [((4, 4), (7, 7)), ((3, 5), (6, 2)), ((2, 8), (4, 4)), ((5, 5), (1, 3))]:
    grid = rng.standard_normal((h, w, D)).astype(np.float32)
    want = ndimage.zoom(grid, (nh / h, nw / w, 1), order=1)
    np.testing.assert_allclose(resample.resample_grid(grid, (nh, nw)), want, atol=1e-6)


def test_bicubic_resize_matches_torch_antialiased_interpolate():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  for (h, w), (nh, nw) in [((4, 4), (7, 7)), ((7, 5), (3, 9)), ((14, 14), (24, 24)),
                           ((24, 24), (14, 14)), ((3, 3), (1, 2))]:
    grid = rng.standard_normal((h, w, D)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(nh, nw), mode='bicubic',
        antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()  # [nh, nw, D]
    np.testing.assert_allclose(resample.resample_grid(grid, (nh, nw), 'bicubic'), want,
                               atol=1e-5)


def test_cls_row_is_dropped_for_gap_kept_for_token_and_zero_when_missing():
  rng = np.random.default_rng(0)
  with_cls = rng.standard_normal((1, 1 + 6, D))
  resize = lambda p, s, t: resample.resize_posemb(p, (2, 3), (4, 6), source_has_cls=s,
                                                  target_has_cls=t)
  grid_only = resize(with_cls[:, 1:], False, False)
  assert grid_only.shape == (1, 24, D)
  np.testing.assert_allclose(resize(with_cls, True, False), grid_only)
  kept = resize(with_cls, True, True)
  np.testing.assert_array_equal(kept[:, :1], with_cls[:, :1])
  np.testing.assert_allclose(kept[:, 1:], grid_only)
  added = resize(with_cls[:, 1:], False, True)
  np.testing.assert_array_equal(added[:, 0], 0)
  np.testing.assert_allclose(added[:, 1:], grid_only)


def test_tile_and_resize_tile_repeat_the_grid_over_frames():
  posemb = np.random.default_rng(0).standard_normal((1, 1 + 4, D))
  tiled = resample.resize_posemb(posemb, (2, 2), (2, 2), source_has_cls=True,
                                 target_has_cls=False, num_frames=3, size_change='tile')
  np.testing.assert_array_equal(tiled[0], np.tile(posemb[0, 1:], (3, 1)))
  frames = resample.resize_posemb(posemb, (2, 2), (4, 4), source_has_cls=True,
                                  target_has_cls=True, num_frames=2, size_change='resize_tile')
  one = resample.resample_grid(posemb[0, 1:].reshape(2, 2, D), (4, 4)).reshape(16, D)
  np.testing.assert_allclose(frames[0, 1:17], one)
  np.testing.assert_allclose(frames[0, 17:], one)  # Frame-major: frame 1 repeats frame 0.
  with pytest.raises(PretrainedError, match="needs 'tile' or 'resize_tile'"):
    resample.resize_posemb(posemb, (2, 2), (4, 4), source_has_cls=True, target_has_cls=True,
                           num_frames=2)


def test_inflated_patch_kernels_embed_clips_as_scenic_says():
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((4, 4, 3, D))  # [ph, pw, C, D]
  frame = rng.standard_normal((4, 4, 3))
  clip = rng.standard_normal((3, 4, 4, 3))  # [pt, ph, pw, C]
  average = resample.inflate_patch_kernel(kernel, 3)
  assert average.shape == (3, 4, 4, 3, D)
  # A clip of identical frames embeds as the image did.
  np.testing.assert_allclose(np.einsum('tpqc,tpqcd->d', np.stack([frame] * 3), average),
                             np.einsum('pqc,pqcd->d', frame, kernel))
  central = resample.inflate_patch_kernel(kernel, 3, 'central_frame_initializer')
  np.testing.assert_allclose(np.einsum('tpqc,tpqcd->d', clip, central),
                             np.einsum('pqc,pqcd->d', clip[1], kernel))  # Only frame 3 // 2.
  with pytest.raises(PretrainedError, match='method must be one of'):
    resample.inflate_patch_kernel(kernel, 3, 'random')


# ------------------------------------------------------------------------------------------------
# What is restored, and what comes from the init.


def test_head_is_kept_for_the_same_classes_and_fresh_otherwise(tmp_path):
  path, arrays = _vit_jax_file(tmp_path)
  cfg = src.model_config('token')
  same = _flat(_load(path, cfg))
  np.testing.assert_array_equal(same['output_projection/kernel'], arrays['head/kernel'])
  other = _flat(_load(path, cfg, num_classes=7, init=None))  # A fresh seed-0 init: zero head.
  np.testing.assert_array_equal(other['output_projection/kernel'], np.zeros((D, 7)))
  np.testing.assert_array_equal(other['output_projection/bias'], np.zeros(7))
  np.testing.assert_array_equal(other['cls'], arrays['cls'])  # The trunk is still restored.
  init = _init(cfg)
  scenic_like = _flat(_load(path, cfg, init=init, restore_head=False))
  np.testing.assert_array_equal(scenic_like['output_projection/kernel'],
                                init['output_projection']['kernel'])


def test_pre_logits_are_dropped_for_a_target_without_them(tmp_path):
  path, arrays = _vit_jax_file(tmp_path, rep=8)
  kept = _flat(_load(path, src.model_config('token', 8)))
  np.testing.assert_array_equal(kept['pre_logits/kernel'], arrays['pre_logits/kernel'])
  dropped = _flat(_load(path, src.model_config('token')))
  assert 'pre_logits/kernel' not in dropped
  assert dropped['output_projection/kernel'].shape == (D, CLASSES)  # A fresh head of width D.


def test_restore_flags_and_keep_init_keep_the_init_values(tmp_path):
  path, arrays = _vit_jax_file(tmp_path)
  cfg = src.model_config('token')
  init = _init(cfg)
  flat_init = _flat(init)
  got = _flat(_load(path, cfg, init=init, restore_input_embedding=False,
                    restore_positional_embedding=False,
                    keep_init=['Transformer/encoderblock_1/.*']))
  for key in ('embedding/kernel', 'embedding/bias', POSEMB,
              'Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'):
    np.testing.assert_array_equal(got[key], flat_init[key])
  np.testing.assert_array_equal(
      got['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'],
      arrays['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'])


def test_tokenlearner_target_from_a_plain_vit_gets_fresh_learner_params(tmp_path):
  path, arrays = _vit_jax_file(tmp_path, cls=False)
  cfg = src.model_config('gap', tokenlearner_loc=1, num_tokens=4)
  init = _init(cfg)
  got = _flat(_load(path, cfg, init=init))
  init = _flat(init)
  learner = [k for k in got if k.startswith('Transformer/TokenLearnerModuleV11_0/')]
  assert learner
  for key in learner:
    np.testing.assert_array_equal(got[key], init[key])
  np.testing.assert_array_equal(
      got['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel'],
      arrays['Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel'])


def test_a_higher_resolution_target_gets_the_resized_embedding(tmp_path):
  path, arrays = _vit_jax_file(tmp_path)
  cfg = src.model_config('token')
  got = _load(path, cfg, size=2 * IMG)
  posemb = _flat(got)[POSEMB]  # [1, 1 + 8*8, D]
  np.testing.assert_array_equal(posemb[:, 0], arrays[POSEMB][:, 0])  # The CLS row is kept.
  grid = arrays[POSEMB][0, 1:].reshape(GRID, GRID, D)
  np.testing.assert_allclose(posemb[0, 1:].reshape(2 * GRID, 2 * GRID, D),
                             ndimage.zoom(grid, (2, 2, 1), order=1), atol=1e-6)
  logits = jax.eval_shape(models.build_model(cfg, CLASSES).apply, {'params': got},
                          src.images(size=2 * IMG))
  assert logits.shape == (1, CLASSES)


def test_a_non_square_source_grid_loads_given_source_grid_size(tmp_path):
  arrays = src.random_arrays(src.flax_family_shapes('vit_jax', cls=True))
  arrays[POSEMB] = arrays[POSEMB][:, :1 + 12]  # A 3 x 4 grid: 12 x 16 px images.
  np.savez(tmp_path / 'wide.npz', **arrays)
  cfg = src.model_config('token')
  params = _load(tmp_path / 'wide.npz', cfg, size=(12, 16), source_grid_size=(3, 4))
  images = src.images(size=(12, 16))
  np.testing.assert_allclose(models.build_model(cfg, CLASSES).apply({'params': params}, images),
                             src.flax_family_vit(arrays, images, style='vit_jax'), atol=1e-4)
  wider = _flat(_load(tmp_path / 'wide.npz', cfg, size=(24, 48), source_grid_size=(3, 4)))
  np.testing.assert_allclose(
      wider[POSEMB][0, 1:].reshape(6, 12, D),
      ndimage.zoom(arrays[POSEMB][0, 1:].reshape(3, 4, D), (2, 3, 1), order=1), atol=1e-6)


def test_a_grey_target_embeds_grey_images_as_the_source_did_their_rgb_replica(tmp_path):
  path, arrays = _vit_jax_file(tmp_path)
  params = _flat(_load(path, src.model_config('token'), num_channels=1))
  grey = src.images(channels=1)
  np.testing.assert_allclose(
      src.flax_patches(grey, params['embedding/kernel'], params['embedding/bias']),
      src.flax_patches(np.repeat(grey, 3, axis=-1), arrays['embedding/kernel'],
                       arrays['embedding/bias']), atol=1e-5)
  np.testing.assert_array_equal(params[POSEMB], arrays[POSEMB])  # The rest is as it was.


def test_a_sincos_source_gives_a_learned_target_its_table(tmp_path):
  cfg = src.model_config('token', positional_embedding='sinusoidal_2d')
  model = models.build_model(cfg, CLASSES)
  params = _init(cfg)
  src.write_flax_checkpoint(tmp_path, 1, {'params': params})
  learned = src.model_config('token')
  loaded = _load(tmp_path, learned, 'scenic',
                 source_model_config={'positional_embedding': 'sinusoidal_2d'})
  images = src.images()
  np.testing.assert_allclose(
      models.build_model(learned, CLASSES).apply({'params': loaded}, images),
      model.apply({'params': params}, images), atol=1e-5)


def test_read_checkpoint_describes_the_source_model(tmp_path):
  path, _ = _vit_jax_file(tmp_path, rep=8)
  ckpt = read_checkpoint(path, 'vit_jax')
  model = models.resolve_model(ckpt.model)
  assert (model['hidden_size'], model['num_layers'], model['num_heads'], model['mlp_dim']) == (
      D, src.LAYERS, src.HEADS, src.MLP)
  assert model['classifier'] == 'token' and model['representation_size'] == 8
  assert model['tokenizer']['patches']['size'] == (src.PATCH, src.PATCH)
  assert ckpt.grid_size == (GRID, GRID) and ckpt.num_classes == CLASSES
  models.build_model(ckpt.model, ckpt.num_classes)  # Evaluable as it is.


def test_safetensors_reader_reads_bfloat16_and_integer_tensors(tmp_path):
  values = np.array([1.5, -2.25, 3.0], np.float32)
  bf16 = (values.view(np.uint32) >> 16).astype('<u2')  # Exact in bfloat16.
  header = b'{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},' \
           b'"b":{"dtype":"I64","shape":[1,2],"data_offsets":[6,22]}}'
  (tmp_path / 'x.safetensors').write_bytes(len(header).to_bytes(8, 'little') + header +
                                          bf16.tobytes() + np.array([[7, -8]], '<i8').tobytes())
  tensors = read_safetensors(str(tmp_path / 'x.safetensors'))
  np.testing.assert_array_equal(tensors['a'], values)
  np.testing.assert_array_equal(tensors['b'], [[7, -8]])


# ------------------------------------------------------------------------------------------------
# Errors: each is one line that says what is wrong.


def _error_cases():
  """name -> (function of tmp_path that raises, exception type, a phrase of the message)."""
  def unknown_format(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token'), fmt='keras')

  def missing(tmp):
    _load(tmp / 'nothing.npz', src.model_config('token'))

  def bad_npz(tmp):
    (tmp / 'x.npz').write_bytes(b'not a zip')
    _load(tmp / 'x.npz', src.model_config('token'))

  def bad_msgpack(tmp):
    (tmp / 'checkpoint_3').write_bytes(b'\xc1\xc1 garbage')
    _load(tmp, src.model_config(), fmt='scenic')

  def no_scenic_files(tmp):
    _load(tmp, src.model_config(), fmt='scenic')

  def truncated_safetensors(tmp):
    src.write_safetensors(tmp / 'm.safetensors', src.random_arrays(src.timm_shapes()))
    data = (tmp / 'm.safetensors').read_bytes()
    (tmp / 'm.safetensors').write_bytes(data[:-40])
    _load(tmp / 'm.safetensors', src.model_config('token', approximate_gelu=False), fmt='timm')

  def bad_safetensors_header(tmp):
    (tmp / 'm.safetensors').write_bytes(b'\xff' * 16)
    _load(tmp / 'm.safetensors', src.model_config('token'), fmt='timm')

  def width(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token', hidden_size=32))

  def depth(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token', num_layers=3))

  def heads(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token', num_heads=4))

  def patch(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token', patch=8))

  def timm_registers(tmp):
    state = src.random_arrays(dict(src.timm_shapes(), reg_token=(1, 4, D)))
    src.write_safetensors(tmp / 'm.safetensors', state)
    _load(tmp / 'm.safetensors', src.model_config('token'), fmt='timm')

  def timm_class_token_with_avg_pool(tmp):
    src.write_safetensors(tmp / 'm.safetensors',
                          src.random_arrays(src.timm_shapes(cls=True, fc_norm=True)))
    _load(tmp / 'm.safetensors', src.model_config('token'), fmt='timm')

  def fc_norm_into_encoder_norm(tmp):
    src.write_safetensors(tmp / 'm.safetensors',
                          src.random_arrays(src.timm_shapes(cls=False, fc_norm=True)))
    _load(tmp / 'm.safetensors', src.model_config('gap'), fmt='timm')

  def non_square_grid(tmp):
    arrays = src.random_arrays(src.flax_family_shapes('vit_jax', cls=True))
    arrays[POSEMB] = arrays[POSEMB][:, :13]  # 1 + 12 rows: a 3 x 4 grid, say.
    np.savez(tmp / 'x.npz', **arrays)
    _load(tmp / 'x.npz', src.model_config('token'))

  def no_learned_posemb(tmp):
    arrays = src.random_arrays(src.flax_family_shapes('vit_jax', cls=True))
    del arrays[POSEMB]
    np.savez(tmp / 'x.npz', **arrays)
    _load(tmp / 'x.npz', src.model_config('token'))

  def not_a_vit(tmp):
    np.savez(tmp / 'x.npz', **{'conv1/kernel': np.zeros((3, 3, 3, 8))})
    _load(tmp / 'x.npz', src.model_config('token'))

  def hybrid(tmp):
    arrays = src.random_arrays(src.flax_family_shapes('vit_jax', cls=True))
    np.savez(tmp / 'x.npz', **arrays, **{'conv_root/kernel': np.zeros((7, 7, 3, 8))})
    _load(tmp / 'x.npz', src.model_config('token'))

  def bad_size_change(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token'), positional_embed_size_change='zoom')

  def bad_interpolation(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token'), posemb_interpolation='nearest')

  def wrong_init_params(tmp):
    _load(_vit_jax_file(tmp)[0], src.model_config('token'),
          init=_init(src.model_config('token', mlp_dim=64)))

  def export_tokenlearner(tmp):
    cfg = src.model_config(tokenlearner_loc=1)
    export_vit_jax(_init(cfg), cfg, tmp / 'x.npz')

  def not_a_run(tmp):
    _load(tmp, src.model_config(), fmt='vit_flax')

  return {name: fn for name, fn in locals().items() if callable(fn)}


ERRORS = {  # name: (exception type, a phrase the message has)
    'unknown_format': (PretrainedError, "Unknown checkpoint_format 'keras'"),
    'missing': (FileNotFoundError, 'nothing.npz not found'),
    'bad_npz': (PretrainedError, 'is not an .npz (zip) archive'),
    'bad_msgpack': (PretrainedError, 'is not a flax msgpack checkpoint'),
    'no_scenic_files': (PretrainedError, 'no checkpoint_<step> file'),
    'truncated_safetensors': (PretrainedError, 'a truncated file?'),
    'bad_safetensors_header': (PretrainedError, 'is not a safetensors file'),
    'width': (PretrainedError, 'source hidden_size=16, target 32'),
    'depth': (PretrainedError, 'Transformer/encoderblock_2/LayerNorm_0/scale (16,) is missing'),
    'heads': (PretrainedError, 'query/kernel: source (16, 2, 8), target (16, 4, 4)'),
    'patch': (PretrainedError, 'embedding/kernel: source (4, 4, 3, 16), target (8, 8, 3, 16)'),
    'timm_registers': (PretrainedError, 'no counterpart for (register tokens'),
    'timm_class_token_with_avg_pool': (PretrainedError, 'cannot compute'),
    'fc_norm_into_encoder_norm': (PretrainedError, 'source pooled_norm=True, target False'),
    'non_square_grid': (PretrainedError, 'pass source_grid_size=(h, w)'),
    'no_learned_posemb': (PretrainedError, 'the source has no learned position embedding'),
    'not_a_vit': (PretrainedError, 'is it a ViT checkpoint?'),
    'hybrid': (PretrainedError, 'no counterpart for: conv_root/kernel (7, 7, 3, 8)'),
    'bad_size_change': (PretrainedError, 'positional_embed_size_change must be one of'),
    'bad_interpolation': (PretrainedError, 'posemb_interpolation must be one of'),
    'wrong_init_params': (PretrainedError, 'init_params do not fit'),
    'export_tokenlearner': (PretrainedError, 'cannot hold this model: a TokenLearner'),
    'not_a_run': (PretrainedError, 'neither a vit_flax run directory'),
}


@pytest.mark.parametrize('name', list(ERRORS))
def test_each_error_is_one_line(tmp_path, name):
  error, phrase = ERRORS[name]
  with pytest.raises(error) as info:
    _error_cases()[name](tmp_path)
  message = str(info.value)
  assert phrase in message and '\n' not in message, message


def test_a_torch_file_without_torch_is_a_one_line_import_error(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == 'torch' or name.startswith('torch.'):
      raise ImportError('No module named torch')
    return real_import(name, *args, **kwargs)

  (tmp_path / 'model.pth').write_bytes(b'whatever')
  monkeypatch.setattr(builtins, '__import__', no_torch)
  with pytest.raises(ImportError, match=r'needs PyTorch \(pip install torch\)') as info:
    _load(tmp_path / 'model.pth', src.model_config('token'), fmt='timm')
  assert '\n' not in str(info.value)
