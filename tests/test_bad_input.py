"""Bad input is one line, before anything compiles: a table of bad inputs to `vit_flax.main`
(config values and keys, the command line, multi-process flags, data, the workdir), `visualize`,
`benchmark` and `compare`, each run in-process while a JAX monitoring listener watches for
compilation; then a few commands end to end for the exit status and the single stderr line.
"""

from collections.abc import Callable
import contextlib
import dataclasses
import gzip
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import CONFIG_DIR, tiny_config
from vit_flax import benchmark
from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import compare
from vit_flax import config as config_lib
from vit_flax import config_files
from vit_flax import input_pipeline
from vit_flax import models
from vit_flax import multihost
from vit_flax import rundir
from vit_flax import train
from vit_flax import visualize

ROOT = pathlib.Path(__file__).resolve().parent.parent
# JAX's monitoring events (jax/_src/dispatch.py): lowering to MLIR, then XLA's compile (recorded
# on persistent-cache hits too, so a cached program still counts).
LOWERING_EVENT = '/jax/core/compile/jaxpr_to_mlir_module_duration'
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
# The two one-op programs `jax.random.key(0)` compiles when called outside a trace, as
# `checkpoints.size_of` and `models.check_model` do before any data loads. Tolerated here until
# they make the key inside `jax.eval_shape`; `test_not_even_a_prng_key_compiles` tracks that.
PRNG_KEY_PROGRAMS = ('jit(stage)', 'jit(_threefry_seed)')
ConfigError = config_lib.ConfigError
DataError = input_pipeline.DataError


@contextlib.contextmanager
def _compiled_programs():
  """The names of the programs JAX lowers or compiles inside the block.

  JAX's caches are cleared first, so a program an earlier test compiled counts again.
  """
  programs = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs
    if event in (LOWERING_EVENT, BACKEND_COMPILE_EVENT):
      programs.append(kwargs.get('fun_name', '?'))

  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield programs
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """A uint8 IDX file (gzipped when the name ends in .gz), as the MNIST files are."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>i4').tobytes()
  with (gzip.open if path.suffix == '.gz' else open)(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _fake_run(workdir: pathlib.Path) -> pathlib.Path:
  """A run directory of the tiny model: config.json and a step-2 checkpoint of zero parameters,
  written without training (nothing compiles)."""
  config = config_lib.resolve(tiny_config())
  model = models.build_model(config.model, 10)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)),
                                               train=False))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract['params'])
  workdir.mkdir(parents=True)
  rundir.write_config(config, str(workdir))
  manager = checkpoints.make_manager(str(workdir), None, asynchronous=False)
  manager.save(2, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      meta=ocp.args.JsonSave(dict(checkpoints.model_meta(config), step=2))), force=True)
  manager.close()
  return workdir


def _edit_config_json(workdir: pathlib.Path, key: str, value: Any) -> pathlib.Path:
  """Sets the dotted `key` of WORKDIR/config.json to `value`, as a hand edit would."""
  path = workdir / 'config.json'
  config = json.loads(path.read_text())
  *parents, last = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[last] = value
  path.write_text(json.dumps(config))
  return workdir


@dataclasses.dataclass
class Env:
  """What a case builds its bad input in: a fresh directory and a pristine run to copy."""
  tmp: pathlib.Path
  pristine_run: pathlib.Path

  @property
  def workdir(self) -> str:
    return str(self.tmp / 'run')

  def config(self, **changes: Any) -> ml_collections.ConfigDict:
    """The tiny config with {'a__b': value} changes for the dotted key a.b (any value type)."""
    config = tiny_config().to_dict()
    for key, value in changes.items():
      *parents, last = key.split('__')
      node = config
      for parent in parents:
        node = node.setdefault(parent, {})
      node[last] = value
    return ml_collections.ConfigDict(config)

  def train(self, **changes: Any) -> None:
    train.train_and_evaluate(self.config(**changes), self.workdir)

  def dir(self, name: str) -> str:
    path = self.tmp / name
    path.mkdir(exist_ok=True)
    return str(path)

  def file(self, name: str, text: str) -> str:
    path = self.tmp / name
    path.write_text(text)
    return str(path)

  def idx(self, *, num_train: int = 30, truncate: str | None = None,
          label: int | None = None, magic: bool = False) -> dict[str, Any]:
    """dataset_configs changes naming a directory of Fashion-MNIST-format IDX files (train
    gzipped, test raw), with one file truncated, one test label set to `label`, or a bad magic."""
    directory = pathlib.Path(self.dir('idx'))
    rng = np.random.default_rng(0)
    for split, n, suffix in (('train', num_train, '.gz'), ('test', 10, '')):
      images_name, labels_name = input_pipeline.IDX_FILES[split]
      labels = np.arange(n) % 10
      if split == 'test' and label is not None:
        labels[-1] = label
      _write_idx(directory / (images_name + suffix), rng.integers(0, 256, (n, 28, 28)))
      _write_idx(directory / (labels_name + suffix), labels)
    if truncate:
      path = directory / truncate
      path.write_bytes(path.read_bytes()[:-100])
    if magic:
      path = directory / 't10k-labels-idx1-ubyte'
      path.write_bytes(b'\x00\x00\x0d\x01' + path.read_bytes()[4:])
    return dict(dataset_name='fashion_mnist', dataset_configs__data_dir=self.dir('tfds'),
                dataset_configs__idx_dir=str(directory), dataset_configs__validation_size=6)

  def run(self) -> str:
    """A copy of the pristine run directory (config.json and a checkpoint)."""
    shutil.copytree(self.pristine_run, self.tmp / 'viz')
    return str(self.tmp / 'viz')

  def busy_workdir(self) -> str:
    """The workdir, locked by a live process (stopped when the test ends)."""
    holder = subprocess.Popen(['sleep', '60'])
    self.stop = holder
    os.makedirs(self.workdir, exist_ok=True)
    pathlib.Path(self.workdir, '.lock').write_text(
        json.dumps({'pid': holder.pid, 'host': socket.gethostname()}))
    return self.workdir


def _broken_config(env: Env, body: str) -> list[str]:
  return ['main', f'--config={env.file("broken.py", body)}']


def _viz(env: Env, **flags: Any) -> None:
  """visualize's flag check on a copy of the pristine run, unless `workdir` is given."""
  workdir = flags.pop('workdir') if 'workdir' in flags else env.run()
  visualize.check_flags(workdir, **flags)


def _viz_config_json_broken(env: Env) -> None:
  workdir = env.run()
  pathlib.Path(workdir, 'config.json').write_text('{"model": ')
  _viz(env, workdir=workdir)


def _viz_without_checkpoint(env: Env) -> None:
  workdir = env.dir('no_checkpoint')
  shutil.copy(env.pristine_run / 'config.json', workdir)
  _viz(env, workdir=workdir)


def _workdir_is_a_file(env: Env) -> None:
  env.file('run', '')
  env.train()


def _checkpoints_is_a_file(env: Env) -> None:
  os.makedirs(env.workdir)
  pathlib.Path(env.workdir, 'checkpoints').write_text('not a directory')
  env.train()


def _compare_with_unusable_second_run(env: Env) -> None:
  (env.tmp / 'b').mkdir()
  (env.tmp / 'b' / 'best').write_text('not a directory')
  compare.run_configs([('a', env.config()), ('b', env.config())], env.tmp)


def _compare_flags(**flags: Any) -> None:
  args = dict(config_given=True, configs=[], num_tokens=[], tokenlearner_locs=[],
              target_accuracy=0.98, min_time_s=10.0)
  compare.check_flags(**{**args, **flags})


def _benchmark_flags(**flags: Any) -> None:
  args = dict(config_given=False, preset='mnist', min_time_s=10.0, windows=5, steps_per_call=4,
              json_path=None)
  benchmark.check_flags(**{**args, **flags})


def _without_learner(env: Env) -> ml_collections.ConfigDict:
  return env.config(model__tokenizer__type='patch', model__tokenizer__tokenlearner_loc=None)


def _configs_dir(env: Env) -> str:
  """A directory with a tiny.py of its own (the same name as the shipped one)."""
  return env.file('tiny.py', (CONFIG_DIR / 'tiny.py').read_text())


@dataclasses.dataclass
class Case:
  id: str
  call: Callable[[Env], Any]
  error: type[BaseException]
  fragment: str
  loads_data: bool = False  # The error comes from the data: check that training did not start.


TINY = str(CONFIG_DIR / 'tiny.py')
CASES = [
    # ---- main: config values, types and keys (config.resolve, inside train_and_evaluate).
    Case('batch_size_zero', lambda e: e.train(batch_size=0), ConfigError,
         'batch_size must be a positive int or None, got 0'),
    Case('batch_size_string', lambda e: e.train(batch_size='32'), ConfigError,
         "batch_size must be a positive int or None, got '32'"),
    Case('batch_size_over_devices', lambda e: config_lib.resolve(
        e.config(batch_size=30), num_devices=8), ConfigError,
         'batch_size=30 is not divisible by the 8 devices'),
    Case('microbatch', lambda e: e.train(microbatch_size=5), ConfigError,
         'microbatch_size=5 does not divide batch_size=32'),
    Case('learning_rate_negative', lambda e: e.train(lr_configs__base_learning_rate=-1e-3),
         ConfigError, 'lr_configs.base_learning_rate must be a finite number > 0'),
    Case('learning_rate_nan', lambda e: e.train(lr_configs__base_learning_rate=float('nan')),
         ConfigError, 'base_learning_rate must be a finite number > 0, got nan'),
    Case('optimizer_unknown', lambda e: e.train(optimizer='lamb'), ConfigError,
         "optimizer must be one of ['adam', 'adamw', 'sgd'], got 'lamb'"),
    Case('beta1_range', lambda e: e.train(optimizer_configs__beta1=1.5), ConfigError,
         'optimizer_configs.beta1 must be in [0, 1), got 1.5'),
    Case('heads_do_not_divide', lambda e: e.train(model__num_heads=3), ConfigError,
         'not divisible by num_heads'),
    Case('learner_past_the_blocks', lambda e: e.train(model__tokenizer__tokenlearner_loc=7),
         ConfigError, 'tokenlearner_loc must be in [0, '),
    Case('learner_without_place', lambda e: e.train(model__tokenizer__tokenlearner_loc=None),
         ConfigError, "tokenlearner_loc is needed by tokenizer.type 'dynamic'"),
    Case('patch_does_not_divide', lambda e: e.train(model__tokenizer__patches__size=(5, 5)),
         ConfigError, 'not divisible by the patch size'),
    Case('model_name_unknown', lambda e: e.train(model={'name': 'vitt'}), ConfigError,
         "model.name must be one of ['cait', 'deit', 'mixer', 'swin', 'vit', 'xcit'], got 'vitt'"),
    Case('ema_decay_one', lambda e: e.train(ema_decay=1.0), ConfigError,
         'ema_decay must be in (0, 1) or None, got 1.0'),
    Case('crop_padding_negative', lambda e: e.train(dataset_configs__crop_padding=-2),
         ConfigError, 'dataset_configs.crop_padding must be an int >= 0, got -2'),
    Case('no_duration', lambda e: e.train(num_training_steps=None), ConfigError,
         'set num_training_steps or a positive num_training_epochs'),
    Case('dataset_name_empty', lambda e: e.train(dataset_name=''), ConfigError,
         "dataset_name must be a TFDS name, got ''"),
    Case('teacher_not_a_run', lambda e: e.train(distillation={'teacher_workdir': e.dir('t')}),
         ConfigError, 'is not a vit_flax run directory (it has no config.json)'),
    Case('unknown_key', lambda e: e.train(bach_size=32), ConfigError,
         'unknown key bach_size (did you mean batch_size?)'),
    Case('unknown_nested_key', lambda e: e.train(model__hiden_size=16), ConfigError,
         'unknown key model.hiden_size (did you mean model.hidden_size?)'),
    Case('unknown_lr_factor', lambda e: e.train(lr_configs__factors='constant*exp_decay'),
         ConfigError, "lr_configs.factors has unknown factors ['exp_decay']"),
    # ---- main: the command line (config files and overrides, before flags are parsed).
    Case('config_missing', lambda e: config_files.check_command_line(
        ['main', f'--config={e.tmp / "nope.py"}']), ConfigError, 'nope.py not found'),
    Case('config_raises', lambda e: config_files.check_command_line(_broken_config(
        e, 'def get_config():\n  return undefined_name\n')), ConfigError,
         "failed to load: NameError: name 'undefined_name' is not defined"),
    Case('config_syntax', lambda e: config_files.check_command_line(_broken_config(
        e, 'def get_config(:\n')), ConfigError, 'failed to load: SyntaxError'),
    Case('config_without_get_config', lambda e: config_files.check_command_line(
        _broken_config(e, 'x = 1\n')), ConfigError, 'failed to load: AttributeError'),
    Case('override_close_match', lambda e: config_files.check_command_line(
        ['main', f'--config={TINY}', '--config.model.hiden_size=3']), ConfigError,
         'Unknown override --config.model.hiden_size (did you mean --config.model.hidden_size?)'),
    Case('override_into_a_value', lambda e: config_files.check_command_line(
        ['main', f'--config={TINY}', '--config.batch_size.x=3']), ConfigError,
         'config.batch_size is not a section'),
    Case('override_not_in_the_file', lambda e: config_files.check_command_line(
        ['main', f'--config={TINY}', '--config.dataset_configs.data_dir=/d']), ConfigError,
         '--config.dataset_configs.data_dir (config.dataset_configs has no such key)'),
    # ---- main: multi-process flags.
    Case('processes_partial', lambda e: multihost.check_flags('127.0.0.1:1234', None, None),
         multihost.DistributedConfigError, 'go together: give all three'),
    Case('coordinator_no_port', lambda e: multihost.check_flags('localhost', 2, 0),
         multihost.DistributedConfigError, '--coordinator_address must be HOST:PORT'),
    Case('processes_zero', lambda e: multihost.check_flags('127.0.0.1:1234', 0, 0),
         multihost.DistributedConfigError, '--num_processes must be >= 1, got 0'),
    Case('process_id_range', lambda e: multihost.check_flags('127.0.0.1:1234', 2, 2),
         multihost.DistributedConfigError, '--process_id must be in [0, 2), got 2'),
    # ---- main: data (input_pipeline.load_dataset, inside train_and_evaluate).
    Case('data_dir_missing', lambda e: e.train(dataset_configs__data_dir=str(e.tmp / 'no')),
         DataError, 'dataset_configs.data_dir={tmp}/no does not exist', loads_data=True),
    Case('idx_dir_missing', lambda e: e.train(dataset_configs__idx_dir=str(e.tmp / 'no')),
         DataError, 'dataset_configs.idx_dir={tmp}/no does not exist', loads_data=True),
    Case('data_dir_empty', lambda e: e.train(dataset_configs__data_dir=e.dir('tfds')),
         DataError, "data_dir={tmp}/tfds holds no prepared 'mnist'", loads_data=True),
    Case('idx_dir_without_files', lambda e: e.train(
        dataset_configs__data_dir=e.dir('tfds'), dataset_configs__idx_dir=e.dir('empty')),
         DataError, 'holds no complete set of IDX files', loads_data=True),
    Case('idx_truncated', lambda e: e.train(**e.idx(truncate='t10k-images-idx3-ubyte')),
         DataError, 'is truncated or corrupt: its header promises 7,840 bytes of data, the file '
         'holds 7,740', loads_data=True),
    Case('idx_not_uint8', lambda e: e.train(**e.idx(magic=True)), DataError,
         't10k-labels-idx1-ubyte is not a uint8 IDX file (magic 00000d01)', loads_data=True),
    Case('labels_outside_the_classes', lambda e: e.train(**e.idx(label=12)), DataError,
         '1 test labels outside [0, 10), e.g. 12', loads_data=True),
    Case('validation_larger_than_train', lambda e: e.train(
        **{**e.idx(), 'dataset_configs__validation_size': 30}), DataError,
         'validation_size=30 must be in [0, 30)', loads_data=True),
    Case('batch_larger_than_train', lambda e: e.train(**e.idx(num_train=20)), ConfigError,
         'batch_size=32 exceeds the 14 training examples', loads_data=True),
    # ---- main: the workdir.
    Case('workdir_is_a_file', _workdir_is_a_file, OSError, 'Cannot create workdir {tmp}/run'),
    Case('checkpoints_is_a_file', _checkpoints_is_a_file, OSError,
         '{tmp}/run/checkpoints exists and is not a directory'),
    Case('workdir_in_use', lambda e: train.train_and_evaluate(e.config(), e.busy_workdir()),
         rundir.WorkdirBusyError, 'is in use by process'),
    # ---- visualize.
    Case('viz_no_workdir', lambda e: _viz(e, workdir=None), cli.FlagError,
         '--workdir is required'),
    Case('viz_workdir_missing', lambda e: _viz(e, workdir=str(e.tmp / 'no')), cli.FlagError,
         'is not a directory'),
    Case('viz_no_config_json', lambda e: _viz(e, workdir=e.dir('plain')), cli.FlagError,
         'has no config.json: is it a vit_flax run directory?'),
    Case('viz_config_json_broken', _viz_config_json_broken, cli.FlagError,
         '{tmp}/viz/config.json cannot be read as JSON'),
    Case('viz_no_checkpoint', _viz_without_checkpoint, cli.FlagError,
         'No last checkpoint in {tmp}/no_checkpoint/checkpoints'),
    Case('viz_num_images', lambda e: _viz(e, num_images=0), cli.FlagError,
         '--num_images must be >= 1, got 0'),
    Case('viz_split', lambda e: _viz(e, split='validation'), cli.FlagError,
         "--split must be one of train, valid, test, got 'validation'"),
    Case('viz_head_fusion', lambda e: _viz(e, head_fusion='avg'), cli.FlagError,
         "--head_fusion must be one of mean, max, min, got 'avg'"),
    Case('viz_discard_ratio_one', lambda e: _viz(e, discard_ratio=1.0), cli.FlagError,
         '--discard_ratio must be in [0, 1), got 1'),
    Case('viz_discard_ratio_negative', lambda e: _viz(e, discard_ratio=-0.1), cli.FlagError,
         '--discard_ratio must be in [0, 1), got -0.1'),
    Case('viz_config_json_other_model', lambda e: visualize.write_plots(_edit_config_json(
        pathlib.Path(e.run()), 'model.hidden_size', 32)), checkpoints.CheckpointMismatchError,
         'describes another model than checkpoint step 2 holds (changed: hidden_size)'),
    Case('viz_config_json_bad_value', lambda e: visualize.write_plots(_edit_config_json(
        pathlib.Path(e.run()), 'model.num_heads', 3)), ConfigError, 'not divisible by num_heads'),
    # ---- benchmark.
    Case('bench_config_and_preset', lambda e: _benchmark_flags(config_given=True),
         cli.FlagError, 'Give exactly one of --config and --preset'),
    Case('bench_neither', lambda e: _benchmark_flags(preset=None), cli.FlagError,
         'Give exactly one of --config and --preset'),
    Case('bench_min_time', lambda e: _benchmark_flags(min_time_s=0.0), cli.FlagError,
         '--min_time_s must be > 0, got 0'),
    Case('bench_windows', lambda e: _benchmark_flags(windows=0), cli.FlagError,
         '--windows must be >= 1, got 0'),
    Case('bench_steps_per_call', lambda e: _benchmark_flags(steps_per_call=-1), cli.FlagError,
         '--steps_per_call must be >= 1, got -1'),
    Case('bench_json_dir_missing', lambda e: _benchmark_flags(
        json_path=str(e.tmp / 'no' / 'r.json')), cli.FlagError, 'no does not exist'),
    Case('bench_json_is_a_dir', lambda e: _benchmark_flags(json_path=e.dir('out')),
         cli.FlagError, 'is a directory; give a file name'),
    Case('bench_override_without_config', lambda e: cli.check_overrides_need_config(
        ['benchmark', '--preset=mnist', '--config.batch_size=8']), cli.FlagError,
         '--config.batch_size overrides a --config file, and none is given'),
    Case('bench_second_model_bad', lambda e: benchmark.run_benchmark(
        _without_learner(e), (28, 28, 1), 10), ConfigError,
         "tokenlearner_loc is needed by tokenizer.type 'dynamic'"),
    # ---- compare.
    Case('compare_config_and_configs', lambda e: _compare_flags(configs=['a.py']),
         cli.FlagError, 'Give exactly one of --config'),
    Case('compare_neither', lambda e: _compare_flags(config_given=False), cli.FlagError,
         'Give exactly one of --config'),
    Case('compare_num_tokens_word', lambda e: _compare_flags(num_tokens=['8', 'a']),
         cli.FlagError, "--num_tokens must be positive integers (e.g. 8,16), got 'a'"),
    Case('compare_num_tokens_zero', lambda e: _compare_flags(num_tokens=['0']), cli.FlagError,
         "--num_tokens must be positive integers (e.g. 8,16), got '0'"),
    Case('compare_loc_float', lambda e: _compare_flags(tokenlearner_locs=['1.5']),
         cli.FlagError, "--tokenlearner_loc must be block indices >= 0 (e.g. 1,2), got '1.5'"),
    Case('compare_target_zero', lambda e: _compare_flags(target_accuracy=0.0), cli.FlagError,
         '--target_accuracy must be in (0, 1], got 0'),
    Case('compare_target_percent', lambda e: _compare_flags(target_accuracy=98.0),
         cli.FlagError, '--target_accuracy must be in (0, 1], got 98'),
    Case('compare_min_time', lambda e: _compare_flags(min_time_s=float('inf')), cli.FlagError,
         '--min_time_s must be > 0, got inf'),
    Case('compare_sweep_with_configs', lambda e: _compare_flags(
        config_given=False, configs=['a.py'], num_tokens=['8']), cli.FlagError,
         '--num_tokens and --tokenlearner_loc sweep the TokenLearner of --config'),
    Case('compare_configs_empty_entry', lambda e: _compare_flags(
        config_given=False, configs=['a.py', '']), cli.FlagError, '--configs has an empty entry'),
    Case('compare_configs_missing', lambda e: compare.load_configs([TINY, 'none.py']),
         ConfigError, 'Config file none.py not found'),
    Case('compare_configs_broken', lambda e: compare.load_configs(
        [TINY, e.file('bad.py', 'def get_config():\n  return 1 / 0\n')]), ConfigError,
         'bad.py failed to load: ZeroDivisionError'),
    Case('compare_configs_same_name', lambda e: compare.load_configs([TINY, _configs_dir(e)]),
         ConfigError, "--configs names two configs 'tiny'"),
    Case('compare_sweep_point', lambda e: compare.run_comparison(
        e.config(), e.tmp, tokenlearner_locs=[1, 5]), ConfigError,
         'tokenlearner_loc must be in [0, '),
    Case('compare_sweep_without_place', lambda e: compare.run_comparison(
        _without_learner(e), e.tmp, num_tokens=[4]), ConfigError,
         "tokenlearner_loc is needed by tokenizer.type 'dynamic'"),
    Case('compare_family_without_learner', lambda e: compare.run_comparison(
        e.config(model={'name': 'mixer'}), e.tmp), ConfigError,
         "model.name 'mixer' has no TokenLearner option"),
    Case('compare_configs_second_bad', lambda e: compare.run_configs(
        [('a', e.config()), ('b', e.config(model__num_heads=3))], e.tmp), ConfigError,
         'not divisible by num_heads'),
    Case('compare_configs_run_dir_unusable', _compare_with_unusable_second_run, OSError,
         '{tmp}/b/best exists and is not a directory'),
]
assert len({c.id for c in CASES}) == len(CASES) >= 40


@pytest.fixture(scope='module')
def pristine_run(tmp_path_factory):
  return _fake_run(tmp_path_factory.mktemp('pristine') / 'run')


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_before_anything_compiles(case, tmp_path, pristine_run):
  env = Env(tmp_path, pristine_run)
  try:
    with _compiled_programs() as programs, pytest.raises(case.error) as info:
      case.call(env)
  finally:
    if hasattr(env, 'stop'):
      env.stop.kill()
      env.stop.wait()
  message = str(info.value)
  assert '\n' not in message and case.fragment.format(tmp=tmp_path) in message, message
  assert not set(programs) - set(PRNG_KEY_PROGRAMS), programs
  if case.loads_data:  # The trainer stopped at the data: no config.json, metrics or checkpoints.
    assert not any(os.path.exists(os.path.join(env.workdir, name))
                   for name in ('config.json', 'metrics.jsonl', 'checkpoints')), env.workdir


def test_the_listener_sees_a_compile():
  """The check above is not vacuous: a jitted function is lowered and compiled once each."""
  times_three = jax.jit(lambda x: x * 3)
  with _compiled_programs() as programs:
    times_three(np.float32(2.0)).block_until_ready()
  assert programs == ['jit(<lambda>)'] * 2


def test_not_even_a_prng_key_compiles(tmp_path):
  config = Env(tmp_path, tmp_path).config(dataset_configs__data_dir=str(tmp_path / 'none'))
  with _compiled_programs() as programs, pytest.raises(DataError):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not programs


def test_a_size_of_the_wrong_type_names_its_key(tmp_path):
  with pytest.raises(ConfigError, match='hidden_size must be a positive int'):
    train.train_and_evaluate(Env(tmp_path, tmp_path).config(model__hidden_size='16'),
                             str(tmp_path))


# ---- the commands end to end: exit status 1 and one stderr line, `Error: ...` ------------------


def _commands(pristine: pathlib.Path, tmp: pathlib.Path) -> dict[str, tuple[list[str], str]]:
  """{id: (`python -m` arguments, the expected start of the last stderr line)}."""
  edited = _edit_config_json(pathlib.Path(shutil.copytree(pristine, tmp / 'edited')),
                             'model.hidden_size', 32)
  missing_data = tmp / 'missing_data.py'
  missing_data.write_text(
      'from vit_flax import config_files\n\n\ndef get_config():\n'
      "  config = config_files.load_config_file('tiny.py')\n"
      f"  config.dataset_configs.data_dir = '{tmp / 'nowhere'}'\n  return config\n")
  return {
      'main_missing_data': (
          ['vit_flax.main', f'--config={missing_data}', f'--workdir={tmp / "run"}'],
          f'Error: dataset_configs.data_dir={tmp / "nowhere"} does not exist.'),
      'visualize_edited_run': (
          ['vit_flax.visualize', f'--workdir={edited}'],
          f'Error: {edited}/config.json describes another model than checkpoint step 2'),
      'benchmark_windows': (['vit_flax.benchmark', '--preset=mnist', '--windows=0'],
                            'Error: --windows must be >= 1, got 0.'),
      'compare_configs_missing': (['vit_flax.compare', '--configs=tiny.py,none.py'],
                                  'Error: Config file none.py not found.'),
      'export_tokenlearner_run': (
          ['vit_flax.export', f'--workdir={pristine}', f'--output={tmp / "vit.npz"}'],
          'Error: A vit_jax checkpoint cannot hold this model: a TokenLearner'),
  }


@pytest.fixture(scope='module', autouse=True)
def running_commands(pristine_run, tmp_path_factory):
  """{id: (process, expected stderr start)}: the commands, started before the first test so that
  they run beside the in-process cases."""
  tmp = tmp_path_factory.mktemp('commands')
  # JAX_PLATFORMS=cpu: JAX's INFO line about a missing TPU is no part of the error.
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  running = {
      name: (subprocess.Popen([sys.executable, '-m', *args], cwd=tmp, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE), message)
      for name, (args, message) in _commands(pristine_run, tmp).items()}
  yield running
  for process, _ in running.values():
    if process.poll() is None:
      process.kill()
      process.wait()


@pytest.mark.parametrize('command_id', [
    'main_missing_data', 'visualize_edited_run', 'benchmark_windows', 'compare_configs_missing',
    'export_tokenlearner_run'])
def test_command_fails_with_one_stderr_line(running_commands, command_id):
  """Exit status 1, no traceback; the last stderr line is the error. The tools print nothing else;
  main's trainer logs its INFO line about the run (devices, workdir) before it loads the data."""
  process, message = running_commands[command_id]
  stdout, stderr = process.communicate(timeout=300)
  lines = stderr.splitlines()
  assert lines and lines[-1].startswith(message) and 'Traceback' not in stderr, stderr[-2000:]
  expected = 2 if command_id.startswith('main') else 1
  assert len(lines) == expected and not any('Error' in line for line in lines[:-1]), stderr
  assert process.returncode == 1 and stdout == ''
