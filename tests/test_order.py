"""The document order (data/order.py): each epoch a permutation of the process's shard, keyed by
(seed, epoch); the per-element and chunked computations agree."""

import collections

import numpy as np
import pytest

from gemma3_train.data import order


@pytest.mark.parametrize('n', [1, 2, 3, 5, 8, 17, 64, 1000, 1025, 4099])
def test_each_epoch_is_a_permutation_and_both_paths_agree(n):
  for seed, epoch in ((0, 0), (0, 1), (2**40 + 7, 3)):
    chunked = order.permute(np.arange(n), n, seed, epoch).tolist()
    assert sorted(chunked) == list(range(n))
    assert chunked == [order.permute_one(j, n, seed, epoch) for j in range(n)]


def test_epochs_and_seeds_give_different_orders():
  n = 100
  orders = {(s, e): tuple(order.permute(np.arange(n), n, s, e)) for s in range(3)
            for e in range(3)}
  assert len(set(orders.values())) == 9


def test_positions_are_spread_evenly():
  """Where element 0 lands, over 4,000 keys: each of 8 places within 15% of 500 (a fixed set
  of keys, so the counts are the same every run)."""
  counts = collections.Counter(int(order.permute(np.arange(8), 8, s, 0)[0]) for s in range(4000))
  assert sorted(counts) == list(range(8))
  assert all(425 <= c <= 575 for c in counts.values()), counts


def test_document_order_shards_shuffles_and_repeats():
  n_docs, count = 37, 3
  seen = []
  for p in range(count):
    ids = order.DocumentOrder(n_docs, process_index=p, process_count=count, shuffle_seed=5,
                              num_epochs=2)
    per_epoch = ids.documents_per_epoch
    assert len(ids) == 2 * per_epoch
    got = [ids[k] for k in range(len(ids))]
    assert got == ids.doc_ids(np.arange(len(ids))).tolist()
    first, second = got[:per_epoch], got[per_epoch:]
    assert sorted(first) == sorted(second) == list(range(p, n_docs, count))
    assert first != second  # reshuffled per epoch
    seen += first
  assert sorted(seen) == list(range(n_docs))
  plain = order.DocumentOrder(n_docs, process_index=1, process_count=count)
  assert [plain[k] for k in range(28)] == list(range(1, n_docs, count)) * 2 + [1, 4, 7, 10]
