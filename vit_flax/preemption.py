"""Stop requests: SIGTERM and SIGINT end a run at the next dispatch boundary, after a save.

SIGTERM is what Colab's stop button, a Cloud TPU maintenance event and SLURM's preemption send;
SIGINT is Ctrl-C. In one process, a handler records the first one and a second Ctrl-C interrupts
at once. In a multi-process job SIGTERM goes to JAX's preemption service (which
`jax.distributed` starts and orbax's `CheckpointManager.reached_preemption` also asks): it tells
every process to stop at the same dispatch. Ctrl-C in any process stops them all there too.
"""

import signal
import threading

from absl import logging
import jax

from vit_flax import multihost


class StopRequests:
  """`requested(dispatch)`, at each dispatch boundary (in every process): whether to stop now.

  Use as a context manager around the train loop; `signal` names what asked (None before).
  """

  def __init__(self):
    self.signal = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name
    logging.warning('%s received: stopping after the current dispatch (Ctrl-C again to abort).',
                    self.signal)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, dispatch: int) -> bool:
    """Whether to save and stop after dispatch number `dispatch` (counted from 1 in this run)."""
    if jax.process_count() == 1:
      return self.signal is not None
    if multihost.any_process(self.signal is not None):
      self.signal = self.signal or 'SIGINT (another process)'
    elif multihost.preemption_reached(dispatch):
      self.signal = 'SIGTERM (preemption)'
    return self.signal is not None

  def __enter__(self) -> 'StopRequests':
    if threading.current_thread() is threading.main_thread():
      # Several processes: SIGTERM stays with JAX's preemption service (see the module docstring).
      signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
