"""Which record source a config reads: resolve(config) settles data.source, make_source(config,
split) opens it.

resolve: data.source left at 'bundled' with data.train_path set takes its kind from the path
(a .jsonl/.jsonl.gz, .parquet or .arrayrecord/.array_record name, a directory written by
`gemma3-data prepare`), one INFO line says so; a path of no known kind is a ConfigError. A data.*
field the source ignores is a WARNING line (a file of another kind than data.source's: an error).
Each line is said once per process, however often the pipeline is built.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.data import prepared
from gemma3_train.data import shapes
from gemma3_train.data import sources


def make_source(c: config_lib.Config, split: str):
  """The record source for split 'train' or 'eval' of data.source."""
  d = c.data
  field = d.messages_field if d.format == 'chat' else d.text_field
  if d.source == 'synthetic':
    return sources.SyntheticSource(1 << 20 if split == 'train' else 1 << 10,
                                   d.seed + (split == 'eval'), c.model.vocab_size, d.seq_len)
  if d.source == 'bundled':
    return sources.JsonlSource(sources.bundled_path(split), 'data.source')
  if d.source == 'tfds':
    return sources.TfdsSource(d.tfds_name, 'train' if split == 'train' else d.tfds_eval_split)
  if d.source == 'shapes':
    return shapes.ShapesSource(split, c.model.vision_image_size, d.seed, d.text_field,
                               d.images_field)
  spec = d.train_path if split == 'train' else d.eval_path
  name = 'data.train_path' if split == 'train' else 'data.eval_path'
  if not spec:
    raise config_lib.ConfigError(f'{name}={spec!r}: expected a file or glob for eval with '
                                 f'data.source={d.source!r} (or set train.eval_every=0)')
  if d.source == 'prepared':
    return prepared.PreparedSource(spec, name, d.tokenizer_path)
  if d.source == 'jsonl':
    return sources.JsonlSource(spec, name)
  if d.source == 'parquet':
    column_field = 'data.messages_field' if d.format == 'chat' else 'data.text_field'
    return sources.ParquetSource(spec, name, field, column_field)
  return sources.ArrayRecordSource(spec, name)


log = logging.getLogger(__name__)

_FILE_SUFFIX = re.compile(r'\.(jsonl\.gz|jsonl|parquet|arrayrecord|array_record)(?=$|[-@*?\[])')
_SUFFIX_SOURCE = {'jsonl.gz': 'jsonl', 'jsonl': 'jsonl', 'parquet': 'parquet',
                  'arrayrecord': 'arrayrecord', 'array_record': 'arrayrecord'}
FILE_SOURCES = ('jsonl', 'parquet', 'arrayrecord', 'prepared')  # read data.train/eval_path
ACCEPTED = ('.jsonl, .jsonl.gz, .parquet or .arrayrecord/.array_record files, or a directory '
            'written by gemma3-data prepare')
_said: set[str] = set()


def _say(level: int, message: str) -> None:
  if message not in _said:
    _said.add(message)
    log.log(level, message)


def _parts(spec: str) -> list[str]:
  return [p.strip() for p in spec.split(',') if p.strip()]


def suffix_source(part: str) -> str | None:
  """The source a file name's suffix implies ('a/b.jsonl.gz' -> 'jsonl'), else None."""
  found = _FILE_SUFFIX.findall(part.rstrip('/').rpartition('/')[2])
  return _SUFFIX_SOURCE[found[-1]] if found else None


def path_source(spec: str) -> str | None:
  """The source every part of a data path implies (by name, or a prepared directory's
  manifest), or None when a part has no known kind or the parts disagree."""
  kinds = set()
  for part in _parts(spec):
    kind = suffix_source(part)
    if kind is None and (epath.Path(part) / prepared.MANIFEST).exists():
      kind = 'prepared'
    kinds.add(kind)
  return kinds.pop() if len(kinds) == 1 else None


def resolve(c: config_lib.Config, *, warn: bool = True) -> config_lib.Config:
  """c with data.source inferred when left at 'bundled' (see the module's docstring); with
  warn, also checks the data.* fields the source ignores. Raises ConfigError (one line)."""
  d = c.data
  if d.source == 'bundled' and d.train_path:
    if d.tfds_name:
      raise config_lib.ConfigError(
          f'data.train_path={d.train_path!r} and data.tfds_name={d.tfds_name!r} are both set '
          "with data.source left at 'bundled'; set data.source to the one to read")
    kind = path_source(d.train_path)
    if kind is None:
      raise config_lib.ConfigError(
          f'data.train_path={d.train_path!r}: cannot tell its kind; expected {ACCEPTED}, or '
          f'set data.source ({" | ".join(FILE_SOURCES)})')
    _say(logging.INFO, f'data.source={kind!r}, inferred from data.train_path='
                       f'{d.train_path!r} (data.source was left at \'bundled\')')
    c = dataclasses.replace(c, data=dataclasses.replace(d, source=kind))
  elif d.source == 'bundled' and d.tfds_name and not d.mixture:
    _say(logging.INFO, f"data.source='tfds', inferred from data.tfds_name={d.tfds_name!r} "
                       "(data.source was left at 'bundled')")
    c = dataclasses.replace(c, data=dataclasses.replace(d, source='tfds'))
  if c.data is not d:
    config_lib.validate(c)
  if warn and not c.data.mixture:
    _check_fields(c)
  return c


def _check_fields(c: config_lib.Config) -> None:
  """A data.* field set away from its default that c's source does not read: a warning; a path
  whose name is a file kind other than data.source's: a ConfigError."""
  d, s = c.data, c.data.source
  for name in ('train_path', 'eval_path'):
    value = getattr(d, name)
    if s not in FILE_SOURCES:
      continue
    for part in _parts(value):
      kind = suffix_source(part)
      if kind is not None and kind != s:
        raise config_lib.ConfigError(
            f'data.{name}={value!r}: {part} is a {kind} file but data.source={s!r}' +
            (' (a directory written by gemma3-data prepare)' if s == 'prepared' else '') +
            f'; set data.source={kind!r}')
  default = config_lib.DataConfig()
  changed = lambda name: getattr(d, name) != getattr(default, name)
  ignored = []  # (field, why)
  source_says = f'data.source={s!r}'
  if changed('train_path') and s not in FILE_SOURCES:
    ignored.append(('train_path', f'{source_says} reads no files'))
  if changed('eval_path') and s not in FILE_SOURCES:
    ignored.append(('eval_path', f'{source_says} evaluates on its own eval split'))
  for name in ('tfds_name', 'tfds_eval_split'):
    if changed(name) and s != 'tfds':
      ignored.append((name, f"{source_says} is not 'tfds'"))
  if changed('tokenizer_path') and s == 'synthetic':
    ignored.append(('tokenizer_path', f'{source_says} makes token ids'))
  if changed('format') and s == 'synthetic':
    ignored.append(('format', f'{source_says} makes token ids'))
  if changed('text_field'):
    if s in ('synthetic', 'prepared'):
      ignored.append(('text_field', f'{source_says} reads no fields'))
    elif d.format == 'chat':
      ignored.append(('text_field', "data.format='chat' reads data.messages_field"))
  if changed('messages_field'):
    if s in ('synthetic', 'prepared', 'shapes'):
      ignored.append(('messages_field', f'{source_says} reads no chat fields'))
    elif d.format == 'text':
      ignored.append(('messages_field', "data.format='text' reads data.text_field"))
  if not c.model.vision:
    for name in ('images_field', 'max_images', 'pan_and_scan'):
      if changed(name):
        ignored.append((name, 'model.vision is False'))
  if changed('mixture_exhausted'):
    ignored.append(('mixture_exhausted', 'data.mixture is not set'))
  for name, why in ignored:
    _say(logging.WARNING, f'data.{name}={getattr(d, name)!r} is ignored: {why}')
