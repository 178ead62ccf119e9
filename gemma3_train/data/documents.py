"""Record -> token document: text with BOS/EOS, or a Gemma chat with a loss mask on model turns.

A document is {'tokens': int32[n], 'mask': float32[n]}: tokens = [BOS, ..., EOS] and mask[j] = 1
when token j counts as a training target (all tokens after BOS for text; for chats only the
model's reply tokens and its <end_of_turn>: the user turn, the model-turn header and BOS are
context, not targets).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import grain
import numpy as np

from gemma3_train.data import images as images_lib
from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib

ROLES = {'user': 'user', 'model': 'model', 'assistant': 'model'}


def _parts_text(parts: list[Any], where: str, k: int) -> str:
  """Hugging Face's message content as typed parts -> text: each image part is an
  IMAGE_MARKER, each text part its text trimmed, joined as they come (other parts ignored)."""
  out = []
  for part in parts:
    if not isinstance(part, dict) or 'type' not in part:
      raise sources.DataError(f'{where}: message {k} content parts need a "type", got '
                              f'{part!r:.80}')
    if part['type'] == 'image':
      out.append(tokenizer_lib.IMAGE_MARKER)
    elif part['type'] == 'text':
      out.append(str(part.get('text', '')).strip())
  return ''.join(out)


def chat_images(messages: list[Any]) -> list[Any]:
  """The image parts' references (path, image or url), in the order the chat shows them."""
  refs = []
  for m in messages:
    content = m.get('content') if isinstance(m, dict) else None
    for part in content if isinstance(content, list) else []:
      if isinstance(part, dict) and part.get('type') == 'image':
        refs.append(next((part[key] for key in ('path', 'image', 'url') if key in part), None))
  return refs


def format_chat(messages: list[Any], tok: tokenizer_lib.Tokenizer, where: str = 'chat',
                encode: Callable[[str], list[int]] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Gemma chat template -> (tokens, mask). Raises DataError on malformed turns.

  `encode` (default tok.encode) turns a turn's text into ids; images pass one that expands
  their markers (tokenizer.encode_with_images). A user turn is encoded with its header, as
  Hugging Face tokenizes the rendered text (an image first in the turn puts a blank line right
  after the header's newline).
  """
  encode = encode or tok.encode
  turns = []  # (role, content)
  system = None
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise sources.DataError(f'{where}: message {k} needs "role" and "content", got {m!r:.80}')
    role, content = m['role'], m['content']
    if isinstance(content, list):
      content = _parts_text(content, where, k)
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
    if role == 'user':  # all context: no target boundary to keep
      turn = ([tokenizer_lib.START_OF_TURN] + encode(f'user\n{content}') +
              [tokenizer_lib.END_OF_TURN] + newline)
      tokens += turn
      mask += [0.0] * len(turn)
      continue
    header = [tokenizer_lib.START_OF_TURN] + tok.encode(f'{role}\n')
    body = encode(content) + [tokenizer_lib.END_OF_TURN]
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
               seq_len: int, images: images_lib.ImageSpec | None = None):
    self.source, self.tok, self.fmt, self.field, self.seq_len = source, tok, fmt, field, seq_len
    self.images = images  # None: a text-only model

  def _value(self, raw: Any, where: str) -> Any:
    """The text field (or messages) of a raw record, or None."""
    obj = self._object(raw, where)
    if obj is None or isinstance(obj, str):
      return obj
    if obj.get(self.field) is None:
      sources.note(f'no field {self.field!r}', where)
      return None
    return obj[self.field]

  def _object(self, raw: Any, where: str) -> dict[str, Any] | str | None:
    """A raw record as a dict (a raw-text ArrayRecord record as its text), or None."""
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
        sources.note('not valid JSON', where, detail=str(e))  # msg: line N column M
        return None
      if not isinstance(obj, dict):
        sources.note(f'not a JSON object ({type(obj).__name__})', where)
        return None
    return obj

  def document(self, i: int) -> dict[str, np.ndarray] | None:
    raw = self.source[i]
    if raw is None:  # a record the source skipped and counted (an unreadable file)
      return None
    if self.source.record == 'tokens':
      tokens = np.concatenate([[tokenizer_lib.BOS], raw, [tokenizer_lib.EOS]]).astype(np.int32)
      return {'tokens': tokens, 'mask': np.ones(len(tokens), np.float32)}
    where = self.source.where(i)
    if self.images is not None:
      return self._image_document(raw, i, where)
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

  # --- model.vision: documents with images --------------------------------------

  def _image_document(self, raw: Any, i: int, where: str) -> dict[str, np.ndarray] | None:
    """As document(), plus 'images' uint8 [n, S, S, 3] in token order (n may be 0).

    Chat rows take their image parts; text rows the list in data.images_field, the k-th
    IMAGE_MARKER of the text taking image k (a row with images and no text gets one marker per
    image, space-separated, as Hugging Face's processor does; other count mismatches are its
    error too). Images load relative to the data file's directory.
    """
    spec = self.images
    obj = self._object(raw, where)
    if obj is None:
      return None
    if isinstance(obj, str):
      obj = {self.field: obj}
    value = obj.get(self.field)
    if self.fmt == 'chat':
      if isinstance(value, (str, bytes)):  # messages stored as a JSON string
        value = json.loads(_utf8(value, where) or 'null')
      if not isinstance(value, list):
        if value is None:
          sources.note(f'no field {self.field!r}', where)
          return None
        raise sources.DataError(f'{where}: field {self.field!r} must be a list of messages')
      refs = chat_images(value)
    else:
      refs = obj.get(spec.field) or []
      refs = list(refs) if isinstance(refs, (list, tuple, np.ndarray)) else [refs]
      if value is None and refs:
        value = ' '.join([tokenizer_lib.IMAGE_MARKER] * len(refs))
      if isinstance(value, bytes):
        value = _utf8(value, where)
        if value is None:
          return None
      if not isinstance(value, str) or not value.strip():
        sources.note(f'no field {self.field!r}' if value is None else 'empty text', where)
        return None
      markers = value.count(tokenizer_lib.IMAGE_MARKER)
      if markers != len(refs):
        raise sources.DataError(
            f'{where}: {markers} {tokenizer_lib.IMAGE_MARKER} in field {self.field!r} but '
            f'{len(refs)} images in field {spec.field!r}; expected one marker per image')
    self._check_images(len(refs), where)
    base = self.source.directory(i) if hasattr(self.source, 'directory') else None
    try:
      pixels = [images_lib.load(r, spec.size, crops=spec.pan_and_scan, base=base) for r in refs]
    except images_lib.ImageError as e:
      sources.note(f'unreadable image {e}', where)
      return None
    crops = [len(p) - 1 for p in pixels]
    self._check_images(len(refs) + sum(crops), where)
    encode = image_encoder(self.tok, crops, spec, where)
    if self.fmt == 'chat':
      tokens, mask = format_chat(value, self.tok, where, encode=encode)
    else:
      tokens = np.asarray([tokenizer_lib.BOS, *encode(value), tokenizer_lib.EOS], np.int32)
      mask = np.ones(len(tokens), np.float32)
      mask[0] = 0.0
    if len(tokens) - 1 > self.seq_len:  # split, an image would lose its text or its tokens
      sources.note(f'document with images longer than data.seq_len={self.seq_len} '
                   f'({len(tokens)} tokens)', where)
      return None
    # No loss on predicting a soft token, nor from one (its output stands for a pixel patch).
    soft = tokens == spec.placeholder
    mask[soft] = 0.0
    mask[1:][soft[:-1]] = 0.0
    return {'tokens': tokens, 'mask': mask,
            'images': np.concatenate(pixels) if pixels else spec.empty()}

  def _check_images(self, n: int, where: str) -> None:
    spec = self.images
    if n > spec.max_images:
      raise sources.DataError(f'{where}: {n} images (pan-and-scan crops included) but a row '
                              f'holds data.max_images={spec.max_images}')
    need = n * (spec.tokens_per_image + 4)  # BOI, soft tokens, EOI, two blank lines
    if need > self.seq_len:
      raise sources.DataError(f'{where}: {n} images take {need} tokens, more than '
                              f'data.seq_len={self.seq_len}')

  def map(self, i: int) -> dict[str, np.ndarray] | None:
    return self.document(int(i))


def image_encoder(tok: tokenizer_lib.Tokenizer, crops: list[int],
                   spec: images_lib.ImageSpec, where: str) -> Callable[[str], list[int]]:
  """Text -> ids with its IMAGE_MARKERs expanded; successive calls (a chat's turns) take the
  next images."""
  left = list(crops)

  def encode(text: str) -> list[int]:
    n = text.count(tokenizer_lib.IMAGE_MARKER)
    if n > len(left):
      raise sources.DataError(f'{where}: more {tokenizer_lib.IMAGE_MARKER} in the text than '
                              f'images ({len(crops)})')
    mine, left[:n] = left[:n], []
    return tokenizer_lib.encode_with_images(tok, text, mine, spec.tokens_per_image,
                                            spec.placeholder)
  return encode
