"""One-line errors for the commands (`compare`, `benchmark`, `visualize`).

Bad input ends a command with `Error: ...` on stderr and exit status 1, before anything loads or
compiles: a flag absl cannot parse, a `--config` file that is missing or broken or an override of
a key it lacks (`config_files.check_command_line`), and each command's own flag checks, which
raise `FlagError`.
"""

from collections.abc import Callable, Sequence
import contextlib
import math
import os
import sys

from absl import app
from absl import flags

from vit_flax import config_files
from vit_flax.config import ConfigError


class FlagError(ValueError):
  """A flag value the command cannot run with; the message is one line."""


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """`app.run(main)` after checking --config and its overrides; every parse error is one line."""
  argv = list(sys.argv if argv is None else argv)
  try:
    if 'config' in flags.FLAGS:
      check_overrides_need_config(argv)
      argv = config_files.check_command_line(argv)
  except (ConfigError, FlagError) as e:
    sys.exit(f'Error: {e}')
  app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with an error as one line (absl prints it over two, with a hint)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'Error: {" ".join(str(e).split())}')


@contextlib.contextmanager
def errors_in_one_line(*kinds: type[BaseException]):
  """Ends the command with `Error: <message>` (exit status 1) on an exception of `kinds`."""
  try:
    yield
  except kinds as e:
    sys.exit(f'Error: {" ".join(str(e).split())}')


def check_overrides_need_config(argv: Sequence[str]) -> None:
  """Raises FlagError for `--config.x=...` overrides without a `--config=` file to apply to."""
  overrides = [a.split('=')[0] for a in argv if a.startswith('--config.')]
  if overrides and not any(a.startswith('--config=') for a in argv):
    raise FlagError(f'{overrides[0]} overrides a --config file, and none is given.')


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
  """Raises FlagError unless `value` is a finite number > 0 (an int >= 1 with `integer`)."""
  if integer and value < 1:
    raise FlagError(f'--{name} must be >= 1, got {value}.')
  if not integer and not (math.isfinite(value) and value > 0):
    raise FlagError(f'--{name} must be > 0, got {value:g}.')


def check_output_file(name: str, path: str | None) -> None:
  """Raises FlagError unless `path` (if given) can be written: its directory exists."""
  if path is None:
    return
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise FlagError(f'--{name}={path} is a directory; give a file name.')
  if not os.path.isdir(directory):
    raise FlagError(f'--{name}={path}: the directory {directory} does not exist.')
  if not os.access(directory, os.W_OK):
    raise FlagError(f'--{name}={path}: the directory {directory} is not writable.')
