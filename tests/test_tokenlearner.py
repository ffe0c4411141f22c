"""Tests for TokenLearner V1 / V1.1 and TokenFuser: shapes, scenic names, hand-written math.

XLA compiles dominate the run time on a small CPU, so most tests use random parameters built in
numpy from `jax.eval_shape(init)`; only the fuser's zero-at-init test runs the initialisers.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from vit_flax import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11
import helpers
from helpers import param_shapes, random_variables

B, C, S = 2, 16, 4


# Hand-written numpy references (float64; no XLA compiles, so the tests stay fast).



def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _mlp(x, p):  # scenic's MlpBlock without dropout.
  h = helpers.gelu(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
  return h @ p['Dense_1']['kernel'] + p['Dense_1']['bias']


def _conv3x3(x, kernel):  # [B, h, w, Cin] * [3, 3, Cin, Cout], SAME padding, no bias.
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum('bhwc,cd->bhwd', xp[:, i:i + h, j:j + w], kernel[i, j])
             for i in range(3) for j in range(3))


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


class LearnerShapesTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(TokenLearnerModule, TokenLearnerModuleV11)
  def test_shapes_and_sown_maps(self, cls, grid_hw=(3, 5)):  # A non-square grid.
    h, w = grid_hw
    x = jax.random.normal(jax.random.key(0), (B, h * w, C))
    learner = cls(S)
    v = random_variables(learner, x, grid_hw=grid_hw)
    apply = self.variant(lambda x: learner.apply(v, x, grid_hw=grid_hw, mutable=['intermediates']))
    out, state = apply(x)
    chex.assert_shape(out, (B, S, C))
    (maps,) = state['intermediates']['token_maps']
    chex.assert_shape(maps, (B, S, h, w))
    # A [B, h, w, C] input gives the same result.
    out4 = jax.jit(learner.apply)(v, x.reshape(B, h, w, C))
    np.testing.assert_allclose(out4, out, atol=1e-5)

  def test_param_trees(self):
    x = jnp.zeros((B, 16, C))
    v1 = jax.eval_shape(lambda: TokenLearnerModule(S).init(jax.random.key(0), x, grid_hw=(4, 4)))
    self.assertEqual(param_shapes(v1['params']), {
        'LayerNorm_0/scale': (C,), 'LayerNorm_0/bias': (C,), 'Conv_0/kernel': (3, 3, C, S),
        'Conv_1/kernel': (3, 3, S, S), 'Conv_2/kernel': (3, 3, S, S),
        'Conv_3/kernel': (3, 3, S, S)})
    v11 = jax.eval_shape(
        lambda: TokenLearnerModuleV11(S).init(jax.random.key(0), x, grid_hw=(4, 4)))
    self.assertEqual(param_shapes(v11['params']), {
        'LayerNorm_0/scale': (C,), 'LayerNorm_0/bias': (C,),
        'token_masking/Dense_0/kernel': (C, 64), 'token_masking/Dense_0/bias': (64,),
        'token_masking/Dense_1/kernel': (64, S), 'token_masking/Dense_1/bias': (S,)})

  def test_bad_grids_raise(self):
    def init(cls, shape, **kwargs):
      return jax.eval_shape(lambda: cls(S).init_with_output(
          jax.random.key(0), jnp.zeros(shape), **kwargs))[0]
    for cls in (TokenLearnerModule, TokenLearnerModuleV11):
      with self.assertRaisesRegex(ValueError, 'square grid'):
        init(cls, (B, 15, C))
      with self.assertRaisesRegex(ValueError, 'cells'):
        init(cls, (B, 15, C), grid_hw=(4, 4))
      with self.assertRaisesRegex(ValueError, 'does not match'):
        init(cls, (B, 3, 5, C), grid_hw=(5, 3))
      with self.assertRaisesRegex(ValueError, 'expects'):
        init(cls, (15, C), grid_hw=(3, 5))
      # A square grid is inferred when grid_hw is not given.
      chex.assert_shape(init(cls, (B, 16, C)), (B, S, C))


class LearnerMathTest(absltest.TestCase):

  def test_v11_weights_sum_to_one_and_equal_einsum(self):
    h, w = 3, 5
    x = jax.random.normal(jax.random.key(0), (B, h * w, C)) * 3 + 1
    learner = TokenLearnerModuleV11(S)
    v = random_variables(learner, x, grid_hw=(h, w))
    apply = jax.jit(lambda x: learner.apply(v, x, grid_hw=(h, w), mutable=['intermediates']))
    out, state = apply(x)
    (maps,) = state['intermediates']['token_maps']
    np.testing.assert_allclose(maps.sum((-2, -1)), 1.0, atol=1e-6)
    p, xn = _np(v['params']), np.asarray(x, np.float64)
    logits = _mlp(helpers.layer_norm(xn, p['LayerNorm_0']), p['token_masking'])  # [B, N, S]
    weights = _softmax(logits.transpose(0, 2, 1))  # [B, S, N]
    np.testing.assert_allclose(maps.reshape(B, S, h * w), weights, atol=1e-6)
    np.testing.assert_allclose(out, np.einsum('...si,...id->...sd', weights, xn), atol=1e-5)
    # Convex combination: a constant input gives that constant back for every token.
    const = jnp.broadcast_to(jnp.arange(C, dtype=jnp.float32), x.shape)
    np.testing.assert_allclose(apply(const)[0], np.broadcast_to(const[:, :1], (B, S, C)),
                               atol=1e-5)

  def test_v11_dropout_in_token_masking(self):
    x = jax.random.normal(jax.random.key(0), (B, 16, C))
    learner = TokenLearnerModuleV11(S, dropout_rate=0.5)
    v = random_variables(learner, x)
    apply = jax.jit(lambda x, key, train: learner.apply(v, x, train=train, rngs={'dropout': key}),
                    static_argnums=2)
    det = apply(x, jax.random.key(2), False)
    np.testing.assert_array_equal(det, apply(x, jax.random.key(3), False))
    self.assertFalse(np.allclose(apply(x, jax.random.key(2), True), det))

  def test_v1_equals_hand_written_math(self):
    h, w = 3, 5
    x = jax.random.normal(jax.random.key(0), (B, h * w, C))
    # Pooling does not change the params.
    v = random_variables(TokenLearnerModule(S), x, grid_hw=(h, w))
    for sum_pooling in (True, False):
      learner = TokenLearnerModule(S, use_sum_pooling=sum_pooling)
      out, state = jax.jit(
          lambda x: learner.apply(v, x, grid_hw=(h, w), mutable=['intermediates']))(x)
      p, xn = _np(v['params']), np.asarray(x, np.float64)
      a = helpers.layer_norm(xn, p['LayerNorm_0']).reshape(B, h, w, C)
      for i in range(3):
        a = helpers.gelu(_conv3x3(a, p[f'Conv_{i}']['kernel']))
      a = _conv3x3(a, p['Conv_3']['kernel'])  # [B, h, w, S]
      sel = _sigmoid(a.reshape(B, h * w, S).transpose(0, 2, 1))[..., None]  # [B, S, HW, 1]
      pooled = (sel * xn[:, None]).sum(2) if sum_pooling else (sel * xn[:, None]).mean(2)
      np.testing.assert_allclose(out, pooled, rtol=1e-5, atol=1e-5)
      (maps,) = state['intermediates']['token_maps']
      np.testing.assert_allclose(maps, sel[..., 0].reshape(B, S, h, w), atol=1e-5)


class TokenFuserTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_at_init_and_shapes(self):
    n = 12
    tokens = jax.random.normal(jax.random.key(0), (B, S, C))
    original = jax.random.normal(jax.random.key(1), (B, n, C))
    fuser = TokenFuser(dropout_rate=0.1)
    v = jax.jit(lambda t, o: fuser.init(jax.random.key(2), t, o))(tokens, original)  # Real init.
    out = self.variant(lambda t, o: fuser.apply(v, t, o))(tokens, original)
    chex.assert_shape(out, (B, n, C))
    np.testing.assert_array_equal(out, 0.0)
    # A 4-D original is flattened; the output is always [B, N, C].
    chex.assert_shape(jax.jit(fuser.apply)(v, tokens, original.reshape(B, 3, 4, C)), (B, n, C))

  def test_tree_and_math(self):
    n = 12
    tokens = jax.random.normal(jax.random.key(0), (B, S, C))
    original = jax.random.normal(jax.random.key(1), (B, n, C))
    fuser = TokenFuser()
    v = random_variables(fuser, tokens, original)
    self.assertEqual(param_shapes(v['params']), {
        'fuser_mix_norm1/scale': (C,), 'fuser_mix_norm1/bias': (C,),
        'Dense_0/kernel': (S, S), 'Dense_0/bias': (S,),
        'fuser_mix_norm2/scale': (C,), 'fuser_mix_norm2/bias': (C,),
        'LayerNorm_0/scale': (C,), 'LayerNorm_0/bias': (C,),
        'token_masking/Dense_0/kernel': (C, 64), 'token_masking/Dense_0/bias': (64,),
        'token_masking/Dense_1/kernel': (64, S), 'token_masking/Dense_1/bias': (S,)})
    p = _np(v['params'])  # Random (non-zero) mixing weights.
    y = helpers.layer_norm(np.asarray(tokens, np.float64), p['fuser_mix_norm1'])
    y = (y.transpose(0, 2, 1) @ p['Dense_0']['kernel'] + p['Dense_0']['bias']).transpose(0, 2, 1)
    y = helpers.layer_norm(y, p['fuser_mix_norm2'])
    m = _sigmoid(_mlp(helpers.layer_norm(np.asarray(original, np.float64), p['LayerNorm_0']),
                      p['token_masking']))
    expected = np.einsum('...sc,...hs->...hc', y, m)
    p32 = jax.tree.map(lambda a: a.astype(np.float32), p)
    np.testing.assert_allclose(jax.jit(fuser.apply)({'params': p32}, tokens, original), expected,
                               atol=1e-5)

  def test_mismatched_inputs_raise(self):
    with self.assertRaisesRegex(ValueError, 'same'):
      jax.eval_shape(lambda: TokenFuser().init(
          jax.random.key(0), jnp.zeros((B, S, C)), jnp.zeros((B, 9, C + 1))))


if __name__ == '__main__':
  absltest.main()
