"""data.source=prepared: documents tokenized once by `gemma3-data prepare` (data/prepare.py).

A prepared directory (local or gs://) holds ArrayRecord shards and manifest.json; data.train_path
names one, or a comma list read as their concatenation (parts prepared on several machines).
Record i of the shards, in manifest order, is row i of the prepared input, so the pipeline
shuffles and shards exactly as it does the raw input and yields the same batches:

  text: the document's int32 tokens (little-endian), BOS ... EOS as documents.ToDocument makes
        them; the loss mask is the text mask (every target counts);
  chat: the int32 tokens followed by one uint8 mask byte per token (model turns only);
  an empty record: a row the prepare skipped (counted in the manifest), skipped here too;
  with --teacher, a uint32 token count first and the teacher's targets after (data/teacher.py).

What depends on data.seq_len is decided here, as documents.ToDocument decides it: a chat
longer than seq_len + 1 tokens is skipped, a longer text is split (counted).
"""

from __future__ import annotations

from concurrent import futures
import hashlib
import json
from typing import Any, Callable

from etils import epath
import grain
import numpy as np

from gemma3_train import config as config_lib
from gemma3_train.data import order
from gemma3_train.data import sources
from gemma3_train.data import teacher as teacher_lib
from gemma3_train.data import tokenizer as tokenizer_lib

MANIFEST = 'manifest.json'
FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype('<i4')


def tokenizer_sha256(tok: tokenizer_lib.Tokenizer) -> str:
  return hashlib.sha256(tok.model_proto).hexdigest()


def encode(doc: dict[str, np.ndarray] | None, fmt: str) -> bytes:
  """A document (or None: a skipped row) -> its record."""
  if doc is None:
    return b''
  tokens = doc['tokens'].astype(TOKEN_DTYPE).tobytes()
  return tokens + doc['mask'].astype(np.uint8).tobytes() if fmt == 'chat' else tokens


def decode(record: bytes, fmt: str, teacher_k: int = 0) -> dict[str, np.ndarray] | None:
  """A record -> its document; teacher_k: the record holds teacher targets of k ids a position
  (teacher_ids, teacher_probs [n - 1, k] added)."""
  if not record:
    return None
  if teacher_k:
    record, ids_PK, q_PK = teacher_lib.decode(record, fmt == 'chat', teacher_k)
    return {**decode(record, fmt), 'teacher_ids': ids_PK, 'teacher_probs': q_PK}
  if fmt == 'chat':
    n = len(record) // 5
    tokens = np.frombuffer(record, TOKEN_DTYPE, count=n).astype(np.int32, copy=False)
    mask = np.frombuffer(record, np.uint8, offset=4 * n).astype(np.float32)
  else:
    # A read-only view on little-endian hosts: rows are built by copying out of it.
    tokens = np.frombuffer(record, TOKEN_DTYPE).astype(np.int32, copy=False)
    mask = np.ones(len(tokens), np.float32)
    mask[0] = 0.0  # BOS is never a target (documents.ToDocument's text mask)
  return {'tokens': tokens, 'mask': mask}


def read_manifest(directory: str, field: str) -> dict[str, Any]:
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    raise config_lib.ConfigError(f'{field}={directory!r}: no {MANIFEST}; expected a directory '
                                 'written by `gemma3-data prepare` (an unfinished one resumes '
                                 'when the same command is run again)')
  manifest = json.loads(path.read_text())
  if manifest.get('format_version') != FORMAT_VERSION:
    raise config_lib.ConfigError(
        f'{field}={directory!r}: {MANIFEST} has format_version '
        f'{manifest.get("format_version")!r}; this version reads {FORMAT_VERSION}')
  return manifest


class PreparedSource(sources._Files):  # pylint: disable=protected-access
  """The records of a prepared directory; refuses one made with another tokenizer."""

  kind = 'record'
  record = 'prepared'

  def __init__(self, spec: str, field: str, tokenizer_path: str):
    ours = tokenizer_lib.Tokenizer(tokenizer_path)
    paths, rows, formats, teachers = [], [], set(), []
    for directory in (d.strip() for d in spec.split(',') if d.strip()):  # one or a comma list
      manifest = read_manifest(directory, field)
      made = manifest['tokenizer']
      if made['sha256'] != tokenizer_sha256(ours):
        raise config_lib.ConfigError(
            f'{field}={directory!r}: tokenized with {made["path"] or tokenizer_lib.BUNDLED} '
            f'(sha256 {made["sha256"][:12]}) but data.tokenizer_path='
            f'{tokenizer_path or tokenizer_lib.BUNDLED!r} is sha256 '
            f'{tokenizer_sha256(ours)[:12]}; use that tokenizer or rerun gemma3-data prepare')
      formats.add(manifest['format'])
      teachers.append(manifest.get('teacher'))
      paths += [str(epath.Path(directory) / s['path']) for s in manifest['shards']]
      rows += [range(s['rows']) for s in manifest['shards']]
    if len(formats) > 1:
      raise config_lib.ConfigError(f'{field}={spec!r}: mixes prepared formats '
                                   f'{" and ".join(sorted(formats))}; use a mixture')
    self.format = formats.pop() if formats else 'text'
    plans = {None if t is None else tuple(t[k] for k in teacher_lib.PLAN_KEYS) for t in teachers}
    if len(plans) > 1:
      raise config_lib.ConfigError(f'{field}={spec!r}: mixes directories prepared with '
                                   'different teachers (or with and without one)')
    self.teacher = teachers[0] if teachers else None  # the manifest's 'teacher' entry
    super().__init__(paths, rows, field, spec)
    self.field, self.spec = field, spec
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self._remote = any('://' in p for p in paths)

  @property
  def remote(self) -> bool:
    """Whether a shard is on remote storage (gs://), whose reads wait on the network."""
    return self._remote

  def __getitem__(self, i: int) -> bytes:
    return self._source[i]

  def records(self, indices: list[int]) -> list[bytes]:
    """Several records in one call. Remote shards (gs://) are read in parallel threads, which
    hides their latency; local ones one by one, which costs half the CPU (array_record starts
    a thread pool per call: 8 ms vs 3.5 ms per 256 records here)."""
    if self.remote:
      return self._source.__getitems__(indices)
    return [self._source[i] for i in indices]


class ToDocument(grain.transforms.Map):
  """Index -> document, as documents.ToDocument would have made it from the raw row.

  record: add the record index ('record', distillation's draw keys); targets: add the stored
  teacher targets (distill.teacher='')."""

  field = ''  # (the pipeline's start-up probe is not run on prepared data)

  def __init__(self, source: PreparedSource, seq_len: int, record: bool = False,
               targets: bool = False):
    self.source, self.seq_len = source, seq_len
    self.record, self.targets = record, targets
    self._k = source.teacher['samples'] if source.teacher else 0

  def document(self, i: int) -> dict[str, np.ndarray] | None:
    return self.from_record(self.source[i], i)

  def from_record(self, record: bytes, i: int) -> dict[str, np.ndarray] | None:
    doc = decode(record, self.source.format, self._k)
    if doc is None:
      return None
    if self._k and not self.targets:
      doc = {'tokens': doc['tokens'], 'mask': doc['mask']}
    if self.record:
      doc['record'] = np.int32(i)
    n = len(doc['tokens'])
    if n - 1 > self.seq_len:
      where = self.source.where(i)
      if self.source.format == 'chat':
        sources.note(f'chat longer than data.seq_len={self.seq_len} ({n} tokens)', where)
        return None
      sources.note(f'longer than data.seq_len={self.seq_len}', where, skipped=False)
    return doc

  def map(self, i: int) -> dict[str, np.ndarray] | None:
    return self.document(int(i))


READ_CHUNK = 256  # documents per batched read


READ_AHEAD_THREAD = 'prepared-read-ahead'


class Pieces(grain.IterDataset):
  """Document ids -> the pieces split(document) gives, in order, as the on-the-fly pipeline's
  map -> to_iter_dataset -> FlatMap gives them, but reading records a chunk at a time: for
  prepared data grain's per-document machinery (reader threads, futures, flat-map) costs more
  than the read itself (benchmarks/data_throughput.py).

  read_ahead: a thread reads the next chunk's records while this one is split and packed. That
  is data.prefetch for remote shards (gs://): the records are the only part that waits on I/O,
  and handing over raw records once per READ_CHUNK documents is cheaper than a batch thread's
  hand-over per batch. The pipeline reads local shards inline: their reads are copies from the
  page cache, and the second thread only contends for the GIL (up to twice the CPU per token
  with the other core busy; docs/data.md)."""

  def __init__(self, ids: order.DocumentOrder, to_doc: ToDocument,
               split: Callable[[dict[str, np.ndarray]], list[dict[str, np.ndarray]]],
               read_ahead: bool = False):
    super().__init__()
    self._ids, self._to_doc, self._split = ids, to_doc, split
    self._read_ahead = read_ahead
    self._positions = range(len(ids))  # the positions of ids this iterator reads

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """grain's worker processes each read a slice of the documents, as they do the on-the-fly
    pipeline's (where the slice is taken of ids.map(to_doc), the same documents)."""
    if sequential_slice:
      raise NotImplementedError('sequential_slice')  # not an option this pipeline sets
    self._positions = self._positions[sl]

  def __iter__(self) -> grain.DatasetIterator:
    return _PiecesIterator(self._ids, self._positions, self._to_doc, self._split,
                           self._read_ahead)


class _PiecesIterator(grain.DatasetIterator):
  """State: the next piece is piece `piece` of document `doc` (an index into positions)."""

  def __init__(self, ids, positions: range, to_doc, split, read_ahead: bool):
    super().__init__()
    self._ids, self._positions, self._to_doc, self._split = ids, positions, to_doc, split
    self._doc = self._piece = 0
    self._start, self._chunk = 0, []  # pieces of documents start, start + 1, ...
    self._reader = futures.ThreadPoolExecutor(1, READ_AHEAD_THREAD) if read_ahead else None
    self._ahead: tuple[int, futures.Future] | None = None  # (start, its records being read)

  def _read(self, k: int) -> tuple[list[int], list[bytes]]:
    """The document ids and records of the chunk that starts at position k."""
    chunk = self._positions[k:k + READ_CHUNK]
    indices = self._ids.doc_ids(np.arange(chunk.start, chunk.stop, chunk.step)).tolist()
    return indices, self._to_doc.source.records(indices)

  def _records(self, k: int) -> tuple[list[int], list[bytes]]:
    ahead, self._ahead = self._ahead, None
    got = ahead[1].result() if ahead and ahead[0] == k else self._read(k)
    if self._reader is not None and k + READ_CHUNK < len(self._positions):
      self._ahead = (k + READ_CHUNK, self._reader.submit(self._read, k + READ_CHUNK))
    return got

  def _pieces(self, k: int) -> list[dict[str, np.ndarray]]:
    if not self._start <= k < self._start + len(self._chunk):
      if k >= len(self._positions):
        raise StopIteration
      indices, records = self._records(k)
      docs = (self._to_doc.from_record(r, i) for r, i in zip(records, indices))
      self._start, self._chunk = k, [[] if d is None else self._split(d) for d in docs]
    return self._chunk[k - self._start]

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      pieces = self._pieces(self._doc)
      if self._piece < len(pieces):
        self._piece += 1
        return pieces[self._piece - 1]
      self._doc, self._piece = self._doc + 1, 0

  def get_state(self) -> dict[str, Any]:
    return {'doc': self._doc, 'piece': self._piece}

  def set_state(self, state: dict[str, Any]) -> None:
    self._doc, self._piece = state['doc'], state['piece']
    self._start, self._chunk = 0, []  # (a read ahead of another position goes unused)

  def close(self) -> None:  # (grain's __del__ calls it again, maybe at interpreter exit)
    if not self._closed and self._reader is not None:
      try:
        self._reader.shutdown(wait=False, cancel_futures=True)
      except Exception:  # pylint: disable=broad-except
        pass  # at interpreter exit module globals are gone; concurrent.futures joins the thread
    super().close()
