"""Record -> token document: text with BOS/EOS, or a Gemma chat with a loss mask on model turns.

A document is {'tokens': int32[n], 'mask': float32[n]}: tokens = [BOS, ..., EOS] and mask[j] = 1
when token j counts as a training target (all tokens after BOS for text; for chats only the
model's reply tokens and its <end_of_turn>: the user turn, the model-turn header and BOS are
context, not targets).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np

from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib

ROLES = {'user': 'user', 'model': 'model', 'assistant': 'model'}


def format_chat(messages: list[Any], tok: tokenizer_lib.Tokenizer,
                where: str = 'chat') -> tuple[np.ndarray, np.ndarray]:
  """Gemma chat template -> (tokens, mask). Raises DataError on malformed turns."""
  turns = []  # (role, content)
  system = None
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise sources.DataError(f'{where}: message {k} needs "role" and "content", got {m!r:.80}')
    role, content = m['role'], m['content']
    if not isinstance(content, str):
      raise sources.DataError(f'{where}: message {k} content must be a string')
    if role == 'system':
      if k != 0:
        raise sources.DataError(f'{where}: a system message may only come first (message {k})')
      system = content.strip()
      continue
    if role not in ROLES:
      raise sources.DataError(f'{where}: message {k} has role {role!r}; expected system, user, '
                              'model or assistant')
    expected = 'user' if len(turns) % 2 == 0 else 'model'
    if ROLES[role] != expected:
      raise sources.DataError(f'{where}: roles must alternate user/model starting with user; '
                              f'message {k} is {role!r} where {expected!r} was expected')
    turns.append((ROLES[role], content.strip()))
  if not turns:
    raise sources.DataError(f'{where}: a chat needs at least one user turn')
  if system is not None:  # no system role in Gemma: it opens the first user turn
    turns[0] = ('user', f'{system}\n\n{turns[0][1]}')

  tokens, mask = [tokenizer_lib.BOS], [0.0]
  newline = tok.encode('\n')
  for role, content in turns:
    header = [tokenizer_lib.START_OF_TURN] + tok.encode(f'{role}\n')
    body = tok.encode(content) + [tokenizer_lib.END_OF_TURN]
    tokens += header + body + newline
    mask += [0.0] * len(header) + [float(role == 'model')] * len(body) + [0.0] * len(newline)
  tokens.append(tokenizer_lib.EOS)
  mask.append(0.0)
  return np.asarray(tokens, np.int32), np.asarray(mask, np.float32)


def _utf8(raw: Any, where: str) -> str | None:
  if isinstance(raw, str):
    return raw
  try:
    return bytes(raw).decode('utf-8')
  except UnicodeDecodeError as e:
    sources.note(f'invalid UTF-8 at byte {e.start}', where)
    return None


class ToDocument(grain.transforms.Map):
  """Index into the source -> document dict, or None (skipped and counted)."""

  def __init__(self, source, tok: tokenizer_lib.Tokenizer | None, fmt: str, field: str,
               seq_len: int):
    self.source, self.tok, self.fmt, self.field, self.seq_len = source, tok, fmt, field, seq_len

  def _value(self, raw: Any, where: str) -> Any:
    """The text field (or messages) of a raw record, or None."""
    kind = self.source.record
    if kind == 'value':
      obj = {self.field: raw}
    elif kind == 'dict':
      obj = raw
    else:
      text = _utf8(raw, where)
      if text is None:
        return None
      if kind == 'json_or_text' and self.fmt == 'text' and not text.lstrip().startswith('{'):
        return text  # a raw-text ArrayRecord record
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        sources.note(f'not valid JSON ({e.msg})', where)
        return None
      if not isinstance(obj, dict):
        sources.note(f'not a JSON object ({type(obj).__name__})', where)
        return None
    if obj.get(self.field) is None:
      sources.note(f'no field {self.field!r}', where)
      return None
    return obj[self.field]

  def document(self, i: int) -> dict[str, np.ndarray] | None:
    raw = self.source[i]
    if raw is None:  # a record the source skipped and counted (an unreadable file)
      return None
    if self.source.record == 'tokens':
      tokens = np.concatenate([[tokenizer_lib.BOS], raw, [tokenizer_lib.EOS]]).astype(np.int32)
      return {'tokens': tokens, 'mask': np.ones(len(tokens), np.float32)}
    where = self.source.where(i)
    value = self._value(raw, where)
    if value is None:
      return None
    if self.fmt == 'chat':
      if isinstance(value, (str, bytes)):  # messages stored as a JSON string
        value = json.loads(_utf8(value, where) or 'null')
      if not isinstance(value, list):
        raise sources.DataError(f'{where}: field {self.field!r} must be a list of messages')
      tokens, mask = format_chat(value, self.tok, where)
      if len(tokens) - 1 > self.seq_len:  # a split chat would train replies without prompts
        sources.note(f'chat longer than data.seq_len={self.seq_len} ({len(tokens)} tokens)',
                     where)
        return None
      return {'tokens': tokens, 'mask': mask}
    text = _utf8(value, where) if isinstance(value, bytes) else value
    if text is None:
      return None
    if not isinstance(text, str):
      sources.note(f'field {self.field!r} is {type(text).__name__}, not text', where)
      return None
    if not text.strip():
      sources.note('empty text', where)
      return None
    tokens = np.asarray([tokenizer_lib.BOS, *self.tok.encode(text), tokenizer_lib.EOS], np.int32)
    if len(tokens) - 1 > self.seq_len:
      sources.note(f'longer than data.seq_len={self.seq_len}', where, skipped=False)
    mask = np.ones(len(tokens), np.float32)
    mask[0] = 0.0
    return {'tokens': tokens, 'mask': mask}

  def map(self, i: int) -> dict[str, np.ndarray] | None:
    return self.document(int(i))
