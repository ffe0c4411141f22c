"""Config files: finding one (a path, or a shipped config by name), running its `get_config`, and
checking `--config=PATH[:ARG]` and its `--config.x=...` overrides before flags are parsed.

Shared by every command (`main`, `compare`, `benchmark`, `evaluate`, ...), so a missing or broken
file or an override of a key the config lacks is one line (with the closest key), not the
traceback `ml_collections.config_flags` would print.
"""

import difflib
import importlib.util
import os
import pathlib

import ml_collections

from vit_flax.config import ConfigError


def load_config_file(path: str | os.PathLike, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
  """Runs a config file's `get_config([arg])`; `path` may name a shipped config (config_path)."""
  path = config_path(str(path))
  spec = importlib.util.spec_from_file_location(f'_vit_flax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def config_path(path: str) -> pathlib.Path:
  """`path` if it exists, else the shipped config of that file name (vit_flax/configs/NAME.py).

  So `--config=configs/mnist_tl.py` works from a checkout and from an installed wheel alike.
  """
  if os.path.exists(path):
    return pathlib.Path(path)
  spec = importlib.util.find_spec('vit_flax.configs')
  if spec is not None and spec.submodule_search_locations:
    shipped = pathlib.Path(list(spec.submodule_search_locations)[0]) / os.path.basename(path)
    if shipped.exists():
      return shipped
  return pathlib.Path(path)


def check_command_line(argv: list[str], flag: str = 'config') -> list[str]:
  """Checks `--config=PATH[:ARG]` and its `--config.x.y=...` overrides before flags are parsed.

  Returns `argv` with a PATH that does not exist pointed at the shipped config of that name.
  Raises ConfigError (one line) for a missing or broken config file or an override of a key the
  config lacks, naming the closest key; config_flags would raise a long traceback instead.
  """
  out, config, path = [], None, None
  for arg in argv:
    if arg.startswith(f'--{flag}='):
      path, sep, rest = arg[len(f'--{flag}='):].partition(':')
      path = str(config_path(path))
      if not os.path.isfile(path):
        raise ConfigError(f'Config file {path} not found.')
      try:
        config = load_config_file(path, rest if sep else None)
      except Exception as e:  # pylint: disable=broad-except  (a user's file can raise anything)
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise ConfigError(f'Config file {path} failed to load: {type(e).__name__}: {first}'
                          ) from None
      arg = f'--{flag}={path}{sep}{rest}'
    out.append(arg)
  if config is not None:
    for arg in argv:
      if arg.startswith(f'--{flag}.'):
        _check_override(config, arg[len(f'--{flag}.'):].split('=')[0], flag)
  return out


def _check_override(config: ml_collections.ConfigDict, dotted: str, flag: str) -> None:
  """Raises ConfigError unless `dotted` (e.g. 'model.hidden_size') names a key of `config`."""
  node, done = config, []
  for key in dotted.split('.'):
    keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1)
      prefix = '.'.join([flag, *done])
      hint = f' (did you mean --{prefix}.{close[0]}?)' if close else (
          f' ({prefix} has no such key)' if keys else f' ({prefix} is not a section)')
      raise ConfigError(f'Unknown override --{flag}.{dotted}{hint}.')
    node, done = node[key], [*done, key]
