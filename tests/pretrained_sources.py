"""Tiny pretrained checkpoints of every format, written on the fly, and numpy references of them.

The writers give random arrays each format's own names, layouts and file type. The reference
forward passes read those arrays under the same names and layouts (vit_jax's pre-Linen block names
and CLS row, big_vision's top-level `pos_embedding` added before `cls`, timm's fused `qkv`, torch
`[out, in]` weights and `[D, C, ph, pw]` conv) and nothing from vit_flax, so comparing a loaded
vit_flax model with them checks the loaders' name and layout mapping independently.
"""

import json
import pathlib

from flax import serialization
import numpy as np
from scipy import special

# Module names inside one encoder block: (LN before attention, attention, LN before MLP, MLP).
LINEN_BLOCK = ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')
PRE_LINEN_BLOCK = ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')
# The tiny source models: B images of IMG px, PATCH px patches (a GRID x GRID grid), D wide.
B, IMG, PATCH, D, HEADS, LAYERS, MLP, CLASSES = 1, 16, 4, 16, 2, 2, 32, 5
GRID = IMG // PATCH


def images(seed=0, size=IMG, channels=3):
  """Random NHWC images; `size` is H = W or (H, W)."""
  h, w = (size, size) if isinstance(size, int) else size
  return np.random.default_rng(seed).standard_normal((B, h, w, channels)).astype(np.float32)


def model_config(classifier='gap', representation_size=None, approximate_gelu=True,
                 pooled_norm=False, tokenlearner_loc=None, num_tokens=4, **sizes):
  """A vit_flax config.model (scenic's schema) of the tiny sources' sizes, dropout off."""
  cfg = dict(hidden_size=D, num_layers=LAYERS, num_heads=HEADS, mlp_dim=MLP,
             classifier=classifier, representation_size=representation_size, dropout_rate=0.0,
             attention_dropout_rate=0.0, approximate_gelu=approximate_gelu,
             pooled_norm=pooled_norm, tokenizer={'type': 'patch', 'patches': {'size': (PATCH,
                                                                                         PATCH)}})
  if tokenlearner_loc is not None:
    cfg['tokenizer'].update(type='dynamic', tokenlearner_loc=tokenlearner_loc,
                            num_tokens=num_tokens)
  patch = sizes.pop('patch', None)
  if patch:
    cfg['tokenizer']['patches']['size'] = (patch, patch)
  cfg.update(sizes)
  return cfg


def random_arrays(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def flax_family_shapes(style, *, cls, representation_size=None, num_tokens=None, width=D,
                       layers=LAYERS, pre_linen=False):
  """{name: shape} of a vit_jax / big_vision / scenic checkpoint of the tiny ViT.

  vit_jax uses pre-Linen block names (as `pre_linen=True` does for old scenic states), a CLS
  row in the position embedding iff `cls`, and `head`; big_vision a top-level `pos_embedding`
  and `head`; scenic `output_projection` and, with `num_tokens`, TokenLearnerModuleV11_0.
  """
  names = PRE_LINEN_BLOCK if style == 'vit_jax' or pre_linen else LINEN_BLOCK
  d, n = width, GRID * GRID
  s = {'embedding/kernel': (PATCH, PATCH, 3, d), 'embedding/bias': (d,),
       'Transformer/encoder_norm/scale': (d,), 'Transformer/encoder_norm/bias': (d,)}
  if style == 'big_vision':
    s['pos_embedding'] = (1, n, d)
  else:
    s['Transformer/posembed_input/pos_embedding'] = (1, n + int(cls), d)
  if cls:
    s['cls'] = (1, 1, d)
  for i in range(layers):
    ln0, attn, ln1, mlp = (f'Transformer/encoderblock_{i}/{name}/' for name in names)
    for ln in (ln0, ln1):
      s.update({ln + 'scale': (d,), ln + 'bias': (d,)})
    for part in ('query', 'key', 'value'):
      s.update({f'{attn}{part}/kernel': (d, HEADS, d // HEADS),
                f'{attn}{part}/bias': (HEADS, d // HEADS)})
    s.update({attn + 'out/kernel': (HEADS, d // HEADS, d), attn + 'out/bias': (d,),
              mlp + 'Dense_0/kernel': (d, MLP), mlp + 'Dense_0/bias': (MLP,),
              mlp + 'Dense_1/kernel': (MLP, d), mlp + 'Dense_1/bias': (d,)})
  if num_tokens:
    tl = 'Transformer/TokenLearnerModuleV11_0/'
    mlp = tl + 'token_masking/'
    s.update({tl + 'LayerNorm_0/scale': (d,), tl + 'LayerNorm_0/bias': (d,),
              mlp + 'Dense_0/kernel': (d, 64), mlp + 'Dense_0/bias': (64,),
              mlp + 'Dense_1/kernel': (64, num_tokens), mlp + 'Dense_1/bias': (num_tokens,)})
  if representation_size:
    s.update({'pre_logits/kernel': (d, representation_size),
              'pre_logits/bias': (representation_size,)})
  head = 'output_projection' if style == 'scenic' else 'head'
  s.update({f'{head}/kernel': (representation_size or d, CLASSES), f'{head}/bias': (CLASSES,)})
  return s


def timm_shapes(*, cls=True, embed_class=True, fc_norm=False, layer_scale=False, qkv_bias=True):
  """{name: shape} of a timm VisionTransformer state dict of the tiny ViT."""
  n = GRID * GRID
  s = {'patch_embed.proj.weight': (D, 3, PATCH, PATCH), 'patch_embed.proj.bias': (D,),
       'pos_embed': (1, n + int(cls and embed_class), D)}
  if cls:
    s['cls_token'] = (1, 1, D)
  for i in range(LAYERS):
    p = f'blocks.{i}.'
    s.update({p + 'norm1.weight': (D,), p + 'norm1.bias': (D,), p + 'attn.qkv.weight': (3 * D, D),
              p + 'attn.proj.weight': (D, D), p + 'attn.proj.bias': (D,), p + 'norm2.weight': (D,),
              p + 'norm2.bias': (D,), p + 'mlp.fc1.weight': (MLP, D), p + 'mlp.fc1.bias': (MLP,),
              p + 'mlp.fc2.weight': (D, MLP), p + 'mlp.fc2.bias': (D,)})
    if qkv_bias:
      s[p + 'attn.qkv.bias'] = (3 * D,)
    if layer_scale:
      s.update({p + 'ls1.gamma': (D,), p + 'ls2.gamma': (D,)})
  norm = 'fc_norm' if fc_norm else 'norm'
  s.update({f'{norm}.weight': (D,), f'{norm}.bias': (D,), 'head.weight': (CLASSES, D),
            'head.bias': (CLASSES,)})
  return s


def write_safetensors(path, tensors):
  """A .safetensors file of float32 numpy arrays, written by hand (the format is simple)."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, a in tensors.items():
    header[name] = {'dtype': 'F32', 'shape': list(a.shape),
                    'data_offsets': [offset, offset + a.size * 4]}
    offset += a.size * 4
  head = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(len(head).to_bytes(8, 'little') + head)
    for a in tensors.values():
      f.write(np.ascontiguousarray(a, '<f4').tobytes())


def unflatten(flat):
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def write_flax_checkpoint(directory, step, state):
  """A flax.training.checkpoints msgpack file DIR/checkpoint_<step> of a state dict."""
  path = pathlib.Path(directory) / f'checkpoint_{step}'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(serialization.msgpack_serialize(state))
  return path


def layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu(x, approximate):
  if approximate:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _attend(q, k, v):
  """Scaled dot-product attention on [B, N, H, Dh] -> [B, N, H, Dh]."""
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])  # [B, H, N, N]
  return np.einsum('bhqk,bkhd->bqhd', softmax(logits), v)  # [B, N, H, Dh]


def flax_patches(images, kernel, bias):
  """NHWC images, flax conv kernel [ph, pw, C, D] (kernel = stride) -> tokens [B, h*w, D]."""
  b, hh, ww, c = images.shape
  ph, pw, _, d = kernel.shape
  x = images.reshape(b, hh // ph, ph, ww // pw, pw, c)  # [B, h, ph, w, pw, C]
  x = np.einsum('bhpwqc,pqcd->bhwd', x, kernel) + bias  # [B, h, w, D]
  return x.reshape(b, -1, d)  # [B, h*w, D]


def _flax_block(x, a, prefix, names, approximate_gelu):
  ln0, attn, ln1, mlp = (prefix + n + '/' for n in names)
  y = layer_norm(x, a[ln0 + 'scale'], a[ln0 + 'bias'])
  q, k, v = (np.einsum('bnd,dhk->bnhk', y, a[f'{attn}{p}/kernel']) + a[f'{attn}{p}/bias']
             for p in ('query', 'key', 'value'))  # [B, N, H, Dh] each
  y = np.einsum('bnhk,hkd->bnd', _attend(q, k, v), a[attn + 'out/kernel'])  # [B, N, D]
  x = x + y + a[attn + 'out/bias']
  y = layer_norm(x, a[ln1 + 'scale'], a[ln1 + 'bias'])
  y = gelu(y @ a[mlp + 'Dense_0/kernel'] + a[mlp + 'Dense_0/bias'], approximate_gelu)
  return x + y @ a[mlp + 'Dense_1/kernel'] + a[mlp + 'Dense_1/bias']


def token_learner_v11(x, a, prefix):
  """scenic's TokenLearnerModuleV11 [B, N, D] -> [B, S, D] (tanh GELU, softmax over space)."""
  y = layer_norm(x, a[prefix + 'LayerNorm_0/scale'], a[prefix + 'LayerNorm_0/bias'])
  mlp = prefix + 'token_masking/'
  y = gelu(y @ a[mlp + 'Dense_0/kernel'] + a[mlp + 'Dense_0/bias'], True)
  y = y @ a[mlp + 'Dense_1/kernel'] + a[mlp + 'Dense_1/bias']  # [B, N, S]
  maps = softmax(y.transpose(0, 2, 1))  # [B, S, N]
  return np.einsum('bsn,bnd->bsd', maps, x)  # [B, S, D]


def flax_family_vit(a, images, *, style, approximate_gelu=True, tokenlearner_loc=None,
                    pre_linen=False):
  """Logits of a vit_jax / big_vision / scenic ViT from its flat '/'-named arrays `a`.

  style 'vit_jax': pre-Linen block names, `cls` prepended before the position embedding (which
  has its CLS row), `head`. 'big_vision': Linen names, top-level `pos_embedding` added before
  `cls` is prepended, `head`. 'scenic': Linen names as vit_jax's order, `output_projection`, and
  TokenLearnerModuleV11_0 before block `tokenlearner_loc` (`pre_linen`: flax.optim-era block
  names). GAP without `cls`, else token 0.
  """
  names = PRE_LINEN_BLOCK if style == 'vit_jax' or pre_linen else LINEN_BLOCK
  x = flax_patches(images, a['embedding/kernel'], a['embedding/bias'])  # [B, N, D]
  cls = a.get('cls')
  if style == 'big_vision':
    x = x + a['pos_embedding']
  if cls is not None:
    x = np.concatenate([np.tile(cls, (x.shape[0], 1, 1)), x], axis=1)  # [B, 1 + N, D]
  if style != 'big_vision':
    x = x + a['Transformer/posembed_input/pos_embedding']
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in a:
    if i == tokenlearner_loc:
      x = token_learner_v11(x, a, 'Transformer/TokenLearnerModuleV11_0/')  # [B, S, D]
    x = _flax_block(x, a, f'Transformer/encoderblock_{i}/', names, approximate_gelu)
    i += 1
  x = layer_norm(x, a['Transformer/encoder_norm/scale'], a['Transformer/encoder_norm/bias'])
  x = x[:, 0] if cls is not None else x.mean(1)  # [B, D]
  if 'pre_logits/kernel' in a:
    x = np.tanh(x @ a['pre_logits/kernel'] + a['pre_logits/bias'])
  head = 'output_projection' if style == 'scenic' else 'head'
  return x @ a[f'{head}/kernel'] + a[f'{head}/bias']


def timm_vit(sd, images, *, num_heads, global_pool):
  """Logits of timm's VisionTransformer from its state dict `sd` (numpy arrays).

  As timm's models/vision_transformer.py: conv patch embedding on NCHW, `cls_token`, `pos_embed`
  (with the class row, or without it for no_embed_class), blocks with fused qkv and optional
  LayerScale, exact GELU, `norm` or (pooled) `fc_norm`, `head`.
  """
  weight = sd['patch_embed.proj.weight']  # [D, C, ph, pw]
  d, c, ph, pw = weight.shape
  x = images.transpose(0, 3, 1, 2)  # [B, C, H, W]
  b, _, hh, ww = x.shape
  x = x.reshape(b, c, hh // ph, ph, ww // pw, pw)  # [B, C, h, ph, w, pw]
  x = np.einsum('bchpwq,dcpq->bhwd', x, weight) + sd['patch_embed.proj.bias']  # [B, h, w, D]
  x = x.reshape(b, -1, d)  # [B, N, D]
  cls, pos = sd.get('cls_token'), sd['pos_embed']
  prefix = 0 if cls is None else 1
  if cls is not None and pos.shape[1] == x.shape[1]:  # no_embed_class: the class token gets none.
    x = np.concatenate([np.tile(cls, (b, 1, 1)), x + pos], axis=1)  # [B, 1 + N, D]
  else:
    if cls is not None:
      x = np.concatenate([np.tile(cls, (b, 1, 1)), x], axis=1)  # [B, 1 + N, D]
    x = x + pos
  linear = lambda y, key: y @ sd[key + '.weight'].T + sd.get(key + '.bias', 0.0)  # [out, in]
  i = 0
  while f'blocks.{i}.attn.qkv.weight' in sd:
    p = f'blocks.{i}.'
    y = layer_norm(x, sd[p + 'norm1.weight'], sd[p + 'norm1.bias'])
    n = y.shape[1]
    qkv = linear(y, p + 'attn.qkv').reshape(b, n, 3, num_heads, d // num_heads)  # [B, N, 3, H, Dh]
    y = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, n, d)  # [B, N, D]
    x = x + linear(y, p + 'attn.proj') * sd.get(p + 'ls1.gamma', 1.0)
    y = layer_norm(x, sd[p + 'norm2.weight'], sd[p + 'norm2.bias'])
    y = linear(gelu(linear(y, p + 'mlp.fc1'), False), p + 'mlp.fc2')
    x = x + y * sd.get(p + 'ls2.gamma', 1.0)
    i += 1
  if 'norm.weight' in sd:
    x = layer_norm(x, sd['norm.weight'], sd['norm.bias'])
  x = x[:, 0] if global_pool == 'token' else x[:, prefix:].mean(1)  # [B, D]
  if 'fc_norm.weight' in sd:
    x = layer_norm(x, sd['fc_norm.weight'], sd['fc_norm.bias'])
  return linear(x, 'head')
