"""Tests for vit_flax.models: the name -> class table, the flat schema, and the reference configs,
whose parameter counts at 224 px and 1000 classes equal timm's (via `jax.eval_shape`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from vit_flax import models, vit

# timm 1.0's `sum(p.numel() for p in model.parameters())` (BatchNorm scale and bias included,
# running statistics not).
TIMM_COUNTS = {
    'deit_tiny_distilled_patch16_224': 5_910_800,
    'cait_xxs24_224': 11_956_264,
    'mixer_b16_224': 59_880_472,
    'xcit_tiny_12_p16_224': 6_716_272,
    'swin_tiny_patch4_window7_224': 28_288_354,
    'vit_tiny_patch16_224': 5_717_416,
    'vit_base_patch16_224': 86_567_656,
}


def _build(cfg, num_classes=1000):
  """What the trainer's build_model does with a config.model."""
  fields = cfg.to_dict()
  name = fields.pop('name')
  if name == 'vit':
    return vit.ViT(num_classes=num_classes, **models.model_kwargs(fields))
  return models.MODELS[name](num_classes=num_classes, dtype=jnp.float32, **fields)


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


class ReferenceTest(parameterized.TestCase):

  @parameterized.parameters(*TIMM_COUNTS.items())
  def test_parameter_count_equals_timm(self, name, expected):
    model = _build(models.reference_config(name))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    self.assertEqual(_count(variables['params']), expected)
    self.assertEqual(set(variables) - {'params'}, {'batch_stats'} if 'xcit' in name else set())

  def test_reference_names(self):
    self.assertEqual(set(models.REFERENCE_NAMES), set(TIMM_COUNTS))
    with self.assertRaisesRegex(ValueError, 'Unknown reference model'):
      models.reference_config('deit_small_patch16_224')


class SchemaTest(parameterized.TestCase):

  def test_table(self):
    self.assertEqual(set(models.MODELS), {'vit', 'deit', 'cait', 'mixer', 'xcit', 'swin'})
    self.assertIs(models.MODELS['vit'], vit.ViT)

  @parameterized.parameters('deit', 'cait', 'mixer', 'xcit', 'swin')
  def test_flat_schema(self, name):
    """Every field but num_classes and dtype is a config key with a default; the defaults build."""
    defaults = models.field_defaults(name)
    fields = {f.name for f in dataclasses.fields(models.MODELS[name])}
    self.assertEqual(set(defaults), fields - {'num_classes', 'dtype', 'parent', 'name'})
    cfg = next(models.reference_config(n) for n in models.REFERENCE_NAMES
               if models.reference_config(n).name == name)
    self.assertEqual(set(cfg) - {'name'}, set(defaults))
    model = models.MODELS[name](num_classes=10, **defaults)
    self.assertEqual(model.num_classes, 10)

  def test_field_defaults_errors(self):
    with self.assertRaisesRegex(ValueError, 'Unknown model name'):
      models.field_defaults('resnet')
    with self.assertRaisesRegex(ValueError, 'nested schema'):
      models.field_defaults('vit')


if __name__ == '__main__':
  absltest.main()
