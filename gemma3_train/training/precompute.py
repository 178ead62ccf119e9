"""dpo.reference_logps=precompute: the reference's log-probabilities of every pair, computed in
one pass before training and stored in the workdir, so that training holds no reference model.

The pass scores each record of this process's shard (the documents i % process_count ==
process_index, in index order) with the run's starting model (checkpoint.init_from, else the
seed's init; with LoRA its base, the adapters off), packed as training packs pairs. The table
is float32 [records, 2] (chosen, rejected; NaN where a record is skipped), keyed by record
index: the data
pipeline (data/preference.py) looks each pair up wherever the shuffled, packed order puts it,
so a resumed run reads the same values. It is written to
dpo.reference_logps_dir/{split}.{process}-of-{count}.npz (default WORKDIR/reference_logps)
with the settings it depends on; a run whose settings differ computes it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import jax
import numpy as np
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train import data as data_lib
from gemma3_train import sharding
from gemma3_train.data import images as images_lib
from gemma3_train.data import packing
from gemma3_train.data import preference
from gemma3_train.data import select
from gemma3_train.infra import progress as progress_lib

log = logging.getLogger(__name__)

_DEPENDS_ON = ('data.train_path', 'data.eval_path', 'data.tokenizer_path', 'data.seq_len',
               'dpo.prompt_field', 'dpo.chosen_field', 'dpo.rejected_field',
               'dpo.max_prompt_len', 'dpo.max_len', 'checkpoint.init_from', 'train.seed',
               'lora.init_adapter')


def table_dir(c: config_lib.Config, workdir: str) -> epath.Path:
  return epath.Path(c.dpo.reference_logps_dir or f'{workdir}/reference_logps')


def _key(c: config_lib.Config) -> str:
  """What the table depends on: the data, the tokenization, the reference model's source."""
  values = {k: getattr(getattr(c, k.split('.')[0]), k.split('.')[1]) for k in _DEPENDS_ON}
  values['model'] = {k: getattr(c.model, k) for k in config_lib.MODEL_SHAPE_FIELDS}
  return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _pair_rows(c: config_lib.Config, split: str, pid: int, nproc: int):
  """(records in the source, an iterator of packed rows) of this process's shard: its pairs in
  index order, packed as training packs them, each token carrying its record index + 1 under
  'record' (0 on padding)."""
  c = select.resolve(c, warn=False)
  tok = data_lib.Tokenizer(c.data.tokenizer_path)
  source = select.make_source(c, split)
  p = c.dpo
  spec = images_lib.spec(c)
  to_pair = preference.ToPair(source, tok, (p.prompt_field, p.chosen_field, p.rejected_field),
                              p.max_prompt_len, p.max_len or c.data.seq_len // 2, images=spec)

  def rows():
    group = []
    for i in range(pid, len(source), nproc):
      piece = to_pair.document(i)
      if piece is not None:
        piece['record'] = np.full(len(piece['inputs']), i + 1, np.int32)
        group.append(piece)
      if len(group) == packing.GROUP or (group and i + nproc >= len(source)):
        yield from packing.pack_group(group, c.data.seq_len, spec.max_images if spec else 0)
        group = []
  return len(source), rows()


def _row_records(row: dict[str, np.ndarray]) -> list[int]:
  """The record index of each pair slot of a packed row, in slot order."""
  seg, record = row['segment_ids'], row['record']
  return [int(record[np.argmax(seg == 2 * j + 1)]) - 1 for j in range(int(seg.max()) // 2)]


def _allgather(x, nproc: int, tiled: bool = False):
  """x from every process (itself with one process)."""
  if nproc == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(x, tiled=tiled)


def _gather_rows(x, group: sharding.DataGroup, nproc: int) -> np.ndarray:
  """This process's data group's rows of a batch-sharded global array."""
  return np.asarray(_allgather(x, nproc, tiled=True))[group.rows(x.shape[0])]


def compute(s, state, split: str, score) -> np.ndarray:
  """The table of this process's shard of `split` (see the module docstring); score(state,
  batch) -> (chosen [B, P], rejected [B, P]) is jitted: the pair slots of each row."""
  c = s.config
  pid, nproc = jax.process_index(), jax.process_count()
  batch_sharding = sharding.batch_sharding(s.mesh)
  group = sharding.data_group(batch_sharding)  # a context group's processes score alike
  B = c.train.global_batch_size // group.count
  n, rows = _pair_rows(c, split, group.index, group.count)
  table = np.full((n, 2), np.nan, np.float32)
  empty = {k: np.zeros(c.data.seq_len, v) for k, v in data_lib.BATCH_DTYPES.items()}
  keys = list(data_lib.BATCH_DTYPES)
  if c.model.vision:
    keys += list(data_lib.IMAGE_BATCH_DTYPES)
    S = c.model.vision_image_size
    empty.update(images=np.zeros((c.data.max_images, S, S, 3), np.uint8),
                 image_counts=np.int32(0))
  bar = progress_lib.Progress(f'reference log-probs of the {split} pairs',
                              -(-n // group.count), 'pairs') if pid == 0 else None
  done, start = 0, time.perf_counter()
  while True:
    chunk = [row for _, row in zip(range(B), rows)]
    # Every process runs the same number of batches, while any has rows left.
    left = _allgather(np.asarray([len(chunk)], np.int32), nproc)
    if not np.any(left):
      break
    local = chunk + [empty] * (B - len(chunk))
    batch = {k: np.stack([r[k] for r in local]) for k in keys}
    chosen, rejected = (_gather_rows(x, group, nproc) for x in
                        score(state, data_lib.global_batch(batch, batch_sharding)))
    for k, row in enumerate(chunk):
      for j, i in enumerate(_row_records(row)):
        table[i] = chosen[k, j], rejected[k, j]
        done += 1
    if bar:
      bar.update(done)
  if bar:
    bar.close()
  log.info('Reference log-probabilities of %d %s pairs in %.1f s', done, split,
           time.perf_counter() - start)
  return table


def ensure(s, workdir: str, splits: tuple[str, ...], *, initial_state, score) -> None:
  """Computes (or finds, with matching settings) the tables of `splits` in table_dir.
  initial_state() builds the starting state only when a table is computed."""
  c = s.config
  directory = table_dir(c, workdir)
  group = sharding.data_group(sharding.batch_sharding(s.mesh))
  key = _key(c)
  state = None
  for split in splits:
    path = preference.table_path(directory, split, group.index, group.count)
    if path.exists():
      with path.open('rb') as f:
        stored = np.load(f)
        if str(stored['key']) == key:
          log.info('Reference log-probabilities (%s) from %s', split, path)
          continue
      log.info('%s was computed with other settings; computing it again', path)
    if state is None:
      state = initial_state()
    table = compute(s, state, split, score)
    directory.mkdir(parents=True, exist_ok=True)
    # The processes of a data group write the same table: each through its own file.
    tmp = path.parent / f'{path.name}.tmp{jax.process_index()}'
    with tmp.open('wb') as f:
      np.savez(f, logps=table, key=np.asarray(key))
    tmp.rename(path)
  del state
