"""The teacher pass of `gemma3-data prepare --teacher=PATH`: a frozen teacher's distillation
targets for every position of a corpus, stored with its tokens (data/teacher.py), so that
train.objective=distill with distill.teacher='' holds and runs no teacher.

Documents are split at --seq_len as the trainer splits them (pipeline.SplitRows) and packed
into rows as it packs them (segment ids and positions: each piece sees only itself), and the
targets are soft_targets.teacher_targets of the teacher's hidden states, the function the online
loss calls, with the draws keyed by (seed, record index, position in the document). A run on
the stored targets with train.seed = --teacher_seed therefore trains on the online run's
targets (tests/test_teacher_labels.py). The teacher is jitted once for [rows, seq_len].

The teacher is held as an online frozen teacher is (training/frozen.py): sharded over every
local device (mesh fsdp = the device count, the trainer's rules; the rows split over it),
streamed from its checkpoint one layer at a time into those shardings (init_from), and with
--teacher_dtype=int8 its seven projections quantized per output channel on their devices.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train import sharding
from gemma3_train.data import packing
from gemma3_train.data import pipeline
from gemma3_train.models import soft_targets
from gemma3_train.training import frozen

_ROW_KEYS = ('inputs', 'positions', 'segment_ids', 'record', 'record_pos')


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the targets are: the manifest's 'teacher' entry (data/teacher.PLAN_KEYS)."""
  path: str
  loss: str  # sampled | topk
  samples: int  # ids per position: draws (sampled) or k (topk)
  temperature: float
  seed: int
  seq_len: int
  dtype: str  # the teacher's storage: bfloat16 | float32 | int8 (projections; the rest bf16)


def teacher_model_config(spec: Spec, compute_dtype: str = '') -> config_lib.ModelConfig:
  """The teacher's ModelConfig: its checkpoint's (no weights read), text only, computing in
  compute_dtype ('': the storage dtype's; bfloat16 for int8)."""
  try:
    src = convert.open_source(spec.path)
  except convert.ConversionError as e:
    raise config_lib.ConfigError(f'--teacher={spec.path!r}: {e}') from e
  storage = 'bfloat16' if spec.dtype == 'int8' else spec.dtype
  return dataclasses.replace(src.cfg, param_dtype=storage, dtype=compute_dtype or storage,
                             vision=False)


class Labeler:
  """docs [(record index, document)] -> per document (ids, q [n - 1, k]); counts its tokens
  and seconds (the teacher's rate).

  devices: the mesh's (default: every local device); rows must divide over them.
  compute_dtype: the teacher's activations ('': its storage dtype's, bfloat16 for int8).
  """

  def __init__(self, spec: Spec, *, rows: int = 8, chunk_size: int = 256,
               devices: Sequence[Any] | None = None, compute_dtype: str = ''):
    devices = list(jax.local_devices() if devices is None else devices)
    if rows % len(devices):
      raise config_lib.ConfigError(f'--teacher_rows={rows}: expected a multiple of the '
                                   f'{len(devices)} local devices the teacher is sharded over')
    self.spec, self.rows = spec, rows
    m = teacher_model_config(spec, compute_dtype)
    self.vocab_size = m.vocab_size
    c = config_lib.Config()  # mesh: fsdp = -1, every device
    c = dataclasses.replace(c, model=m, train=dataclasses.replace(c.train, global_batch_size=rows))
    self.mesh = sharding.make_mesh(c, devices)
    self.rules = sharding.DEFAULT_RULES
    model = frozen.abstract_model(m, spec.dtype)
    graphdef = nnx.graphdef(model)
    abstract = nnx.state(model, frozen.MODEL_VARIABLES)
    shardings = sharding.state_shardings(abstract, self.mesh, self.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    # Streamed into the shardings (no device holds the whole teacher), int8 quantized there.
    self.state = frozen.load(spec.path, c, abstract)
    keys = spec.loss == 'sampled'

    def targets(state, inputs, positions, segment_ids, record, record_pos):
      teacher = nnx.merge(graphdef, state)
      x_BLD = teacher.hidden(inputs, positions, segment_ids)
      draws = dict(seed=spec.seed, record_BL=record, pos_BL=record_pos) if keys else {}
      return soft_targets.teacher_targets(x_BLD, teacher.embedder.table(), k=spec.samples,
                                          temperature=spec.temperature, chunk_size=chunk_size,
                                          **draws)
    rows_BL = sharding.batch_sharding(self.mesh, (rows, spec.seq_len), self.rules)
    self._targets = jax.jit(targets, in_shardings=(shardings,) + (rows_BL,) * len(_ROW_KEYS),
                            out_shardings=sharding.batch_sharding(self.mesh))
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
      arrays = {key: np.stack([r[key] for r in batch]) for key in _ROW_KEYS}
      real = len(batch)
      if real < self.rows:  # one compiled shape: empty rows (segment 0) fill the batch
        arrays = {key: np.pad(a, ((0, self.rows - real), (0, 0))) for key, a in arrays.items()}
      with sharding.use_mesh(self.mesh, self.rules):  # the model's constraints, as in training
        ids, q = jax.device_get(self._targets(self.state, *arrays.values()))
      for r in range(real):  # each segment is a piece: one document's positions
        seg = arrays['segment_ids'][r]
        for s in np.unique(seg[seg > 0]):
          at = seg == s
          rec, pos = int(arrays['record'][r][at][0]), arrays['record_pos'][r][at]
          out[rec][0][pos], out[rec][1][pos] = ids[r][at], q[r][at]
    self.tokens += sum(len(d['tokens']) - 1 for _, d in docs)
    self.seconds += time.perf_counter() - start
    return [out[i] for i, _ in docs]
