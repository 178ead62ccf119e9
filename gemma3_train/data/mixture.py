"""Weighted mixtures of train sources (data.mixture), mixed row by row after packing.

Each source runs its own pipeline up to packed rows (its own files, format and shuffle); the
mixture then fills row slots by a schedule that is a pure function of (data.seed, slot):

  slots come in windows of WINDOW_BATCHES local batches (W = WINDOW_BATCHES * B rows); in every
  window source i gets exactly quota_i slots (weights * W rounded by largest remainder, so
  exact whenever weight_i * W is an integer and within one row per window otherwise), in an
  order shuffled by (seed, window index).

A source is only read when the schedule names it, so the mixture iterator's state is its slot
count plus each source's iterator state: grain checkpoints it with the train state, and a
resumed run draws exactly the batches an uninterrupted one would. Each row carries its source
index (SOURCE_KEY) through batching and the worker processes; the last stage, in the main
process, drops it and counts rows per source (also checkpointed), which training/loop.py logs as
`tokens/NAME`: the token slots (rows x data.seq_len, padding included) drawn from NAME by
all processes together since step 0. Every process follows the same schedule, so that total is
exact without any cross-process communication.

data.mixture_exhausted: 'repeat' gives every source endless epochs (each reshuffled by
(seed, epoch)); 'stop' reads each source once and ends the train data (StopIteration) at the
first slot whose source has run out.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np

from gemma3_train import config as config_lib

log = logging.getLogger(__name__)

WINDOW_BATCHES = 100  # schedule window in local batches: weights are exact over each
SOURCE_KEY = 'mixture_source'  # per-row source index, dropped before the batch leaves


def quotas(weights: Sequence[float], window: int) -> np.ndarray:
  """Slots per source in a window of `window` rows: largest-remainder rounding of weights."""
  w = np.asarray(weights, np.float64)
  exact = w / w.sum() * window
  q = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - q), kind='stable')  # ties: the earlier source first
  q[order[:window - q.sum()]] += 1
  return q


@functools.lru_cache(maxsize=4)
def _window_schedule(seed: int, window_index: int, quota: tuple[int, ...]) -> np.ndarray:
  slots = np.repeat(np.arange(len(quota), dtype=np.int32), quota)
  return np.random.default_rng([seed, window_index]).permutation(slots)


def source_of(seed: int, quota: tuple[int, ...], position: int) -> int:
  """The source index of row slot `position` (0, 1, ... over the whole run)."""
  window = sum(quota)
  k, j = divmod(position, window)
  return int(_window_schedule(seed, k, quota)[j])


class _MixtureIterator(grain.DatasetIterator):
  """Draws row `position` from source source_of(position); state = position + sources."""

  def __init__(self, parents: list[grain.DatasetIterator], names: list[str],
               quota: tuple[int, ...], seed: int, stop: bool):
    super().__init__(parents)
    self._names, self._quota, self._seed, self._stop = names, quota, seed, stop
    self._position = 0

  def __next__(self) -> dict[str, Any]:
    src = source_of(self._seed, self._quota, self._position)
    try:
      row = next(self._parents[src])
    except StopIteration:
      log.info("data.mixture: source %r ran out at row slot %d; the train data ends "
               "(data.mixture_exhausted='stop')", self._names[src], self._position)
      raise
    self._position += 1
    return {**row, SOURCE_KEY: np.int32(src)}

  def get_state(self) -> dict[str, Any]:
    return {'position': self._position, 'sources': [p.get_state() for p in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._position = state['position']
    for p, s in zip(self._parents, state['sources']):
      p.set_state(s)


class MixtureIterDataset(grain.IterDataset):
  """Rows of several sources, mixed by the windowed schedule above."""

  def __init__(self, parents: list[grain.IterDataset], names: list[str],
               quota: tuple[int, ...], seed: int, stop: bool):
    super().__init__(parents)
    self._names, self._quota, self._seed, self._stop = names, quota, seed, stop

  def __iter__(self) -> _MixtureIterator:
    return _MixtureIterator([p.__iter__() for p in self._parents], self._names, self._quota,
                            self._seed, self._stop)


class _CountIterator(grain.DatasetIterator):
  """Drops SOURCE_KEY from each batch and counts rows per source (checkpointed)."""

  _HISTORY = 8  # the loop logs step N after drawing batch N + 1

  def __init__(self, parent: grain.DatasetIterator, names: list[str], tokens_per_row: int):
    super().__init__(parent)
    self.names, self._tokens_per_row = names, tokens_per_row
    self._rows = np.zeros(len(names), np.int64)
    self._batches = 0
    self._history: collections.deque = collections.deque(maxlen=self._HISTORY)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._parent))
    src = batch.pop(SOURCE_KEY)
    self._rows += np.bincount(src, minlength=len(self.names))
    self._batches += 1
    self._history.append((self._batches, self._rows.copy()))
    return batch

  def tokens(self, batches: int | None = None) -> dict[str, float]:
    """{'tokens/NAME': token slots drawn by all processes} after `batches` batches (default:
    all drawn so far; an older count if it is still in the short history)."""
    rows = self._rows
    for n, r in self._history:
      if n == batches:
        rows = r
    return {f'tokens/{name}': float(n * self._tokens_per_row) for name, n in zip(self.names, rows)}

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(), 'rows': [int(n) for n in self._rows],
            'batches': self._batches}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._rows = np.asarray(state['rows'], np.int64)
    self._batches = state['batches']
    self._history.clear()


class _CountDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, names: list[str], tokens_per_row: int):
    super().__init__(parent)
    self._names, self._tokens_per_row = names, tokens_per_row

  def __iter__(self) -> _CountIterator:
    return _CountIterator(self._parent.__iter__(), self._names, self._tokens_per_row)


def make_rows(c: config_lib.Config, source_rows: Callable[..., grain.IterDataset],
              *, batch_size: int, num_epochs: int | None) -> MixtureIterDataset:
  """The mixed rows of data.mixture; source_rows(config, num_epochs, labels=) builds one
  source's rows (labels: the source's labels=, for distillation).

  A source's ConfigError (a glob matching nothing, a missing field) names the source.
  """
  d = c.data
  parts = [m for m in config_lib.parse_mixture(d.mixture) if m.weight > 0]
  stop = d.mixture_exhausted == 'stop'
  parents = []
  for m in parts:
    try:
      parents.append(source_rows(dataclasses.replace(c, data=config_lib.source_data(d, m)),
                                 1 if stop else num_epochs, labels=m.labels))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f'data.mixture source {m.name!r}: {e}') from None
  quota = tuple(int(q) for q in quotas([m.weight for m in parts], WINDOW_BATCHES * batch_size))
  log.info('data.mixture: %s per %d rows', ', '.join(
      f'{m.name} {q}' for m, q in zip(parts, quota)), sum(quota))
  return MixtureIterDataset(parents, [m.name for m in parts], quota, d.seed, stop)


def count_sources(ds: grain.IterDataset, c: config_lib.Config, process_count: int
                  ) -> grain.IterDataset:
  """The last stage of a mixture pipeline (see _CountIterator)."""
  names = [m.name for m in config_lib.parse_mixture(c.data.mixture) if m.weight > 0]
  return _CountDataset(ds, names, c.data.seq_len * process_count)


def tokens_drawn(it: Any, batches: int | None = None) -> dict[str, float]:
  """Per-source token counts of a train iterator ({} when it is not a mixture's)."""
  return it.tokens(batches) if isinstance(it, _CountIterator) else {}
