"""Video: ViViT tubelets and frame sampling, the learner per frame, image -> video init, the task."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict, unflatten_dict

import helpers
from vit_flax import config as config_lib
from vit_flax import config_files
from vit_flax import models
from vit_flax import moving_digits
from vit_flax import pretrained
from vit_flax import resample
from vit_flax import video
from vit_flax import vit

random_variables = functools.partial(helpers.random_variables, scale=0.3)
B, T, IMG, PATCH, FT, D, S = 2, 4, 16, 4, 2, 16, 3


def _model_config(method='3d_conv', tokenlearner_loc=1, **extra):
  """A scenic-schema video config.model: clips [B, 4, 16, 16, 1], tubelets 4 x 4 x 2."""
  size = [PATCH, PATCH, FT] if method == '3d_conv' else [PATCH, PATCH]
  encoding = {'method': method, 'n_sampled_frames': 2 if method == 'temporal_sampling' else None}
  return ml_collections.ConfigDict({
      'hidden_size': D, 'num_layers': 2, 'num_heads': 2, 'mlp_dim': 32, 'dropout_rate': 0.0,
      'attention_dropout_rate': 0.0, **extra,
      'tokenizer': {'type': 'video', 'patches': {'size': size}, 'num_tokens': S,
                    'tokenlearner_loc': tokenlearner_loc, 'temporal_encoding_config': encoding}})


def _clips(seed=0, frames=T):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, frames, IMG, IMG, 1)),
                     jnp.float32)


class TokenizerTest(parameterized.TestCase):

  def test_tubelet_embedding_is_scenics_3d_conv(self):
    """The patch embedding of a clip equals nn.Conv's 3-D convolution with kernel = stride."""
    layer = video.PatchEmbedding(D, (FT, PATCH, PATCH))
    x = _clips()
    variables = random_variables(layer, x)
    ours = layer.apply(variables, x)  # [B, t, h, w, D]
    kernel, bias = variables['params']['kernel'], variables['params']['bias']
    conv = jax.lax.conv_general_dilated(x, kernel, (FT, PATCH, PATCH), 'VALID',
                                        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC')) + bias
    assert ours.shape == (B, T // FT, IMG // PATCH, IMG // PATCH, D)
    np.testing.assert_allclose(ours, conv, rtol=1e-5, atol=1e-5)

  def test_kernel_initializers(self):
    shape = (3, 2, 2, 1, 4)  # [ft, fh, fw, C, D]
    central = np.asarray(video.central_frame_initializer()(jax.random.key(0), shape))
    assert np.abs(central[1]).sum() > 0 and not central[0].any() and not central[2].any()
    average = np.asarray(video.average_frame_initializer()(jax.random.key(0), shape))
    np.testing.assert_array_equal(average[0], average[1])
    np.testing.assert_array_equal(average[0], average[2])

  def test_uniform_frame_sampling_is_scenics(self):
    # Start and spacing T / (n + 1) = 3.2: frames 3.2, 6.4, 9.6, 12.8, rounded.
    np.testing.assert_array_equal(video.sampled_frame_indices(16, 4), [3, 6, 10, 13])
    np.testing.assert_array_equal(video.sampled_frame_indices(4, 8), [0, 1, 2, 3])


class VideoViTTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('tubelets_learner', '3d_conv', 1, {}, T // FT * S),
      ('tubelets_no_learner', '3d_conv', None, {}, T // FT * 16),
      ('tubelets_fuser', '3d_conv', 0, {'use_tokenfuse': True}, T // FT * S),  # Blocks see S.
      ('sampled_frames_learner', 'temporal_sampling', 1, {}, 2 * S))
  def test_shapes_and_per_frame_token_maps(self, method, loc, tokenizer, tokens):
    cfg = _model_config(method, loc)
    cfg.tokenizer.update(tokenizer)
    model = models.build_model(cfg, 8)
    x = _clips()
    variables = random_variables(model, x)
    apply = self.variant(lambda v, x: model.apply(v, x, mutable=['intermediates']))
    logits, state = apply(variables, x)
    chex.assert_shape(logits, (B, 8))
    flat = flatten_dict(state['intermediates'], sep='/')
    attention = flat[f'Transformer/encoderblock_1/MultiHeadDotProductAttention_0/'
                     'attention_weights'][0]
    assert attention.shape[-1] == tokens
    maps = [v[0] for k, v in flat.items() if k.endswith('token_maps')]
    frames = T // FT if method == '3d_conv' else 2
    assert all(m.shape == (B * frames, S, IMG // PATCH, IMG // PATCH) for m in maps)
    assert bool(maps) == (loc is not None)
    kernel = variables['params']['embedding']['kernel']
    assert kernel.shape == ((FT, PATCH, PATCH, 1, D) if method == '3d_conv' else
                            (PATCH, PATCH, 1, D))

  def test_static_clip_gives_each_frame_the_image_learners_tokens(self):
    """T copies of one frame, the image model's parameters inflated ('average') and its position
    embedding tiled: every frame's learned token maps, and the logits, are the image model's."""
    image_cfg = _model_config()
    image_cfg.tokenizer = {'type': 'dynamic', 'patches': {'size': [PATCH, PATCH]},
                           'num_tokens': S, 'tokenlearner_loc': 1}
    image_model, video_model = models.build_model(image_cfg, 8), models.build_model(
        _model_config(), 8)
    frame = _clips()[:, 0]  # [B, H, W, 1]
    image_vars = random_variables(image_model, frame)
    flat = flatten_dict(image_vars['params'], sep='/')
    flat['embedding/kernel'] = resample.inflate_patch_kernel(
        np.asarray(flat['embedding/kernel']), FT, 'average_frame_initializer')
    posemb = 'Transformer/posembed_input/pos_embedding'
    flat[posemb] = np.tile(flat[posemb], (1, T // FT, 1))  # [1, t*h*w, D]
    video_vars = {'params': unflatten_dict(flat, sep='/')}
    clip = jnp.repeat(frame[:, None], T, axis=1)  # [B, T, H, W, 1]
    run = lambda m, v, x: m.apply(v, x, mutable=['intermediates'])
    image_logits, image_state = run(image_model, image_vars, frame)
    video_logits, video_state = run(video_model, video_vars, clip)
    maps = lambda s: s['intermediates']['Transformer']['TokenLearnerModuleV11_0']['token_maps'][0]
    per_frame = np.asarray(maps(video_state)).reshape(B, T // FT, S, 4, 4)
    for f in range(T // FT):
      np.testing.assert_allclose(per_frame[:, f], maps(image_state), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(video_logits, image_logits, rtol=1e-4, atol=1e-5)

  def test_concat_final_head_sees_every_final_token(self):
    model = models.build_model(_model_config(use_concat_final=True), 8)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), _clips()))['params']
    assert params['output_projection']['kernel'].shape == (T // FT * S * D, 8)

  def test_bad_clips_and_configs_are_one_line_errors(self):
    model = models.build_model(_model_config(), 8)
    with pytest.raises(ValueError, match='clips of 5 frames do not divide into tubelets of 2'):
      vit.check_vit(model, (5, IMG, IMG, 1))
    with pytest.raises(ValueError, match=r'ViT expects clips \[B, T, H, W, C\]'):
      jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, IMG, IMG, 1))))
    cases = [({'tokenizer.temporal_encoding_config': None}, 'temporal_encoding_config is needed'),
             ({'tokenizer.temporal_encoding_config.method': 'rnn'}, 'method must be one of'),
             ({'tokenizer.patches.size': [4, 4]}, 'must have 3 entries for .3d_conv.'),
             ({'positional_embedding': 'sinusoidal_2d'}, 'sinusoidal_2d position embeddings')]
    for changes, message in cases:
      cfg = _model_config()
      for key, value in changes.items():
        node, *path = cfg, *key.split('.')
        for part in path[:-1]:
          node = node[part]
        node[path[-1]] = value
      with pytest.raises(ValueError, match=message) as info:
        models.check_model(cfg, 8, (T, IMG, IMG, 1))
      assert '\n' not in str(info.value)


def test_an_image_checkpoint_initialises_a_video_model(tmp_path):
  """scenic's init_from for video: the 2-D patch kernel inflated, the position embedding tiled."""
  image_cfg = _model_config()
  image_cfg.tokenizer = {'type': 'patch', 'patches': {'size': [PATCH, PATCH]}}
  image_model = models.build_model(image_cfg, 8)
  image_params = random_variables(image_model, _clips()[:, 0])['params']
  path = tmp_path / 'image.npz'
  pretrained.export_vit_jax(image_params, image_cfg, path)
  for method in ('average_frame_initializer', 'central_frame_initializer'):
    video_cfg = _model_config(tokenlearner_loc=None)
    video_cfg.tokenizer.temporal_encoding_config.kernel_init_method = method
    params = pretrained.load_pretrained(
        str(path), checkpoint_format='vit_jax', model_config=video_cfg, num_classes=8,
        image_size=IMG, num_frames=T, positional_embed_size_change='tile', restore_head=True)
    kernel = np.asarray(params['embedding']['kernel'])
    np.testing.assert_allclose(kernel, resample.inflate_patch_kernel(
        np.asarray(image_params['embedding']['kernel']), FT, method), rtol=1e-6)
    posemb = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
    source = np.asarray(image_params['Transformer']['posembed_input']['pos_embedding'])
    np.testing.assert_allclose(posemb, np.tile(source, (1, T // FT, 1)), rtol=1e-6)
    if method == 'average_frame_initializer':  # A static clip then gives the image's logits.
      frame = _clips()[:, 0]
      clip = jnp.repeat(frame[:, None], T, axis=1)
      np.testing.assert_allclose(
          models.build_model(video_cfg, 8).apply({'params': params}, clip),
          image_model.apply({'params': image_params}, frame), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The moving-digits task.


def _options(**changes):
  return {**moving_digits.DEFAULTS, 'num_train': 64, 'num_valid': 16, 'num_test': 32, **changes}


def test_clips_move_in_their_labelled_direction_and_are_reproducible():
  digits = np.zeros((3, 16, 16), np.uint8)
  digits[:, 6:10, 6:10] = 255  # A square: its centroid is the digit's position.
  options = _options()
  clips, labels = moving_digits.make_clips(digits, 400, np.random.default_rng(1), options)
  again, _ = moving_digits.make_clips(digits, 400, np.random.default_rng(1), options)
  np.testing.assert_array_equal(clips, again)
  assert clips.shape == (400, 8, 32, 32, 1) and clips.dtype == np.uint8
  assert set(np.unique(labels)) == set(range(8))
  mass = clips[..., 0].astype(float)
  ys, xs = np.mgrid[:32, :32]
  cy = (mass * ys).sum((2, 3)) / mass.sum((2, 3))  # [n, T]
  cx = (mass * xs).sum((2, 3)) / mass.sum((2, 3))
  assert (mass.sum((2, 3)) == 16 * 255).all()  # The digit never leaves the canvas.
  angle = np.degrees(np.arctan2(-(cy[:, -1] - cy[:, 0]), cx[:, -1] - cx[:, 0])) % 360
  np.testing.assert_array_equal(np.round(angle / 45).astype(int) % 8, labels)
  travel = np.hypot(cy[:, -1] - cy[:, 0], cx[:, -1] - cx[:, 0])  # At least min_speed * (T - 1),
  assert (travel >= 7 * options['min_speed'] - 1.0).all()  # less the rounding to whole pixels.


def test_moving_digits_dataset_and_config_checks():
  config = config_files.load_config_file(helpers.CONFIG_DIR / 'moving_fashion_mnist_tl.py')
  resolved = config_lib.resolve(config, num_devices=2)
  assert resolved.dataset_configs.moving_digits.num_frames == 8
  bad = [({'dataset_configs.crop_padding': 2}, 'crop_padding is for images'),
         ({'dataset_configs.random_erasing': 0.25}, 'random_erasing is for images'),
         ({'mixup_alpha': 0.2}, 'mixup_alpha is for images'),
         ({'dataset_configs.moving_digits.max_speed': 3.0}, 'leaves a 32 px canvas'),
         ({'dataset_configs.moving_digits.num_frames': 7}, 'clips of 7 frames do not divide')]
  for changes, message in bad:
    config = config_files.load_config_file(helpers.CONFIG_DIR / 'moving_fashion_mnist_tl.py')
    with config.unlocked():
      for key, value in changes.items():
        node, *path = config, *key.split('.')
        for part in path[:-1]:
          node = node[part]
        node[path[-1]] = value
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.resolve(config, num_devices=2)


if __name__ == '__main__':
  absltest.main()
