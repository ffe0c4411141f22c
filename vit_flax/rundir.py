"""A run directory's files besides checkpoints: config.json, metrics.jsonl (+ TensorBoard),
summary.json, the workdir lock and the checks that a workdir can hold a run.

Only the primary process of a multi-process job writes them (see `multihost`); checkpoints are in
`checkpoints`.
"""

import json
import os
import shutil
import socket
from typing import Any

from absl import logging
from flax import traverse_util
import ml_collections

from vit_flax import multihost


def changed_keys(old: Any, new: Any) -> list[str]:
  """The dotted keys whose values differ between two nested dicts."""
  flat_old = traverse_util.flatten_dict(old, sep='.') if isinstance(old, dict) else {'': old}
  flat_new = traverse_util.flatten_dict(new, sep='.') if isinstance(new, dict) else {'': new}
  return sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))


class MetricsLog:
  """WORKDIR/metrics.jsonl (one JSON object per line) plus clu TensorBoard scalars.

  metrics.jsonl is the record: on resume, what lies past the checkpoint (steps trained again) is
  dropped, and TensorBoard's event files are rewritten from it, so a resumed run is one
  TensorBoard run with the curves of an uninterrupted one. Only the primary process writes;
  elsewhere `write` does nothing.
  """

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if not multihost.is_primary():
      return
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    records = [r for r in self.records() if r['step'] <= resume_step and
               not any(k.startswith('test_') for k in r)]
    write_lines(self.path, [json.dumps(r) for r in records])
    for name in os.listdir(workdir):
      if name.startswith('events.out.tfevents.'):
        os.remove(os.path.join(workdir, name))
    self.writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    for r in records:
      self.writer.write_scalars(r['step'], _scalars(r))

  def records(self) -> list[dict[str, Any]]:
    return read_metrics(os.path.dirname(self.path))

  def write(self, step: int, wall_time_s: float, scalars: dict[str, float]) -> None:
    if self.writer is None:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'wall_time_s': round(wall_time_s, 3), **scalars}) + '\n')
    self.writer.write_scalars(step, scalars)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()


def _scalars(record: dict[str, Any]) -> dict[str, float]:
  return {k: v for k, v in record.items() if k not in ('step', 'wall_time_s') and
          isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_lines(path: str, lines: list[str]) -> None:
  """Writes `lines` to `path` atomically (a temporary file, then a rename)."""
  with open(path + '.tmp', 'w') as f:
    f.writelines(line + '\n' for line in lines)
  os.replace(path + '.tmp', path)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON atomically (a temporary file, then a rename)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(path + '.tmp', path)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json, warning when it replaces a different config of the same run."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != new:
      flat_old = traverse_util.flatten_dict(old, sep='.')
      flat_new = traverse_util.flatten_dict(new, sep='.')
      changed = sorted(k for k in set(flat_old) | set(flat_new)
                       if flat_old.get(k) != flat_new.get(k))
      logging.warning('config.json in %s differs from this config in %s; resuming anyway.',
                      workdir, changed)
  write_json(path, new)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl, one dict per line (empty if there is none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class WorkdirBusyError(RuntimeError):
  """Another live process is training in this workdir."""


class WorkdirLock:
  """WORKDIR/.lock, holding the pid and host of the process training there.

  Taking it fails with a one-line WorkdirBusyError naming the holder while that process lives; a
  lock left by a dead process on this host is taken over with a warning. Released on exit.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self.held = False

  def __enter__(self) -> 'WorkdirLock':
    me = {'pid': os.getpid(), 'host': socket.gethostname()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        holder = self._holder()
        if holder.get('host') == me['host'] and not _alive(holder.get('pid')):
          logging.warning('Taking over the stale lock %s of process %s, which is gone.',
                          self.path, holder.get('pid'))
          os.remove(self.path)
          continue
        raise WorkdirBusyError(
            f'{os.path.dirname(self.path)} is in use by process {holder.get("pid")} on '
            f'{holder.get("host")} (lock file {self.path}); use another --workdir, or delete the '
            'lock if that process is gone.') from None
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirBusyError(f'Could not take the lock {self.path}.')

  def _holder(self) -> dict[str, Any]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def __exit__(self, *exc) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False


def _alive(pid: Any) -> bool:
  """Whether process `pid` exists on this host."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def check_workdir(workdir: str, checkpoint_bytes: int = 0) -> None:
  """Raises a one-line OSError unless `workdir` can hold a run: creatable and writable,
  `checkpoints` and `best` directories if they exist, and room on its disk for two checkpoints
  of `checkpoint_bytes` (orbax writes the new one before deleting the oldest)."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(f'Cannot create workdir {workdir}: {e.strerror or e}.') from None
  if not os.path.isdir(workdir) or not os.access(workdir, os.W_OK):
    raise OSError(f'Cannot write to workdir {workdir}.')
  for name in ('checkpoints', 'best'):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and not os.path.isdir(path):
      raise OSError(f'{path} exists and is not a directory: move it away or pick another workdir.')
  free = shutil.disk_usage(workdir).free
  if free < 2 * checkpoint_bytes:
    raise OSError(f'{workdir} has {free / 2**20:,.0f} MiB free, less than two checkpoints need '
                  f'({2 * checkpoint_bytes / 2**20:,.0f} MiB): free some space or pick another '
                  'workdir.')


def time_to_accuracy(records: list[dict[str, Any]], thresholds: Any, batch_size: int
                     ) -> list[dict[str, Any]]:
  """For each threshold, the first validation (raw or EMA) at or above it: step, wall time and
  images seen, or None where it was never reached."""
  out = []
  for threshold in thresholds:
    hit = next((r for r in records
                if max(r.get('valid_accuracy', -1), r.get('valid_ema_accuracy', -1)) >= threshold),
               None)
    out.append({'accuracy': threshold, 'step': hit and hit['step'],
                'wall_time_s': hit and hit['wall_time_s'],
                'images_seen': hit and hit['step'] * batch_size})
  return out
