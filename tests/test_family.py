"""Tests for the DeiT, CaiT, MLP-Mixer, XCiT and Swin modules on Fashion-MNIST-sized inputs.

Shapes (jitted and not), then one invariant per idea: LayerScale scales its branch, class
attention updates only the class token, Swin's shifted windows equal a dense attention with an
explicit mask, XCiT's map is head_dim x head_dim, DeiT's two heads, TokenLearner's token counts,
and the one-line errors. Token counts and errors use `jax.eval_shape`, so they compile nothing.
"""

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax.traverse_util import flatten_dict, unflatten_dict

from vit_flax import cait, layers, models, swin, xcit
import helpers

B, IMG, CLASSES, D, HEADS = 2, 28, 10, 16, 2
GRID = IMG // 4  # 7 x 7 patches of 4 for every family but Swin (patch 2: 14 x 14).
FAMILIES = ('deit', 'cait', 'mixer', 'xcit', 'swin')
# config.model fields (flat schema) of small models for 28 x 28 x 1 inputs; one block per stage
# keeps the compiles short (the TokenLearner tests add a layer).
TINY = {
    'deit': dict(hidden_size=D, num_layers=1, num_heads=HEADS, patch_size=(4, 4)),
    'cait': dict(hidden_size=D, num_layers=1, num_class_layers=1, num_heads=HEADS,
                 patch_size=(4, 4)),
    'mixer': dict(hidden_size=D, num_layers=1, patch_size=(4, 4)),
    'xcit': dict(hidden_size=D, num_layers=1, num_class_layers=1, num_heads=HEADS, patch_size=4),
    # 14 x 14 grid, window 7: stage 0 has 2 x 2 windows (shifted in block 1), stage 1 one window.
    'swin': dict(hidden_size=8, depths=(2, 1), num_heads=(1, 2), window_size=7,
                 patch_size=(2, 2)),
}
# Block i of L drops with rate i / (L - 1) * stochastic_depth: one block would never drop.
LINEAR_DEPTH = {'deit': dict(num_layers=2), 'mixer': dict(num_layers=2)}


def _model(name, **overrides):
  return models.MODELS[name](num_classes=CLASSES, **{**TINY[name], **overrides})


def _images(size=IMG, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((B, size, size, channels)), jnp.float32)


def _variables(module, *args, **kwargs):
  """Random variables in init's tree; BatchNorm variances positive."""
  v = helpers.random_variables(module, *args, scale=0.3, **kwargs)
  if 'batch_stats' in v:
    v = {**v, 'batch_stats': jax.tree.map(lambda a: jnp.abs(a) + 0.5, v['batch_stats'])}
  return v


def _exact_gelu(x):
  """numpy erf GELU (timm's, the families' default)."""
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def _sown(model, images, **kwargs):
  """Shapes of the sown intermediates (nothing compiled), as a flat {'a/b/c': shape} dict."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  _, state = jax.eval_shape(
      lambda v: model.apply(v, images, mutable=['intermediates'], **kwargs), variables)
  return {k: v[0].shape for k, v in flatten_dict(state['intermediates'], sep='/').items()}


class ShapeTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*FAMILIES)
  def test_training_logits_on_28x28x1(self, name):
    """Logits [B, classes]; dropout rates are 0, so only stochastic depth (from the 'dropout'
    rng) can make two training passes differ; BatchNorm (XCiT) updates its statistics."""
    model = _model(name, stochastic_depth=0.5, **LINEAR_DEPTH.get(name, {}))
    images = _images()
    variables = _variables(model, images)
    self.assertEqual({a.dtype for a in jax.tree.leaves(variables)}, {jnp.dtype(jnp.float32)})
    apply = self.variant(lambda v, x, key: model.apply(
        v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats']))
    (logits, state), (other, _) = (apply(variables, images, jax.random.key(k)) for k in (1, 2))
    chex.assert_shape(logits, (B, CLASSES))
    chex.assert_tree_all_finite(logits)
    self.assertFalse(np.allclose(logits, other, atol=1e-5))
    if name == 'xcit':
      self.assertFalse(np.allclose(state['batch_stats']['embedding']['BatchNorm_0']['mean'],
                                   variables['batch_stats']['embedding']['BatchNorm_0']['mean']))
    else:
      self.assertEqual(state, {})

  @parameterized.parameters(*FAMILIES)
  def test_bfloat16_compute_float32_params(self, name):
    model = _model(name, dtype=jnp.bfloat16)
    images = _images()
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    self.assertEqual({a.dtype for a in jax.tree.leaves(variables)}, {jnp.dtype(jnp.float32)})
    logits = jax.eval_shape(lambda v: model.apply(v, images), variables)
    self.assertEqual(logits.dtype, jnp.bfloat16)


def _set(params, paths, value):
  """A copy of `params` with the leaves under each '/'-joined path prefix set to `value`."""
  flat = flatten_dict(flax.core.unfreeze(params), sep='/')
  flat = {k: jnp.full_like(v, value) if any(k.startswith(p) for p in paths) else v
          for k, v in flat.items()}
  return unflatten_dict(flat, sep='/')


class LayerScaleTest(parameterized.TestCase):
  """At init each LayerScale holds its init value c, and scales its residual branch by c."""

  INIT = 0.1

  def _check(self, module, x, branches, **kwargs):
    """branches: {LayerScale name: param paths whose zeroing silences that branch}."""
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x, **kwargs))(x)
    for name in branches:
      np.testing.assert_array_equal(variables['params'][name]['scale'], np.float32(self.INIT))
    variables = _variables(module, x, **kwargs)
    apply = jax.jit(lambda p, x: module.apply({**variables, 'params': p}, x, **kwargs))
    for name in branches:
      silenced = [p for other, paths in branches.items() if other != name for p in paths]
      params = _set(variables['params'], silenced, 0.0)
      scaled = apply(_set(params, list(branches), self.INIT), x) - x
      unscaled = apply(_set(params, list(branches), 1.0), x) - x
      self.assertGreater(float(jnp.abs(unscaled).max()), 1e-3)  # The branch is alive.
      np.testing.assert_allclose(scaled, self.INIT * unscaled, atol=1e-5, err_msg=name)

  def test_encoder_block(self):  # CaiT's self-attention block (with talking heads).
    block = layers.Encoder1DBlock(32, HEADS, layerscale_init=self.INIT, talking_heads=True)
    self._check(block, _images().reshape(B, -1, D)[:, :10], {
        'LayerScale_0': ['MultiHeadDotProductAttention_0/out'],
        'LayerScale_1': ['MlpBlock_0/Dense_1']})

  def test_xcit_block(self):
    block = xcit.XCABlock(32, HEADS, layerscale_init=self.INIT)
    self._check(block, _images().reshape(B, 49, D), {
        'LayerScale_0': ['XCA_0/out'], 'LayerScale_1': ['LPI_0/Conv_1'],
        'LayerScale_2': ['MlpBlock_0/Dense_1']}, grid_hw=(7, 7))

  def test_cait_class_attention_block(self):
    block = cait.ClassAttentionBlock(32, HEADS, layerscale_init=self.INIT)
    self._check(block, _images().reshape(B, 49, D), {
        'LayerScale_0': ['MultiHeadDotProductAttention_0/out'],
        'LayerScale_1': ['MlpBlock_0/Dense_1']})

  def test_no_layerscale_keeps_scenic_tree(self):
    x = jnp.zeros((B, 5, D))
    tree = jax.eval_shape(lambda: layers.Encoder1DBlock(32, HEADS).init(jax.random.key(0), x))
    self.assertEqual(set(tree['params']), {'LayerNorm_0', 'MultiHeadDotProductAttention_0',
                                           'LayerNorm_1', 'MlpBlock_0'})


class ClassAttentionTest(absltest.TestCase):

  def test_only_the_class_token_changes(self):
    block = cait.ClassAttentionBlock(32, HEADS, layerscale_init=1.0)
    x = _images().reshape(B, 49, D)
    variables = _variables(block, x)
    out, state = jax.jit(lambda x: block.apply(variables, x, mutable=['intermediates']))(x)
    np.testing.assert_array_equal(out[:, 1:], x[:, 1:])
    self.assertGreater(float(jnp.abs(out[:, 0] - x[:, 0]).min()), 0.0)
    (weights,) = state['intermediates']['MultiHeadDotProductAttention_0']['attention_weights']
    chex.assert_shape(weights, (B, HEADS, 1, 49))  # One query (the class token) over all keys.
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)


class SwinWindowTest(parameterized.TestCase):
  """A Swin block equals a dense block over all h*w tokens whose mask is built here from the
  geometry: token pairs attend iff they share a window translated by the shift and cut at the
  image border (no wrap-around), with the relative-position bias of their offset."""

  @parameterized.named_parameters(('windows', (0, 0)), ('shifted', (2, 2)))
  def test_equals_masked_dense_attention(self, shift):
    grid, window, c = 8, 4, 8
    block = swin.SwinBlock(HEADS, (window, window), shift)
    x = _images(grid, c)
    variables = _variables(block, x)
    out = jax.jit(block.apply)(variables, x)
    p = jax.tree.map(np.asarray, variables['params'])
    row, col = np.divmod(np.arange(grid * grid), grid)  # [n] each
    same = np.ones((grid * grid,) * 2, bool)
    for pos, s in ((row, shift[0]), (col, shift[1])):
      group = (pos - s) // window  # Tokens before the shift's first border form group -1.
      same &= group[:, None] == group[None, :]
    dr, dc = row[:, None] - row[None, :], col[:, None] - col[None, :]
    index = np.where(same, (dr + window - 1) * (2 * window - 1) + dc + window - 1, 0)
    bias = p['relative_position_bias_table'][index].transpose(2, 0, 1)  # [heads, n, n]
    xn = np.asarray(x, np.float64)
    def dense_block(bias):  # numpy: pre-LN attention over all n tokens, then the MLP.
      a = helpers.layer_norm(xn, p['LayerNorm_0'], eps=1e-5).reshape(B, grid * grid, c)
      att = p['MultiHeadDotProductAttention_0']
      q, k, v = (np.einsum('bnd,dhk->bnhk', a, att[n]['kernel']) + att[n]['bias']
                 for n in ('query', 'key', 'value'))
      logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(c // HEADS) + bias
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      o = np.einsum('bhqk,bkhd->bqhd', w, v)
      y = xn + (np.einsum('bqhd,hdo->bqo', o, att['out']['kernel']) +
                att['out']['bias']).reshape(xn.shape)
      mlp = p['MlpBlock_0']
      h = helpers.layer_norm(y, p['LayerNorm_1'], eps=1e-5) @ mlp['Dense_0']['kernel']
      h = _exact_gelu(h + mlp['Dense_0']['bias'])
      return y + h @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
    np.testing.assert_allclose(out, dense_block(np.where(same, bias, -np.inf)), atol=2e-5)
    # Without the mask the dense block is different: the windows and the mask do the work.
    self.assertFalse(np.allclose(out, dense_block(bias), atol=1e-3))

  def test_stage_geometry_clips_windows_to_small_grids(self):
    # 28 x 28 images, patch 2, window 7: 14 -> 7 -> 4 (odd grids pad when merged) -> 2.
    self.assertEqual(swin.stage_geometry((14, 14), 7, 4), [
        ((14, 14), (7, 7), (3, 3)), ((7, 7), (7, 7), (0, 0)), ((4, 4), (4, 4), (0, 0)),
        ((2, 2), (2, 2), (0, 0))])
    model = _model('swin', depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), _images()))['params']
    self.assertEqual(tree['stage_2_block_1']['relative_position_bias_table'].shape, (7 * 7, 2))
    self.assertEqual(tree['merging_3']['reduction']['kernel'].shape, (4 * 32, 64))


class XCiTAttentionTest(absltest.TestCase):

  def test_map_is_head_dim_square_for_any_token_count(self):
    xca = xcit.XCA(HEADS)
    x = _images().reshape(B, 49, D)
    variables = _variables(xca, x)
    out, state = jax.jit(lambda x: xca.apply(variables, x, mutable=['intermediates']))(x)
    chex.assert_shape(out, (B, 49, D))
    (weights,) = state['intermediates']['attention_weights']
    chex.assert_shape(weights, (B, HEADS, D // HEADS, D // HEADS))
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    for size in (16, 32):  # In the model: 16 or 64 tokens, the same 8 x 8 maps.
      sown = _sown(_model('xcit'), _images(size))
      self.assertEqual(sown['encoderblock_0/XCA_0/attention_weights'],
                       (B, HEADS, D // HEADS, D // HEADS))

  def test_stem_depth_follows_log2_patch(self):
    for patch, convs in ((2, 1), (4, 2), (8, 3), (16, 4)):
      model = _model('xcit', patch_size=patch)
      tree = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), _images(32)))
      stem = tree['params']['embedding']
      self.assertEqual(sorted(k for k in stem if k.startswith('Conv')),
                       [f'Conv_{i}' for i in range(convs)])
      self.assertEqual(stem[f'Conv_{convs - 1}']['kernel'].shape[-1], D)
      self.assertIn('BatchNorm_0', tree['batch_stats']['embedding'])


class DeiTTest(absltest.TestCase):

  def test_two_heads_and_their_mean(self):
    model = _model('deit')
    images = _images()
    apply = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_heads=True)))
    init = jax.jit(model.init)(jax.random.key(0), images)
    mean, _ = apply(init, images)
    np.testing.assert_array_equal(mean, 0.0)  # Both heads start at zero.
    mean, (cls_logits, dist_logits) = apply(_variables(model, images), images)
    chex.assert_shape([mean, cls_logits, dist_logits], (B, CLASSES))
    self.assertFalse(np.allclose(cls_logits, dist_logits, atol=1e-3))
    np.testing.assert_allclose(mean, (cls_logits + dist_logits) / 2, atol=1e-6)


class TokenLearnerTest(parameterized.TestCase):
  """Blocks from `tokenlearner_loc` on see S learned tokens (plus the prefix tokens)."""

  S = 4

  def _model(self, name, **overrides):  # Two layers, the learner before the second.
    return _model(name, num_layers=2, tokenlearner_loc=1, num_tokens=self.S, **overrides)

  @parameterized.named_parameters(('v11', True), ('v1', False))
  def test_deit(self, use_v11):
    sown = _sown(self._model('deit', use_v11=use_v11), _images())
    attn = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/attention_weights'
    self.assertEqual(sown[attn.format(0)], (B, HEADS, 2 + GRID**2, 2 + GRID**2))
    self.assertEqual(sown[attn.format(1)], (B, HEADS, 2 + self.S, 2 + self.S))
    learner = 'TokenLearnerModuleV11_0' if use_v11 else 'TokenLearnerModule_0'
    self.assertEqual(sown[f'Transformer/{learner}/token_maps'], (B, self.S, GRID, GRID))

  def test_deit_tokenfuse_restores_the_grid(self):
    model = self._model('deit', use_tokenfuse=True)
    sown = _sown(model, _images())
    self.assertEqual(
        sown['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/attention_weights'],
        (B, HEADS, 2 + self.S, 2 + self.S))
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), _images()))['params']
    self.assertIn('TokenFuser_0', tree['Transformer'])

  def test_cait(self):
    sown = _sown(self._model('cait'), _images())
    attn = 'Transformer/encoderblock_{}/MultiHeadDotProductAttention_0/attention_weights'
    self.assertEqual(sown[attn.format(0)], (B, HEADS, GRID**2, GRID**2))
    self.assertEqual(sown[attn.format(1)], (B, HEADS, self.S, self.S))
    self.assertEqual(sown['classblock_0/MultiHeadDotProductAttention_0/attention_weights'],
                     (B, HEADS, 1, 1 + self.S))

  def test_xcit_skips_lpi_after_the_learner(self):
    model = self._model('xcit')
    sown = _sown(model, _images())
    self.assertEqual(sown['TokenLearnerModuleV11_0/token_maps'], (B, self.S, GRID, GRID))
    self.assertEqual(sown['classblock_0/MultiHeadDotProductAttention_0/attention_weights'],
                     (B, HEADS, 1, 1 + self.S))
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), _images()))['params']
    self.assertIn('LPI_0', tree['encoderblock_0'])
    self.assertNotIn('LPI_0', tree['encoderblock_1'])


class ErrorTest(parameterized.TestCase):

  def _init(self, model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))

  @parameterized.parameters(*FAMILIES)
  def test_image_not_divisible_by_patch(self, name):
    with self.assertRaisesRegex(ValueError, r'^Invalid .*not divisible by the patch size'):
      self._init(_model(name), (B, IMG + 1, IMG, 1))
    with self.assertRaisesRegex(ValueError, 'NHWC'):
      self._init(_model(name), (B, IMG, IMG))

  @parameterized.parameters('deit', 'cait', 'xcit')
  def test_tokenlearner_loc_out_of_range(self, name):
    with self.assertRaisesRegex(ValueError, 'tokenlearner_loc must be in'):
      self._init(_model(name, tokenlearner_loc=1), (B, IMG, IMG, 1))

  @parameterized.named_parameters(
      ('window', 'swin', dict(window_size=4), r'stage 0 grid \(14, 14\) is not divisible by '
       r'the window \(4, 4\)'),
      ('stages', 'swin', dict(num_heads=(1, 2, 4)), 'the same length'),
      ('swin_heads', 'swin', dict(num_heads=(3, 2)), 'not divisible by 3 heads'),
      ('xcit_patch', 'xcit', dict(patch_size=7), 'power of 2'),
      ('deit_heads', 'deit', dict(num_heads=3), 'not divisible by num_heads'),
      ('cait_class_layers', 'cait', dict(num_class_layers=0), 'num_class_layers'),
      ('rate', 'mixer', dict(stochastic_depth=1.0), r'stochastic_depth must be in \[0, 1\)'),
  )
  def test_bad_sizes(self, name, overrides, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      self._init(_model(name, **overrides), (B, IMG, IMG, 1))


if __name__ == '__main__':
  absltest.main()
