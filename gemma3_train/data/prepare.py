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
With --teacher=PATH (cli/data.py builds the teacher pass, training/teacher_labels.py) each
record also holds the teacher's distillation targets of every position (data/teacher.py): the
teacher runs in this process (--workers is 1), on documents split at --seq_len as training
splits them, and the manifest's 'teacher' entry records what they are, the teacher's tokens/s
and the bytes per token. (The command line itself is cli/data.py.)
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
from typing import Any

from array_record.python import array_record_module
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.data import documents
from gemma3_train.data import prepared
from gemma3_train.data import select
from gemma3_train.data import sources
from gemma3_train.data import teacher as teacher_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.infra import progress as progress_lib

_WRITER_OPTIONS = 'group_size:1'  # one record per chunk: cheap random access when shuffled
_TEACHER_BLOCK = 64  # documents per call of the teacher pass
_EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.gz': 'jsonl', '.parquet': 'parquet',
               '.arrayrecord': 'arrayrecord', '.array_record': 'arrayrecord'}


class _Job:
  """What a worker needs to write any shard; inherited by fork (the source is not copied)."""

  def __init__(self, args: argparse.Namespace, labeler=None):
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
      self.source = select.make_source(self.config, 'train')
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
    self.labeler = labeler  # (record index, document) list -> per document (ids, q)
    if labeler is not None:
      self.plan['teacher'] = {k: getattr(labeler.spec, k) for k in teacher_lib.PLAN_KEYS}

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
  docs = tokens = nbytes = 0
  writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  try:
    with sources.recording() as reasons:  # why rows were skipped, each row counted
      block = _TEACHER_BLOCK if job.labeler is not None else 1
      for b in range(lo, hi, block):
        rows = [(i, job.to_doc.document(i)) for i in range(b, min(b + block, hi))]
        found = [(i, d) for i, d in rows if d is not None]
        docs += len(found)
        tokens += sum(len(d['tokens']) for _, d in found)
        for record in _records(job, rows, found):
          nbytes += len(record)
          writer.write(record)
  finally:
    writer.close()
  if local:
    os.replace(tmp, dst / job.name(k))  # atomic: a shard is complete or absent
  else:
    (dst / job.name(k)).write_bytes(epath.Path(tmp).read_bytes())
    os.remove(tmp)
    os.rmdir(tmp_dir)
  stats = {'path': job.name(k), 'rows': hi - lo, 'documents': docs, 'tokens': tokens,
           'counts': dict(collections.Counter(reasons)), 'bytes': nbytes}
  if job.labeler is not None:  # this process's teacher pass so far
    stats['teacher'] = {'tokens': job.labeler.tokens, 'seconds': job.labeler.seconds}
  (dst / (job.name(k) + '.stats.json')).write_text(json.dumps(stats))
  return stats


def _records(job: _Job, rows: list, found: list) -> list[bytes]:
  """The records of rows [(index, document or None)]; found: those with a document."""
  if job.labeler is None:
    return [prepared.encode(d, job.format) for _, d in rows]
  labels = dict(zip((i for i, _ in found), job.labeler(found)))
  return [b'' if d is None else teacher_lib.encode(prepared.encode(d, job.format),
                                                   len(d['tokens']), *labels[i])
          for i, d in rows]


def prepare(args: argparse.Namespace, labeler=None) -> dict[str, Any]:
  """Writes (or finishes) DIR; returns the manifest. args: cli/data.py's parsed command line;
  labeler: the teacher pass of --teacher (training/teacher_labels.Labeler) or None."""
  global _JOB
  job = _JOB = _Job(args, labeler)
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
  rows = sum(s['rows'] for s in done.values())
  tokens = 0  # written by this run (the rate's)
  progress = progress_lib.Progress('prepare', job.num_shards, 'shards', done=len(done))

  def note() -> str:
    return f'{rows}/{len(job.source)} rows, {tokens / progress.elapsed:,.0f} tokens/s'

  # The teacher runs in this process: forked workers cannot share its initialized runtime.
  workers = 1 if labeler is not None else max(1, min(args.workers, len(todo)))
  if workers == 1:
    results = map(_write_shard, todo)
  else:
    # fork: the workers share the already-read source instead of each reading the corpus.
    pool = multiprocessing.get_context('fork').Pool(workers)
    results = pool.imap_unordered(_write_shard, todo)
  try:
    for stats in results:
      done[int(stats['path'].split('-')[1])] = stats
      rows, tokens = rows + stats['rows'], tokens + stats['tokens']
      progress.update(len(done), note())
  finally:
    progress.close(note())
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
  if labeler is not None:
    manifest['teacher'] = {**job.plan['teacher'], **_teacher_figures(shards, manifest)}
  (dst / prepared.MANIFEST).write_text(json.dumps(manifest, indent=1))
  print(f'{args.dst}: {manifest["rows"]} rows -> {manifest["documents"]} documents, '
        f'{manifest["tokens"]} tokens in {job.num_shards} shards')
  if labeler is not None:
    t = manifest['teacher']
    print(f'teacher targets: {t["bytes_per_token"]:.1f} bytes per token '
          f'({t["target_bytes_per_token"]:.1f} of them targets), teacher '
          f'{t["tokens_per_sec"]:,.0f} tokens/s')
  return manifest


def _teacher_figures(shards: list[dict], manifest: dict) -> dict[str, float]:
  """Bytes per token of the records (and of the targets alone) and the teacher's tokens/s
  (its positions over its seconds, the last shard's figures of each process)."""
  tokens = max(manifest['tokens'], 1)
  nbytes = sum(s.get('bytes', 0) for s in shards)
  # the tokens' own bytes: 4 per token (5 for chats) and the 4-byte count of each record
  plain = manifest['tokens'] * (5 if manifest['format'] == 'chat' else 4) + 4 * manifest['documents']
  t = [s['teacher'] for s in shards if 'teacher' in s]
  rate = max((x['tokens'] / x['seconds'] for x in t if x['seconds']), default=0.0)
  return {'bytes_per_token': nbytes / tokens, 'target_bytes_per_token': (nbytes - plain) / tokens,
          'tokens_per_sec': rate}
