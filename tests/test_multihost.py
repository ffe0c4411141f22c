"""Multi-process JAX on localhost: 2 processes x 1 CPU device against 1 process x 2 devices."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from vit_flax import multihost
from vit_flax import rundir

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / 'configs' / 'tiny.py')
# The subprocesses get the same cheap compiles as this process (tests/conftest.py).
FAST_XLA = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir, devices, *flags, process=None, log=None):
  """`python -m vit_flax.main` on the tiny config with `devices` CPU devices, as a Popen."""
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_XLA}')
  args = [sys.executable, '-m', 'vit_flax.main', f'--config={TINY}', f'--workdir={workdir}', *flags]
  if process is not None:
    port, index, count = process
    args += [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={count}',
             f'--process_id={index}']
  return subprocess.Popen(args, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _two_processes(workdir, *flags, logs=(None, None)):
  port = _free_port()
  return [_start(workdir, 1, *flags, process=(port, i, 2), log=logs[i]) for i in range(2)]


def _finish(procs, timeout=600):
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, (out or '')[-3000:]


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  _finish([_start(one, 2)])  # The reference: 1 process x 2 devices.
  _finish(_two_processes(two))
  reference, summary = _summary(one), _summary(two)
  assert abs(summary['test_loss'] - reference['test_loss']) <= 1e-5
  assert summary['processes'] == 2 and summary['devices'].startswith('2 x')
  assert summary['segments'] == [{'start_step': 0, 'end_step': 40, 'devices': 2,
                                  'processes': 2, 'device_kind': 'cpu'}]
  # Only the primary process writes the run's files: each record once, the lock released.
  steps = [r['step'] for r in rundir.read_metrics(str(two)) if 'train_loss' in r]
  assert steps == [10, 20, 30, 40] and not (two / '.lock').exists()

  # The 2-process job's step-30 checkpoint, resumed in a single process on one device.
  resumed = tmp_path / 'resumed'
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '40')
  (resumed / 'summary.json').unlink()
  _finish([_start(resumed, 1)])
  summary = _summary(resumed)
  assert abs(summary['test_loss'] - reference['test_loss']) <= 1e-5
  assert [(s['start_step'], s['end_step'], s['processes'], s['devices'])
          for s in summary['segments']] == [(0, 30, 2, 2), (30, 40, 1, 1)]
  assert [r['step'] for r in rundir.read_metrics(str(resumed)) if 'train_loss' in r] == [
      10, 20, 30, 40]
  assert len([f for f in os.listdir(resumed) if f.startswith('events.out.tfevents.')]) == 1


def test_sigterm_to_the_job_saves_at_one_step_in_every_process(tmp_path):
  """SIGTERM (a preemption) reaches JAX's preemption service: all stop at one step, after a save."""
  workdir = tmp_path / 'run'
  logs = [open(tmp_path / f'p{i}.log', 'w') for i in range(2)]
  procs = _two_processes(workdir, '--config.num_training_steps=4000',
                         '--config.checkpoint_steps=2000', logs=logs)
  deadline = time.time() + 300
  while 'step 10/4000' not in (tmp_path / 'p0.log').read_text():
    assert time.time() < deadline and all(p.poll() is None for p in procs), 'no training'
    time.sleep(0.5)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  _finish(procs)
  outputs = [(tmp_path / f'p{i}.log').read_text() for i in range(2)]
  stops = [[line for line in out.splitlines() if line.startswith('Stopped by')] for out in outputs]
  assert all(len(s) == 1 for s in stops) and stops[0] == stops[1], stops
  step = int(stops[0][0].split(' at step ')[1].split('/')[0])
  assert 10 <= step < 4000 and os.listdir(workdir / 'checkpoints') == [str(step)]
  assert 'Traceback' not in outputs[0] + outputs[1]


@pytest.mark.parametrize('flags, message', [
    (('127.0.0.1:1234', None, None), 'go together'),
    (('localhost', 2, 0), 'must be HOST:PORT'),
    (('127.0.0.1:1234', 0, 0), '--num_processes must be >= 1'),
    (('127.0.0.1:1234', 2, 2), r'--process_id must be in \[0, 2\)'),
])
def test_bad_multiprocess_flags_are_one_line_errors(flags, message):
  with pytest.raises(multihost.DistributedConfigError, match=message) as info:
    multihost.check_flags(*flags)
  assert '\n' not in str(info.value)
  assert not multihost.check_flags(None, None, None)
