"""Config files and dicts -> a validated Config: unknown keys, wrong types and impossible
combinations raise a ConfigError whose message is one line naming the field, its value and what
was expected (the CLIs turn it into exit code 2)."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any

import ml_collections

from gemma3_train.config import aliases
from gemma3_train.config.fields import Config, ConfigError
from gemma3_train.config.validate import validate


def load_config_dict(path: str) -> ml_collections.ConfigDict:
  """Runs a config file's get_config(); 'file.py:arg' calls get_config('arg') (config_flags').

  Raises ConfigError (one line naming the file) when the file is missing, fails to run, has no
  get_config or does not return a ConfigDict.
  """
  file, sep, arg = path.partition(':')
  if not pathlib.Path(file).is_file():
    raise ConfigError(f'{file}: no such config file')
  spec = importlib.util.spec_from_file_location(f'_gemma3_config_{pathlib.Path(file).stem}', file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    get_config = getattr(module, 'get_config', None)
    config = get_config(*([arg] if sep else [])) if get_config else None
  except Exception as e:  # pylint: disable=broad-except  # any error in the file: name the file
    hint = ''
    if isinstance(e, ModuleNotFoundError) and (e.name or '').split('.')[0] == 'configs':
      # Written as `from configs import base`, run where the repository root is not importable.
      hint = ('; start from `config_lib.default_config_dict()` (from gemma3_train import config '
              'as config_lib), or run with the repository root on PYTHONPATH')
    message = ' '.join(str(e).split())
    raise ConfigError(f'{file}: cannot load the config file ({type(e).__name__}: {message})'
                      f'{hint}') from e
  if get_config is None:
    raise ConfigError(f'{file}: defines no get_config()')
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{file}: get_config() returned {type(config).__name__}, '
                      'expected an ml_collections.ConfigDict')
  return config


def load_config_file(path: str) -> Config:
  """The validated Config of a config file (see load_config_dict); raises ConfigError."""
  return from_config_dict(load_config_dict(path))


def _check_type(name: str, value: Any, annotation: str) -> Any:
  """Returns value coerced to the annotated scalar type, or raises ConfigError."""
  expected = {'int': int, 'float': float, 'bool': bool, 'str': str}[annotation]
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if expected is int and isinstance(value, bool):
    raise ConfigError(f'{name}={value!r}: expected an int, got a bool')
  if not isinstance(value, expected):
    raise ConfigError(f'{name}={value!r}: expected {annotation}, got {type(value).__name__}')
  return value


def _section(name: str, cls: type, values: dict[str, Any]) -> Any:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    hint = aliases.hint(f'{name}.{unknown[0]}')
    raise ConfigError(f'{name}.{unknown[0]}: unknown config field' + (
        hint or f'; expected one of {", ".join(sorted(fields))}'))
  kwargs = {k: _check_type(f'{name}.{k}', v, fields[k].type) for k, v in values.items()}
  return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
  """Builds a validated Config from a nested dict (ConfigDict.to_dict() or a saved JSON)."""
  sections = {f.name: f for f in dataclasses.fields(Config)}
  unknown = sorted(set(values) - set(sections))
  if unknown:
    raise ConfigError(f'{unknown[0]}: unknown config section; expected one of '
                      f'{", ".join(sections)}')
  kwargs = {}
  for name, f in sections.items():
    section_values = values.get(name, {})
    if not isinstance(section_values, dict):
      raise ConfigError(f'{name}={section_values!r}: expected a section (dict)')
    kwargs[name] = _section(name, f.default.__class__, section_values)
  config = Config(**kwargs)
  validate(config)
  return config


def from_config_dict(c: ml_collections.ConfigDict) -> Config:
  return from_dict(c.to_dict())
