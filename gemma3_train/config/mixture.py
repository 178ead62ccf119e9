"""data.mixture's grammar: 'NAME:WEIGHT key=value ...' sources separated by ';'."""

from __future__ import annotations

import dataclasses
import math
import re

from gemma3_train.config.fields import ConfigError, DataConfig

# The data.* fields a mixture source may set for itself; the rest (tokenizer, seq_len, seed,
# packing, workers) are shared by the whole mixture.
KEYS = ('source', 'train_path', 'format', 'text_field', 'messages_field', 'tfds_name')
# A source's own key that is no data.* field: under train.objective=distill, whether its rows
# learn the teacher's targets or their hard labels (docs/distillation.md, "Mixtures").
LABELS = ('teacher', 'hard')


@dataclasses.dataclass(frozen=True)
class MixtureSource:
  name: str
  weight: float
  fields: tuple[tuple[str, str], ...]  # (data.* key, value) overrides
  labels: str = 'teacher'  # train.objective=distill: teacher (its targets) | hard (the data's)


def parse_mixture(spec: str) -> list[MixtureSource]:
  """data.mixture -> its sources; '' -> []. Raises ConfigError naming data.mixture.

  Grammar: sources separated by ';' (or newlines); each is 'NAME:WEIGHT' followed by
  space-separated key=value pairs with keys from KEYS, or labels=teacher|hard. Weights are
  relative (>= 0, not all 0); a weight-0 source is never read.
  """
  out = []
  for entry in (e.strip() for e in re.split(r'[;\n]', spec)):
    if not entry:
      continue
    head, *pairs = entry.split()
    name, sep, weight = head.partition(':')
    bad = lambda what: ConfigError(f'data.mixture={spec!r}: {what} in {entry!r}')
    if not sep or not re.fullmatch(r'[\w.-]+', name):
      raise bad("expected 'NAME:WEIGHT key=value ...' (NAME letters, digits, _ . -)")
    try:
      w = float(weight)
    except ValueError:
      raise bad(f'weight {weight!r} is not a number') from None
    if not (w >= 0 and math.isfinite(w)):
      raise bad(f'weight {weight} is negative or not finite; expected >= 0')
    fields, labels = [], 'teacher'
    for pair in pairs:
      key, sep, value = pair.partition('=')
      if sep and key == 'labels':
        if value not in LABELS:
          raise bad(f'{pair!r}: expected labels={" | ".join(LABELS)}')
        labels = value
        continue
      if not sep or key not in KEYS:
        raise bad(f'{pair!r} is not key=value with a key in {", ".join(KEYS)}, labels')
      fields.append((key, value))
    if name in (m.name for m in out):
      raise bad(f'source name {name!r} is used twice')
    out.append(MixtureSource(name, w, tuple(fields), labels))
  if out and not sum(m.weight for m in out) > 0:
    raise ConfigError(f'data.mixture={spec!r}: all weights are 0; expected one > 0')
  return out


def source_data(d: DataConfig, m: MixtureSource) -> DataConfig:
  """The data config a mixture source reads with: data.* with the source's overrides."""
  return dataclasses.replace(d, mixture='', **dict(m.fields))
