"""Our families with timm's weights copied in give timm's logits (skipped without torch and timm).

Small timm models with every parameter and BatchNorm statistic randomised, so that each part
(talking heads, LayerScale, class attention, shifted windows, patch merging, conv stem, LPI,
Fourier features) is exercised; timm runs in eval mode, ours with `train=False`.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_flax import cait, deit, mixer, swin, xcit  # pylint: disable=g-import-not-at-top
from timm.models import cait as timm_cait  # pylint: disable=g-import-not-at-top
from timm.models import deit as timm_deit  # pylint: disable=g-import-not-at-top
from timm.models import mlp_mixer as timm_mixer  # pylint: disable=g-import-not-at-top
from timm.models import swin_transformer as timm_swin  # pylint: disable=g-import-not-at-top
from timm.models import xcit as timm_xcit  # pylint: disable=g-import-not-at-top

D, HEADS, CLASSES = 32, 4, 5


def _dense(sd, key, bias=True):
  out = {'kernel': sd[f'{key}.weight'].T}
  if bias:
    out['bias'] = sd[f'{key}.bias']
  return out


def _norm(sd, key):
  return {'scale': sd[f'{key}.weight'], 'bias': sd[f'{key}.bias']}


def _mlp(sd, key):
  return {'Dense_0': _dense(sd, f'{key}.fc1'), 'Dense_1': _dense(sd, f'{key}.fc2')}


def _conv(sd, key, bias=True):
  out = {'kernel': sd[f'{key}.weight'].transpose(2, 3, 1, 0)}  # [kh, kw, in, out]
  if bias:
    out['bias'] = sd[f'{key}.bias']
  return out


def _attention(sd, key, heads=HEADS):
  """query/key/value/out from timm's fused `qkv` or separate `q`, `k`, `v`, and `proj`."""
  if f'{key}.qkv.weight' in sd:
    w, b = np.split(sd[f'{key}.qkv.weight'], 3), np.split(sd[f'{key}.qkv.bias'], 3)
  else:
    w = [sd[f'{key}.{n}.weight'] for n in 'qkv']
    b = [sd[f'{key}.{n}.bias'] for n in 'qkv']
  d = w[0].shape[1]
  out = {name: {'kernel': wi.T.reshape(d, heads, -1), 'bias': bi.reshape(heads, -1)}
         for name, wi, bi in zip(('query', 'key', 'value'), w, b)}
  proj = sd[f'{key}.proj.weight']
  out['out'] = {'kernel': proj.T.reshape(heads, -1, proj.shape[0]), 'bias': sd[f'{key}.proj.bias']}
  return out


def _vit_block(sd, key):
  return {'LayerNorm_0': _norm(sd, f'{key}.norm1'), 'LayerNorm_1': _norm(sd, f'{key}.norm2'),
          'MultiHeadDotProductAttention_0': _attention(sd, f'{key}.attn'),
          'MlpBlock_0': _mlp(sd, f'{key}.mlp')}


def _randomise(model):
  """Every parameter and BatchNorm statistic random (LayerNorm scales near 1, variances > 0)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if t.dtype != torch.float32:
        continue
      if name.endswith('running_var'):
        t.copy_(0.5 + torch.rand_like(t))
      elif 'norm' in name and name.endswith('weight'):
        t.copy_(1 + 0.2 * torch.randn_like(t))
      else:
        t.copy_(0.2 * torch.randn_like(t))
  return model.eval()


def _deit():
  m = timm_deit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=D, depth=2,
                                           num_heads=HEADS, num_classes=CLASSES)
  ours = deit.DeiT(CLASSES, D, 2, HEADS, patch_size=(8, 8))
  def convert(sd):
    enc = {f'encoderblock_{i}': _vit_block(sd, f'blocks.{i}') for i in range(2)}
    enc.update(posembed_input={'pos_embedding': sd['pos_embed']}, encoder_norm=_norm(sd, 'norm'))
    return {'params': {'embedding': _conv(sd, 'patch_embed.proj'), 'cls': sd['cls_token'],
                       'dist': sd['dist_token'], 'Transformer': enc,
                       'output_projection': _dense(sd, 'head'),
                       'output_projection_dist': _dense(sd, 'head_dist')}}
  return m, ours, convert, 32


def _cait():
  m = timm_cait.Cait(img_size=32, patch_size=8, embed_dim=D, depth=2, num_heads=HEADS,
                     num_classes=CLASSES, depth_token_only=2)
  ours = cait.CaiT(CLASSES, D, num_layers=2, num_class_layers=2, num_heads=HEADS,
                   patch_size=(8, 8))
  def convert(sd):
    enc = {}
    for i in range(2):
      k = f'blocks.{i}'
      block = _vit_block(sd, k)
      block['MultiHeadDotProductAttention_0'].update(
          talking_heads_logits=_dense(sd, f'{k}.attn.proj_l'),
          talking_heads_weights=_dense(sd, f'{k}.attn.proj_w'))
      block.update(LayerScale_0={'scale': sd[f'{k}.gamma_1']},
                   LayerScale_1={'scale': sd[f'{k}.gamma_2']})
      enc[f'encoderblock_{i}'] = block
    enc['posembed_input'] = {'pos_embedding': sd['pos_embed']}
    params = {'embedding': _conv(sd, 'patch_embed.proj'), 'Transformer': enc,
              'cls': sd['cls_token'], 'encoder_norm': _norm(sd, 'norm'),
              'output_projection': _dense(sd, 'head')}
    for i in range(2):
      k = f'blocks_token_only.{i}'
      block = _vit_block(sd, k)
      block.update(LayerScale_0={'scale': sd[f'{k}.gamma_1']},
                   LayerScale_1={'scale': sd[f'{k}.gamma_2']})
      params[f'classblock_{i}'] = block
    return {'params': params}
  return m, ours, convert, 32


def _mixer():
  m = timm_mixer.MlpMixer(num_classes=CLASSES, img_size=32, patch_size=8, num_blocks=2,
                          embed_dim=D)
  ours = mixer.Mixer(CLASSES, D, 2, sequence_mlp_dim=D // 2, patch_size=(8, 8))
  def convert(sd):
    params = {'embedding': _conv(sd, 'stem.proj'), 'pre_logits_norm': _norm(sd, 'norm'),
              'output_projection': _dense(sd, 'head')}
    for i in range(2):
      k = f'blocks.{i}'
      params[f'mixerblock_{i}'] = {
          'LayerNorm_0': _norm(sd, f'{k}.norm1'), 'LayerNorm_1': _norm(sd, f'{k}.norm2'),
          'token_mixing': _mlp(sd, f'{k}.mlp_tokens'),
          'channel_mixing': _mlp(sd, f'{k}.mlp_channels')}
    return {'params': params}
  return m, ours, convert, 32


def _xcit():
  m = timm_xcit.Xcit(img_size=32, patch_size=8, embed_dim=D, depth=2, num_heads=HEADS,
                     num_classes=CLASSES, cls_attn_layers=2, tokens_norm=True)
  ours = xcit.XCiT(CLASSES, D, num_layers=2, num_class_layers=2, num_heads=HEADS, patch_size=8)
  def bn(sd, key):
    return ({'scale': sd[f'{key}.weight'], 'bias': sd[f'{key}.bias']},
            {'mean': sd[f'{key}.running_mean'], 'var': sd[f'{key}.running_var']})
  def convert(sd):
    params, stats = {'cls': sd['cls_token'], 'encoder_norm': _norm(sd, 'norm'),
                     'output_projection': _dense(sd, 'head')}, {}
    proj = sd['pos_embed.token_projection.weight'][:, :, 0, 0]  # [D, 2F]
    params['posembed_input'] = {'token_projection': {
        'kernel': proj.T, 'bias': sd['pos_embed.token_projection.bias']}}
    stem, stem_stats = {}, {}
    for i in range(3):
      stem[f'Conv_{i}'] = _conv(sd, f'patch_embed.proj.{2 * i}.0', bias=False)
      stem[f'BatchNorm_{i}'], stem_stats[f'BatchNorm_{i}'] = bn(sd, f'patch_embed.proj.{2 * i}.1')
    params['embedding'], stats['embedding'] = stem, stem_stats
    for i in range(2):
      k = f'blocks.{i}'
      attn = _attention(sd, f'{k}.attn')
      attn['temperature'] = sd[f'{k}.attn.temperature'].reshape(-1)
      lpi_bn, lpi_stats = bn(sd, f'{k}.local_mp.bn')
      params[f'encoderblock_{i}'] = {
          'LayerNorm_0': _norm(sd, f'{k}.norm1'), 'LayerNorm_1': _norm(sd, f'{k}.norm3'),
          'LayerNorm_2': _norm(sd, f'{k}.norm2'), 'XCA_0': attn, 'MlpBlock_0': _mlp(sd, f'{k}.mlp'),
          'LPI_0': {'Conv_0': _conv(sd, f'{k}.local_mp.conv1'), 'BatchNorm_0': lpi_bn,
                    'Conv_1': _conv(sd, f'{k}.local_mp.conv2')},
          'LayerScale_0': {'scale': sd[f'{k}.gamma1']},
          'LayerScale_1': {'scale': sd[f'{k}.gamma3']},
          'LayerScale_2': {'scale': sd[f'{k}.gamma2']}}
      stats[f'encoderblock_{i}'] = {'LPI_0': {'BatchNorm_0': lpi_stats}}
      k = f'cls_attn_blocks.{i}'
      block = _vit_block(sd, k)
      block.update(LayerScale_0={'scale': sd[f'{k}.gamma1']},
                   LayerScale_1={'scale': sd[f'{k}.gamma2']})
      params[f'classblock_{i}'] = block
    return {'params': params, 'batch_stats': stats}
  return m, ours, convert, 32


def _swin():
  # 16 x 16 grid: stage 0 has 4 x 4 windows of 4 (shifted in its odd block), stage 1's 8 x 8
  # grid 2 x 2 windows, stage 2 (4 x 4) one window and no shift.
  m = timm_swin.SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2),
                                num_heads=(2, 4, 4), window_size=4, num_classes=CLASSES)
  ours = swin.Swin(CLASSES, 16, depths=(2, 2, 2), num_heads=(2, 4, 4), window_size=4,
                   patch_size=(2, 2))
  def convert(sd):
    params = {'embedding': _conv(sd, 'patch_embed.proj'),
              'embedding_norm': _norm(sd, 'patch_embed.norm'), 'encoder_norm': _norm(sd, 'norm'),
              'output_projection': _dense(sd, 'head.fc')}
    for s, heads in enumerate((2, 4, 4)):
      if s:
        params[f'merging_{s}'] = {'norm': _norm(sd, f'layers.{s}.downsample.norm'),
                                  'reduction': _dense(sd, f'layers.{s}.downsample.reduction',
                                                      bias=False)}
      for j in range(2):
        k = f'layers.{s}.blocks.{j}'
        block = _vit_block(sd, k)
        block['MultiHeadDotProductAttention_0'] = _attention(sd, f'{k}.attn', heads)
        block['relative_position_bias_table'] = sd[f'{k}.attn.relative_position_bias_table']
        params[f'stage_{s}_block_{j}'] = block
    return {'params': params}
  return m, ours, convert, 32


@pytest.mark.parametrize('make', [_deit, _cait, _mixer, _xcit, _swin],
                         ids=['deit', 'cait', 'mixer', 'xcit', 'swin'])
def test_timm_weights_give_timm_logits(make):
  timm_model, ours, convert, size = make()
  _randomise(timm_model)
  sd = {k: v.numpy().astype(np.float32) for k, v in timm_model.state_dict().items()
        if v.dtype == torch.float32}
  images = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    expected = timm_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  variables = convert(sd)
  abstract = jax.eval_shape(lambda: ours.init(jax.random.key(0), jnp.asarray(images)))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)
  logits = jax.jit(ours.apply)(variables, jnp.asarray(images))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
