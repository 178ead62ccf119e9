"""Random-access record sources selected by data.source, and bad-record accounting.

Every source is a picklable sequence: `len(src)`, `src[i] -> raw record` (bytes, str, dict or
a token array) and `src.where(i) -> 'FILE row N'` for messages. What is an error and what is
skipped-and-counted:

  error (ConfigError at start-up): missing file, a glob matching nothing, no records at all,
    no usable record among the first PROBE_ROWS rows (e.g. data.text_field absent everywhere),
    a Parquet file without the field's column, tensorflow_datasets not installed;
  error (DataError while reading): a chat whose roles do not alternate user/model, an unknown
    role, a message without role/content (these are systematic formatting mistakes);
  skip-and-count (a WARNING naming file and row for the first few of each reason, each row
    once however many epochs read it; then only counted in COUNTS, and `log_summary` gives a
    total per file and reason at the end of the run; per process and per grain worker): an
    empty file among others, a row that is not JSON, lacks the field, is null or empty, or is
    not valid UTF-8, a chat longer than data.seq_len + 1 tokens (split, it would train replies
    without their prompt), the rows of an ArrayRecord file that turned unreadable mid-run (a
    DataError naming it once no readable file remains; JSONL and Parquet are read at start-up);
  count only (DEBUG): a text document longer than a row is split into seq_len pieces, each
    starting at position 0 (ordinary in pretraining, so not worth a line).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gzip
import importlib.resources
import logging
import re
from typing import Any, Iterator

from array_record.python import array_record_module
from etils import epath
import grain
import numpy as np

from gemma3_train import config as config_lib

PROBE_ROWS = 64  # start-up check: at least one usable record among the first rows
_WARN_FIRST = 5  # warnings naming the row per file and reason, then only counts

log = logging.getLogger(__name__)

COUNTS: collections.Counter[str] = collections.Counter()  # event -> rows, in this process
_SKIPPED: dict[tuple[str, str], set[str]] = {}  # (file, reason) -> rows skipped
_recorders: list[list[str]] = []


class DataError(ValueError):
  """A record that must not be silently skipped; the message names the file and row."""


def note(reason: str, where: str, *, skipped: bool = True, detail: str = '') -> None:
  """Counts a skipped (or split) record; warns of the first few skipped rows of each reason.

  Rows are counted by `reason`; `detail` (e.g. a JSON decoder's message with its line and
  column) is shown after it in the row's warning and in a start-up probe's error."""
  key = f'{"skipped" if skipped else "split"}: {reason}'
  shown = f'{key} ({detail})' if detail else key
  for keys in _recorders:
    keys.append(shown)
  if _probing:  # a start-up probe: the pipeline reads (and counts) these rows again
    return
  if not skipped:
    COUNTS[key] += 1
    if COUNTS[key] <= _WARN_FIRST:
      log.debug('data: %s at %s', key, where)
    return
  # where = 'FILE line N' (or row, record): one warning and one count per row, not per epoch
  file, _, row = where.rpartition(' ')
  rows = _SKIPPED.setdefault((file.rpartition(' ')[0] or where, reason), set())
  if row in rows:
    return
  rows.add(row)
  COUNTS[key] += 1
  if len(rows) <= _WARN_FIRST:  # the first few of each file and reason
    log.warning('data: %s at %s', shown, where)
  if len(rows) == _WARN_FIRST:
    log.warning('data: further rows of %s %s are counted, not shown; totals at the end',
                file.rpartition(' ')[0] or where, key)


_probing: list[bool] = []


@contextlib.contextmanager
def probing() -> Iterator[None]:
  """Notes inside the block are recorded but neither counted nor logged: a start-up probe
  reads rows that the pipeline will read (and count) again."""
  _probing.append(True)
  try:
    yield
  finally:
    _probing.pop()


@contextlib.contextmanager
def recording() -> Iterator[list[str]]:
  """Collects the reasons noted inside the block, rows seen before included."""
  keys: list[str] = []
  _recorders.append(keys)
  try:
    yield keys
  finally:
    _recorders.remove(keys)


def log_summary() -> None:
  """One WARNING per file and reason with the rows this process skipped (grain workers, with
  data.num_workers > 0, count and warn in their own processes)."""
  for (file, reason), rows in sorted(_SKIPPED.items()):
    log.warning('data: %s: %d rows skipped: %s', file, len(rows), reason)


# --- paths --------------------------------------------------------------------

_GLOB = re.compile(r'[*?\[]')


def expand_paths(spec: str, field: str) -> list[epath.Path]:
  """'a.jsonl,gs://b/dir/*.jsonl' -> sorted files. Missing file / empty glob: ConfigError."""
  files = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    if _GLOB.search(part):
      parts = part.split('/')
      k = next(i for i, s in enumerate(parts) if _GLOB.search(s))
      base = '/'.join(parts[:k]) or '.'
      matches = sorted(epath.Path(base).glob('/'.join(parts[k:])))
      if not matches:
        raise config_lib.ConfigError(f'{field}={spec!r}: no file matches {part!r}')
      files += matches
    else:
      p = epath.Path(part)
      if not p.exists():
        raise config_lib.ConfigError(f'{field}={spec!r}: file not found: {part}')
      files.append(p)
  if not files:
    raise config_lib.ConfigError(f'{field}={spec!r}: expected a file, glob or comma list')
  return files


# --- sources ------------------------------------------------------------------


class _Files:
  """Concatenation of per-file record lists with file/row bookkeeping."""

  kind = 'row'  # how a message counts rows: line, row or record
  record = 'json'  # what src[i] is: json | json_or_text | value | dict | tokens

  def __init__(self, names: list[str], per_file: list[Any], field: str, spec: str):
    for name, rows in zip(names, per_file):
      if len(rows) == 0:  # pylint: disable=g-explicit-length-test
        note('empty file', name)
    self.names = names
    self._rows = per_file
    self._ends = np.cumsum([len(r) for r in per_file]).tolist()
    if not self._ends or self._ends[-1] == 0:
      raise config_lib.ConfigError(f'{field}={spec!r}: no records in {", ".join(names)}')

  def __len__(self) -> int:
    return self._ends[-1]

  def _locate(self, i: int) -> tuple[int, int]:
    f = bisect.bisect_right(self._ends, i)
    return f, i - (self._ends[f - 1] if f else 0)

  def __getitem__(self, i: int):
    f, r = self._locate(i)
    return self._rows[f][r]

  def where(self, i: int) -> str:
    f, r = self._locate(i)
    return f'{self.names[f]} {self.kind} {r + 1}'

  def directory(self, i: int) -> epath.Path:
    """The directory of record i's file (relative image paths start there)."""
    return epath.Path(self.names[self._locate(i)[0]]).parent


class JsonlSource(_Files):
  """JSON Lines (optionally .gz), kept as raw bytes per line; parsed on access."""

  kind = 'line'

  def __init__(self, spec: str, field: str):
    files = expand_paths(spec, field)
    per_file = []
    for p in files:
      data = p.read_bytes()
      if str(p).endswith('.gz'):
        data = gzip.decompress(data)
      lines = data.split(b'\n')
      if lines and not lines[-1].strip():
        lines.pop()
      per_file.append(lines)
    super().__init__([str(p) for p in files], per_file, field, spec)


class ParquetSource(_Files):
  """One column of Parquet files (pyarrow), kept as Arrow arrays."""

  record = 'value'

  def __init__(self, spec: str, field: str, column: str, column_field: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    files = expand_paths(spec, field)
    per_file = []
    for p in files:
      with p.open('rb') as f:
        schema = pq.read_schema(f)
        if column not in schema.names:
          raise config_lib.ConfigError(f'{column_field}={column!r}: no such column in {p} '
                                       f'(columns: {", ".join(schema.names)})')
        f.seek(0)
        per_file.append(pq.read_table(f, columns=[column]).column(column).combine_chunks())
    super().__init__([str(p) for p in files], per_file, field, spec)

  def __getitem__(self, i: int):
    return super().__getitem__(i).as_py()


class ArrayRecordSource(_Files):
  """ArrayRecord files; each record is a JSON object or raw UTF-8 text."""

  kind = 'record'
  record = 'json_or_text'

  def __init__(self, spec: str, field: str):
    files = expand_paths(spec, field)
    counts = []
    for p in files:
      try:
        reader = array_record_module.ArrayRecordReader(str(p))
        counts.append(range(reader.num_records()))
        reader.close()
      except RuntimeError as e:  # riegeli: a truncated or corrupted file
        raise config_lib.ConfigError(f'{field}={spec!r}: {p} is not a readable ArrayRecord '
                                     f'file ({str(e)[:200]})') from e
    super().__init__([str(p) for p in files], counts, field, spec)
    self._source = grain.sources.ArrayRecordDataSource([str(p) for p in files])
    self._spec = spec
    self._unreadable: set[int] = set()  # files that failed a read since start-up

  def __getitem__(self, i: int):
    f, _ = self._locate(i)
    if f not in self._unreadable:
      try:
        return self._source[i]
      except Exception as e:  # pylint: disable=broad-except  # deleted, truncated, corrupted
        self._unreadable.add(f)
        log.warning('data: %s turned unreadable mid-run (%s: %s); its rows are skipped',
                    self.names[f], type(e).__name__, str(e)[:200])
        if len(self._unreadable) == len(self.names):
          raise DataError(f'{self.names[f]}: unreadable ({type(e).__name__}: '
                          f'{str(e)[:200]}); no readable file remains in {self._spec}') from e
    # Skipped like a bad row (None: counted here, not again as an empty record); the index
    # still advances, so the iterator's checkpointed state stays that of the rows consumed.
    note('unreadable data file', self.where(i))
    return None


class TfdsSource:
  """A TFDS split through tfds.data_source (random access, ArrayRecord-backed)."""

  record = 'dict'

  def __init__(self, name: str, split: str):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise config_lib.ConfigError(
          f"data.source='tfds' (data.tfds_name={name!r}): tensorflow_datasets is not "
          "installed; pip install 'gemma3-train[tfds]'") from None
    self.name, self.split = name, split
    self._source = tfds.data_source(name, split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    return self._source[i]

  def where(self, i: int) -> str:
    return f'tfds {self.name}[{self.split}] row {i + 1}'


class SyntheticSource:
  """Random-token documents, a pure function of (seed, index); for benchmarks, no tokenizer."""

  record = 'tokens'

  def __init__(self, num_docs: int, seed: int, vocab_size: int, seq_len: int):
    self._n, self._seed, self._vocab, self._seq_len = num_docs, seed, vocab_size, seq_len

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, i])
    n = int(rng.integers(self._seq_len // 8 + 2, 2 * self._seq_len))
    return rng.integers(3, self._vocab, size=n, dtype=np.int32)  # 0..2 are PAD/EOS/BOS

  def where(self, i: int) -> str:
    return f'synthetic row {i + 1}'


def bundled_path(split: str) -> str:
  """The shipped Shakespeare corpus (assets/corpus/README.md)."""
  name = 'train.jsonl.gz' if split == 'train' else 'eval.jsonl.gz'
  return str(importlib.resources.files('gemma3_train') / 'assets' / 'corpus' / name)
