"""The model families by name, their schema, and reference configs named as timm's models.

`MODELS` is the one name -> class table. Every family but 'vit' has a flat `config.model`:
`{'name': <family>, <fields of its class but num_classes and dtype>}`, so a model is
`MODELS[name](num_classes=..., dtype=..., **fields)` and `field_defaults(name)` lists the keys
it accepts. 'vit' keeps scenic's nested schema (`config.MODEL_DEFAULTS`, `tokenizer`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import ml_collections

from vit_flax import cait, deit, mixer, swin, vit, xcit

MODELS: dict[str, type[nn.Module]] = {
    'vit': vit.ViT,
    'deit': deit.DeiT,
    'cait': cait.CaiT,
    'mixer': mixer.Mixer,
    'xcit': xcit.XCiT,
    'swin': swin.Swin,
}
# Fields that are not part of `config.model`: set by the trainer, or flax's own.
NOT_CONFIG_FIELDS = ('num_classes', 'dtype', 'parent', 'name')


def field_defaults(name: str) -> dict[str, Any]:
  """A flat family's `config.model` keys (its class's fields) with their defaults."""
  if name not in MODELS:
    raise ValueError(f'Unknown model name {name!r}; expected one of {sorted(MODELS)}.')
  if name == 'vit':
    raise ValueError("'vit' uses scenic's nested schema (config.MODEL_DEFAULTS), not fields.")
  return {f.name: f.default for f in dataclasses.fields(MODELS[name])
          if f.name not in NOT_CONFIG_FIELDS and f.default is not dataclasses.MISSING}


def _vit(hidden_size: int, num_layers: int, num_heads: int) -> dict[str, Any]:
  """timm's `vit_*_patch16_224` in scenic's schema: CLS token, exact GELU, final LN on tokens."""
  return {'name': 'vit', 'hidden_size': hidden_size, 'num_layers': num_layers,
          'num_heads': num_heads, 'mlp_dim': 4 * hidden_size, 'classifier': 'token',
          'representation_size': None, 'dropout_rate': 0.0, 'attention_dropout_rate': 0.0,
          'stochastic_depth': 0.0, 'positional_embedding': 'learned_1d',
          'approximate_gelu': False, 'pooled_norm': False,
          'tokenizer': {'type': 'patch', 'patches': {'size': (16, 16)}}}


# timm model name -> (family, its architecture fields; the rest are defaults). Dropout and
# stochastic depth stay 0 here: they are training choices, for the training config.
_REFERENCES = {
    'deit_tiny_distilled_patch16_224': ('deit', dict(
        hidden_size=192, num_layers=12, num_heads=3, patch_size=(16, 16))),
    'cait_xxs24_224': ('cait', dict(
        hidden_size=192, num_layers=24, num_class_layers=2, num_heads=4, patch_size=(16, 16),
        layerscale_init=1e-5)),
    'mixer_b16_224': ('mixer', dict(
        hidden_size=768, num_layers=12, sequence_mlp_dim=384, channels_mlp_dim=3072,
        patch_size=(16, 16))),
    'xcit_tiny_12_p16_224': ('xcit', dict(
        hidden_size=192, num_layers=12, num_class_layers=2, num_heads=4, patch_size=16,
        layerscale_init=1.0, tokens_norm=True)),
    'swin_tiny_patch4_window7_224': ('swin', dict(
        hidden_size=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
        patch_size=(4, 4))),
}
REFERENCE_NAMES = (*_REFERENCES, 'vit_tiny_patch16_224', 'vit_base_patch16_224')


def reference_config(name: str) -> ml_collections.ConfigDict:
  """`config.model` of a timm-named reference model (224 px; its parameter count is timm's)."""
  if name == 'vit_tiny_patch16_224':
    return ml_collections.ConfigDict(_vit(192, 12, 3))
  if name == 'vit_base_patch16_224':
    return ml_collections.ConfigDict(_vit(768, 12, 12))
  if name not in _REFERENCES:
    raise ValueError(f'Unknown reference model {name!r}; expected one of {REFERENCE_NAMES}.')
  family, overrides = _REFERENCES[name]
  return ml_collections.ConfigDict({'name': family, **field_defaults(family), **overrides})
