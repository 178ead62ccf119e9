"""Which record source a config reads: make_source(config, split) over data.source."""

from __future__ import annotations

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
