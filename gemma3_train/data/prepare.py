"""gemma3-data prepare: tokenize a corpus once into ArrayRecord shards (data.source=prepared).

  gemma3-data prepare --src=FILES --dst=DIR [--format=text|chat] [--text_field=text]
      [--messages_field=messages] [--tokenizer_path=MODEL] [--source=auto]
      [--rows_per_shard=50000] [--workers=N] [--max_shards=N]

FILES is what data.train_path takes (a file, glob or comma list, local or gs://) of JSON Lines,
Parquet or ArrayRecord rows. Every row becomes one record (prepared.py gives the layout): the
document exactly as the trainer builds it on the fly (documents.ToDocument: BOS/EOS, chat masks
on model turns), or an empty record for a row the trainer would skip. Shard k holds rows
[k * rows_per_shard, (k + 1) * rows_per_shard) and is written by one of --workers processes.

Resumable: a shard is written under a temporary name and renamed when complete, then its counts
go to SHARD.stats.json; a rerun of the same command skips the shards that have one.
DIR/.prepare.json pins the plan (input files and rows, tokenizer, format, shard size), so a
rerun with different input is refused instead of mixing two corpora. manifest.json (tokenizer
path and sha256, counts, shard list) is written last: a directory without it is unfinished.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any

from array_record.python import array_record_module
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.data import documents
from gemma3_train.data import prepared
from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib

_WRITER_OPTIONS = 'group_size:1'  # one record per chunk: cheap random access when shuffled
_EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.gz': 'jsonl', '.parquet': 'parquet',
               '.arrayrecord': 'arrayrecord', '.array_record': 'arrayrecord'}


class _Job:
  """What a worker needs to write any shard; inherited by fork (the source is not copied)."""

  def __init__(self, args: argparse.Namespace):
    kind = args.source
    if kind == 'auto':
      first = args.src.split(',')[0].strip()
      kind = next((v for k, v in _EXTENSIONS.items() if first.endswith(k)), 'jsonl')
    self.config = config_lib.Config().replace(data=dict(
        source=kind, train_path=args.src, format=args.format, text_field=args.text_field,
        messages_field=args.messages_field, tokenizer_path=args.tokenizer_path))
    config_lib.validate(self.config)
    self.tok = tokenizer_lib.Tokenizer(args.tokenizer_path)
    try:
      self.source = sources.make_source(self.config, 'train')
    except config_lib.ConfigError as e:  # name our flag, not the config field
      raise config_lib.ConfigError(str(e).replace('data.train_path=', '--src=', 1)) from None
    field = args.messages_field if args.format == 'chat' else args.text_field
    # No seq_len limit here: what depends on it is decided when the shards are read.
    self.to_doc = documents.ToDocument(self.source, self.tok, args.format, field, sys.maxsize)
    self.dst, self.format = args.dst, args.format
    self.rows_per_shard = args.rows_per_shard
    self.num_shards = max(1, math.ceil(len(self.source) / args.rows_per_shard))
    self.plan = {
        'src': args.src, 'source': kind, 'files': list(getattr(self.source, 'names', [])),
        'rows': len(self.source), 'format': args.format, 'field': field,
        'rows_per_shard': args.rows_per_shard,
        'tokenizer': {'path': args.tokenizer_path,
                      'sha256': prepared.tokenizer_sha256(self.tok)}}

  def name(self, k: int) -> str:
    return f'shard-{k:05d}-of-{self.num_shards:05d}.arrayrecord'

  def done(self, k: int) -> dict[str, Any] | None:
    stats = epath.Path(self.dst) / (self.name(k) + '.stats.json')
    return json.loads(stats.read_text()) if stats.exists() else None


_JOB: _Job | None = None


def _write_shard(k: int) -> dict[str, Any]:
  """Tokenizes and writes shard k; returns (and records) its counts."""
  job = _JOB
  lo = k * job.rows_per_shard
  hi = min(lo + job.rows_per_shard, len(job.source))
  dst = epath.Path(job.dst)
  local = not str(dst).startswith(('gs://', 's3://'))
  tmp_dir = str(dst) if local else tempfile.mkdtemp()
  tmp = os.path.join(tmp_dir, job.name(k) + f'.tmp{os.getpid()}')
  docs = tokens = 0
  writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  try:
    with sources.recording() as reasons:  # why rows were skipped, each row counted
      for i in range(lo, hi):
        doc = job.to_doc.document(i)
        if doc is not None:
          docs += 1
          tokens += len(doc['tokens'])
        writer.write(prepared.encode(doc, job.format))
  finally:
    writer.close()
  if local:
    os.replace(tmp, dst / job.name(k))  # atomic: a shard is complete or absent
  else:
    (dst / job.name(k)).write_bytes(epath.Path(tmp).read_bytes())
    os.remove(tmp)
    os.rmdir(tmp_dir)
  stats = {'path': job.name(k), 'rows': hi - lo, 'documents': docs, 'tokens': tokens,
           'counts': dict(collections.Counter(reasons))}
  (dst / (job.name(k) + '.stats.json')).write_text(json.dumps(stats))
  return stats


class _Progress:
  """One stderr line: shards, rows, tokens, rate and ETA (redrawn in place on a terminal)."""

  def __init__(self, total_rows: int, total_shards: int, done_rows: int, done_shards: int):
    self.total_rows, self.total_shards = total_rows, total_shards
    self.rows, self.shards, self.tokens = done_rows, done_shards, 0
    self._start_rows, self._t0 = done_rows, time.perf_counter()
    self._tty = sys.stderr.isatty()

  def update(self, stats: dict[str, Any]) -> None:
    self.rows += stats['rows']
    self.shards += 1
    self.tokens += stats['tokens']
    dt = max(time.perf_counter() - self._t0, 1e-9)
    rate = (self.rows - self._start_rows) / dt
    eta = (self.total_rows - self.rows) / rate if rate else 0.0
    width = 30
    filled = width * self.rows // max(self.total_rows, 1)
    line = (f'prepare [{"#" * filled}{"." * (width - filled)}] {self.shards}/{self.total_shards}'
            f' shards, {self.rows}/{self.total_rows} rows, {self.tokens / dt:,.0f} tokens/s, '
            f'ETA {time.strftime("%H:%M:%S", time.gmtime(eta))}')
    print(('\r' + line) if self._tty else line, end='' if self._tty else '\n', file=sys.stderr,
          flush=True)

  def close(self) -> None:
    if self._tty:
      print(file=sys.stderr)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
  """Writes (or finishes) DIR; returns the manifest."""
  global _JOB
  job = _JOB = _Job(args)
  dst = epath.Path(args.dst)
  dst.mkdir(parents=True, exist_ok=True)
  plan_path = dst / '.prepare.json'
  if plan_path.exists():
    old = json.loads(plan_path.read_text())
    if old != job.plan:
      diff = [k for k in job.plan if old.get(k) != job.plan[k]]
      raise config_lib.ConfigError(
          f'--dst={args.dst}: holds a prepare of other input (differs in {", ".join(diff)}); '
          'use a new --dst or delete it')
  else:
    plan_path.write_text(json.dumps(job.plan, indent=1))
  done = {k: s for k in range(job.num_shards) if (s := job.done(k)) is not None}
  todo = [k for k in range(job.num_shards) if k not in done]
  if args.max_shards:
    todo = todo[:args.max_shards]
  progress = _Progress(len(job.source), job.num_shards, sum(s['rows'] for s in done.values()),
                       len(done))
  workers = max(1, min(args.workers, len(todo)))
  if workers == 1:
    results = map(_write_shard, todo)
  else:
    # fork: the workers share the already-read source instead of each reading the corpus.
    pool = multiprocessing.get_context('fork').Pool(workers)
    results = pool.imap_unordered(_write_shard, todo)
  try:
    for stats in results:
      done[int(stats['path'].split('-')[1])] = stats
      progress.update(stats)
  finally:
    progress.close()
    if workers > 1:
      pool.terminate()
  if len(done) < job.num_shards:
    print(f'gemma3-data: {len(done)}/{job.num_shards} shards written to {args.dst}; run the '
          'same command again to continue', file=sys.stderr)
    return {}
  shards = [done[k] for k in range(job.num_shards)]
  counts = collections.Counter()
  for s in shards:
    counts.update(s['counts'])
  manifest = {
      'format_version': prepared.FORMAT_VERSION, **job.plan,
      'documents': sum(s['documents'] for s in shards),
      'tokens': sum(s['tokens'] for s in shards), 'counts': dict(sorted(counts.items())),
      'shards': [{k: s[k] for k in ('path', 'rows', 'documents', 'tokens')} for s in shards]}
  (dst / prepared.MANIFEST).write_text(json.dumps(manifest, indent=1))
  print(f'{args.dst}: {manifest["rows"]} rows -> {manifest["documents"]} documents, '
        f'{manifest["tokens"]} tokens in {job.num_shards} shards')
  return manifest


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, as every gemma3 command reports bad input
    raise config_lib.ConfigError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog='gemma3-data', description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True, metavar='{prepare}',
                         parser_class=_Parser)
  pp = sub.add_parser('prepare', help='Tokenize a corpus once into ArrayRecord shards.')
  pp.add_argument('--src', required=True, help='File, glob or comma list (as data.train_path).')
  pp.add_argument('--dst', required=True, help='Output directory (local or gs://); rerun the '
                  'same command to resume it.')
  pp.add_argument('--source', default='auto', choices=('auto', 'jsonl', 'parquet',
                                                       'arrayrecord'),
                  help='Input kind (auto: from the first file name; default jsonl).')
  pp.add_argument('--format', default='text', choices=('text', 'chat'), help='As data.format.')
  pp.add_argument('--text_field', default='text', help='As data.text_field.')
  pp.add_argument('--messages_field', default='messages', help='As data.messages_field.')
  pp.add_argument('--tokenizer_path', default='', help="As data.tokenizer_path ('' = the "
                  'bundled Gemma 3 tokenizer); training must use the same one.')
  pp.add_argument('--rows_per_shard', type=int, default=50_000, help='Input rows per shard.')
  pp.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                  help='Processes writing shards (default: one per CPU).')
  pp.add_argument('--max_shards', type=int, default=0, help='Write at most N more shards in '
                  'this run, then stop (0 = all); for bounded jobs on preemptible machines.')
  return p


def main(argv: list[str]) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  if args.rows_per_shard < 1:
    raise config_lib.ConfigError(f'--rows_per_shard={args.rows_per_shard}: expected >= 1')
  if args.workers < 1:
    raise config_lib.ConfigError(f'--workers={args.workers}: expected >= 1')
  return prepare(args)


def run() -> None:
  try:
    main(sys.argv[1:])
  except (config_lib.ConfigError, sources.DataError, OSError) as e:
    print(f'gemma3-data: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
