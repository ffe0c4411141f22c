"""Every configs/*.py loads, validates and builds its model (abstractly); bad ones fail clearly."""

import pathlib
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import pytest

from helpers import CONFIG_DIR
from vit_flax import config as config_lib
from vit_flax import config_files
from vit_flax import input_pipeline
from vit_flax import models
from vit_flax import optim

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if not p.stem.startswith('_'))
PAIRS = [n[:-3] for n in CONFIGS if n.endswith('_tl') and n[:-3] + '_vit' in CONFIGS]


def load(name: str) -> ml_collections.ConfigDict:
  """configs/NAME.py's config, loaded by path as config_flags does."""
  return config_files.load_config_file(CONFIG_DIR / f'{name}.py')


def test_expected_configs_exist():
  for name in ('mnist_vit', 'mnist_tl', 'fashion_mnist_vit', 'fashion_mnist_tl', 'cifar10_vit',
               'cifar10_tl', 'imagenet_tl_b16', 'tiny', 'moving_fashion_mnist_vit',
               'moving_fashion_mnist_tl', 'fashion_mnist_deit', 'fashion_mnist_cait',
               'fashion_mnist_mixer', 'fashion_mnist_xcit', 'fashion_mnist_swin'):
    assert name in CONFIGS


@pytest.fixture
def teacher_run(tmp_path, monkeypatch):
  """Runs in a directory where DeiT's teacher (runs/fashion_mnist_vit) exists, as after training."""
  (tmp_path / 'runs' / 'fashion_mnist_vit').mkdir(parents=True)
  (tmp_path / 'runs' / 'fashion_mnist_vit' / 'config.json').write_text('{}')
  monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates_and_builds(name, teacher_run):
  del teacher_run
  config = config_lib.resolve(load(name), num_devices=8)
  shape = input_pipeline.image_shape(config.dataset_name, config.dataset_configs)
  num_classes = input_pipeline.DATASETS[config.dataset_name].num_classes
  model = models.build_model(config.model, num_classes,
                                 dtype=config_lib.DTYPES[config.model_dtype_str])
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                                                train=False))
  assert variables['params']['output_projection']['kernel'].shape[-1] == num_classes
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *shape))), variables)
  assert logits.shape == (2, num_classes)
  # The optimizer and schedule build for this config too.
  optim.make_optimizer(config, config_lib.num_train_steps(config, 50_000))


@pytest.mark.parametrize('base', PAIRS)
def test_vit_and_tl_pairs_differ_only_in_tokenlearner(base):
  flat = lambda c: ml_collections.ConfigDict(c).to_dict()
  vit_cfg, tl_cfg = flat(load(base + '_vit')), flat(load(base + '_tl'))
  tl_type, vit_type = (c['model']['tokenizer'].pop('type') for c in (tl_cfg, vit_cfg))
  # Images: 'dynamic' against 'patch'; clips: 'video' both, the learner's place set or None.
  assert (tl_type, vit_type) in (('dynamic', 'patch'), ('video', 'video'))
  if tl_type == 'video':
    assert tl_cfg['model']['tokenizer']['tokenlearner_loc'] is not None
    assert vit_cfg['model']['tokenizer']['tokenlearner_loc'] is None
  for key in models.LEARNER_KEYS:  # Unread by a 'patch' model, so they may differ.
    tl_cfg['model']['tokenizer'].pop(key)
    vit_cfg['model']['tokenizer'].pop(key, None)
  del vit_cfg['experiment_name'], tl_cfg['experiment_name']
  assert vit_cfg == tl_cfg


def test_imagenet_config_is_scenics():
  config = load('imagenet_tl_b16')
  assert config.lr_configs.total_steps == 28_080
  assert (config.batch_size, config.optimizer, config.optimizer_configs.weight_decay) == \
      (4096, 'adam', 0.3)
  assert (config.init_head_bias, config.loss, config.max_grad_norm) == (-10.0, 'sigmoid', 1.0)
  tok = config.model.tokenizer
  assert (tok.num_tokens, tok.tokenlearner_loc, tok.use_v11, tok.use_tokenfuse) == \
      (16, 9, True, False)


def _tiny(changes=None):
  """The tiny config with {'dotted.key': value} changes, of any type (as a config file may set)."""
  config = load('tiny').to_dict()
  for path, value in (changes or {}).items():
    *parents, key = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[key] = value
  return ml_collections.ConfigDict(config)


@pytest.mark.parametrize('changes,message', [
    ({'learning_rate': 0.1}, 'unknown key learning_rate'),
    ({'model.hiden_size': 8}, 'unknown key model.hiden_size (did you mean model.hidden_size?)'),
    ({'model.tokenizer.num_tokenz': 8}, 'model.tokenizer.num_tokenz'),
    ({'optimizer_configs.momentum': 0.9}, 'unknown key optimizer_configs.momentum'),
    ({'lr_configs.end_learning_rate': 0.0}, 'unknown key lr_configs.end_learning_rate'),
    ({'lr_configs.factors': 'constant*exp_decay'}, 'unknown factors'),
    ({'lr_configs.warmup_steps': None}, "warmup_steps is needed by factor 'linear_warmup'"),
    ({'dataset_configs.crop_pad': 2}, 'dataset_configs.crop_pad'),
    ({'optimizer': 'lamb'}, 'optimizer must be one of'),
    ({'loss': 'hinge'}, 'loss must be'),
    ({'model.tokenizer.patches.size': (5, 5)}, 'not divisible by the patch size'),
    ({'model.tokenizer.tokenlearner_loc': 7}, 'tokenlearner_loc'),
    ({'batch_size': 0}, 'batch_size must be a positive int'),
    ({'batch_size': 32.0}, 'batch_size must be a positive int'),
    ({'lr_configs.base_learning_rate': -1e-3}, 'base_learning_rate must be a finite number > 0'),
    ({'lr_configs.base_learning_rate': '1e-3'}, 'base_learning_rate must be a finite number'),
    ({'lr_configs.base_learning_rate': float('nan')}, 'base_learning_rate must be a finite'),
    ({'lr_configs.base_learning_rate': float('inf')}, 'base_learning_rate must be a finite'),
    ({'lr_configs.warmup_steps': -5}, 'lr_configs.warmup_steps must be >= 0'),
    ({'optimizer_configs.beta1': 2.0}, 'optimizer_configs.beta1 must be in [0, 1)'),
    ({'optimizer_configs.beta2': -0.1}, 'optimizer_configs.beta2 must be in [0, 1)'),
    ({'optimizer_configs.weight_decay': -0.1}, 'weight_decay must be >= 0'),
    ({'optimizer_configs.epsilon': 0.0}, 'epsilon must be > 0'),
    ({'dataset_configs.crop_padding': -2}, 'crop_padding must be an int >= 0'),
    ({'dataset_configs.random_resized_crop': 1.5}, 'random_resized_crop must be in (0, 1]'),
    ({'dataset_configs.random_erasing': 1.5}, 'random_erasing must be a probability in [0, 1]'),
    ({'mixup_alpha': -1.0}, 'mixup_alpha must be >= 0'),
    ({'ema_decay': 1.0}, 'ema_decay must be in (0, 1)'),
    ({'label_smoothing': -0.1}, 'label_smoothing must be positive or None'),
    ({'max_grad_norm': 0.0}, 'max_grad_norm must be positive or None'),
    ({'model_dtype_str': 'float8'}, 'model_dtype_str must be one of'),
    ({'num_training_steps': None}, 'set num_training_steps or a positive num_training_epochs'),
    ({'model.num_heads': 3}, 'not divisible by num_heads'),
    ({'model.dropout_rate': 1.0}, 'dropout_rate must be in [0, 1)'),
    ({'model.classifier': 'map'}, 'unknown classifier'),
    ({'model.tokenizer.type': 'voxel'}, 'model.tokenizer.type must be one of'),
    ({'model.tokenizer.tokenlearner_loc': None}, 'tokenlearner_loc is needed'),
    ({'model.tokenizer.num_tokens': 0}, 'num_tokens must be >= 1'),
    ({'microbatch_size': 5}, 'microbatch_size=5 does not divide batch_size=32'),
])
def test_bad_configs_give_one_line_errors(changes, message):
  config = _tiny(changes)
  with pytest.raises(ValueError, match='Invalid config') as info:
    config_lib.resolve(config, num_devices=1)
  assert message in str(info.value)
  assert '\n' not in str(info.value)


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ValueError, match='batch_size=30 is not divisible by the 8 devices'):
    config_lib.resolve(_tiny({'batch_size': 30}), num_devices=8)
  with pytest.raises(ValueError, match='eval_batch_size=100 is not divisible by the 8 devices'):
    config_lib.resolve(_tiny({'eval_batch_size': 100}), num_devices=8)
  config_lib.resolve(_tiny({'batch_size': 30}), num_devices=2)


def test_command_line_errors_are_one_line(tmp_path, monkeypatch):
  tiny = str(CONFIG_DIR / 'tiny.py')
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  return undefined_name\n')
  cases = [
      (['p', f'--config={tmp_path / "missing.py"}'], 'missing.py not found'),
      (['p', f'--config={broken}'], "failed to load: NameError: name 'undefined_name'"),
      (['p', f'--config={tiny}', '--config.model.hiden_size=3'],
       'Unknown override --config.model.hiden_size (did you mean --config.model.hidden_size?)'),
      (['p', f'--config={tiny}', '--config.batch_size.x=3'], 'config.batch_size is not a section'),
  ]
  for argv, message in cases:
    with pytest.raises(config_lib.ConfigError) as info:
      config_files.check_command_line(argv)
    assert message in str(info.value) and '\n' not in str(info.value)
  monkeypatch.chdir(tmp_path)  # A shipped config by name, from any directory.
  argv = ['p', '--config=configs/tiny.py', '--config.model.hidden_size=32']
  out = config_files.check_command_line(argv)
  assert out[1] == f'--config={CONFIG_DIR / "tiny.py"}' and out[2] == argv[2]


def test_main_reports_a_missing_config_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'vit_flax.main', '--config=nope/none.py'],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == 'Error: Config file nope/none.py not found.'


def test_resolve_fills_defaults_once_and_locks():
  config = config_lib.resolve(_tiny({'eval_batch_size': None, 'checkpoint_steps': None}))
  assert config.eval_batch_size == config.batch_size == 32
  assert config.checkpoint_steps == config.log_eval_steps == 20
  assert config.model.attention_dropout_rate == 0.0  # Given in tiny.py.
  assert config.model.tokenizer.patches.size == (7, 7)
  assert config.optimizer_configs.epsilon == 1e-8  # A default the file does not set.
  assert config_lib.resolve(config).to_dict() == config.to_dict()  # Idempotent.
  with pytest.raises(AttributeError):  # Locked: a typo cannot add a key.
    config.bach_size = 3


@pytest.mark.parametrize('name', [n for n in CONFIGS if 'tokenizer' in load(n).model])
def test_patch_size_overrides_from_the_command_line(name, monkeypatch):
  """config_flags overrides tuple fields (it rejects list ones), as `main` parses them."""
  path = str(CONFIG_DIR / f'{name}.py')
  argv = ['prog', f'--config={path}', '--config.model.tokenizer.patches.size=(4,4)']
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads its overrides from sys.argv.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', path, flag_values=flag_values, lock_config=True)
  flag_values(argv)
  assert flag_values.config.model.tokenizer.patches.size == (4, 4)


def test_duration_prefers_steps_over_epochs():
  config = _tiny()
  config.num_training_epochs = 3
  assert config_lib.num_train_steps(config, 1000) == 40
  config.num_training_steps = None
  assert config_lib.num_train_steps(config, 1000) == 3 * (1000 // 32)
