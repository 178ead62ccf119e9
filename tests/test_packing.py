"""data/packing.py: first-fit-decreasing rows, exact restore mid-group."""

import json

import grain
import numpy as np

from gemma3_train.data import packing


def _pieces(lengths):
  return [{'inputs': np.full(n, 10 + k, np.int32), 'targets': np.full(n, 100 + k, np.int32),
           'weights': np.full(n, 0.5 if k % 2 else 1.0, np.float32)}
          for k, n in enumerate(lengths)]


def test_first_fit_decreasing_by_hand():
  # Decreasing: 6 (row 0), 5 (row 1), 4 (row 2), 3 -> row 1 (0 has 2 left), 2 -> row 0, 2 -> row 2
  rows = packing.pack_group(_pieces([2, 5, 3, 6, 4, 2]), seq_len=8)
  assert [sorted(set(r['inputs'][r['segment_ids'] > 0].tolist())) for r in rows] == [
      [10, 13], [11, 12], [14, 15]]
  r = rows[0]  # pieces 0 (len 2) then 3 (len 6): input order within the row
  np.testing.assert_array_equal(r['inputs'], [10, 10, 13, 13, 13, 13, 13, 13])
  np.testing.assert_array_equal(r['targets'], [100, 100, 103, 103, 103, 103, 103, 103])
  np.testing.assert_array_equal(r['positions'], [0, 1, 0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(r['segment_ids'], [1, 1, 2, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(rows[1]['weights'], [.5] * 5 + [1.] * 3)  # pieces 1, 2
  np.testing.assert_array_equal(rows[2]['segment_ids'], [1, 1, 1, 1, 2, 2, 0, 0])
  np.testing.assert_array_equal(rows[2]['inputs'][6:], [0, 0])  # padding


def _ds(lengths, seed=0):
  src = grain.MapDataset.source(_pieces(lengths)).to_iter_dataset()
  return packing.FirstFitPack(src, 16, seed=seed)


def test_every_piece_once_and_restore_mid_group(monkeypatch):
  monkeypatch.setattr(packing, 'GROUP', 7)  # several groups
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 17, size=40).tolist()
  rows = list(_ds(lengths))
  got = sorted(v for r in rows for v in set(r['inputs'][r['segment_ids'] > 0].tolist()))
  assert got == [10 + k for k in range(40)]
  assert sum(int((r['segment_ids'] > 0).sum()) for r in rows) == sum(lengths)
  for cut in (0, 1, 3, 5, 9):
    it = iter(_ds(lengths))
    head = [next(it) for _ in range(cut)]
    state = json.loads(json.dumps(it.get_state()))
    it2 = iter(_ds(lengths))
    it2.set_state(state)
    for a, b in zip(head + list(it2), rows, strict=True):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
