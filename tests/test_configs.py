"""Every configs/*.py loads, validates and builds its model (abstractly); bad ones fail clearly."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from vit_flax import train
from vit_flax import vit

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if not p.stem.startswith('_'))
PAIRS = [n[:-3] for n in CONFIGS if n.endswith('_tl') and n[:-3] + '_vit' in CONFIGS]
TOKENLEARNER_KEYS = {'num_tokens', 'tokenlearner_loc', 'use_v11', 'use_tokenfuse'}


def load(name: str):
  """Imports configs/NAME.py as a module (the way config_flags does, by path)."""
  spec = importlib.util.spec_from_file_location(f'configs_{name}', CONFIG_DIR / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_expected_configs_exist():
  for name in ('mnist_vit', 'mnist_tl', 'fashion_mnist_vit', 'fashion_mnist_tl', 'cifar10_vit',
               'cifar10_tl', 'imagenet_tl_b16', 'tiny'):
    assert name in CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates_and_builds(name):
  config = load(name).get_config()
  train.validate_config(config, num_devices=8)
  shape = train.known_image_shape(config)
  num_classes = train.KNOWN_DATASETS[config.dataset_name][1]
  model = vit.build_model(config.model, num_classes, dtype=train.DTYPES[config.model_dtype_str])
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                                                train=False))
  assert variables['params']['output_projection']['kernel'].shape[-1] == num_classes
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *shape))), variables)
  assert logits.shape == (2, num_classes)
  # The optimizer and schedule build for this config too.
  train.make_optimizer(config, train.total_train_steps(config, 50_000))


@pytest.mark.parametrize('name', CONFIGS)
def test_docstring_is_a_runbook(name):
  doc = load(name).__doc__
  assert f'python -m vit_flax.main --config=configs/{name}.py' in doc
  assert 'accuracy' in doc.lower() and 'time' in doc.lower()


@pytest.mark.parametrize('base', PAIRS)
def test_vit_and_tl_pairs_differ_only_in_tokenlearner(base):
  flat = lambda c: ml_collections.ConfigDict(c).to_dict()
  vit_cfg, tl_cfg = flat(load(base + '_vit').get_config()), flat(load(base + '_tl').get_config())
  assert tl_cfg['model']['tokenizer'].pop('type') == 'dynamic'
  assert vit_cfg['model']['tokenizer'].pop('type') == 'patch'
  for key in TOKENLEARNER_KEYS:
    tl_cfg['model']['tokenizer'].pop(key)
  del vit_cfg['experiment_name'], tl_cfg['experiment_name']
  assert vit_cfg == tl_cfg


def test_imagenet_config_is_scenics():
  config = load('imagenet_tl_b16').get_config()
  assert config.lr_configs.total_steps == 28_080
  assert (config.batch_size, config.optimizer, config.optimizer_configs.weight_decay) == \
      (4096, 'adam', 0.3)
  assert (config.init_head_bias, config.loss, config.max_grad_norm) == (-10.0, 'sigmoid', 1.0)
  tok = config.model.tokenizer
  assert (tok.num_tokens, tok.tokenlearner_loc, tok.use_v11, tok.use_tokenfuse) == \
      (16, 9, True, False)


def _tiny(changes=None):
  """The tiny config with {'dotted.key': value} changes (new keys allowed: it is unlocked)."""
  config = load('tiny').get_config()
  for path, value in (changes or {}).items():
    *parents, key = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[key] = value
  return config


@pytest.mark.parametrize('changes,message', [
    ({'learning_rate': 0.1}, "unknown key 'learning_rate'"),
    ({'model.hiden_size': 8}, 'hiden_size'),
    ({'model.tokenizer.num_tokenz': 8}, 'num_tokenz'),
    ({'optimizer_configs.momentum': 0.9}, "optimizer_configs.momentum is not read by optimizer"),
    ({'lr_configs.end_learning_rate': 0.0}, 'lr_configs.end_learning_rate is not read'),
    ({'lr_configs.factors': 'constant*exp_decay'}, 'unknown factors'),
    ({'lr_configs.warmup_steps': None}, "warmup_steps is needed by factor 'linear_warmup'"),
    ({'dataset_configs.crop_pad': 2}, 'dataset_configs.crop_pad'),
    ({'optimizer': 'lamb'}, 'optimizer must be one of'),
    ({'loss': 'hinge'}, 'loss must be'),
    ({'model.tokenizer.patches.size': [5, 5]}, 'not divisible by the patch size'),
    ({'model.tokenizer.tokenlearner_loc': 7}, 'tokenlearner_loc'),
    ({'batch_size': 0}, 'batch_size must be a positive int'),
])
def test_bad_configs_give_one_line_errors(changes, message):
  config = _tiny(changes)
  with pytest.raises(ValueError, match='Invalid config') as info:
    train.validate_config(config, num_devices=1)
  assert message in str(info.value)
  assert '\n' not in str(info.value)


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ValueError, match='batch_size=30 is not divisible by the 8 devices'):
    train.validate_config(_tiny({'batch_size': 30}), num_devices=8)
  with pytest.raises(ValueError, match='eval_batch_size=100 is not divisible by the 8 devices'):
    train.validate_config(_tiny({'eval_batch_size': 100}), num_devices=8)
  train.validate_config(_tiny({'batch_size': 30}), num_devices=2)


def test_duration_prefers_steps_over_epochs():
  config = _tiny()
  config.num_training_epochs = 3
  assert train.total_train_steps(config, 1000) == 40
  config.num_training_steps = None
  assert train.total_train_steps(config, 1000) == 3 * (1000 // 32)
