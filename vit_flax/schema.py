"""Config sections over their defaults: `merge` (with one-line problems for unknown and missing
keys), `as_dict`, `REQUIRED` and `ConfigError`, shared by the training config (`config`) and the
model section (`models`).
"""

import difflib
from collections.abc import Mapping
from typing import Any

REQUIRED = '<required>'  # Marks a key without a default.


class ConfigError(ValueError):
  """A config that cannot run; the message is one line listing every problem."""


def as_dict(cfg: Any) -> dict[str, Any]:
  """A ConfigDict / FrozenConfigDict / Mapping (or None) as a plain nested dict."""
  if cfg is None:
    return {}
  if hasattr(cfg, 'to_dict'):
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
  raise ConfigError(f'Expected a ConfigDict or mapping, got {type(cfg).__name__}.')


def merge(defaults: Mapping[str, Any], given: Mapping[str, Any], prefix: str,
           errors: list[str]) -> dict[str, Any]:
  """`given` over `defaults` (one level); unknown and missing required keys go to `errors`."""
  for key in sorted(set(given) - set(defaults)):
    close = difflib.get_close_matches(key, list(defaults), n=1)
    errors.append(f'unknown key {prefix}{key}' + (f' (did you mean {prefix}{close[0]}?)'
                                                  if close else ' (nothing reads it)'))
  merged = {k: given.get(k, v) for k, v in defaults.items()}
  errors += [f'missing key {prefix}{k}' for k, v in merged.items() if v is REQUIRED]
  return merged
