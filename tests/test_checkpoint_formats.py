"""Each checkpoint format loads into a vit_flax ViT that computes what the source computes.

Checkpoints are tiny and random, written on the fly with each format's names, layouts and file
type (tests/pretrained_sources.py); the loaded model's logits are compared with a numpy forward
pass of the source architecture read from the saved arrays, and, where torch and timm are
installed, with timm's own model. Nothing is downloaded.
"""

from flax.traverse_util import flatten_dict
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
import pretrained_sources as src
from pretrained_sources import CLASSES, IMG
from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import config as config_lib
from vit_flax import export
from vit_flax import models
from vit_flax import rundir
from vit_flax.pretrained import export_vit_jax, load_pretrained, read_checkpoint

ATOL = 1e-4


def _logits(cfg, params, images, num_classes=CLASSES):
  return np.asarray(models.build_model(cfg, num_classes).apply({'params': params}, images))


def _init(cfg, size=IMG, channels=3):
  """Random target params (numpy; no init compile): whatever the source supplies replaces them."""
  model = models.build_model(cfg, CLASSES)
  return helpers.random_variables(model, src.images(size=size, channels=channels))['params']


def _assert_same_logits(got, want):
  assert np.std(want) > 0.1  # Not vacuous: the logits vary.
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize('classifier,rep', [('token', 8), ('gap', None)])
def test_vit_jax_npz_computes_what_the_source_computes(tmp_path, classifier, rep):
  arrays = src.random_arrays(src.flax_family_shapes(
      'vit_jax', cls=classifier == 'token', representation_size=rep))
  path = tmp_path / 'ViT-tiny.npz'
  np.savez(path, **arrays)
  cfg = src.model_config(classifier, rep)
  params = load_pretrained(path, checkpoint_format='vit_jax', model_config=cfg,
                           num_classes=CLASSES, image_size=IMG,
                           init_params=_init(cfg))
  images = src.images()
  _assert_same_logits(_logits(cfg, params, images),
                      src.flax_family_vit(arrays, images, style='vit_jax'))


@pytest.mark.parametrize('cls,scan,prefix', [(True, True, 'params/'), (False, False, '')])
def test_big_vision_npz_computes_what_the_source_computes(tmp_path, cls, scan, prefix):
  arrays = src.random_arrays(src.flax_family_shapes('big_vision', cls=cls))
  saved = dict(arrays)
  if scan:  # One `encoderblock` whose leaves carry a leading depth axis.
    blocks = [{k.split('/', 2)[2]: saved.pop(k) for k in list(saved)
               if k.startswith(f'Transformer/encoderblock_{i}/')} for i in range(src.LAYERS)]
    saved.update({f'Transformer/encoderblock/{k}': np.stack([b[k] for b in blocks])
                  for k in blocks[0]})
  np.savez(tmp_path / 'bv.npz', **{prefix + k: v for k, v in saved.items()},
           **({'opt/state/mu': np.zeros(3)} if prefix else {}))
  cfg = src.model_config('token' if cls else 'gap')
  params = load_pretrained(tmp_path / 'bv.npz', checkpoint_format='big_vision', model_config=cfg,
                           num_classes=CLASSES, image_size=IMG,
                           init_params=_init(cfg))
  images = src.images()
  _assert_same_logits(_logits(cfg, params, images),
                      src.flax_family_vit(arrays, images, style='big_vision'))
  if cls:  # The CLS token gets no position in big_vision: a zero row in vit_flax's table.
    np.testing.assert_array_equal(params['Transformer']['posembed_input']['pos_embedding'][0, 0], 0)


def test_scenic_tokenlearner_checkpoint_computes_what_the_source_computes(tmp_path):
  arrays = src.random_arrays(src.flax_family_shapes('scenic', cls=False, num_tokens=4))
  older = src.random_arrays(src.flax_family_shapes('scenic', cls=False, num_tokens=4), seed=1)
  src.write_flax_checkpoint(tmp_path, 3, {'params': src.unflatten(older), 'global_step': 3})
  src.write_flax_checkpoint(tmp_path, 12, {  # The newest step is the one loaded.
      'params': src.unflatten(arrays), 'global_step': 12, 'opt_state': {'mu': np.zeros(3)}})
  cfg = src.model_config(tokenlearner_loc=1, num_tokens=4)
  params = load_pretrained(tmp_path, checkpoint_format='scenic', model_config=cfg,
                           num_classes=CLASSES, image_size=IMG,
                           init_params=_init(cfg))
  images = src.images()
  _assert_same_logits(_logits(cfg, params, images),
                      src.flax_family_vit(arrays, images, style='scenic', tokenlearner_loc=1))


def test_flax_optim_era_scenic_checkpoint_converts_pre_linen_names(tmp_path):
  arrays = src.random_arrays(src.flax_family_shapes('scenic', cls=True))
  old = src.random_arrays(src.flax_family_shapes('scenic', cls=True, pre_linen=True))
  path = src.write_flax_checkpoint(tmp_path, 5, {'optimizer': {
      'target': {'params': src.unflatten(old)}, 'state': {'step': 5}}})
  ckpt = read_checkpoint(path, 'scenic')
  assert set(ckpt.params) == set(arrays)
  assert ckpt.model['classifier'] == 'token' and ckpt.num_classes == CLASSES
  cfg = src.model_config('token')
  params = load_pretrained(path, checkpoint_format='scenic', model_config=cfg,
                           num_classes=CLASSES, image_size=IMG,
                           init_params=_init(cfg))
  images = src.images()
  _assert_same_logits(_logits(cfg, params, images),
                      src.flax_family_vit(old, images, style='scenic', pre_linen=True))


TIMM_CASES = {  # name: (timm_shapes kwargs, target classifier, timm global_pool)
    'token_layerscale': (dict(cls=True, layer_scale=True), 'token', 'token'),
    'avg_fc_norm_no_qkv_bias': (dict(cls=False, fc_norm=True, qkv_bias=False), 'gap', 'avg'),
    'token_no_embed_class': (dict(cls=True, embed_class=False), 'token', 'token'),
}


@pytest.mark.parametrize('case', list(TIMM_CASES))
def test_timm_safetensors_computes_what_the_source_computes(tmp_path, case):
  shapes, classifier, pool = TIMM_CASES[case]
  state = src.random_arrays(src.timm_shapes(**shapes))
  src.write_safetensors(tmp_path / 'model.safetensors', state)
  cfg = src.model_config(classifier, approximate_gelu=False,
                         pooled_norm=shapes.get('fc_norm', False))
  params = load_pretrained(tmp_path / 'model.safetensors', checkpoint_format='timm',
                           model_config=cfg, num_classes=CLASSES, image_size=IMG,
                           init_params=_init(cfg))
  images = src.images()
  _assert_same_logits(_logits(cfg, params, images),
                      src.timm_vit(state, images, num_heads=src.HEADS, global_pool=pool))


def _tiny_run(workdir, tokenizer_type='dynamic'):
  """A vit_flax run directory of configs/tiny.py with random params at step 40; its params."""
  config = models.with_tokenlearner(helpers.tiny_config(), tokenizer_type == 'dynamic')
  config = config_lib.resolve(config)
  model = models.build_model(config.model, 10)
  params = helpers.random_variables(model, np.zeros((1, 28, 28, 1), np.float32))['params']
  manager = checkpoints.make_manager(str(workdir))
  meta = dict(checkpoints.model_meta(config), step=40)  # As a training run writes it.
  manager.save(40, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                           meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()
  manager.close()
  rundir.write_config(config, str(workdir))
  return config, params


def test_vit_flax_run_directory_and_step_directory_load(tmp_path):
  config, saved = _tiny_run(tmp_path)
  init = jax.tree.map(np.zeros_like, saved)
  for path in (tmp_path, tmp_path / 'checkpoints' / '40'):
    ckpt = read_checkpoint(path, 'vit_flax')
    assert ckpt.grid_size == (4, 4) and ckpt.num_channels == 1  # From config.json's dataset.
    assert ckpt.model['tokenizer']['tokenlearner_loc'] == config.model.tokenizer.tokenlearner_loc
    params = load_pretrained(path, checkpoint_format='vit_flax', model_config=config.model,
                             num_classes=10, image_size=28, init_params=init)
    got, want = flatten_dict(params), flatten_dict(saved)
    assert set(got) == set(want)
    for key, value in want.items():
      np.testing.assert_array_equal(got[key], value)


@pytest.mark.parametrize('classifier,rep', [('token', 8), ('gap', None)])
def test_export_vit_jax_then_load_gives_equal_logits(tmp_path, classifier, rep):
  cfg = src.model_config(classifier, rep)
  model = models.build_model(cfg, CLASSES)
  params = helpers.random_variables(model, src.images())['params']
  export_vit_jax(params, cfg, tmp_path / 'exported.npz')
  with np.load(tmp_path / 'exported.npz') as z:
    names = set(z.files)
  assert 'head/kernel' in names and not any('output_projection' in k for k in names)
  assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel' in names
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias' in names
  loaded = load_pretrained(tmp_path / 'exported.npz', checkpoint_format='vit_jax',
                           model_config=cfg, num_classes=CLASSES, image_size=IMG,
                           init_params=_init(cfg))
  images = src.images()
  _assert_same_logits(_logits(cfg, loaded, images), _logits(cfg, params, images))



def test_export_command_writes_the_runs_vit_with_equal_logits(tmp_path):
  config, saved = _tiny_run(tmp_path / 'run', tokenizer_type='patch')
  result = export.export_run(str(tmp_path / 'run'), str(tmp_path / 'vit.npz'))
  assert result['step'] == 40 and result['num_classes'] == 10
  loaded = load_pretrained(tmp_path / 'vit.npz', checkpoint_format='vit_jax',
                           model_config=config.model, num_classes=10, image_size=28,
                           init_params=jax.tree.map(np.zeros_like, saved))
  images = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
  _assert_same_logits(_logits(config.model, loaded, images, 10),
                      _logits(config.model, saved, images, 10))


@pytest.mark.parametrize('output,fragment', [
    (None, '--output is required'), ('vit.txt', 'must name a .npz file'),
    ('missing/vit.npz', 'does not exist')])
def test_export_command_checks_its_output_before_loading(tmp_path, output, fragment):
  _tiny_run(tmp_path / 'run', tokenizer_type='patch')
  with pytest.raises(cli.FlagError, match=fragment):
    export.export_run(str(tmp_path / 'run'), output and str(tmp_path / output))
  assert not list(tmp_path.glob('*.npz'))

# ------------------------------------------------------------------------------------------------
# Against timm itself (torch and timm are optional: skipped where they are not installed).


def _timm_model(case, img_size=IMG):
  """A timm VisionTransformer of TIMM_CASES[case] with random weights (all of them)."""
  torch = pytest.importorskip('torch')
  vision_transformer = pytest.importorskip('timm.models.vision_transformer')
  shapes, _, pool = TIMM_CASES[case]
  model = vision_transformer.VisionTransformer(
      img_size=img_size, patch_size=src.PATCH, embed_dim=src.D, depth=src.LAYERS,
      num_heads=src.HEADS, mlp_ratio=src.MLP / src.D, num_classes=CLASSES, global_pool=pool,
      class_token=shapes['cls'], no_embed_class=not shapes.get('embed_class', True),
      init_values=0.1 if shapes.get('layer_scale') else None,
      qkv_bias=shapes.get('qkv_bias', True), fc_norm=shapes.get('fc_norm')).eval()
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.5 * torch.randn(p.shape, generator=generator))
  return model


def _timm_logits(model, images):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()  # NHWC -> NCHW


@pytest.mark.parametrize('case', list(TIMM_CASES))
@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_timm_checkpoint_computes_what_timm_computes(tmp_path, case, suffix):
  model = _timm_model(case)
  import torch  # pylint: disable=g-import-not-at-top
  path = tmp_path / f'model{suffix}'
  if suffix == '.pth':
    torch.save({'state_dict': model.state_dict()}, path)
  else:
    safetensors_torch = pytest.importorskip('safetensors.torch')
    safetensors_torch.save_file(model.state_dict(), str(path))
  _, classifier, _ = TIMM_CASES[case]
  cfg = src.model_config(classifier, approximate_gelu=False,
                         pooled_norm=TIMM_CASES[case][0].get('fc_norm', False))
  params = load_pretrained(path, checkpoint_format='timm', model_config=cfg,
                           num_classes=CLASSES, image_size=IMG,
                           init_params=_init(cfg))
  images = src.images()
  _assert_same_logits(_logits(cfg, params, images), _timm_logits(model, images))


@pytest.mark.parametrize('case', ['token_layerscale', 'avg_fc_norm_no_qkv_bias'])
def test_timm_bicubic_resize_matches_timm_at_a_new_resolution(tmp_path, case):
  source = _timm_model(case)
  vision_transformer = pytest.importorskip('timm.models.vision_transformer')
  import torch  # pylint: disable=g-import-not-at-top
  torch.save(source.state_dict(), tmp_path / 'model.pth')
  bigger = _timm_model(case, img_size=24)  # A 6 x 6 grid from the 4 x 4 one.
  bigger.load_state_dict(vision_transformer.checkpoint_filter_fn(source.state_dict(), bigger))
  _, classifier, _ = TIMM_CASES[case]
  cfg = src.model_config(classifier, approximate_gelu=False,
                         pooled_norm=TIMM_CASES[case][0].get('fc_norm', False))
  params = load_pretrained(tmp_path / 'model.pth', checkpoint_format='timm', model_config=cfg,
                           num_classes=CLASSES, image_size=24, posemb_interpolation='bicubic',
                           init_params=_init(cfg, 24))
  images = src.images(size=24)
  _assert_same_logits(_logits(cfg, params, images), _timm_logits(bigger, images))


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_exported_npz_loads_into_timm_with_equal_logits(tmp_path, classifier):
  pytest.importorskip('torch')
  vision_transformer = pytest.importorskip('timm.models.vision_transformer')
  cfg = src.model_config(classifier, approximate_gelu=False)  # timm computes exact GELU.
  params = helpers.random_variables(models.build_model(cfg, CLASSES), src.images())['params']
  export_vit_jax(params, cfg, tmp_path / 'exported.npz')
  model = vision_transformer.VisionTransformer(
      img_size=IMG, patch_size=src.PATCH, embed_dim=src.D, depth=src.LAYERS, num_heads=src.HEADS,
      mlp_ratio=src.MLP / src.D, num_classes=CLASSES, class_token=classifier == 'token',
      global_pool='token' if classifier == 'token' else 'avg', fc_norm=False).eval()
  vision_transformer._load_weights(model, str(tmp_path / 'exported.npz'))  # timm's npz loader.
  images = src.images()
  _assert_same_logits(_timm_logits(model, images), _logits(cfg, params, images))
