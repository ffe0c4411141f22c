"""Pretrained checkpoints into vit_flax's ViT: scenic's `init_from` surgery, and the vit_jax export.

`read_checkpoint(path, format)` reads a vit_flax, scenic, vit_jax, big_vision or timm checkpoint
(`checkpoint_formats`) into a `Checkpoint`: vit_flax's parameter names plus the source model in
scenic's config.model schema. `load_pretrained(...)` merges one into the params of
`config.build_model(model_config, num_classes)` at `image_size`:
  * The head (`output_projection`) is kept when its shapes are the target's (same classes and
    width), so a loaded model computes what the source computes; otherwise, or with
    `restore_head=False` (scenic always does this), it is the init's (zero kernel). `pre_logits`
    is kept when the target has one and dropped otherwise (scenic's rule).
  * The position embedding is resampled to the target grid (`resample.resize_posemb`): 'bilinear'
    as vit_jax and scenic, 'bicubic' as timm; its CLS row is dropped for a GAP target and kept
    (zero when the source has none) for a token one. A source with fixed 2-D sin-cos embeddings
    gives a learned target their values.
  * TokenLearner / TokenFuser parameters, and `cls`, come from the init when the source has none.
    A 3-channel patch kernel is summed over channels for a 1-channel target (a grey image then
    embeds as its RGB replica did).
  * Everything else must match: a width, depth, head count, patch size or MLP width that differs
    is a one-line PretrainedError listing each path with its source and target shapes.
`export_vit_jax(params, model_config, path)` writes the reverse: a vit_jax `.npz`.
"""

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vit_flax import checkpoint_formats as formats
from vit_flax import checkpoints
from vit_flax import config as config_lib
from vit_flax import models
from vit_flax.checkpoint_formats import FORMATS, KNOWN_PATH, POSEMB, PretrainedError
from vit_flax.layers import posemb_sincos_2d
from vit_flax import resample
from vit_flax.resample import INTERPOLATIONS, SIZE_CHANGES, resize_posemb


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A pretrained checkpoint in vit_flax's names (see checkpoint_formats)."""
  params: dict[str, np.ndarray]  # Flat '/'-joined vit_flax paths -> float32 arrays.
  model: dict[str, Any]  # The source in scenic's config.model schema; None where unknown.
  grid_size: tuple[int, int] | None  # (h, w) of the position embedding's patch grid.
  num_classes: int | None  # Width of the source's head (None without one).
  num_channels: int  # Image channels of the patch embedding.
  description: str  # "timm checkpoint PATH", for messages.


def read_checkpoint(path: str | os.PathLike, checkpoint_format: str, *,
                    source_model_config: Any = None,
                    source_grid_size: tuple[int, int] | None = None) -> Checkpoint:
  """Reads a pretrained checkpoint of `checkpoint_format` (one of FORMATS) into a `Checkpoint`.

  `source_model_config` (scenic's config.model schema, any subset) gives what the file cannot:
  `classifier` 'gmp' | 'gsp' for a source without `cls` (default 'gap'), `approximate_gelu`
  (default: the format's, exact for timm, else tanh), `num_heads` (required for timm),
  `positional_embedding` of a source without a learned one, `tokenizer.tokenlearner_loc`.
  `source_grid_size` is the source's (h, w) patch grid; needed only for a non-square grid that the
  file does not record (a vit_flax run's config.json does).

  Raises:
    FileNotFoundError: `path` does not exist.
    ImportError: a torch state dict and no torch.
    PretrainedError: an unknown format, an unreadable file, or parameters vit_flax cannot express.
  """
  if checkpoint_format not in FORMATS:
    raise PretrainedError(f'Unknown checkpoint_format {checkpoint_format!r}; expected one of '
                          f'{FORMATS}.')
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Pretrained checkpoint {path} not found.')
  description = f'{checkpoint_format} checkpoint {path}'
  given = formats.as_dict(source_model_config)
  if checkpoint_format == 'vit_flax':
    flat, facts = checkpoints.read_as_pretrained(path, description)
  else:
    flat, facts = formats.READERS[checkpoint_format](path, given, description)
  flat = {k: formats.as_float32(v) for k, v in flat.items()}
  known = {**facts.get('model', {}), **given}
  model = _describe(flat, known, facts, description)
  unknown = [f'{k} {tuple(v.shape)}' for k, v in flat.items() if not KNOWN_PATH.fullmatch(k)]
  if unknown:
    raise PretrainedError(f'{description} has parameters vit_flax\'s ViT has no counterpart for: '
                          f'{formats.listing(unknown)}.')
  grid = tuple(source_grid_size) if source_grid_size is not None else facts.get('grid_size')
  grid = _canonical_posemb(flat, model['classifier'] == 'token', grid, facts, description)
  head = flat.get('output_projection/kernel')
  return Checkpoint(flat, model, grid, None if head is None else int(head.shape[-1]),
                    int(flat['embedding/kernel'].shape[2]), description)


def _describe(flat: dict[str, np.ndarray], known: dict[str, Any], facts: dict[str, Any],
              description: str) -> dict[str, Any]:
  """The source's scenic-schema config.model: sizes from the arrays, the rest from `known`."""
  kernel = flat.get('embedding/kernel')
  if kernel is None or kernel.ndim != 4:
    raise PretrainedError(f'{description} has no 2-D patch embedding `embedding/kernel` '
                          '[ph, pw, C, D]: is it a ViT checkpoint?')
  blocks = sorted({int(m.group(1)) for k in flat
                   if (m := re.match(r'Transformer/encoderblock_(\d+)/', k))})
  if not blocks or blocks != list(range(len(blocks))):
    raise PretrainedError(f'{description} has encoder blocks {blocks}; expected 0..L-1.')
  block = 'Transformer/encoderblock_0/'
  query = flat.get(block + 'MultiHeadDotProductAttention_0/query/kernel')
  dense = flat.get(block + 'MlpBlock_0/Dense_0/kernel')
  tok = known.get('tokenizer') or {}
  classifier = known.get('classifier') or ('token' if 'cls' in flat else 'gap')
  if (classifier == 'token') != ('cls' in flat):
    raise PretrainedError(f'{description}: classifier {classifier!r} but the checkpoint '
                          f'{"has" if "cls" in flat else "has no"} `cls` parameter.')
  if POSEMB in flat:
    posemb = 'learned_1d'
  else:
    posemb = known.get('positional_embedding') or 'none'
    posemb = 'none' if posemb == 'learned_1d' else posemb
  model = dict(
      hidden_size=int(kernel.shape[3]), num_layers=len(blocks),
      num_heads=int(query.shape[1]) if query is not None else known.get('num_heads'),
      mlp_dim=int(dense.shape[1]) if dense is not None else None, classifier=classifier,
      representation_size=(int(flat['pre_logits/kernel'].shape[1])
                           if 'pre_logits/kernel' in flat else None),
      dropout_rate=0.0, attention_dropout_rate=0.0, positional_embedding=posemb,
      approximate_gelu=bool(known.get('approximate_gelu', facts.get('approximate_gelu', True))),
      pooled_norm='fc_norm/scale' in flat,
      tokenizer={'type': 'patch', 'patches': {'size': tuple(int(s) for s in kernel.shape[:2])}})
  learners = sorted({k.split('/')[1] for k in flat if re.match(r'Transformer/TokenLearner', k)})
  if learners:
    v11 = learners[0].startswith('TokenLearnerModuleV11')
    fused = any(k.startswith('Transformer/TokenFuser_') for k in flat)
    node = f'Transformer/{learners[0]}/'
    tokens = (flat[node + 'token_masking/Dense_1/kernel'].shape[1] if v11 else
              flat[node + 'Conv_3/kernel'].shape[3])
    loc = tok.get('tokenlearner_loc')
    if loc is None and fused:  # One learner + fuser pair per block from loc on.
      loc = len(blocks) - len(learners)
    model['tokenizer'].update(type='dynamic', num_tokens=int(tokens), tokenlearner_loc=loc,
                              use_v11=v11, use_tokenfuse=fused)
  return model


def _canonical_posemb(flat: dict[str, np.ndarray], token: bool, grid: tuple[int, int] | None,
                      facts: dict[str, Any], description: str) -> tuple[int, int] | None:
  """Gives flat[POSEMB] a CLS row iff `token` (a zero one if stored without); returns the grid.

  Whether the stored table has a CLS row follows from the grid when known, else from which of
  rows or rows - 1 is a square (facts['posemb_cls_row'] = False: never one, as in big_vision).
  """
  posemb = flat.get(POSEMB)
  if posemb is None:
    return grid
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise PretrainedError(f'{description}: position embedding of shape {posemb.shape}; expected '
                          '[1, N, D].')
  rows = posemb.shape[1]
  choices = (0,) if facts.get('posemb_cls_row') is False else ((1, 0) if token else (0, 1))
  if grid is not None:
    extra = [c for c in choices if rows - c == grid[0] * grid[1]]
  else:
    extra = [c for c in choices if math.isqrt(rows - c)**2 == rows - c]
  if not extra:
    given = f'the grid {grid}' if grid is not None else 'any square grid'
    raise PretrainedError(f'{description}: a position embedding of {rows} rows does not fit '
                          f'{given}; pass source_grid_size=(h, w).')
  if extra[0] and not token:
    raise PretrainedError(f'{description}: the position embedding has a CLS row but the model has '
                          'no `cls` token.')
  if token and not extra[0]:
    flat[POSEMB] = np.pad(posemb, ((0, 0), (1, 0), (0, 0)))  # [1, 1 + h*w, D]
  if grid is None:
    side = math.isqrt(rows - extra[0])
    grid = (side, side)
  return grid


def load_pretrained(path: str, *, checkpoint_format: str, model_config: Any, num_classes: int,
                    image_size: int | tuple[int, int], init_params: Any = None,
                    source_model_config: Any = None,
                    source_grid_size: tuple[int, int] | None = None,
                    num_channels: int | None = None, restore_head: bool = True,
                    restore_positional_embedding: bool = True,
                    restore_input_embedding: bool = True,
                    positional_embed_size_change: str = 'resize',
                    posemb_interpolation: str = 'bilinear',
                    keep_init: Sequence[str] = (), num_frames: int | None = None
                    ) -> dict[str, Any]:
  """Params for `build_model(model_config, num_classes)` at `image_size`, from a checkpoint.

  Args:
    path: the checkpoint (see checkpoint_formats for what each format's path is).
    checkpoint_format: 'vit_flax' | 'scenic' | 'vit_jax' | 'big_vision' | 'timm'.
    model_config: the target's scenic-schema config.model.
    num_classes: the target's classes.
    image_size: the target's H = W, or (H, W).
    init_params: the target's params (model.init(...)['params']) supplying whatever is not
      restored; None: a fresh init with seed 0.
    source_model_config: what the file cannot tell about the source (read_checkpoint); for timm,
      num_heads defaults to the target's.
    source_grid_size: the source's (h, w) patch grid, for a non-square one the file lacks.
    num_channels: image channels of a fresh init (None: the source's); init_params have theirs.
    restore_head: keep a source head of the target's shape (False: the init's).
    restore_positional_embedding: False keeps the init's position embedding (scenic's key).
    restore_input_embedding: False keeps the init's patch embedding (scenic's key).
    positional_embed_size_change: 'resize' | 'tile' | 'resize_tile' (see resize_posemb).
    posemb_interpolation: 'bilinear' (vit_jax, scenic) | 'bicubic' (timm).
    keep_init: regexes of '/'-joined parameter paths that keep the init's values (big_vision's
      `dont_load`), e.g. 'Transformer/encoderblock_11/.*'.
    num_frames: frames per clip of a video target (tokenizer.type 'video'); an image source's
      2-D patch kernel is then inflated to the tubelet by the target's kernel_init_method
      (default 'average_frame_initializer') and its position embedding tiled over time
      (positional_embed_size_change 'tile' or 'resize_tile').

  Returns:
    The params tree (float arrays with init_params' dtypes).

  Raises:
    FileNotFoundError / ImportError / PretrainedError: see read_checkpoint; PretrainedError also
      for parameters that cannot be bridged and for bad arguments. ConfigError: a bad model_config.
  """
  if positional_embed_size_change not in SIZE_CHANGES:
    raise PretrainedError(f'positional_embed_size_change must be one of {SIZE_CHANGES}, got '
                          f'{positional_embed_size_change!r}.')
  if posemb_interpolation not in INTERPOLATIONS:
    raise PretrainedError(f'posemb_interpolation must be one of {INTERPOLATIONS}, got '
                          f'{posemb_interpolation!r}.')
  target = models.model_kwargs(model_config)
  model = models.build_model(model_config, num_classes)
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  ph, pw = target['patch_size']
  if height % ph or width % pw:
    raise PretrainedError(f'image_size {(height, width)} is not divisible by the patch size '
                          f'{(ph, pw)}.')
  given = formats.as_dict(source_model_config)
  if checkpoint_format == 'timm':
    given.setdefault('num_heads', target['num_heads'])
  ckpt = read_checkpoint(path, checkpoint_format, source_model_config=given,
                         source_grid_size=source_grid_size)
  frames = () if num_frames is None else (num_frames,)
  init = _init_params(model, init_params, (*frames, height, width),
                      num_channels or ckpt.num_channels)
  if ckpt.model['approximate_gelu'] != target['approximate_gelu']:
    logging.warning('%s computes %s GELU, the target model %s (model.approximate_gelu): outputs '
                    'differ from the source until fine-tuned.', ckpt.description,
                    *('tanh' if a else 'exact' for a in (ckpt.model['approximate_gelu'],
                                                         target['approximate_gelu'])))
  merged = merge_checkpoint(
      ckpt, init, target, (height // ph, width // pw), restore_head=restore_head,
      restore_positional_embedding=restore_positional_embedding,
      restore_input_embedding=restore_input_embedding, size_change=positional_embed_size_change,
      interpolation=posemb_interpolation, keep_init=keep_init)
  return traverse_util.unflatten_dict(
      {tuple(k.split('/')): jnp.asarray(v) for k, v in merged.items()})


def _init_params(model, init_params: Any, image_hw: tuple[int, ...],
                 channels: int) -> dict[str, Any]:
  """Flat init params: `init_params` checked against the model, else a fresh seed-0 init.

  `image_hw` is (H, W) of images, or (T, H, W) of clips.
  """
  if init_params is None:
    images = jnp.zeros((1, *image_hw, channels), jnp.float32)
    init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False)['params'])
    return formats.flatten_params(init(images))
  if set(init_params) == {'params'}:
    init_params = init_params['params']
  flat = formats.flatten_params(init_params)
  kernel = flat.get('embedding/kernel')
  channels = kernel.shape[-2] if kernel is not None else channels
  images = jax.ShapeDtypeStruct((1, *image_hw, channels), jnp.float32)
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  expected = {k: v.shape for k, v in
              traverse_util.flatten_dict(dict(abstract['params']), sep='/').items()}
  got = {k: v.shape for k, v in flat.items()}
  if got != expected:
    wrong = [f'{k} {got.get(k)} (model: {expected.get(k)})'
             for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)]
    raise PretrainedError(f'init_params do not fit build_model(model_config) at image size '
                          f'{image_hw}: {formats.listing(wrong)}.')
  return flat


def _category(path: str) -> str:
  """Which surgery rule a parameter path falls under."""
  if path == POSEMB:
    return 'posemb'
  if re.match(r'Transformer/(TokenLearnerModule|TokenLearnerModuleV11|TokenFuser)_\d+/', path):
    return 'learner'
  top = path.split('/')[0]
  return top if top in ('output_projection', 'pre_logits', 'cls', 'embedding') else 'trunk'


def merge_checkpoint(ckpt: Checkpoint, init: dict[str, np.ndarray], target: dict[str, Any],
                     grid: tuple[int, int], *, restore_head: bool = True,
                     restore_positional_embedding: bool = True,
                     restore_input_embedding: bool = True, size_change: str = 'resize',
                     interpolation: str = 'bilinear',
                     keep_init: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Flat target params: `ckpt`'s arrays by the surgery rules (module docstring), else `init`.

  `target` is `config.model_kwargs` of the target, `grid` its (h, w) patch grid.
  """
  keep = [re.compile(p) for p in keep_init]
  head = [p for p in init if _category(p) == 'output_projection']
  head_fits = all(p in ckpt.params and ckpt.params[p].shape == init[p].shape for p in head)
  skipped = {'output_projection': not (restore_head and head_fits),
             'posemb': not restore_positional_embedding, 'embedding': not restore_input_embedding}
  out, fresh, problems = {}, [], []
  for path, init_value in init.items():
    category = _category(path)
    value = ckpt.params.get(path)
    if skipped.get(category) or any(k.fullmatch(path) for k in keep):
      value = init_value
      fresh.append(path)
    elif category == 'posemb':
      value = _target_posemb(ckpt, init_value, target, grid, size_change, interpolation)
      if value is None:
        problems.append(f'the source has no learned position embedding (positional_embedding='
                        f'{ckpt.model["positional_embedding"]!r}; restore_positional_embedding='
                        'False keeps the init)')
        continue
    elif path == 'embedding/kernel' and value is not None:
      if value.ndim == 4 and init_value.ndim == 5:  # An image kernel for a tubelet (scenic).
        value = resample.inflate_patch_kernel(
            value, init_value.shape[0],
            target.get('kernel_init_method') or 'average_frame_initializer')
      value = _adapt_channels(value, init_value.shape)
    if value is None:
      if category in ('trunk', 'embedding'):
        problems.append(f'{path} {init_value.shape} is missing from the source')
      value = init_value
      fresh.append(path)
    if value.shape != init_value.shape:
      problems.append(f'{path}: source {value.shape}, target {init_value.shape}')
    out[path] = np.asarray(value, init_value.dtype)
  dropped = sorted(set(ckpt.params) - set(init))
  problems += [f'source {p} {ckpt.params[p].shape} has no place in the target' for p in dropped
               if _category(p) == 'trunk']
  if problems:
    raise PretrainedError(f'Cannot load {ckpt.description} into this model'
                          f'{_differences(ckpt.model, target)}: {formats.listing(problems)}.')
  logging.info('Loaded %s: %d arrays restored; from the init: %s; dropped: %s.',
               ckpt.description, len(out) - len(fresh), _groups(fresh) or 'nothing',
               _groups(dropped) or 'nothing')
  unused = [p for p in dropped if _category(p) in ('learner', 'posemb')]
  if unused:  # The target computes something else than the source here.
    logging.warning('The target model has no place for the source\'s %s; they are dropped.',
                    _groups(unused))
  return out


def _adapt_channels(kernel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A 3-channel patch kernel summed over channels for a 1-channel target, else `kernel`.

  Summing makes a grey image embed exactly as its RGB replica (grey in every channel) did.
  """
  if kernel.shape[-2] == 3 and shape[-2] == 1 and kernel.shape[:-2] == shape[:-2]:
    return kernel.sum(axis=-2, keepdims=True)  # [(pt,) ph, pw, 1, D]
  return kernel


def _differences(source: dict[str, Any], target: dict[str, Any]) -> str:
  """' (source num_layers=3, target 2; ...)' for the sizes that differ, else ''."""
  pairs = [(k, source.get(k), target.get(k)) for k in
           ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'pooled_norm')]
  pairs.append(('patch size', tuple(source['tokenizer']['patches']['size']),
                tuple(target['patch_size'])))
  diffs = [f'source {k}={s}, target {t}' for k, s, t in pairs if s is not None and s != t]
  return f' ({"; ".join(diffs)})' if diffs else ''


def _groups(paths: list[str]) -> str:
  """'output_projection, Transformer/TokenLearnerModuleV11_0' for a list of parameter paths."""
  names = []
  for path in paths:
    parts = path.split('/')
    name = '/'.join(parts[:2] if parts[0] == 'Transformer' and len(parts) > 2 else parts[:1])
    if name not in names:
      names.append(name)
  return ', '.join(names)


def _target_posemb(ckpt: Checkpoint, init_value: np.ndarray, target: dict[str, Any],
                   grid: tuple[int, int], size_change: str,
                   interpolation: str) -> np.ndarray | None:
  """The target's `[1, c + T*h*w, D]` position embedding from the source's (None: it has none)."""
  target_cls = target['classifier'] == 'token'
  frames, rest = divmod(init_value.shape[1] - int(target_cls), grid[0] * grid[1])
  if rest:
    raise PretrainedError(f'The target position embedding {init_value.shape} does not fit its '
                          f'{grid} grid.')
  source = ckpt.params.get(POSEMB)
  if source is None:
    if ckpt.model['positional_embedding'] != 'sinusoidal_2d' or frames != 1:
      return None
    table = posemb_sincos_2d(*grid, init_value.shape[2])  # [1, h*w, D]: what the source added.
    return np.pad(table, ((0, 0), (int(target_cls), 0), (0, 0)))  # [1, c + h*w, D]
  return resize_posemb(source, ckpt.grid_size, grid, source_has_cls=ckpt.model['classifier'] ==
                       'token', target_has_cls=target_cls, num_frames=frames,
                       size_change=size_change, interpolation=interpolation)


def export_vit_jax(params: Any, model_config: Any, path: str | os.PathLike) -> None:
  """Writes a vit_flax ViT's params as a vit_jax `.npz`, in the layout of vit_jax's own files.

  Pre-Linen block names (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) and
  `head`, as the original ViT and AugReg checkpoints use, so vit_jax's `checkpoint.load`, timm's
  npz loader and big_vision's `fix_old_checkpoints` read it as they read those. Only what vit_jax's
  `VisionTransformer` computes fits: 'token' or 'gap', learned position embeddings, no
  TokenLearner, no `fc_norm`. vit_jax uses tanh GELU; an exact-GELU model is written with a
  warning.
  """
  kw = models.model_kwargs(model_config)
  problems = [] if kw['classifier'] in ('token', 'gap') else [f'classifier {kw["classifier"]!r}']
  problems += ['a TokenLearner'] if kw.get('tokenlearner_loc') is not None else []
  problems += ['pooled_norm (fc_norm)'] if kw['pooled_norm'] else []
  if kw['positional_embedding'] != 'learned_1d':
    problems.append(f'positional_embedding {kw["positional_embedding"]!r}')
  flat = formats.flatten_params(params)
  problems += [f'parameter {k}' for k in flat if not KNOWN_PATH.fullmatch(k)]
  if problems:
    raise PretrainedError(f'A vit_jax checkpoint cannot hold this model: {", ".join(problems)}.')
  if not kw['approximate_gelu']:
    logging.warning('Exporting an exact-GELU model to %s: vit_jax computes tanh GELU, so its '
                    'outputs will differ slightly.', path)
  out = {}
  for key, value in flat.items():
    parts = key.split('/')
    if parts[0] == 'output_projection':
      parts[0] = 'head'
    if parts[1:2] and parts[1].startswith('encoderblock_'):
      parts[2] = formats.PRE_LINEN_BLOCK[parts[2]]
    out['/'.join(parts)] = np.asarray(value, np.float32)
  path = os.fspath(path)
  with open(path + '.tmp', 'wb') as f:  # np.savez on a name would append '.npz'.
    np.savez(f, **out)
  os.replace(path + '.tmp', path)
