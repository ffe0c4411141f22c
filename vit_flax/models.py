"""The model families by name, the `config.model` schema, building a model from it, and reference
configs named as timm's models.

`MODELS` is the one name -> class table. Every family but 'vit' has a flat `config.model`:
`{'name': <family>, <fields of its class but num_classes and dtype>}`, so a model is
`MODELS[name](num_classes=..., dtype=..., **fields)` and `field_defaults(name)` lists the keys
it accepts. 'vit' keeps scenic's nested schema (`MODEL_DEFAULTS`, `tokenizer`), which
`model_kwargs` maps onto `vit.ViT`'s fields. `build_model(config.model, num_classes)` is the one
way a model is made from a config.
"""

import copy
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_flax import cait, deit, mixer, schema, swin, video, vit, xcit
from vit_flax.schema import REQUIRED

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
    raise ValueError("'vit' uses scenic's nested schema (MODEL_DEFAULTS), not fields.")
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


# The config.model section: scenic's schema for 'vit', flat fields for the other families.

MODEL_DEFAULTS = {
    'name': 'vit',  # A key of models.MODELS; the others have a flat schema (models.field_defaults).
    'variant': None,  # e.g. 'B/16': fills the four sizes and the patch size; explicit keys win.
    'hidden_size': None, 'num_layers': None, 'num_heads': None, 'mlp_dim': None,
    'classifier': 'gap', 'representation_size': None, 'dropout_rate': 0.1,
    'attention_dropout_rate': 0.1, 'stochastic_depth': 0.0, 'positional_embedding': 'learned_1d',
    'tokenizer': None,
    'approximate_gelu': True,  # tanh GELU (scenic, vit_jax, big_vision); False: exact (timm).
    'pooled_norm': False,  # The final LayerNorm on the pooled vector (timm's fc_norm).
    'use_concat_final': False,  # scenic's: the head sees the final tokens concatenated.
}
# type: 'patch' (ViT), 'dynamic' (TokenLearner) or 'video' (clips; a learner per frame when
# tokenlearner_loc is set). patches.size: [h, w] ('patch', 'dynamic', 'temporal_sampling') or
# [h, w, t] ('3d_conv'), scenic's order.
TOKENIZER_DEFAULTS = {'type': 'patch', 'patches': None, 'temporal_encoding_config': None}
# tokenizer keys read when type == 'dynamic' or 'video' (allowed, and unread, for 'patch', so one
# config can switch its learner off with --config.model.tokenizer.type=patch).
LEARNER_DEFAULTS = {
    'num_tokens': 8, 'tokenlearner_loc': None, 'use_v11': True, 'use_tokenfuse': False}
LEARNER_KEYS = tuple(LEARNER_DEFAULTS)
# tokenizer.temporal_encoding_config (type 'video'), ViViT's keys.
TEMPORAL_ENCODING_DEFAULTS = {
    'method': REQUIRED,  # '3d_conv' (tubelets) | 'temporal_sampling' (frames, 2-D patches)
    'kernel_init_method': None,  # '3d_conv': central_frame_initializer | average_frame_initializer
    'n_sampled_frames': None,  # 'temporal_sampling': frames kept (uniformly).
}


def resolve_model(model_config: Any, errors: list[str] | None = None) -> dict[str, Any]:
  """scenic's `config.model` with every default filled and `variant` expanded.

  Sizes absent from the config come from `variant`; patches.size becomes a 2-tuple. With `errors`
  given, problems are appended to it; otherwise the first batch raises ConfigError.
  """
  own = errors is None
  errors = [] if own else errors
  given = schema.as_dict(model_config)
  if given.get('name', 'vit') != 'vit':
    model = _resolve_family(given, errors)
    if own and errors:
      raise schema.ConfigError('Invalid model config: ' + '; '.join(errors) + '.')
    return model
  model = schema.merge(MODEL_DEFAULTS, given, 'model.', errors)
  tokenizer = schema.as_dict(model['tokenizer'])
  tok_type = tokenizer.get('type', 'patch')
  tokenizer = schema.merge(dict(TOKENIZER_DEFAULTS, **LEARNER_DEFAULTS), tokenizer,
                           'model.tokenizer.', errors)
  if tok_type == 'dynamic' and tokenizer['tokenlearner_loc'] is None:
    errors.append("model.tokenizer.tokenlearner_loc is needed by tokenizer.type 'dynamic'")
  if tok_type not in vit.TOKENIZER_TYPES:
    errors.append(f'model.tokenizer.type must be one of {vit.TOKENIZER_TYPES}, got {tok_type!r}')
  patches = schema.merge({'size': None}, schema.as_dict(tokenizer['patches']),
                         'model.tokenizer.patches.', errors)
  sizes = {}
  if model['variant']:
    try:
      sizes = vit.decode_variant(model['variant'])
    except ValueError as e:
      errors.append(str(e).rstrip('.'))
  for key in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
    if model[key] is None:
      model[key] = sizes.get(key)
    elif not (isinstance(model[key], int) and not isinstance(model[key], bool) and
              model[key] >= 1):
      errors.append(f'model.{key} must be a positive int, got {model[key]!r}')
  size = patches['size'] if patches['size'] is not None else sizes.get('patch_size')
  if isinstance(size, int):
    size = (size, size)
  patches['size'] = tuple(size) if size is not None else None
  if tok_type == 'video':
    tokenizer['temporal_encoding_config'] = _resolve_temporal(tokenizer, patches['size'], errors)
  missing = [k for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim') if model[k] is None]
  missing += ['tokenizer.patches.size'] if patches['size'] is None else []
  if missing:
    errors.append(f'model lacks {", ".join(missing)} (give them, or a variant like "B/16")')
  tokenizer['patches'] = patches
  model['tokenizer'] = tokenizer
  if own and errors:
    raise schema.ConfigError('Invalid model config: ' + '; '.join(errors) + '.')
  return model


def _resolve_temporal(tokenizer: dict[str, Any], size: tuple[int, ...] | None,
                      errors: list[str]) -> dict[str, Any]:
  """A 'video' tokenizer's temporal_encoding_config, defaults filled and sizes checked."""
  given = tokenizer['temporal_encoding_config']
  if given is None:
    errors.append("model.tokenizer.temporal_encoding_config is needed by tokenizer.type 'video'")
    return given
  encoding = schema.merge(TEMPORAL_ENCODING_DEFAULTS, schema.as_dict(given),
                          'model.tokenizer.temporal_encoding_config.', errors)
  method = encoding['method']
  want = {'3d_conv': 3, 'temporal_sampling': 2}.get(method)
  if want is None:
    errors.append(f'model.tokenizer.temporal_encoding_config.method must be one of '
                  f'{video.TEMPORAL_ENCODINGS}, got {method!r}')
  elif size is not None and len(size) != want:
    errors.append(f"model.tokenizer.patches.size must have {want} entries for {method!r} "
                  f"({'[h, w, t]' if want == 3 else '[h, w]'}), got {list(size)}")
  if method == 'temporal_sampling' and encoding['n_sampled_frames'] is None:
    errors.append("temporal_encoding_config.n_sampled_frames is needed by 'temporal_sampling'")
  return encoding


def _resolve_family(given: dict[str, Any], errors: list[str]) -> dict[str, Any]:
  """A flat `config.model` of a family other than 'vit': its class's fields, defaults filled."""
  name = given['name']
  if name not in MODELS:
    errors.append(f'model.name must be one of {sorted(MODELS)}, got {name!r}')
    return given
  model = schema.merge({'name': name, **field_defaults(name)}, given, 'model.', errors)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}


def model_kwargs(model_config: Any) -> dict[str, Any]:
  """The model class's fields (all but num_classes and dtype) for `config.model`: scenic's
  schema mapped onto `vit.ViT`, or a family's flat fields as they are."""
  m = resolve_model(model_config)
  if m['name'] != 'vit':
    return {k: v for k, v in m.items() if k != 'name'}
  tok = m['tokenizer']
  kw = {k: m[k] for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'classifier',
                          'representation_size', 'positional_embedding', 'approximate_gelu',
                          'pooled_norm', 'use_concat_final')}
  size = tuple(int(s) for s in tok['patches']['size'])
  kw.update(patch_size=size[:2], dropout_rate=float(m['dropout_rate']),
            attention_dropout_rate=float(m['attention_dropout_rate']),
            stochastic_depth=float(m['stochastic_depth']))
  if tok['type'] == 'video':
    encoding = tok['temporal_encoding_config']
    kw.update(temporal_encoding=encoding['method'],
              kernel_init_method=encoding['kernel_init_method'])
    if len(size) == 3:
      kw['tubelet_frames'] = size[2]
    if encoding['n_sampled_frames'] is not None:
      kw['n_sampled_frames'] = int(encoding['n_sampled_frames'])
  if tok['type'] == 'dynamic' or (tok['type'] == 'video' and tok['tokenlearner_loc'] is not None):
    kw.update(tokenlearner_loc=int(tok['tokenlearner_loc']), num_tokens=int(tok['num_tokens']),
              use_v11=bool(tok['use_v11']), use_tokenfuse=bool(tok['use_tokenfuse']))
  return kw


def build_model(model_config: Any, num_classes: int, *, dtype: Any = jnp.float32) -> nn.Module:
  """The model `config.model` describes: `MODELS[model.name]` (default 'vit', scenic's
  schema with the defaults of MODEL_DEFAULTS; the other families take their fields flat).

  `dtype` (e.g. jnp.bfloat16 or 'bfloat16') is the compute dtype; parameters stay float32.
  Raises ConfigError for a config that cannot be built.
  """
  name = resolve_model(model_config)['name']
  try:
    model = MODELS[name](num_classes=num_classes, dtype=jnp.dtype(dtype),
                                **model_kwargs(model_config))
    if name == 'vit':
      vit.check_vit(model)
  except (TypeError, ValueError) as e:
    raise schema.ConfigError(str(e).splitlines()[0]) from None
  return model


def check_model(model_config: Any, num_classes: int, image_shape: tuple[int, ...] | None
                ) -> None:
  """Raises ValueError (one line) for a model that cannot run on images of `image_shape`.

  A ViT is checked from its fields; another family is traced (`jax.eval_shape`, nothing is
  compiled), so its own size checks run.
  """
  model = build_model(model_config, num_classes)
  if isinstance(model, vit.ViT):
    vit.check_vit(model, image_shape)
  elif image_shape is not None:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)),
                                      train=False))


def with_tokenlearner(config: ml_collections.ConfigDict, enabled: bool, *,
                      num_tokens: int | None = None,
                      tokenlearner_loc: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` whose model has its TokenLearner (ViT: tokenizer 'dynamic') or not
  ('patch'); for clips (tokenizer 'video') and the other families, `tokenlearner_loc` set or None.

  Nothing else changes: a 'patch' model keeps (and ignores) the learner's tokenizer keys.
  """
  config = copy.deepcopy(config)  # Keeps placeholders, so CLI overrides still type-check.
  with config.unlocked():
    if config.model.get('name', 'vit') != 'vit':
      if 'tokenlearner_loc' not in field_defaults(config.model.name):
        raise schema.ConfigError(f'model.name {config.model.name!r} has no TokenLearner option.')
      loc = tokenlearner_loc if tokenlearner_loc is not None else config.model.get(
          'tokenlearner_loc')
      if enabled and loc is None:
        raise schema.ConfigError('model.tokenlearner_loc is needed to add a TokenLearner.')
      config.model.tokenlearner_loc = loc if enabled else None
      if num_tokens is not None:
        config.model.num_tokens = num_tokens
      return config
    tokenizer = config.model.tokenizer
    if num_tokens is not None:
      tokenizer.num_tokens = num_tokens
    if tokenlearner_loc is not None:
      tokenizer.tokenlearner_loc = tokenlearner_loc
    if tokenizer.get('type') == 'video':  # Clips: the learner is on when it has a place.
      if enabled and tokenizer.get('tokenlearner_loc') is None:
        raise schema.ConfigError('model.tokenizer.tokenlearner_loc is needed to add a '
                                 'TokenLearner.')
      if not enabled:
        tokenizer.tokenlearner_loc = None
    else:
      tokenizer.type = 'dynamic' if enabled else 'patch'
  return config
