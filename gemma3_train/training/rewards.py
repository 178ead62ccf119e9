"""Reward functions for RL (rl.rewards, rl.reward_weights; docs/rl.md).

A reward is a Python function `(prompts, completions, completion_ids, **row_fields) ->
list[float]`, one value per completion, as TRL's GRPOTrainer calls them: prompts are the rows'
prompt fields (repeated per completion), completions the decoded texts (for a chat prompt, the
one-message list [{'role': 'assistant', 'content': text}]), completion_ids the sampled ids (the
stop token included), and every other field of the rows as a list of the same length.

rl.rewards names them 'module:function' (imported) or as a built-in:
  accuracy  1 when the completion's answer equals the row's GSM8K-style `answer` ('... #### 42'):
            the number after the completion's last '####', else its last number; commas dropped
  format    1 when rl.format_regex matches the completion (re.search), else 0
  length    -(completion tokens) / rl.max_completion_len, a penalty in [-1, 0)
A reward that raises, returns the wrong number of values, or a value that is not a finite
number stops the run with one line naming it (RewardError, a ConfigError).
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from gemma3_train import config as config_lib

RewardFn = Callable[..., Sequence[float]]
_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?|-?\.\d+')


class RewardError(config_lib.ConfigError):
  """A reward function failed (one line, naming it)."""


def text_of(completion: Any) -> str:
  """A completion's text: the string, or a message list's last content."""
  if isinstance(completion, list):
    return str(completion[-1].get('content', '')) if completion else ''
  return str(completion)


def _number(s: str | None) -> float | None:
  if s is None:
    return None
  try:
    return float(s.replace(',', '').rstrip('.'))
  except ValueError:
    return None


def extract_answer(text: str) -> float | None:
  """The number after the last '####', else the last number in the text (None: none)."""
  if '####' in text:
    found = _NUMBER.search(text.rsplit('####', 1)[1])
    return _number(found.group()) if found else None
  found = _NUMBER.findall(text)
  return _number(found[-1]) if found else None


def accuracy(prompts, completions, completion_ids, answer=None, **_) -> list[float]:
  """1.0 where the completion's number equals the gold answer's (GSM8K: after '####')."""
  del prompts, completion_ids
  if answer is None:
    raise ValueError("the rows have no 'answer' field")
  out = []
  for completion, gold in zip(completions, answer):
    want = extract_answer(str(gold))
    got = extract_answer(text_of(completion))
    out.append(float(want is not None and got is not None and abs(want - got) < 1e-6))
  return out


def format_match(prompts, completions, completion_ids, *, regex: str, **_) -> list[float]:
  """1.0 where `regex` matches the completion (re.search)."""
  del prompts, completion_ids
  pattern = re.compile(regex)
  return [float(pattern.search(text_of(c)) is not None) for c in completions]


def length_penalty(prompts, completions, completion_ids, *, max_len: int, **_) -> list[float]:
  """-(completion tokens) / max_len."""
  del prompts, completions
  return [-len(ids) / max_len for ids in completion_ids]


def _load(name: str, r) -> RewardFn:
  builtins = {'accuracy': accuracy,
              'format': functools.partial(format_match, regex=r.format_regex),
              'length': functools.partial(length_penalty, max_len=r.max_completion_len)}
  if name in builtins:
    return builtins[name]
  module, _, attr = name.partition(':')
  if not (module and attr):
    raise config_lib.ConfigError(f"rl.rewards: {name!r}: expected 'module:function' or one of "
                                 f'{", ".join(builtins)}')
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise config_lib.ConfigError(f'rl.rewards: {name!r} does not load ({type(e).__name__}: '
                                 f'{e})') from None
  if not callable(fn):
    raise config_lib.ConfigError(f'rl.rewards: {name!r} is not a function')
  return fn


class Rewards:
  """The rewards of rl.rewards with their weights; calling it scores one rollout."""

  def __init__(self, c: config_lib.Config):
    r = c.rl
    self.names = [x.strip() for x in r.rewards.split(',')]
    self.functions = [_load(n, r) for n in self.names]
    self.weights = np.asarray([float(w) for w in r.reward_weights.split(',')]
                              if r.reward_weights else [1.0] * len(self.names), np.float32)

  def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
               fields: dict[str, list]) -> np.ndarray:
    """Each reward of each completion, float32 [B, F]."""
    B = len(completions)
    out = np.zeros((B, len(self.names)), np.float32)
    for f, (name, fn) in enumerate(zip(self.names, self.functions)):
      try:
        values = list(fn(prompts=prompts, completions=completions,
                         completion_ids=completion_ids, **fields))
      except Exception as e:  # pylint: disable=broad-except  # the user's code: one line
        first = (str(e).splitlines() or [''])[0]
        raise RewardError(f'rl.rewards: {name} raised {type(e).__name__}: {first}') from e
      if len(values) != B:
        raise RewardError(f'rl.rewards: {name} returned {len(values)} values for {B} '
                          'completions')
      for i, v in enumerate(values):
        if not isinstance(v, (int, float, np.number)) or not math.isfinite(float(v)):
          raise RewardError(f'rl.rewards: {name} returned {v!r} for completion {i}: expected '
                            'a finite number')
      out[:, f] = values
    return out
