"""Tests for the ViT / TokenLearner model: scenic's parameter counts and tree, token flow, errors.

XLA compiles dominate the run time on a small CPU: parameter counts and trees come from
`jax.eval_shape`, forward tests use random parameters built in numpy, and one test runs the real
initialisers of a 1-layer model.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest, parameterized

import vit_flax
from vit_flax import vit
import helpers
from helpers import param_shapes

# Smaller random weights than the layer tests: deeper stacks stay in a useful range.
random_variables = functools.partial(helpers.random_variables, scale=0.3)

B, IMG, PATCH, D, LAYERS, HEADS, S, LOC = 2, 16, 4, 16, 3, 2, 4, 1
N = (IMG // PATCH)**2  # 16 patch tokens.


def _config(variant=None, tokenizer_type='patch', **overrides):
  """A scenic-schema config.model; `tok_*` overrides go to config.model.tokenizer."""
  cfg = ml_collections.ConfigDict({
      'classifier': 'gap', 'representation_size': None, 'dropout_rate': 0.0,
      'attention_dropout_rate': 0.0, 'stochastic_depth': 0.0,
      'tokenizer': {'type': tokenizer_type, 'patches': {'size': [PATCH, PATCH]}}})
  if variant:
    cfg.variant = variant
    cfg.tokenizer.patches.size = [16, 16]
  else:
    cfg.update(hidden_size=D, num_layers=LAYERS, num_heads=HEADS, mlp_dim=32)
  if tokenizer_type == 'dynamic':
    cfg.tokenizer.update(num_tokens=S, tokenlearner_loc=LOC, use_v11=True, use_tokenfuse=False)
  for key, value in overrides.items():
    if key.startswith('tok_'):
      cfg.tokenizer[key[4:]] = value
    else:
      cfg[key] = value
  return cfg


def _abstract_params(model, image_size=IMG):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))['params']


def _count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


class ParamCountTest(parameterized.TestCase):
  """Scenic's and vit_jax's figures at 224 px, 1000 classes (scenic's token_learner tests and vit_jax's models_test.py); no allocation."""

  @parameterized.named_parameters(
      ('vit_b16_gap', {}, 86_566_120),
      ('v11_16_at_9', dict(tok_type='dynamic', tok_num_tokens=16, tok_tokenlearner_loc=9,
                           tok_use_v11=True), 86_617_912),
      ('v1_16_at_9', dict(tok_type='dynamic', tok_num_tokens=16, tok_tokenlearner_loc=9,
                          tok_use_v11=False), 86_685_160),
      ('v11_fuser_at_9', dict(tok_type='dynamic', tok_num_tokens=16, tok_tokenlearner_loc=9,
                              tok_use_tokenfuse=True), 86_886_904),
      ('vit_b16_token', dict(classifier='token'), 86_567_656),
  )
  def test_b16_counts(self, overrides, expected):
    model = vit_flax.build_model(_config('B/16', **overrides), 1000)
    self.assertEqual(_count(_abstract_params(model, 224)), expected)

  def test_b16_v11_tree_equals_spec(self):
    cfg = _config('B/16', tok_type='dynamic', tok_num_tokens=16, tok_tokenlearner_loc=9)
    paths = param_shapes(_abstract_params(vit_flax.build_model(cfg, 1000), 224))
    expected = {
        'embedding/kernel': (16, 16, 3, 768), 'embedding/bias': (768,),
        'Transformer/posembed_input/pos_embedding': (1, 196, 768),
        'Transformer/TokenLearnerModuleV11_0/LayerNorm_0/scale': (768,),
        'Transformer/TokenLearnerModuleV11_0/LayerNorm_0/bias': (768,),
        'Transformer/TokenLearnerModuleV11_0/token_masking/Dense_0/kernel': (768, 64),
        'Transformer/TokenLearnerModuleV11_0/token_masking/Dense_0/bias': (64,),
        'Transformer/TokenLearnerModuleV11_0/token_masking/Dense_1/kernel': (64, 16),
        'Transformer/TokenLearnerModuleV11_0/token_masking/Dense_1/bias': (16,),
        'Transformer/encoder_norm/scale': (768,), 'Transformer/encoder_norm/bias': (768,),
        'output_projection/kernel': (768, 1000), 'output_projection/bias': (1000,)}
    for i in range(12):
      block = f'Transformer/encoderblock_{i}/'
      mha = block + 'MultiHeadDotProductAttention_0/'
      expected.update({
          block + 'LayerNorm_0/scale': (768,), block + 'LayerNorm_0/bias': (768,),
          block + 'LayerNorm_1/scale': (768,), block + 'LayerNorm_1/bias': (768,),
          block + 'MlpBlock_0/Dense_0/kernel': (768, 3072),
          block + 'MlpBlock_0/Dense_0/bias': (3072,),
          block + 'MlpBlock_0/Dense_1/kernel': (3072, 768),
          block + 'MlpBlock_0/Dense_1/bias': (768,),
          mha + 'out/kernel': (12, 64, 768), mha + 'out/bias': (768,)})
      for name in ('query', 'key', 'value'):
        expected.update({mha + f'{name}/kernel': (768, 12, 64), mha + f'{name}/bias': (12, 64)})
    self.assertEqual(paths, expected)

  def test_b16_v1_and_fuser_nodes(self):
    cfg = _config('B/16', tok_type='dynamic', tok_num_tokens=16, tok_tokenlearner_loc=9,
                  tok_use_v11=False)
    enc = _abstract_params(vit_flax.build_model(cfg, 1000), 224)['Transformer']
    tl = enc['TokenLearnerModule_0']
    self.assertEqual(param_shapes(tl), {
        'LayerNorm_0/scale': (768,), 'LayerNorm_0/bias': (768,), 'Conv_0/kernel': (3, 3, 768, 16),
        'Conv_1/kernel': (3, 3, 16, 16), 'Conv_2/kernel': (3, 3, 16, 16),
        'Conv_3/kernel': (3, 3, 16, 16)})
    cfg = _config('B/16', tok_type='dynamic', tok_num_tokens=16, tok_tokenlearner_loc=9,
                  tok_use_tokenfuse=True)
    enc = _abstract_params(vit_flax.build_model(cfg, 1000), 224)['Transformer']
    extra = {k for k in enc if not k.startswith('encoderblock_')}
    self.assertEqual(extra, {'posembed_input', 'encoder_norm', 'TokenLearnerModuleV11_0',
                             'TokenLearnerModuleV11_1', 'TokenLearnerModuleV11_2', 'TokenFuser_0',
                             'TokenFuser_1', 'TokenFuser_2'})
    self.assertEqual(set(param_shapes(enc['TokenFuser_2'])), {
        'fuser_mix_norm1/scale', 'fuser_mix_norm1/bias', 'fuser_mix_norm2/scale',
        'fuser_mix_norm2/bias', 'Dense_0/kernel', 'Dense_0/bias', 'LayerNorm_0/scale',
        'LayerNorm_0/bias', 'token_masking/Dense_0/kernel', 'token_masking/Dense_0/bias',
        'token_masking/Dense_1/kernel', 'token_masking/Dense_1/bias'})
    self.assertEqual(param_shapes(enc['TokenFuser_0'])['Dense_0/kernel'], (16, 16))

  def test_token_classifier_and_pre_logits_params(self):
    params = _abstract_params(vit_flax.build_model(_config(classifier='token',
                                                           representation_size=8), 5))
    self.assertEqual(params['cls'].shape, (1, 1, D))
    self.assertEqual(params['Transformer']['posembed_input']['pos_embedding'].shape, (1, N + 1, D))
    self.assertEqual(params['pre_logits']['kernel'].shape, (D, 8))
    for pe in ('sinusoidal_2d', 'none'):
      params = _abstract_params(vit_flax.build_model(_config(positional_embedding=pe), 5))
      self.assertNotIn('posembed_input', params['Transformer'])


class ForwardTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('vit', {}, [N] * LAYERS, 0),
      ('v1', dict(tokenizer_type='dynamic', tok_use_v11=False), [N] + [S] * (LAYERS - 1), 1),
      ('fuser', dict(tokenizer_type='dynamic', tok_use_tokenfuse=True), [N] + [S] * (LAYERS - 1),
       LAYERS - 1),
      ('token_v11', dict(tokenizer_type='dynamic', classifier='token'),
       [N + 1] + [S + 1] * (LAYERS - 1), 1),
  )
  def test_token_flow(self, overrides, seq_lens, num_learners):
    """Blocks from `loc` on see S tokens (+ CLS); sown shapes tell what each block attended over."""
    model = vit_flax.build_model(_config(**overrides), 10)
    images = jax.random.normal(jax.random.key(0), (B, IMG, IMG, 3))
    variables = random_variables(model, images)
    apply = self.variant(lambda x: model.apply(variables, x, mutable=['intermediates']))
    logits, state = apply(images)
    chex.assert_shape(logits, (B, 10))
    inter = state['intermediates']['Transformer']
    for i, n in enumerate(seq_lens):
      (weights,) = inter[f'encoderblock_{i}']['MultiHeadDotProductAttention_0']['attention_weights']
      chex.assert_shape(weights, (B, HEADS, n, n))
      np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    learners = sorted(k for k in inter if k.startswith('TokenLearner'))
    self.assertLen(learners, num_learners)
    for name in learners:  # Every learner sees the full grid (the fuser restores N tokens).
      (maps,) = inter[name]['token_maps']
      chex.assert_shape(maps, (B, S, IMG // PATCH, IMG // PATCH))

  def test_init_values_and_fused_identity(self):
    """Zero head (so zero logits), zero `cls` and fuser mixing Dense, float32 params; a fused layer
    adds exactly 0 to the patch tokens at init."""
    model = vit.ViT(num_classes=10, hidden_size=D, num_layers=1, num_heads=HEADS, mlp_dim=32,
                    patch_size=(PATCH, PATCH), classifier='token', tokenlearner_loc=0,
                    num_tokens=S, use_tokenfuse=True)
    images = jax.random.normal(jax.random.key(0), (B, IMG, IMG, 3))
    logits, variables = jax.jit(lambda x: model.init_with_output(jax.random.key(1), x))(images)
    np.testing.assert_array_equal(logits, 0.0)
    p = variables['params']
    mix = p['Transformer']['TokenFuser_0']['Dense_0']
    for leaf in (p['output_projection']['kernel'], p['cls'], mix['kernel'], mix['bias']):
      np.testing.assert_array_equal(leaf, 0.0)
    self.assertEqual({a.dtype for a in jax.tree.leaves(variables)}, {jnp.dtype(jnp.float32)})
    # Encoder: only posemb + encoder_norm act on the patch tokens (the CLS goes through the block).
    enc = vit.Encoder(1, 32, HEADS, has_cls_token=True, tokenlearner_loc=0, num_tokens=S,
                      use_tokenfuse=True)
    x = jax.random.normal(jax.random.key(2), (B, 1 + N, D))
    out = jax.jit(lambda x: enc.apply({'params': p['Transformer']}, x, grid_hw=(4, 4)))(x)
    chex.assert_shape(out, (B, 1 + N, D))  # The fuser keeps all N tokens.
    y = (x + p['Transformer']['posembed_input']['pos_embedding'])[:, 1:]
    norm = p['Transformer']['encoder_norm']
    mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    expected = (y - mean) / jnp.sqrt(var + 1e-6) * norm['scale'] + norm['bias']
    np.testing.assert_allclose(out[:, 1:], expected, atol=1e-5)

  def test_non_square_v1_every_pooling_sincos(self):
    """V1 on a 4 x 6 grid (scenic's V1 cannot), every pooling, sinusoidal_2d; traced only."""
    images = jnp.zeros((B, IMG, IMG + 8, 3))
    for classifier in vit.CLASSIFIERS:
      model = vit_flax.build_model(_config(
          tokenizer_type='dynamic', tok_use_v11=False, classifier=classifier,
          positional_embedding='sinusoidal_2d'), 10)
      variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), images))
      logits, state = jax.eval_shape(
          lambda v, m=model: m.apply(v, images, mutable=['intermediates']), variables)
      chex.assert_shape(logits, (B, 10))
      (maps,) = state['intermediates']['Transformer']['TokenLearnerModule_0']['token_maps']
      chex.assert_shape(maps, (B, S, 4, 6))

  def test_stochastic_depth_is_applied(self):
    """Scenic's TokenLearner model ignores stochastic_depth; here training drops residuals."""
    images = jax.random.normal(jax.random.key(0), (8, IMG, IMG, 3))
    model = vit_flax.build_model(_config(tokenizer_type='dynamic', stochastic_depth=0.5), 10)
    variables = random_variables(model, images)
    apply = jax.jit(lambda x, key: model.apply(variables, x, train=True, rngs={'dropout': key}))
    # Dropout rates are 0, so only stochastic depth can make two training passes differ.
    self.assertFalse(np.allclose(apply(images, jax.random.key(2)), apply(images, jax.random.key(3)),
                                 atol=1e-4))

  def test_bfloat16_compute_float32_params(self):
    model = vit_flax.build_model(_config(tokenizer_type='dynamic'), 10, dtype=jnp.bfloat16)
    images = jnp.ones((B, IMG, IMG, 3))
    variables = random_variables(model, images)  # Parameter dtypes are those init would create.
    self.assertEqual({a.dtype for a in jax.tree.leaves(variables)}, {jnp.dtype(jnp.float32)})
    logits, state = jax.jit(lambda x: model.apply(variables, x, mutable=['intermediates']))(images)
    self.assertEqual(logits.dtype, jnp.bfloat16)
    (weights,) = state['intermediates']['Transformer']['encoderblock_0'][
        'MultiHeadDotProductAttention_0']['attention_weights']
    self.assertEqual(weights.dtype, jnp.float32)  # The softmax runs in float32.


class ConfigTest(parameterized.TestCase):

  def test_decode_variant(self):
    self.assertEqual(vit_flax.decode_variant('B/16'), dict(
        hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=(16, 16)))
    self.assertEqual(vit_flax.decode_variant('H/14')['patch_size'], (14, 14))
    self.assertNotIn('patch_size', vit_flax.decode_variant('Ti'))
    for bad in ('X/16', 'B/x', 'b/16'):
      with self.assertRaisesRegex(ValueError, 'Unknown variant'):
        vit_flax.decode_variant(bad)

  def test_build_model_fields(self):
    model = vit_flax.build_model(_config('S/16', tokenizer_type='dynamic', hidden_size=192), 7)
    self.assertEqual((model.num_classes, model.hidden_size, model.num_layers, model.num_heads,
                      model.mlp_dim, model.patch_size), (7, 192, 12, 6, 1536, (16, 16)))
    self.assertEqual((model.tokenlearner_loc, model.num_tokens, model.use_v11), (LOC, S, True))
    plain = vit_flax.build_model(_config(), 7)
    self.assertIsNone(plain.tokenlearner_loc)
    # A plain dict works too, and scenic's defaults fill absent keys.
    model = vit_flax.build_model({'variant': 'Ti/16'}, 3)
    self.assertEqual((model.classifier, model.dropout_rate, model.positional_embedding),
                     ('gap', 0.1, 'learned_1d'))

  @parameterized.named_parameters(
      ('unknown_key', dict(patch_size=4), 'unknown key model.patch_size'),
      ('unknown_tokenizer_key', dict(tok_patch_size=4), r"tokenizer.patch_size"),
      ('classifier', dict(classifier='map'), 'unknown classifier'),
      ('posemb', dict(positional_embedding='sinusoidal_1d'), 'unknown positional_embedding'),
      ('tokenizer_type', dict(tok_type='frames'), 'tokenizer.type must be one of'),
      ('loc_too_big', dict(tokenizer_type='dynamic', tok_tokenlearner_loc=LAYERS),
       'tokenlearner_loc'),
      ('loc_negative', dict(tokenizer_type='dynamic', tok_tokenlearner_loc=-1), 'tokenlearner_loc'),
      ('loc_missing', dict(tokenizer_type='dynamic', tok_tokenlearner_loc=None),
       'tokenlearner_loc'),
      ('num_tokens', dict(tokenizer_type='dynamic', tok_num_tokens=0), 'num_tokens'),
      ('heads', dict(num_heads=3), 'not divisible by num_heads'),
      ('missing_width', dict(hidden_size=None), 'lacks'),
  )
  def test_config_errors(self, overrides, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      vit_flax.build_model(_config(**overrides), 10)

  def test_check_vit_checks_image_size(self):
    model = vit_flax.build_model(_config(), 10)
    self.assertEqual(model.hidden_size, D)
    vit.check_vit(model, (IMG, IMG, 3))
    with self.assertRaisesRegex(ValueError, 'not divisible by the patch size'):
      vit.check_vit(model, (IMG + 2, IMG, 3))

  def test_call_time_errors(self):
    model = vit_flax.build_model(_config(), 10)
    def init(shape):
      return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    with self.assertRaisesRegex(ValueError, 'not divisible by the patch size'):
      init((B, IMG + 1, IMG, 3))
    with self.assertRaisesRegex(ValueError, 'NHWC'):
      init((B, IMG, IMG))
    variables = init((B, IMG, IMG, 3))
    with self.assertRaisesRegex(ValueError, 'channels'):
      jax.eval_shape(lambda v: model.apply(v, jnp.zeros((B, IMG, IMG, 1))), variables)
    bad = vit.ViT(num_classes=10, hidden_size=D, num_layers=LAYERS, num_heads=HEADS, mlp_dim=32,
                  patch_size=(PATCH, PATCH), tokenlearner_loc=LAYERS)
    with self.assertRaisesRegex(ValueError, 'tokenlearner_loc'):
      jax.eval_shape(lambda: bad.init(jax.random.key(0), jnp.zeros((B, IMG, IMG, 3))))
    enc = vit.Encoder(LAYERS, 32, HEADS, tokenlearner_loc=LAYERS)
    with self.assertRaisesRegex(ValueError, 'tokenlearner_loc'):
      jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((B, N, D)), grid_hw=(4, 4)))


if __name__ == '__main__':
  absltest.main()
