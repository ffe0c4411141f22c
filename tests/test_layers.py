"""Tests for vit_flax.layers: shapes, scenic/flax parameter trees and inits, numerics.

XLA compiles dominate the run time on a small CPU, so most tests use random parameters built in
numpy from `jax.eval_shape(init)`, and only the init tests run an initialiser.
"""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from vit_flax import layers
import helpers
from helpers import param_shapes, random_variables

B, N, D, HEADS = 2, 6, 16, 4



class PosembTest(absltest.TestCase):

  def test_sincos_values_match_formula(self):
    h, w, dim = 3, 5, 8
    pe = layers.posemb_sincos_2d(h, w, dim)
    self.assertEqual(pe.shape, (1, h * w, dim))
    row, col = 2, 4
    omega = 1.0 / 10_000**(np.arange(2) / 2)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                               np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(pe[0, row * w + col], expected, rtol=1e-6)

  def test_sincos_needs_multiple_of_4(self):
    with self.assertRaisesRegex(ValueError, 'divisible by 4'):
      layers.posemb_sincos_2d(2, 2, 6)

  def test_learned_posemb_param_and_init(self):
    x = jnp.zeros((B, 196, 64))
    out, v = jax.jit(lambda x: layers.AddPositionEmbs().init_with_output(jax.random.key(0), x))(x)
    pe = v['params']['pos_embedding']
    self.assertEqual(pe.shape, (1, 196, 64))
    self.assertAlmostEqual(float(pe.std()), 0.02, delta=0.002)
    np.testing.assert_array_equal(out, jnp.broadcast_to(pe, x.shape))


class MlpAndAttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp_shapes(self):
    mlp = layers.MlpBlock(32, out_dim=5)
    x = jax.random.normal(jax.random.key(0), (B, N, D))
    v = random_variables(mlp, x)
    self.assertEqual(param_shapes(v['params']), {'Dense_0/kernel': (D, 32), 'Dense_0/bias': (32,),
                                  'Dense_1/kernel': (32, 5), 'Dense_1/bias': (5,)})
    chex.assert_shape(self.variant(lambda x: mlp.apply(v, x))(x), (B, N, 5))

  def test_attention_tree_matches_flax(self):
    x = jnp.zeros((B, N, D))
    ours = jax.eval_shape(lambda: layers.MultiHeadDotProductAttention(HEADS).init(
        jax.random.key(0), x))
    theirs = jax.eval_shape(lambda: nn.MultiHeadDotProductAttention(HEADS).init(
        jax.random.key(0), x))
    self.assertEqual(param_shapes(ours['params']), param_shapes(theirs['params']))
    self.assertEqual(param_shapes(ours['params'])['query/kernel'], (D, HEADS, D // HEADS))
    self.assertEqual(param_shapes(ours['params'])['query/bias'], (HEADS, D // HEADS))
    self.assertEqual(param_shapes(ours['params'])['out/kernel'], (HEADS, D // HEADS, D))

  @chex.variants(with_jit=True, without_jit=True)
  def test_attention_equals_flax_and_sows_weights(self):
    x = jax.random.normal(jax.random.key(0), (B, N, D))
    mha = layers.MultiHeadDotProductAttention(HEADS)
    v = random_variables(mha, x)
    out, state = self.variant(lambda x: mha.apply(v, x, mutable=['intermediates']))(x)
    chex.assert_shape(out, (B, N, D))
    expected = jax.jit(nn.MultiHeadDotProductAttention(HEADS).apply)(v, x)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    (weights,) = state['intermediates']['attention_weights']
    chex.assert_shape(weights, (B, HEADS, N, N))
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)

  def test_attention_dropout(self):
    x = jax.random.normal(jax.random.key(0), (B, N, D))
    mha = layers.MultiHeadDotProductAttention(HEADS, dropout_rate=0.5)
    v = random_variables(mha, x)
    apply = jax.jit(lambda x, key: mha.apply(v, x, train=True, rngs={'dropout': key}))
    out_a, out_b = apply(x, jax.random.key(2)), apply(x, jax.random.key(3))
    self.assertFalse(np.allclose(out_a, out_b))
    det = jax.jit(mha.apply)(v, x)  # Not training: no rng needed, nothing sown, plain output.
    chex.assert_shape(det, (B, N, D))
    self.assertFalse(np.allclose(out_a, det))


class StochasticDepthTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rate_zero_is_identity(self):
    x = jax.random.normal(jax.random.key(0), (8, N, D))
    sd = layers.StochasticDepth(0.0)
    out = self.variant(lambda x: sd.apply({}, x, train=True,
                                          rngs={'dropout': jax.random.key(1)}))(x)
    np.testing.assert_array_equal(out, x)

  @chex.variants(with_jit=True, without_jit=True)
  def test_half_rate_drops_whole_examples(self):
    x = jnp.ones((256, N, D))
    sd = layers.StochasticDepth(0.5)
    out = self.variant(lambda x: sd.apply({}, x, train=True,
                                          rngs={'dropout': jax.random.key(1)}))(x)
    rows = np.asarray(out).reshape(256, -1)
    row_value = rows[:, :1]
    np.testing.assert_array_equal(rows, np.broadcast_to(row_value, rows.shape))
    self.assertTrue(set(np.unique(row_value)) <= {0.0, 2.0})
    self.assertAlmostEqual(float(rows.mean()), 1.0, delta=0.2)
    np.testing.assert_array_equal(sd.apply({}, x, train=False), x)


class EncoderBlockTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shape_tree_and_dropout(self):
    block = layers.Encoder1DBlock(mlp_dim=32, num_heads=HEADS, dropout_rate=0.1,
                                  attention_dropout_rate=0.1, stochastic_depth=0.1)
    x = jax.random.normal(jax.random.key(0), (B, N, D))
    v = random_variables(block, x)
    self.assertEqual(set(v['params']), {'LayerNorm_0', 'MultiHeadDotProductAttention_0',
                                        'LayerNorm_1', 'MlpBlock_0'})
    apply = self.variant(lambda x, key: block.apply(v, x, train=True, rngs={'dropout': key}))
    out = apply(x, jax.random.key(2))
    chex.assert_shape(out, (B, N, D))
    self.assertFalse(np.allclose(out, apply(x, jax.random.key(3))))

  def test_inits(self):
    """Scenic's inits: xavier-uniform kernels, zero attention biases, normal(1e-6) MLP biases."""
    x = jnp.zeros((B, N, D))
    p = jax.jit(lambda x: layers.Encoder1DBlock(32, HEADS).init(jax.random.key(0), x))(x)['params']
    p = jax.tree.map(np.asarray, p)
    att, mlp = p['MultiHeadDotProductAttention_0'], p['MlpBlock_0']
    for kernel, fan_in, fan_out in [(att['query']['kernel'], D, D), (att['out']['kernel'], D, D),
                                    (mlp['Dense_0']['kernel'], D, 32),
                                    (mlp['Dense_1']['kernel'], 32, D)]:
      limit = np.sqrt(6 / (fan_in + fan_out))  # xavier_uniform over the flattened 2-D kernel.
      self.assertLessEqual(np.abs(kernel).max(), limit)
      self.assertGreater(np.abs(kernel).max(), 0.8 * limit)
    for name in ('query', 'key', 'value', 'out'):
      np.testing.assert_array_equal(att[name]['bias'], 0.0)
    bias = mlp['Dense_0']['bias']
    self.assertTrue(0 < np.abs(bias).max() < 1e-4)
    np.testing.assert_array_equal(p['LayerNorm_0']['scale'], 1.0)

  def test_pre_ln_math(self):
    """out = y + MLP(LN_1(y)), y = x + MHSA(LN_0(x)); dropout and SD are off when not training."""
    block = layers.Encoder1DBlock(mlp_dim=32, num_heads=HEADS, dropout_rate=0.5,
                                  attention_dropout_rate=0.5, stochastic_depth=0.5)
    x = jax.random.normal(jax.random.key(0), (B, N, D))
    v = random_variables(block, x)
    out = jax.jit(block.apply)(v, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
    xn = np.asarray(x, np.float64)
    att = p['MultiHeadDotProductAttention_0']
    a = helpers.layer_norm(xn, p['LayerNorm_0'])
    q, k, val = (np.einsum('bnd,dhk->bnhk', a, att[n]['kernel']) + att[n]['bias']
                 for n in ('query', 'key', 'value'))
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(D // HEADS)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum('bhqk,bkhd->bqhd', w, val)
    y = xn + np.einsum('bqhd,hdo->bqo', o, att['out']['kernel']) + att['out']['bias']
    mlp = p['MlpBlock_0']
    h = helpers.gelu(helpers.layer_norm(y, p['LayerNorm_1']) @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    expected = y + h @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
    np.testing.assert_allclose(out, expected, atol=1e-4)


if __name__ == '__main__':
  absltest.main()


@pytest.mark.parametrize('depthwise, strides, use_bias', [(True, 1, True), (False, 2, False),
                                                          (False, 1, True)])
def test_shifted_conv_is_nn_conv(depthwise, strides, use_bias):
  """The same parameters (names, shapes, init) and outputs as nn.Conv with padding k // 2."""
  x = jax.random.normal(jax.random.key(0), (2, 14, 14, 8))
  features = 8 if depthwise else 16
  ours = layers.ShiftedConv(features, strides=strides, depthwise=depthwise, use_bias=use_bias)
  conv = nn.Conv(features, (3, 3), strides=strides, padding=((1, 1), (1, 1)),
                 feature_group_count=8 if depthwise else 1, use_bias=use_bias)
  variables = conv.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), variables)
  np.testing.assert_allclose(ours.apply(variables, x), conv.apply(variables, x), atol=1e-5)
