"""Readers of pretrained ViT checkpoints' files into vit_flax's (scenic's) parameter names.

`READERS[format](path, source_model_config, description)` gives `(flat, facts)`: the source's
arrays under vit_flax's flat '/'-joined parameter paths, and what the file says about its model
(`pretrained.read_checkpoint` turns both into a `Checkpoint`). What each format stores:
  * vit_flax: a run directory (config.json + orbax checkpoints/<step>/params; the newest step)
    or one step directory of it (checkpoints/<step> or best/<step>); our own tree.
  * scenic: a flax msgpack file `checkpoint_<step>` (or a directory of them): `params` (optax era)
    or `optimizer/target[/params]` (flax.optim era, pre-Linen names).
  * vit_jax (google-research/vision_transformer, AugReg): `.npz` with '/'-joined pre-Linen names
    (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`), `head`, `cls`.
  * big_vision: `.npz`, optional `params/` prefix, Linen names, a top-level `pos_embedding` added
    *before* `cls` is prepended, `head`; scan layout (`Transformer/encoderblock` with a leading
    depth axis) is unstacked.
  * timm: `.safetensors` (read here, no package needed) or a torch `.pth` / `.bin` state dict of
    `VisionTransformer`: fused `qkv`, torch `[out, in]` Linear weights, `[D, C, ph, pw]` conv.
In a `Checkpoint` the position embedding has a CLS row exactly when the classifier is 'token', as
vit_flax's ViT adds it; a source whose CLS token gets no position (big_vision, timm's
`no_embed_class`) gets a zero row, which computes the same. timm's LayerScale is folded into the
projection before it, and missing biases are zeros, so the computation is unchanged.
"""

import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

from flax import serialization
from flax import traverse_util
import numpy as np

FORMATS = ('vit_flax', 'scenic', 'vit_jax', 'big_vision', 'timm')
POSEMB = 'Transformer/posembed_input/pos_embedding'
# A block's modules in pre-Linen checkpoints (numbered across module types) and in Linen ones.
PRE_LINEN_BLOCK = {'LayerNorm_0': 'LayerNorm_0', 'MultiHeadDotProductAttention_0':
                   'MultiHeadDotProductAttention_1', 'LayerNorm_1': 'LayerNorm_2',
                   'MlpBlock_0': 'MlpBlock_3'}
_LEARNER = r'Transformer/(TokenLearnerModule|TokenLearnerModuleV11|TokenFuser)_\d+/.+'
# Every parameter path vit_flax's ViT can have.
KNOWN_PATH = re.compile('|'.join([
    r'embedding/(kernel|bias)', 'cls', POSEMB, r'Transformer/encoder_norm/(scale|bias)',
    r'Transformer/encoderblock_\d+/(LayerNorm_[01]/(scale|bias)|MultiHeadDotProductAttention_0/'
    r'(query|key|value|out)/(kernel|bias)|MlpBlock_0/Dense_[01]/(kernel|bias))', _LEARNER,
    r'(fc_norm|pre_logits|output_projection)/(kernel|bias|scale)']))


class PretrainedError(ValueError):
  """A checkpoint that cannot be read or loaded into the target model; the message is one line."""


def as_dict(cfg: Any) -> dict[str, Any]:
  """A ConfigDict / Mapping (or None) as a plain nested dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}


def first_line(e: BaseException) -> str:
  """'KeyError: the first line of its message', for one-line errors that wrap another."""
  line = (str(e).strip().splitlines() or [''])[0][:160]
  return f'{type(e).__name__}: {line}' if line else type(e).__name__


def listing(items: list[str], limit: int = 8) -> str:
  """'a; b; c; and 5 more': the first `limit` items, for one-line messages."""
  more = f'; and {len(items) - limit} more' if len(items) > limit else ''
  return '; '.join(items[:limit]) + more


def as_float32(a: np.ndarray) -> np.ndarray:
  """`a` as a float32 numpy array (bfloat16, float16 and float64 sources alike)."""
  a = np.asarray(a)
  if a.dtype.kind == 'V' and a.dtype.itemsize == 2:  # bfloat16 saved by numpy as raw 2 bytes.
    a = _bfloat16_to_float32(a.view(np.uint16))
  return a.astype(np.float32)


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
  """bfloat16 bit patterns (uint16) -> float32: they are the float32's upper 16 bits."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def convert_pre_linen(tree: Any) -> Any:
  """Renumbers pre-Linen module names per type, as flax's `checkpoints.convert_pre_linen`.

  Pre-Linen flax numbered a parent's submodules with one counter over all types
  (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`); Linen counts per type
  (`LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`). Idempotent on Linen
  trees. (flax's own imports TensorFlow, which costs seconds.)
  """
  if not isinstance(tree, Mapping):
    return tree
  numbered = {}
  for name in tree:
    if m := re.fullmatch(r'(.*)_(\d+)', name):
      numbered.setdefault(m.group(1), []).append((int(m.group(2)), name))
  renamed = {name: name for name in tree}
  for module, entries in numbered.items():
    for i, (_, name) in enumerate(sorted(entries)):
      renamed[name] = f'{module}_{i}'
  return {renamed[name]: convert_pre_linen(value) for name, value in tree.items()}


def flatten_params(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'a/b/kernel': numpy array} for a (nested) parameter tree."""
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep='/').items()}


def _tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _latest_flax_checkpoint(path: str, description: str) -> str:
  """`path` itself, or its `checkpoint_<step>` file with the largest step."""
  if os.path.isfile(path):
    return path
  steps = [(int(m.group(1)), name) for name in os.listdir(path)
           if (m := re.fullmatch(r'checkpoint_(\d+)', name))]
  if not steps:
    raise PretrainedError(f'{description}: no checkpoint_<step> file in the directory.')
  file = os.path.join(path, max(steps)[1])
  if not os.path.isfile(file):
    raise PretrainedError(f'{description}: {file} is a directory; the scenic format reads flax '
                          'msgpack files.')
  return file


def _read_scenic(path: str, given: dict[str, Any], description: str):
  """A flax msgpack train state: `params`, else `optimizer/target` (pre-Linen names converted)."""
  del given
  file = _latest_flax_checkpoint(path, description)
  try:
    with open(file, 'rb') as f:
      state = serialization.msgpack_restore(f.read())
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises many kinds)
    raise PretrainedError(f'{description}: {file} is not a flax msgpack checkpoint '
                          f'({first_line(e)}).') from None
  params = state.get('params') if isinstance(state, dict) else None
  if not params and isinstance(state, dict) and isinstance(state.get('optimizer'), dict):
    params = state['optimizer'].get('target')  # flax.optim-era TrainState.
  if not isinstance(params, dict) or not params:
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise PretrainedError(f'{description}: no `params` or `optimizer/target` in {file} '
                          f'(found {keys}).')
  if set(params) == {'params'}:  # Very old states nest the model's params once more.
    params = params['params']
  return flatten_params(convert_pre_linen(params)), {}


def _read_npz(path: str, description: str) -> dict[str, np.ndarray]:
  if not zipfile.is_zipfile(path):
    raise PretrainedError(f'{description} is not an .npz (zip) archive.')
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except  (zip, pickle and format errors)
    raise PretrainedError(f'{description} is not a readable .npz archive ({first_line(e)}).'
                          ) from None


def _read_vit_jax(path: str, given: dict[str, Any], description: str):
  """An original-ViT / AugReg .npz: pre-Linen names, `head`, CLS row iff `cls`."""
  del given
  tree = convert_pre_linen(_tree(_read_npz(path, description)))
  if 'head' in tree:
    tree['output_projection'] = tree.pop('head')
  return flatten_params(tree), {'approximate_gelu': True}


def _read_big_vision(path: str, given: dict[str, Any], description: str):
  """A big_vision .npz: [params/ or opt/target/] Linen names, top-level `pos_embedding`, `head`."""
  del given
  flat = _read_npz(path, description)
  for prefix in ('params/', 'opt/target/'):
    if any(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
      break
  tree = convert_pre_linen(_tree(flat))
  encoder = tree.get('Transformer', {})
  if 'encoderblock' in encoder:  # scan=True: one block whose leaves carry a leading depth axis.
    stacked = flatten_params(encoder.pop('encoderblock'))
    depth = next(iter(stacked.values())).shape[0]
    for i in range(depth):
      encoder[f'encoderblock_{i}'] = _tree({k: v[i] for k, v in stacked.items()})
  if 'head' in tree:
    tree['output_projection'] = tree.pop('head')
  facts = {'approximate_gelu': True}
  posemb = tree.pop('pos_embedding', None)
  if posemb is None:
    posemb = encoder.pop('pos_embedding', None)
  if posemb is not None:  # Added to the patches before `cls` is prepended: no CLS row.
    encoder['posembed_input'] = {'pos_embedding': posemb}
    facts['posemb_cls_row'] = False
  return flatten_params(tree), facts


_SAFETENSORS_DTYPES = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'BF16': '<u2', 'I64': '<i8',
                       'I32': '<i4', 'I16': '<i2', 'I8': 'i1', 'U8': 'u1', 'BOOL': '?'}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file; BF16 ones as float32.

  The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
  data_offsets: [begin, end]}} (offsets into the bytes after the header), the raw data.
  """
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    prefix = f.read(8)
    n = int.from_bytes(prefix, 'little') if len(prefix) == 8 else 0
    if not 0 < n <= size - 8:
      raise PretrainedError(f'{path} is not a safetensors file (header length {n}, file size '
                            f'{size}).')
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise PretrainedError(f'{path}: the safetensors header is not valid JSON.') from None
    data = f.read()
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']])
      shape, (begin, end) = tuple(int(s) for s in info['shape']), info['data_offsets']
    except (KeyError, TypeError, ValueError):
      raise PretrainedError(f'{path}: tensor {name!r} has an unsupported or malformed header '
                            f'entry {str(info)[:80]}.') from None
    if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
      raise PretrainedError(f'{path}: tensor {name!r} needs bytes [{begin}, {end}) of '
                            f'{len(data)} (a truncated file?).')
    array = np.frombuffer(data, dtype, math.prod(shape), begin).reshape(shape)  # As stored.
    tensors[name] = _bfloat16_to_float32(array) if info['dtype'] == 'BF16' else array
  return tensors


def _read_torch(path: str, description: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'Reading the torch state dict {path} needs PyTorch (pip install torch); '
                      'or save it as .safetensors, which needs nothing.') from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (pickle, zip and torch errors)
    raise PretrainedError(f'{description} is not a readable torch file ({first_line(e)}).'
                          ) from None
  for key in ('state_dict', 'model', 'state_dict_ema'):  # Training checkpoints wrap the dict.
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  if not isinstance(state, dict):
    raise PretrainedError(f'{description} holds a {type(state).__name__}, not a state dict.')
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if torch.is_tensor(v)}


def _read_timm(path: str, given: dict[str, Any], description: str):
  """A timm VisionTransformer state dict (.safetensors, or .pth / .bin with torch)."""
  if os.path.isdir(path):
    raise PretrainedError(f'{description} is a directory; the timm format reads one '
                          '.safetensors or torch (.pth, .bin) file.')
  if path.endswith('.safetensors'):
    state = read_safetensors(path)
  else:
    state = _read_torch(path, description)
  state = {k.removeprefix('module.'): v for k, v in state.items()}  # DistributedDataParallel's.
  heads = given.get('num_heads')
  if not heads:
    raise PretrainedError(f'{description}: timm files do not record num_heads; pass '
                          'source_model_config={"num_heads": H}.')
  flat, used = _timm_to_flax(state, int(heads), description)
  unused = [f'{k} {tuple(v.shape)}' for k, v in state.items() if k not in used]
  if unused:
    raise PretrainedError(f'{description} has parameters vit_flax\'s ViT has no counterpart for '
                          f'(register tokens, qk-norm, pre-norm, attention pooling?): '
                          f'{listing(unused)}.')
  if 'cls' in flat and 'fc_norm/scale' in flat:
    raise PretrainedError(f'{description} pools the patch tokens of a model with a class token '
                          "(global_pool='avg' with class_token=True), which vit_flax's ViT "
                          'cannot compute.')
  return flat, {'approximate_gelu': False}


def _timm_to_flax(state: dict[str, np.ndarray], heads: int, description: str):
  """(vit_flax flat params, the state keys used) of a timm VisionTransformer state dict."""
  used = set()

  def take(key: str, default: np.ndarray | None = None) -> np.ndarray | None:
    if key in state:
      used.add(key)
      return state[key]
    return default

  def linear(key: str) -> tuple[np.ndarray, np.ndarray]:
    weight = take(key + '.weight')  # [out, in]
    return weight.T, take(key + '.bias', np.zeros(weight.shape[0], weight.dtype))  # [in, out]

  weight = take('patch_embed.proj.weight')  # [D, C, ph, pw]
  if weight is None or weight.ndim != 4:
    raise PretrainedError(f'{description} has no `patch_embed.proj.weight` [D, C, ph, pw]: is it '
                          'a timm VisionTransformer?')
  d = weight.shape[0]
  flat = {'embedding/kernel': weight.transpose(2, 3, 1, 0),  # [ph, pw, C, D]
          'embedding/bias': take('patch_embed.proj.bias', np.zeros(d, weight.dtype))}
  for key, name in (('cls_token', 'cls'), ('pos_embed', POSEMB)):
    if key in state:
      flat[name] = take(key)  # [1, 1, D] / [1, N, D]
  i = 0
  while f'blocks.{i}.attn.qkv.weight' in state:
    flat.update(_timm_block(state, f'blocks.{i}.', f'Transformer/encoderblock_{i}/', heads, take,
                            linear, description))
    i += 1
  for key, name in (('norm', 'Transformer/encoder_norm'), ('fc_norm', 'fc_norm')):
    if f'{key}.weight' in state:
      flat[f'{name}/scale'], flat[f'{name}/bias'] = take(f'{key}.weight'), take(f'{key}.bias')
  if 'head.weight' in state:
    flat['output_projection/kernel'], flat['output_projection/bias'] = linear('head')
  return flat, used


def _timm_block(state, prefix, name, heads, take, linear, description) -> dict[str, np.ndarray]:
  """One timm `Block` in vit_flax's names: qkv split per head, LayerScale folded into proj/fc2."""
  qkv = take(prefix + 'attn.qkv.weight')  # [3*D, D]
  d = qkv.shape[1]
  if qkv.shape[0] != 3 * d or d % heads:
    raise PretrainedError(f'{description}: {prefix}attn.qkv.weight {qkv.shape} does not split '
                          f'into query, key, value of {heads} heads.')
  qkv_bias = take(prefix + 'attn.qkv.bias', np.zeros(3 * d, qkv.dtype))  # [3*D]
  attn = name + 'MultiHeadDotProductAttention_0/'
  out = {}
  for j, part in enumerate(('query', 'key', 'value')):
    rows = slice(j * d, (j + 1) * d)
    out[f'{attn}{part}/kernel'] = qkv[rows].T.reshape(d, heads, d // heads)  # [D, H, Dh]
    out[f'{attn}{part}/bias'] = qkv_bias[rows].reshape(heads, d // heads)  # [H, Dh]
  proj, proj_bias = linear(prefix + 'attn.proj')  # [H*Dh, D], [D]
  fc2, fc2_bias = linear(prefix + 'mlp.fc2')  # [M, D], [D]
  # LayerScale multiplies the branch output per channel: fold it into the last projection.
  gamma1 = take(prefix + 'ls1.gamma', np.ones(d, qkv.dtype))  # [D]
  gamma2 = take(prefix + 'ls2.gamma', np.ones(d, qkv.dtype))  # [D]
  out[attn + 'out/kernel'] = (proj * gamma1).reshape(heads, d // heads, d)  # [H, Dh, D]
  out[attn + 'out/bias'] = proj_bias * gamma1
  mlp = name + 'MlpBlock_0/'
  out[mlp + 'Dense_0/kernel'], out[mlp + 'Dense_0/bias'] = linear(prefix + 'mlp.fc1')  # [D, M]
  out[mlp + 'Dense_1/kernel'], out[mlp + 'Dense_1/bias'] = fc2 * gamma2, fc2_bias * gamma2
  for norm, layer in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_1')):
    out[f'{name}{layer}/scale'] = take(f'{prefix}{norm}.weight')
    out[f'{name}{layer}/bias'] = take(f'{prefix}{norm}.bias')
  return out


# The readers of the other projects' files; 'vit_flax' runs are read by `checkpoints`.
READERS = {'scenic': _read_scenic, 'vit_jax': _read_vit_jax, 'big_vision': _read_big_vision,
           'timm': _read_timm}


