"""The grain pipeline: shard -> shuffle(seed, epoch) -> tokenize -> split -> pack -> batch.

Batches are dicts of numpy arrays [B, L] (B = global batch / data groups, L = data.seq_len),
with the keys and dtypes of BATCH_DTYPES:
  inputs, targets int32   targets[j] is the token after inputs[j] in the same document
  positions int32          0 at each document (or split piece) start
  segment_ids int32        1, 2, ... per document within a row; 0 on padding
  weights float32          1 where the target counts in the loss (chat: model turns only)
and, when model.vision, IMAGE_BATCH_DTYPES:
  images uint8 [B, data.max_images, S, S, 3]  the row's images in token order, then zeros
  image_counts int32 [B]                       how many of the slots hold an image
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from absl import flags
import grain
import jax
import numpy as np

from gemma3_train import config as config_lib
from gemma3_train import sharding as sharding_lib
from gemma3_train.data import documents
from gemma3_train.data import images as images_lib
from gemma3_train.data import mixture
from gemma3_train.data import order
from gemma3_train.data import packing
from gemma3_train.data import preference
from gemma3_train.data import prepared
from gemma3_train.data import select
from gemma3_train.data import sources
from gemma3_train.data import teacher
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.infra import signals

log = logging.getLogger(__name__)

BATCH_DTYPES = {'inputs': np.int32, 'targets': np.int32, 'positions': np.int32,
                'segment_ids': np.int32, 'weights': np.float32}
IMAGE_BATCH_DTYPES = {'images': np.uint8, 'image_counts': np.int32}


class SplitRows(grain.experimental.FlatMapTransform):
  """Document -> pieces of at most seq_len (inputs, targets, weights) = (t[:-1], t[1:], m[1:])."""

  max_fan_out = 1 << 16

  def __init__(self, seq_len: int, images: images_lib.ImageSpec | None = None):
    self.seq_len, self.images = seq_len, images

  def flat_map(self, doc):
    x, y, w = doc['tokens'][:-1], doc['tokens'][1:], doc['mask'][1:]
    L = self.seq_len
    pieces = [{'inputs': x[s:s + L], 'targets': y[s:s + L], 'weights': w[s:s + L]}
              for s in range(0, len(x), L)]
    # Distillation (data/teacher.py): stored targets per position; the draws' keys (record
    # index, position in the document).
    for s, piece in zip(range(0, len(x), L), pieces):
      for k in ('teacher_ids', 'teacher_probs'):
        if k in doc:
          piece[k] = doc[k][s:s + L]
      if 'record' in doc:
        n = len(piece['inputs'])
        piece['record'] = np.full(n, doc['record'], np.int32)
        piece['record_pos'] = np.arange(s, s + n, dtype=np.int32)
    if self.images is not None:  # documents with images fit one row (documents.ToDocument)
      for k, piece in enumerate(pieces):
        piece['images'] = doc['images'] if k == 0 and 'images' in doc else self.images.empty()
    return pieces


class _WithRecord(grain.transforms.Map):
  """Index -> the document with its record index (distillation's draw keys, data/teacher.py)."""

  def __init__(self, to_doc: documents.ToDocument):
    self.to_doc, self.source, self.field = to_doc, to_doc.source, to_doc.field

  def document(self, i: int) -> dict[str, np.ndarray] | None:
    return self.to_doc.document(i)

  def map(self, i: int) -> dict[str, np.ndarray] | None:
    doc = self.to_doc.map(i)
    return None if doc is None else {**doc, 'record': np.int32(i)}


class _PadRow(grain.transforms.Map):
  """data.packing=False: one piece per row, right-padded."""

  def __init__(self, seq_len: int, max_images: int = 0):
    self.seq_len, self.max_images = seq_len, max_images

  def map(self, piece):
    n, L = len(piece['inputs']), self.seq_len
    pad = lambda x: np.pad(x, (0, L - n))
    row = {'inputs': pad(piece['inputs']), 'targets': pad(piece['targets']),
           'weights': pad(piece['weights']),
           'positions': pad(np.arange(n, dtype=np.int32)),
           'segment_ids': pad(np.ones(n, np.int32))}
    for k in packing.EXTRA_KEYS:
      if k in piece:
        row[k] = np.pad(piece[k], ((0, L - n),) + ((0, 0),) * (piece[k].ndim - 1))
    if 'images' in piece:
      row.update(packing.image_slots([piece['images']], self.max_images))
    return row


def local_batch_size(c: config_lib.Config, process_count: int) -> int:
  """Rows per batch of one data group (process_count: the number of groups, see
  sharding.data_groups; each process is one unless a context group spans processes)."""
  if c.train.global_batch_size % process_count:
    raise config_lib.ConfigError(
        f'train.global_batch_size={c.train.global_batch_size}: expected a multiple of the '
        f'number of data groups {process_count} (processes loading different rows)')
  return c.train.global_batch_size // process_count


def _tokenizer(c: config_lib.Config) -> tokenizer_lib.Tokenizer | None:
  if c.data.source == 'synthetic':
    return None
  tok = tokenizer_lib.Tokenizer(c.data.tokenizer_path)
  tokenizer_lib.check_vocab(tok, c)
  return tok


def _probe(to_doc: documents.ToDocument, indices, field_name: str) -> None:
  """Start-up check that a systematic mistake (wrong field, format) is an error, not skips."""
  with sources.recording() as reasons, sources.probing():
    for i in indices[:sources.PROBE_ROWS]:
      if to_doc.document(int(i)) is not None:
        return
  new = sorted(set(reasons))
  if len(new) > 3:  # the same reason at other columns, say: the first three, then a count
    new = new[:3] + [f'{len(new) - 3} more']
  if new:
    n = min(len(indices), sources.PROBE_ROWS)
    raise config_lib.ConfigError(
        f'{field_name}={to_doc.field!r}: none of the first {n} records from '
        f'{to_doc.source.where(int(indices[0]))} is usable ({"; ".join(new)}); check the '
        'field name and data.format')


def make_dataset(c: config_lib.Config, split: str = 'train', *, process_index: int = 0,
                 process_count: int = 1, num_epochs: int | None = None,
                 batch_size: int | None = None) -> grain.IterDataset:
  """The batch pipeline for this process's shard; num_epochs None repeats forever."""
  c = select.resolve(c)  # data.source from data.train_path, when left at 'bundled'
  d = c.data
  if not 0 <= process_index < process_count:
    raise config_lib.ConfigError(f'process_index={process_index}: expected 0 <= index < '
                                 f'process_count={process_count}')
  B = batch_size or local_batch_size(c, process_count)
  # The distillation keys are the whole run's (a mixture's labels=hard adds one to every row).
  rows = functools.partial(_source_rows, split=split, process_index=process_index,
                           process_count=process_count, keys=teacher.batch_keys(c))
  mixed = bool(d.mixture) and split == 'train'
  if mixed:
    ds = mixture.make_rows(c, rows, batch_size=B, num_epochs=num_epochs)
  else:
    ds = rows(c, num_epochs)
  k = crossing_batches(B, d.seq_len) if d.num_workers else 1
  ds = ds.batch(k * B, drop_remainder=num_epochs is None)
  if d.num_workers:
    # grain 0.2.18's mp_prefetch reads its --grain_* absl flags, which raise until parsed; a
    # caller outside absl.app (tests, notebooks) has not parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.num_workers, per_worker_buffer_size=max(d.prefetch, 1)),
        worker_init_fn=signals.ignore_interrupts_in_worker)
  elif d.prefetch and not _all_prepared(c, mixed):  # (prepared data: see _all_prepared)
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
  if k > 1:
    ds = SplitBatches(ds, B)
  if mixed:
    ds = mixture.count_sources(ds, c, process_count)
  return ds


# A worker process hands each element to the main process through shared memory: a segment per
# array, opened and unlinked on the other side. At 8 x 1024 tokens per batch that cost about a
# sixth of the CPU per token (docs/data.md), so a crossing carries batches for at least this many
# tokens (at most CROSSING_MAX_BATCHES batches), and the main process splits them.
CROSSING_TOKENS = 1 << 16
CROSSING_MAX_BATCHES = 16


def crossing_batches(batch_size: int, seq_len: int) -> int:
  """How many batches one worker element carries."""
  return max(1, min(CROSSING_MAX_BATCHES, -(-CROSSING_TOKENS // (batch_size * seq_len))))


class _SplitIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, rows: int):
    super().__init__(parent)
    self._rows = rows
    self._big, self._used, self._before = None, 0, None  # the parent's state before _big

  def __next__(self) -> dict[str, np.ndarray]:
    if self._big is None or self._used >= self._size:
      self._before = self._parent.get_state()
      self._fetch()
    rows = slice(self._used, self._used + self._rows)
    self._used += self._rows
    return {k: v[rows] for k, v in self._big.items()}

  def _fetch(self) -> None:
    # A copy, so that the worker's shared memory is released now, not when the last view of
    # it goes (an element still held at exit is reported as a leaked segment).
    self._big = {k: np.array(v) for k, v in next(self._parent).items()}
    self._used, self._size = 0, len(next(iter(self._big.values())))

  def get_state(self) -> dict:
    if self._big is None or self._used >= self._size:
      return {'parent': self._parent.get_state(), 'split_rows': 0}
    return {'parent': self._before, 'split_rows': self._used}

  def set_state(self, state: dict) -> None:
    self._big, self._used = None, 0
    if 'split_rows' not in state:  # a checkpoint from before the split: the parent's own
      self._parent.set_state(state)
      return
    self._parent.set_state(state['parent'])
    if state['split_rows']:
      self._before = state['parent']
      self._fetch()
      self._used = state['split_rows']


class SplitBatches(grain.IterDataset):
  """Elements of k x rows rows -> k batches of `rows` rows each, in order; the checkpointed
  state is the parent's before the current element and the rows handed out of it."""

  def __init__(self, parent: grain.IterDataset, rows: int):
    super().__init__(parent)
    self._rows = rows

  def __iter__(self) -> _SplitIterator:
    return _SplitIterator(self._parent.__iter__(), self._rows)


def _all_prepared(c: config_lib.Config, mixed: bool) -> bool:
  """Whether every source read is data.source=prepared, which takes no batch thread: its
  data.prefetch is a read-ahead of records from gs:// (prepared.Pieces), and local shards are
  read inline."""
  if not mixed:
    return c.data.source == 'prepared'
  return all(select.resolve(dataclasses.replace(c, data=config_lib.source_data(c.data, m)),
                            warn=False).data.source == 'prepared'
             for m in config_lib.parse_mixture(c.data.mixture) if m.weight > 0)


def _source_rows(c: config_lib.Config, num_epochs: int | None, *, split: str,
                 process_index: int, process_count: int, keys: dict,
                 labels: str | None = None) -> grain.IterDataset:
  """One source's packed (or padded) rows for this data group's shard of its documents
  (process_index / process_count: the group and the number of groups, sharding.data_group).

  keys: the run's teacher.batch_keys; labels: a mixture source's labels= (None: no mixture).
  """
  c = select.resolve(c, warn=False)  # a mixture source's data.source, from its train_path
  d = c.data
  tok = _tokenizer(c)
  source = select.make_source(c, split)
  field = d.messages_field if d.format == 'chat' else d.text_field
  image_spec = images_lib.spec(c)
  pairs = c.train.objective == 'dpo'
  hard = labels == 'hard'
  stored = 'teacher_ids' in keys and not hard  # this source's rows carry stored targets
  if pairs:  # one piece per preference pair, never split (data/preference.py)
    p = c.dpo
    table = None  # dpo.reference_logps=precompute: the reference's table of this shard
    if (p.reference_logps == 'precompute' and p.loss not in config_lib.DPO_REFERENCE_FREE
        and p.reference_logps_dir):
      table = preference.table_path(p.reference_logps_dir, split, process_index, process_count)
    to_doc = preference.ToPair(source, tok, (p.prompt_field, p.chosen_field, p.rejected_field),
                               p.max_prompt_len, p.max_len or d.seq_len // 2, reference=table,
                               images=image_spec)
  elif d.source == 'prepared':  # documents tokenized by gemma3-data prepare
    if stored:  # distillation on stored targets: the shards must hold them
      teacher.check(c, source.teacher, f'{source.field}={source.spec!r}', labels is not None)
    to_doc = prepared.ToDocument(source, d.seq_len, record='record' in keys, targets=stored)
  else:
    if stored:
      hint = ', or give the mixture source labels=hard' if labels is not None else ''
      raise config_lib.ConfigError(
          f"distill.teacher='': data.source={d.source!r} has no stored teacher targets; "
          f'train on shards of gemma3-data prepare --teacher (data.source=prepared){hint}')
    to_doc = documents.ToDocument(source, tok, d.format, field, d.seq_len, images=image_spec)
    if 'record' in keys:
      to_doc = _WithRecord(to_doc)

  # Each process sees only the documents i % process_count == process_index, shuffled
  # per epoch by (seed, epoch) (data/order.py).
  mine = range(process_index, len(source), process_count)
  if not mine:
    raise config_lib.ConfigError(f'data: {len(source)} documents cannot feed '
                                 f'{process_count} processes')
  if source.record not in ('tokens', 'prepared'):
    _probe(to_doc, mine, 'dpo.prompt_field' if pairs else
           'data.messages_field' if d.format == 'chat' else 'data.text_field')
  ids = order.DocumentOrder(len(source), process_index=process_index,
                            process_count=process_count, num_epochs=num_epochs,
                            shuffle_seed=d.seed if d.shuffle and split == 'train' else None)
  split_rows = SplitRows(d.seq_len, image_spec)  # (a vision model's text pieces get empty slots)
  if d.source == 'prepared':  # no tokenizing to overlap: read records a chunk at a time
    ds = prepared.Pieces(ids, to_doc, split_rows.flat_map,
                         read_ahead=d.prefetch > 0 and source.remote)
  else:
    # grain 0.2.18 polls every buffered future on each element: a deep buffer costs per
    # document as much as tokenizing a few hundred tokens (benchmarks/data_throughput.py); 16
    # keeps 4 reader threads busy.
    ds = ids.map(to_doc).to_iter_dataset(grain.ReadOptions(
        num_threads=1 if d.num_workers else 4, prefetch_buffer_size=16))
    if not pairs:
      ds = grain.experimental.FlatMapIterDataset(ds, split_rows)
  if d.packing:  # held-out rows independent of data.seed: evals of runs stay comparable
    ds = packing.FirstFitPack(ds, d.seq_len, seed=d.seed if split == 'train' else 0,
                              max_images=image_spec.max_images if image_spec else 0)
  else:
    ds = ds.map(_PadRow(d.seq_len, d.max_images))
  if ('teacher_ids' in keys and hard) or 'hard_labels' in keys:
    ds = ds.map(_HardLabels(hard, keys, c.model.vocab_size))
  return ds


class _HardLabels(grain.transforms.Map):
  """A distillation mixture's rows (data/teacher.py): offline, a labels=hard source's rows get
  their next tokens as targets; online, every row says whether its source is labels=hard."""

  def __init__(self, hard: bool, keys: dict, vocab_size: int):
    self.hard, self.vocab_size = hard, vocab_size
    self.k = keys['teacher_ids'][0][0] if 'teacher_ids' in keys else 0

  def map(self, row):
    if self.k:
      ids_LK, q_LK = teacher.hard_targets(row['targets'], self.k, self.vocab_size)
      return {**row, 'teacher_ids': ids_LK, 'teacher_probs': np.ascontiguousarray(q_LK)}
    return {**row, 'hard_labels': np.full(len(row['targets']), self.hard, np.int32)}


def make_train_iterator(c: config_lib.Config, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Endless checkpointable iterator (get_state/set_state) of host-local train batches.

  process_index / process_count: the process's data group and the number of groups
  (sharding.data_group); the processes of a group get the same batches.

  Close and drop it before the interpreter exits (training/loop.py does): grain 0.2.18's prefetch
  iterators close again from __del__, which fails during interpreter teardown (an ignored
  AttributeError on stderr).
  """
  c = select.resolve(c)
  it = iter(make_dataset(c, 'train', process_index=process_index,
                         process_count=process_count))
  log.info('data: %s train batches of %s x %d for process %d/%d', c.data.source,
           local_batch_size(c, process_count), c.data.seq_len, process_index, process_count)
  return it


def make_eval_iterator(c: config_lib.Config, *, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """A fresh, repeating, unshuffled iterator over the eval split (same batch format).

  Runs in the main process (threads only): an eval takes a few batches, and starting grain
  worker processes per eval would cost more than it saves.
  """
  c = c.replace(data=dict(num_workers=0))
  return iter(make_dataset(c, 'eval', process_index=process_index, process_count=process_count))


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding | dict) -> dict[str, jax.Array]:
  """Host-local rows -> global jax.Arrays laid out by `sharding` (batch axis over processes),
  or by sharding[key] per array (a train Setup's batch_sharding: [B, L] arrays' positions on
  the context axis).

  The local rows are those of the process's data group (sharding.data_group): when each
  process is a group of its own they are the process's rows; when a context group spans
  processes, every process of it holds the same whole rows and gives each of its devices
  that device's rows and positions."""
  pick = (lambda k: sharding[k]) if isinstance(sharding, dict) else (lambda k: sharding)
  group = sharding_lib.data_group(pick(next(iter(local_batch))))
  if group.count == jax.process_count():  # a process per group: the rows are its own
    return {k: jax.make_array_from_process_local_data(pick(k), v)
            for k, v in local_batch.items()}
  n = len(next(iter(local_batch.values())))
  B = n * group.count
  local_of = np.full(B, -1)  # global row -> its place in local_batch
  local_of[group.rows(B)] = np.arange(n)

  def one(k, v):
    return jax.make_array_from_callback(
        (B,) + v.shape[1:], pick(k), lambda index: v[(local_of[index[0]],) + index[1:]])
  return {k: one(k, v) for k, v in local_batch.items()}
