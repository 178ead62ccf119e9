"""Preference pairs (train.objective='dpo'): a {prompt, chosen, rejected} record -> one piece
that holds both sequences, packed whole into a row.

Records follow TRL's preference formats: the three fields are strings (standard) or lists of
messages (conversational: the prompt's turns end with a user turn, each completion is the model
turn(s) that follow). A sequence is the prompt followed by one completion, tokenized as:
  standard        [BOS] prompt completion [EOS]; the completion and EOS are targets;
  conversational  the Gemma 3 chat template of prompt + completion (data/documents.py); the
                  completion's reply tokens and their <end_of_turn> are targets, the prompt's
                  model turns are not.
The piece is the chosen sequence then the rejected one, with local segment ids 1 and 2 and
positions from 0 in each; packing (data/packing.py) gives a row's k-th pair the segment ids
2k+1 (chosen) and 2k+2 (rejected), which is how the objective tells them apart.

With model.vision the prompt's images (a conversational prompt's image parts, or a standard
row's data.images_field list, placed at its <start_of_image> markers or before the text) go
with both sequences: the piece carries them twice, one block per sequence, and the prompt may
not be truncated through an image.

Truncation (as TRL's max_prompt_length / max_length): the prompt keeps its last
dpo.max_prompt_len tokens after BOS, then each sequence its first dpo.max_len tokens; a pair
truncated is counted ("split: ..."). Skipped and counted: a missing or empty field, chosen equal
to rejected, a completion with no target left after truncation.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath
import grain
import numpy as np

from gemma3_train.data import documents
from gemma3_train.data import images as images_lib
from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib


def table_path(directory, split: str, process_index: int, process_count: int) -> epath.Path:
  """Where training/precompute.py stores a process's table of reference log-probabilities."""
  return epath.Path(directory) / f'{split}.{process_index}-of-{process_count}.npz'


def _messages(value: Any) -> list | None:
  if isinstance(value, (str, bytes)):
    text = value.decode('utf-8') if isinstance(value, bytes) else value
    if text.lstrip().startswith('['):
      try:
        value = json.loads(text)
      except json.JSONDecodeError:
        return None
  return value if isinstance(value, list) else None


def _empty(value: Any) -> bool:
  if isinstance(value, str):
    return not value.strip()
  if isinstance(value, list):
    return not value or all(not str(m.get('content', '')).strip() if isinstance(m, dict)
                            else True for m in value)
  return value is None


class ToPair(grain.transforms.Map):
  """Index into the source -> a pair piece, or None (skipped and counted)."""

  def __init__(self, source, tok: tokenizer_lib.Tokenizer, fields: tuple[str, str, str],
               max_prompt_len: int, max_len: int, reference: epath.Path | None = None,
               images: images_lib.ImageSpec | None = None):
    self.source, self.tok, self.fields = source, tok, fields
    self.images = images  # None: a text-only model
    self.max_prompt_len, self.max_len = max_prompt_len, max_len
    self.field = fields[0]  # what the start-up probe names
    self.reference = reference  # a table of reference log-probs, read at the first pair
    self._table = None

  def _reference_logps(self, i: int, piece: dict[str, np.ndarray]) -> np.ndarray:
    """[n] float32: the chosen and rejected reference sums at their segments' first
    positions (the objective sums them per segment), zeros elsewhere."""
    if self._table is None:
      try:
        with epath.Path(self.reference).open('rb') as f:
          self._table = np.load(f)['logps']
      except OSError as e:
        raise sources.DataError(f'{self.reference}: the precomputed reference log-probabilities '
                                f'are unreadable ({e})') from None
    values = self._table[i] if i < len(self._table) else (np.nan, np.nan)
    if np.isnan(values).any():
      raise sources.DataError(f'{self.source.where(i)}: no precomputed reference log-probability '
                              f'in {self.reference} (the data changed since it was computed?)')
    out = np.zeros(len(piece['segment_ids']), np.float32)
    starts = np.flatnonzero(np.diff(piece['segment_ids'], prepend=0))
    out[starts] = values
    return out

  def _record(self, raw: Any, where: str) -> dict | None:
    if self.source.record == 'dict':
      return raw
    text = raw if isinstance(raw, str) else bytes(raw).decode('utf-8', errors='replace')
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      sources.note('not valid JSON', where, detail=str(e))
      return None
    if not isinstance(obj, dict):
      sources.note(f'not a JSON object ({type(obj).__name__})', where)
      return None
    return obj

  def _sequence(self, prompt: Any, completion: Any, where: str, encoder=None
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, target mask, prompt length) of prompt + completion; encoder() makes a text ->
    ids function that expands image markers (None: plain text)."""
    encode = encoder() if encoder else self.tok.encode
    if isinstance(prompt, str) and isinstance(completion, str):
      p = [tokenizer_lib.BOS, *encode(prompt)]
      c = [*self.tok.encode(completion), tokenizer_lib.EOS]
      tokens = np.asarray(p + c, np.int32)
      mask = np.concatenate([np.zeros(len(p), np.float32), np.ones(len(c), np.float32)])
      return tokens, mask, len(p)
    prompt_msgs, completion_msgs = _messages(prompt), _messages(completion)
    if prompt_msgs is None or completion_msgs is None:
      raise sources.DataError(f'{where}: {self.fields[0]!r} and the completions must be all '
                              'strings or all lists of messages')
    prompt_tokens, _ = documents.format_chat(prompt_msgs, self.tok, where,
                                             encode=encoder() if encoder else None)
    tokens, mask = documents.format_chat(prompt_msgs + completion_msgs, self.tok, where,
                                         encode=encoder() if encoder else None)
    n = len(prompt_tokens) - 1  # the prompt's tokens without its closing EOS
    mask[:n] = 0.0  # the prompt's own model turns are context
    return tokens, mask, n

  def _truncate(self, tokens, mask, n_prompt: int) -> tuple[np.ndarray, np.ndarray, bool]:
    cut = False
    if self.max_prompt_len and n_prompt - 1 > self.max_prompt_len:
      drop = n_prompt - 1 - self.max_prompt_len  # keep BOS and the prompt's last tokens
      tokens = np.concatenate([tokens[:1], tokens[1 + drop:]])
      mask = np.concatenate([mask[:1], mask[1 + drop:]])
      cut = True
    if len(tokens) > self.max_len:
      tokens, mask, cut = tokens[:self.max_len], mask[:self.max_len], True
    return tokens, mask, cut

  def map(self, i: int) -> dict[str, np.ndarray] | None:
    i = int(i)
    piece = self.document(i)
    if piece is not None and self.reference is not None:
      piece['reference_logps'] = self._reference_logps(i, piece)
    return piece

  def document(self, i: int) -> dict[str, np.ndarray] | None:
    """The pair piece of record i without reference values, or None (skipped, counted)."""
    raw = self.source[i]
    if raw is None:
      return None
    where = self.source.where(i)
    obj = self._record(raw, where)
    if obj is None:
      return None
    values = []
    for f in self.fields:
      if _empty(obj.get(f)):
        sources.note(f'no field {f!r}' if obj.get(f) is None else f'empty {f!r}', where)
        return None
      values.append(obj[f])
    prompt, chosen, rejected = values
    if chosen == rejected:
      sources.note('chosen equals rejected', where)
      return None
    encoder, pixels = None, None
    if self.images is not None:
      loaded = self._load_images(obj, prompt, i, where)
      if loaded is None:
        return None
      prompt, encoder, pixels = loaded
    pieces, any_cut = [], False
    for completion in (chosen, rejected):
      tokens, mask, n_prompt = self._sequence(prompt, completion, where, encoder)
      if pixels is not None and len(pixels):
        # an image block stays whole: the prompt is never cut through it
        last_image = np.flatnonzero(tokens == tokenizer_lib.END_OF_IMAGE)
        if self.max_prompt_len and len(last_image) and n_prompt - 1 > self.max_prompt_len:
          raise sources.DataError(f'{where}: a prompt with images is longer than '
                                  f'dpo.max_prompt_len={self.max_prompt_len}; raise it or set 0')
        if len(last_image) and last_image[-1] >= self.max_len:
          sources.note(f'images beyond dpo.max_len={self.max_len}', where)
          return None
        mask[tokens == self.images.placeholder] = 0.0
      tokens, mask, cut = self._truncate(tokens, mask, n_prompt)
      any_cut |= cut
      if mask[1:].sum() == 0:
        sources.note(f'no completion token within dpo.max_len={self.max_len}', where)
        return None
      pieces.append((tokens, mask))
    if any_cut:
      sources.note('pair truncated to dpo.max_prompt_len / dpo.max_len', where, skipped=False)
    piece = pair_piece(*pieces)
    if pixels is not None:
      piece['images'] = np.concatenate([pixels, pixels])  # one block per sequence
    return piece

  def _load_images(self, obj: dict, prompt: Any, i: int, where: str):
    """(prompt, encoder factory, pixels [n, S, S, 3]) of a row for a vision model, or None
    (an unreadable image: skipped and counted)."""
    spec = self.images
    msgs = _messages(prompt) if not isinstance(prompt, str) else None
    if msgs is not None:
      refs = documents.chat_images(msgs)
    else:
      refs = obj.get(spec.field) or []
      refs = list(refs) if isinstance(refs, (list, tuple, np.ndarray)) else [refs]
      markers = prompt.count(tokenizer_lib.IMAGE_MARKER)
      if refs and not markers:  # as Hugging Face's processor: the images open the prompt
        prompt = ' '.join([tokenizer_lib.IMAGE_MARKER] * len(refs)) + ' ' + prompt
      elif markers != len(refs):
        raise sources.DataError(f'{where}: {markers} {tokenizer_lib.IMAGE_MARKER} in the prompt '
                                f'but {len(refs)} images in field {spec.field!r}')
    base = self.source.directory(i) if hasattr(self.source, 'directory') else None
    try:
      loaded = [images_lib.load(r, spec.size, crops=spec.pan_and_scan, base=base) for r in refs]
    except images_lib.ImageError as e:
      sources.note(f'unreadable image {e}', where)
      return None
    crops = [len(p) - 1 for p in loaded]
    n = len(refs) + sum(crops)
    if 2 * n > spec.max_images:
      raise sources.DataError(f'{where}: a pair with {n} images needs {2 * n} image slots (one '
                              f'block per sequence) but a row holds data.max_images='
                              f'{spec.max_images}')
    pixels = np.concatenate(loaded) if loaded else spec.empty()
    return prompt, lambda: documents.image_encoder(self.tok, crops, spec, where), pixels


def pair_piece(chosen: tuple[np.ndarray, np.ndarray], rejected: tuple[np.ndarray, np.ndarray]
               ) -> dict[str, np.ndarray]:
  """Two (tokens, mask) sequences -> one piece: inputs, targets, weights (= the targets' mask),
  positions and local segment ids 1 (chosen) and 2 (rejected)."""
  parts = []
  for segment, (tokens, mask) in enumerate((chosen, rejected), 1):
    n = len(tokens) - 1
    parts.append({'inputs': tokens[:-1], 'targets': tokens[1:], 'weights': mask[1:],
                  'positions': np.arange(n, dtype=np.int32),
                  'segment_ids': np.full(n, segment, np.int32)})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
