"""The order in which a data group reads its documents: its shard, shuffled per epoch, repeated.

A data group (sharding.data_group: one process, unless a context group spans processes; the
processes of a group read the same documents) owns the documents
i % process_count == process_index (process_index / process_count: the group and the number
of groups; n documents). Position k of the order is epoch e = k // n, place j = k % n, and
reads document

    process_index + process_count * perm_e(j),   perm_e: a bijection of [0, n) keyed by (seed, e)

(the identity when unshuffled). perm_e is a keyed Feistel network over the smallest
even-bit-width domain 2^2h >= n with cycle walking (values >= n are permuted again until they
land in [0, n)): a pseudo-random permutation that needs O(1) memory whatever the corpus size,
and is computed for a whole chunk of positions at once in numpy (~1 us per document in chunks
of 256; grain's per-index shuffle cost 15-35 us, the largest cost of reading prepared shards).
"""

from __future__ import annotations

import functools
import sys

import grain
import numpy as np

ROUNDS = 6
_U64 = (1 << 64) - 1


def _rounds(v, keys, half: int, mask: int):
  """The Feistel rounds on v (numpy uint64 array or Python int < 2^2half): each round function is
  splitmix64's finalizer of (right half ^ key). Python ints are masked to 64 bits where numpy's
  uint64 wraps; the same expression serves both (numpy takes the ints as uint64)."""
  left, right = v >> half, v & mask
  for key in keys:
    x = right ^ key
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    left, right = right, left ^ ((x ^ (x >> 31)) & mask)
  return (left << half) | right


@functools.lru_cache(maxsize=8)
def _round_keys(seed: int, epoch: int) -> tuple[int, ...]:
  return tuple(int(k) for k in np.random.default_rng(
      [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch]).integers(0, 2**63, ROUNDS))


def _half_bits(n: int) -> int:
  return max(1, ((n - 1).bit_length() + 1) // 2)


def permute(j: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """perm_(seed, epoch)(j) for j in [0, n): a bijection of [0, n), vectorized."""
  half, keys = _half_bits(n), _round_keys(seed, epoch)
  mask = (1 << half) - 1
  with np.errstate(over='ignore'):
    out = _rounds(np.asarray(j, np.uint64), keys, half, mask)
    outside = out >= n
    while outside.any():  # cycle walking: the domain is under 4n, so a few rounds at most
      out[outside] = _rounds(out[outside], keys, half, mask)
      outside = out >= n
  return out.astype(np.int64)


def permute_one(j: int, n: int, seed: int, epoch: int) -> int:
  """permute() of one position in Python integers (grain's per-element reads: numpy's
  per-call overhead would cost ~100x more here). Equal to permute() (tests/test_order.py)."""
  half, keys = _half_bits(n), _round_keys(seed, epoch)
  mask = (1 << half) - 1
  v = _rounds(j, keys, half, mask)
  while v >= n:
    v = _rounds(v, keys, half, mask)
  return v


class DocumentOrder(grain.MapDataset):
  """Position k -> the document id this data group reads k-th (see the module docstring).

  num_epochs None repeats endlessly. doc_ids(positions) computes a chunk at once.
  """

  def __init__(self, num_documents: int, *, process_index: int = 0, process_count: int = 1,
               shuffle_seed: int | None = None, num_epochs: int | None = None):
    super().__init__()
    self._n = len(range(process_index, num_documents, process_count))
    self._first, self._stride = process_index, process_count
    self._seed = shuffle_seed
    self._epochs = num_epochs

  @property
  def documents_per_epoch(self) -> int:
    return self._n

  def __len__(self) -> int:
    return sys.maxsize if self._epochs is None else self._n * self._epochs

  def doc_ids(self, positions: np.ndarray) -> np.ndarray:
    epoch, place = np.divmod(np.asarray(positions, np.int64), self._n)
    if self._seed is not None:
      for e in np.unique(epoch):
        here = epoch == e
        place[here] = permute(place[here], self._n, self._seed, int(e))
    return self._first + self._stride * place

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, place = divmod(int(index), self._n)
    if self._seed is not None:
      place = permute_one(place, self._n, self._seed, epoch)
    return self._first + self._stride * place

  def __str__(self) -> str:
    return (f'DocumentOrder(n={self._n}, first={self._first}, stride={self._stride}, '
            f'seed={self._seed}, epochs={self._epochs})')
