"""First-fit packing of document pieces into rows, in groups, with O(1) per-piece Python.

Pieces ({'inputs', 'targets', 'weights'}, each at most seq_len long) are taken GROUP at a time;
a group is packed first-fit-decreasing (longest piece first, into the first row with room) and
its rows are emitted in an order shuffled by (seed, group index). Rows carry 'positions' (0 at
each piece start) and 'segment_ids' (1, 2, ... per piece, 0 on padding). A piece may hold several
sequences (a preference pair, data/preference.py): it then carries its own 'positions' and local
'segment_ids' 1..k, which continue the row's numbering.

Why not grain's FirstFitPackIterDataset: it spends ~250 us of Python per piece (measured with
benchmarks/data_throughput.py), as much as tokenizing ~300 tokens, which caps prepared-shard reads
near 3M tokens/s per core. Here the per-piece work is a scan of the rows still open (a row
leaves the scan once it cannot take the group's shortest piece) and an append; rows are built
with one slice copy per piece and key.

With images (model.vision), pieces also carry 'images' uint8 [n, S, S, 3]: a row then holds at
most max_images of them, in the rows' token order, as 'images' [max_images, S, S, 3] (zeros after
the last) and 'image_counts'. Groups are smaller (GROUP_IMAGES): each piece holds its pixels.

The iterator state is the parent's state at the start of the current group, the group index and
the rows of the group already emitted: cheap to take after every row (grain's worker processes
do) and exact on restore (the group is re-read and re-packed, then the emitted rows skipped).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

GROUP = 256  # pieces packed together; more packs tighter, holds more pieces in memory
GROUP_IMAGES = 64  # the same with images (a 896 x 896 image is 2.4 MB)
# Per-token values a piece may carry ([n] or [n, k]), and their dtypes: precomputed DPO
# reference sums, the record index of a pair or document (training/precompute.py's pass,
# distillation's draw keys) and the position in it, stored teacher targets (data/teacher.py).
EXTRA_KEYS = {'reference_logps': np.float32, 'record': np.int32, 'record_pos': np.int32,
              'teacher_ids': np.int32, 'teacher_probs': np.float32}


def image_slots(images: list[np.ndarray], max_images: int) -> dict[str, np.ndarray]:
  """A row's pieces' images [n_k, S, S, 3] -> 'images' [max_images, S, S, 3], 'image_counts'."""
  pixels = np.concatenate(images)
  slots = np.zeros((max_images, *pixels.shape[1:]), np.uint8)
  slots[:len(pixels)] = pixels
  return {'images': slots, 'image_counts': np.int32(len(pixels))}


def pack_group(pieces: list[dict[str, np.ndarray]], seq_len: int, max_images: int = 0
               ) -> list[dict[str, np.ndarray]]:
  """First-fit-decreasing: pieces -> rows of seq_len (inputs, targets, weights, positions,
  segment_ids; with max_images, images and image_counts too)."""
  lengths = [len(p['inputs']) for p in pieces]
  order = sorted(range(len(pieces)), key=lambda k: -lengths[k])
  smallest = min(lengths, default=0)
  free: list[int] = []  # room left per row
  slots: list[int] = []  # image slots left per row
  live: list[int] = []  # rows that can still take the smallest piece, in row order
  members: list[list[int]] = []
  for k in order:
    n = lengths[k]
    m = len(pieces[k]['images']) if max_images else 0
    for r in live:  # the first row with room, else a fresh one
      if free[r] >= n and slots[r] >= m:
        break
    else:
      r = len(members)
      members.append([])
      free.append(seq_len)
      slots.append(max_images)
      live.append(r)
    free[r] -= n
    slots[r] -= m
    members[r].append(k)
    if free[r] < smallest:
      live.remove(r)
  rows = []
  arange = np.arange(seq_len, dtype=np.int32)
  for ks in members:
    row = {'inputs': np.zeros(seq_len, np.int32), 'targets': np.zeros(seq_len, np.int32),
           'weights': np.zeros(seq_len, np.float32), 'positions': np.zeros(seq_len, np.int32),
           'segment_ids': np.zeros(seq_len, np.int32)}
    extra = [k for k in EXTRA_KEYS if k in pieces[ks[0]]]
    for k in extra:
      row[k] = np.zeros((seq_len, *pieces[ks[0]][k].shape[1:]), EXTRA_KEYS[k])
    start, segment = 0, 0
    for k in sorted(ks):  # input order within a row
      piece = pieces[k]
      end = start + lengths[k]
      row['inputs'][start:end] = piece['inputs']
      row['targets'][start:end] = piece['targets']
      row['weights'][start:end] = piece['weights']
      for k in extra:
        row[k][start:end] = piece[k]
      if 'segment_ids' in piece:  # a piece of several sequences (a preference pair)
        row['positions'][start:end] = piece['positions']
        row['segment_ids'][start:end] = segment + piece['segment_ids']
        segment += int(piece['segment_ids'][-1])
      else:
        segment += 1
        row['positions'][start:end] = arange[:end - start]
        row['segment_ids'][start:end] = segment
      start = end
    if max_images:
      row.update(image_slots([pieces[k]['images'] for k in sorted(ks)], max_images))
    rows.append(row)
  return rows


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, seed: int,
               max_images: int = 0):
    super().__init__(parent)
    self._seq_len, self._seed, self._max_images = seq_len, seed, max_images
    self._group = 0
    self._rows: list[dict[str, np.ndarray]] = []
    self._emitted = 0
    self._start: dict[str, Any] | None = None  # the parent's state when this group began
    self._done = False

  def _fill(self) -> None:
    """Reads and packs the group that starts at the parent's current position."""
    self._start = self._parent.get_state()
    pieces = []
    for _ in range(GROUP_IMAGES if self._max_images else GROUP):
      try:
        pieces.append(next(self._parent))
      except StopIteration:
        self._done = True
        break
    rows = pack_group(pieces, self._seq_len, self._max_images)
    perm = np.random.default_rng([self._seed, self._group]).permutation(len(rows))
    self._rows = [rows[i] for i in perm]
    self._emitted = 0

  def __next__(self) -> dict[str, np.ndarray]:
    while self._emitted >= len(self._rows):
      if self._done:
        raise StopIteration
      if self._rows:
        self._group += 1
      self._fill()
    row = self._rows[self._emitted]
    self._emitted += 1
    return row

  def get_state(self) -> dict[str, Any]:
    if self._emitted >= len(self._rows) and not self._done:
      # Between groups: the next group starts where the parent is now.
      return {'parent': self._parent.get_state(), 'group': self._group + bool(self._rows),
              'emitted': 0}
    return {'parent': self._start, 'group': self._group, 'emitted': self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._group, self._done = state['group'], False
    self._fill()
    self._emitted = state['emitted']


class FirstFitPack(grain.IterDataset):
  """Packs a parent's pieces into seq_len rows (module docstring)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, seed: int, max_images: int = 0):
    super().__init__(parent)
    self._seq_len, self._seed, self._max_images = seq_len, seed, max_images

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._seed, self._max_images)
