"""The teacher pass of `gemma3-data prepare --teacher=PATH`: a frozen teacher's distillation
targets for every position of a corpus, stored with its tokens (data/teacher.py), so that
train.objective=distill with distill.teacher='' holds and runs no teacher.

Documents are split at --seq_len as the trainer splits them (pipeline.SplitRows) and packed
into rows as it packs them (segment ids and positions: each piece sees only itself), and the
targets are lm_head.teacher_targets of the teacher's hidden states, the function the online
loss calls, with the draws keyed by (seed, record index, position in the document). A run on
the stored targets with train.seed = --teacher_seed therefore trains on the online run's
targets (tests/test_teacher_labels.py). The teacher is jitted once for [rows, seq_len].
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3_train import convert
from gemma3_train.data import packing
from gemma3_train.data import pipeline
from gemma3_train.models import lm_head


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the targets are: the manifest's 'teacher' entry (data/teacher.PLAN_KEYS)."""
  path: str
  loss: str  # sampled | topk
  samples: int  # ids per position: draws (sampled) or k (topk)
  temperature: float
  seed: int
  seq_len: int
  dtype: str  # the teacher's params and compute: bfloat16 | float32


class Labeler:
  """docs [(record index, document)] -> per document (ids, q [n - 1, k]); counts its tokens
  and seconds (the teacher's rate)."""

  def __init__(self, spec: Spec, *, rows: int = 8, chunk_size: int = 256):
    self.spec, self.rows = spec, rows
    model = convert.load(spec.path, param_dtype=spec.dtype, dtype=spec.dtype, vision=False)
    self.vocab_size = model.cfg.vocab_size
    graphdef, state = nnx.split(model)
    keys = spec.loss == 'sampled'

    def targets(state, inputs, positions, segment_ids, record, record_pos):
      teacher = nnx.merge(graphdef, state)
      x_BLD = teacher.hidden(inputs, positions, segment_ids)
      draws = dict(seed=spec.seed, record_BL=record, pos_BL=record_pos) if keys else {}
      return lm_head.teacher_targets(x_BLD, teacher.embedder.table(), k=spec.samples,
                                     temperature=spec.temperature, chunk_size=chunk_size,
                                     **draws)
    self._state = state
    self._targets = jax.jit(targets)
    self._split = pipeline.SplitRows(spec.seq_len)
    self.tokens, self.seconds = 0, 0.0

  def __call__(self, docs: list[tuple[int, dict[str, np.ndarray]]]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    start = time.perf_counter()
    k, L = self.spec.samples, self.spec.seq_len
    out = {i: (np.zeros((len(d['tokens']) - 1, k), np.int32),
               np.zeros((len(d['tokens']) - 1, k), np.float32)) for i, d in docs}
    pieces = [p for i, d in docs for p in self._split.flat_map({**d, 'record': np.int32(i)})]
    rows = packing.pack_group(pieces, L) if pieces else []
    for start_row in range(0, len(rows), self.rows):
      batch = rows[start_row:start_row + self.rows]
      arrays = {key: np.stack([r[key] for r in batch]) for key in (
          'inputs', 'positions', 'segment_ids', 'record', 'record_pos')}
      real = len(batch)
      if real < self.rows:  # one compiled shape: empty rows (segment 0) fill the batch
        arrays = {key: np.pad(a, ((0, self.rows - real), (0, 0))) for key, a in arrays.items()}
      ids, q = jax.device_get(self._targets(self._state, *arrays.values()))
      for r in range(real):  # each segment is a piece: one document's positions
        seg = arrays['segment_ids'][r]
        for s in np.unique(seg[seg > 0]):
          at = seg == s
          rec, pos = int(arrays['record'][r][at][0]), arrays['record_pos'][r][at]
          out[rec][0][pos], out[rec][1][pos] = ids[r][at], q[r][at]
    self.tokens += sum(len(d['tokens']) - 1 for _, d in docs)
    self.seconds += time.perf_counter() - start
    return [out[i] for i, _ in docs]
