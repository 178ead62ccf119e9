"""Prompt rows for RL (train.objective=grpo): rl.prompts_per_step rows per rollout, every field
kept for the reward functions.

A row is a JSON object (a JSONL line or an ArrayRecord record) whose rl.prompt_field is a string
(a plain prompt: BOS + its pieces), a list of {role, content} messages (the chat template with
the generation prompt, docs/gemma3.md section 4) or a list of token ids (used as is). Rows are
read in data/order.py's order (shuffled per epoch by data.seed when data.shuffle), endlessly.
Every process reads the same rows: a rollout samples all of them on the whole mesh.

The iterator's state (checkpointed with the train state, as the data iterator's is) is its
position, and, between the optimizer steps that reuse one rollout (rl.updates_per_batch > 1),
that rollout's rows, so that a resume in the middle of them trains on the same batch.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np

from gemma3_train import config as config_lib
from gemma3_train.data import order
from gemma3_train.data import select
from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib

_READABLE = ('jsonl', 'arrayrecord')


def prompt_tokens(value: Any, tok: tokenizer_lib.Tokenizer, where: str) -> list[int]:
  """A prompt field's token ids: text -> BOS + pieces; messages -> the chat template ending
  with the generation prompt; a list of ints as is. Raises DataError on anything else."""
  if isinstance(value, str) and value:
    return [tokenizer_lib.BOS] + tok.encode(value)
  if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
    return list(value)
  if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
    from gemma3_train.data import documents  # pylint: disable=g-import-not-at-top  (grain)
    tokens, _ = documents.format_chat(value, tok)
    return ([int(x) for x in tokens[:-1]] + [tokenizer_lib.START_OF_TURN]
            + tok.encode('model\n'))
  raise sources.DataError(f'{where}: the prompt is {type(value).__name__} {str(value)[:80]!r}; '
                          'expected text, a list of messages or a list of token ids')


class PromptIterator:
  """Endless batches of rl.prompts_per_step rows (dicts), with get_state / set_state for the
  checkpoint (grain's checkpoint handler saves any iterator with bytes states)."""

  def __init__(self, c: config_lib.Config):
    c = select.resolve(c)
    if c.data.source not in _READABLE:
      raise config_lib.ConfigError(
          f'data.source={c.data.source!r}: expected jsonl or arrayrecord prompt rows for '
          'train.objective=grpo (JSON objects, every field kept for the rewards)')
    self.source = select.make_source(c, 'train')
    self.field = c.rl.prompt_field
    self.per_step = c.rl.prompts_per_step
    self.order = order.DocumentOrder(len(self.source), shuffle_seed=(
        c.data.seed if c.data.shuffle else None))
    self.position = 0
    self.rollout: dict[str, np.ndarray] | None = None  # the rows in use (make_batches)
    self.rollout_step = -1  # the step that sampled them

  def __iter__(self):
    return self

  def row(self, i: int) -> dict:
    raw, where = self.source[i], self.source.where(i)
    try:
      obj = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except (ValueError, UnicodeDecodeError) as e:
      raise sources.DataError(f'{where}: not a JSON object ({e})') from None
    if not isinstance(obj, dict) or self.field not in obj:
      raise sources.DataError(f'{where}: no field rl.prompt_field={self.field!r}')
    return {**obj, '_where': where}

  def __next__(self) -> list[dict]:
    rows = [self.row(int(self.order[self.position + k])) for k in range(self.per_step)]
    self.position += self.per_step
    return rows

  def get_state(self) -> bytes:
    state: dict[str, Any] = {'position': self.position, 'rollout_step': self.rollout_step}
    if self.rollout is not None:
      buf = io.BytesIO()
      np.savez(buf, **self.rollout)
      state['rollout'] = base64.b64encode(buf.getvalue()).decode()
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    s = json.loads(state)
    self.position, self.rollout_step = s['position'], s['rollout_step']
    self.rollout = None
    if 'rollout' in s:
      with np.load(io.BytesIO(base64.b64decode(s['rollout']))) as f:
        self.rollout = {k: f[k] for k in f.files}

  def start_prefetch(self) -> None:
    """(grain's checkpoint handler calls this after set_state; nothing runs ahead here)"""

  def close(self) -> None:
    pass
