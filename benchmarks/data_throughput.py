"""Input-pipeline throughput for one process, next to the SentencePiece limit, measured together.

python benchmarks/data_throughput.py [--corpora=bundled,1gb] [--workers=0,1,2] [--seq_len=1024]
  [--batch=8] [--tokens=1000000] [--synthetic_path=$TMPDIR/gemma3_data_1gb.jsonl]

For each corpus (the bundled Shakespeare, and a synthetic 1 GB JSONL generated once at
--synthetic_path) it prints, in tokens/s of real (non-padding) tokens:
  raw SentencePiece encode of the same documents, in 1 process and in 2 (the on-the-fly limit);
  make_train_iterator with data.num_workers 0, 1, 2 (tokenize + split + pack + batch);
  gemma3-data prepare of a slice of the corpus (2 processes), then data.source=prepared reads.
Each figure runs until --tokens tokens (a fixed amount of work, whatever the corpus size), after
the first batch (worker start-up is reported apart). The machine and its load come first: the
box may be shared, and the load average says how far to trust the wall-clock figures. In-process
figures (raw 1-process, 0 workers) are also given per CPU-second of this process, which a busy
machine disturbs much less.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from gemma3_train import config as config_lib
from gemma3_train import data
from gemma3_train.data import prepare as prepare_lib
from gemma3_train.data import sources

_CORPORA = flags.DEFINE_list('corpora', ['bundled', '1gb'], 'bundled | 1gb')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'data.num_workers values')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'data.seq_len')
_BATCH = flags.DEFINE_integer('batch', 8, 'rows per batch (one process)')
_TOKENS = flags.DEFINE_integer('tokens', 1_000_000, 'tokens per measurement')
_SYNTHETIC = flags.DEFINE_string(
    'synthetic_path', os.path.join(tempfile.gettempdir(), 'gemma3_data_1gb.jsonl'),
    'where the 1 GB JSONL is generated (once)')
_SIZE = flags.DEFINE_float('synthetic_gb', 1.0, 'size of the synthetic JSONL in GB')


def _load() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def _make_synthetic(path: str, gigabytes: float) -> None:
  """English-like documents (Zipf-distributed words of the bundled corpus), ~4 KB each."""
  target = int(gigabytes * 1e9)
  if os.path.exists(path) and os.path.getsize(path) >= target:
    return
  t0 = time.perf_counter()
  text = ' '.join(_texts(sources.bundled_path('train'), 10**9))
  words, counts = np.unique(np.array(text.split()), return_counts=True)
  p = counts / counts.sum()
  rng = np.random.default_rng(0)
  written = 0
  with open(path + '.tmp', 'w') as f:
    while written < target:
      lengths = rng.integers(200, 1400, size=256)
      draw = rng.choice(words, size=int(lengths.sum()), p=p)
      lines, start = [], 0
      for n in lengths:
        lines.append(json.dumps({'text': ' '.join(draw[start:start + n])}) + '\n')
        start += n
      chunk = ''.join(lines)
      f.write(chunk)
      written += len(chunk)
  os.replace(path + '.tmp', path)
  print(f'  generated {path}: {written / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s')


def _texts(path: str, max_bytes: int) -> list[str]:
  """The first documents of a JSONL file (up to max_bytes of lines)."""
  opener = gzip.open if path.endswith('.gz') else open
  out, size = [], 0
  with opener(path, 'rt') as f:
    for line in f:
      if size >= max_bytes:
        break
      if line.strip():
        out.append(json.loads(line)['text'])
        size += len(line)
  return out


_SP = None
_RAW_CPU = [0.0]  # the 1-process encode rate per CPU-second (load-independent)


def _encode_count(texts: list[str]) -> int:
  return sum(len(ids) for ids in _SP.encode(texts))


def _raw_rate(texts: list[str], processes: int) -> float:
  """SentencePiece encode tokens/s over texts, split across processes (fork)."""
  global _SP
  _SP = data.Tokenizer()._sp  # pylint: disable=protected-access
  parts = [texts[i::processes] for i in range(processes)]
  if processes == 1:
    t0, cpu = time.perf_counter(), time.process_time()
    n = _encode_count(texts)
    _RAW_CPU[0] = n / (time.process_time() - cpu)
  else:
    with multiprocessing.get_context('fork').Pool(processes) as pool:
      pool.map(_encode_count, [['warm up'] for _ in range(processes)])
      t0 = time.perf_counter()
      n = sum(pool.map(_encode_count, parts))
  return n / (time.perf_counter() - t0)


def _iterator_rate(c: config_lib.Config, tokens: int) -> tuple[float, float, float, float]:
  """(real tokens/s, real tokens per CPU-second of this process, packing efficiency, seconds
  to the first batch). The CPU rate counts this process's threads, not worker processes: with
  workers it measures only the main process's share."""
  t0 = time.perf_counter()
  it = data.make_train_iterator(c)
  next(it)
  t1, cpu = time.perf_counter(), time.process_time()
  real = slots = 0
  while real < tokens:
    seg = next(it)['segment_ids']
    real += int(np.count_nonzero(seg))
    slots += seg.size
  dt, dcpu = time.perf_counter() - t1, time.process_time() - cpu
  it.close()
  return real / dt, real / dcpu, real / slots, t1 - t0


def _bench(name: str, c: config_lib.Config, train_path: str) -> None:
  tokens = _TOKENS.value
  print(f'\n== {name}: {train_path} (load {_load()})')
  texts, got = [], 0
  tok = data.Tokenizer()
  for t in _texts(train_path, 1 << 62):  # the first documents holding `tokens` tokens
    texts.append(t)
    got += len(tok.encode(t))
    if got >= tokens:
      break
  raw1, raw2 = _raw_rate(texts, 1), _raw_rate(texts, 2)
  raw_cpu = _RAW_CPU[0]
  print(f'  raw SentencePiece encode: {raw1:,.0f} tokens/s (1 process), '
        f'{raw2:,.0f} tokens/s (2 processes); {raw_cpu:,.0f} tokens per CPU-second')
  fly = {}
  for w in (int(x) for x in _WORKERS.value):
    rate, cpu_rate, eff, start = _iterator_rate(c.replace(data=dict(num_workers=w)), tokens)
    fly[w] = rate
    per_cpu = (f'; {cpu_rate:,.0f} tokens per CPU-second = {cpu_rate / raw_cpu:.0%} of raw'
               if w == 0 else '')
    print(f'  on the fly, {w} workers: {rate:,.0f} tokens/s = {rate / raw1:.0%} of raw 1-proc, '
          f'{rate / raw2:.0%} of raw 2-proc{per_cpu} (first batch {start:.1f} s, packing '
          f'{eff:.3f}) [load {_load()}]')
  with tempfile.TemporaryDirectory() as tmp:
    head = os.path.join(tmp, 'head.jsonl')
    with open(head, 'w') as f:
      f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    t0 = time.perf_counter()
    manifest = prepare_lib.main(['prepare', f'--src={head}', f'--dst={tmp}/prep',
                                 '--workers=2', f'--rows_per_shard={max(len(texts) // 8, 1)}'])
    dt = time.perf_counter() - t0
    print(f'  gemma3-data prepare (2 processes): {manifest["tokens"] / dt:,.0f} tokens/s '
          f'({manifest["tokens"]:,} tokens incl. BOS/EOS, start-up included)')
    # The default data.prefetch=2 puts the reader in a thread: in this loop, which itself runs
    # Python between batches, the two hand the GIL back and forth; prefetch=0 is the reader alone.
    for w, prefetch in ((0, 2), (0, 0), (2, 2)):
      pc = c.replace(data=dict(source='prepared', train_path=f'{tmp}/prep', num_workers=w,
                               prefetch=prefetch))
      rate, cpu_rate, eff, start = _iterator_rate(pc, 4 * tokens)
      best = max(fly.values())
      per_cpu = (f'; {cpu_rate:,.0f} tokens per CPU-second = {cpu_rate / raw_cpu:.1f}x raw '
                 'SentencePiece per CPU-second' if w == 0 else '')
      print(f'  prepared shards, {w} workers, prefetch {prefetch}: {rate:,.0f} tokens/s = '
            f'{rate / best:.1f}x the best on-the-fly rate{per_cpu} (first batch {start:.1f} s, '
            f'packing {eff:.3f}) [load {_load()}]')


def main(_):
  print(f'machine: {platform.node()} {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs; load average {_load()} (1/5/15 min)')
  base = config_lib.Config().replace(
      data=dict(seq_len=_SEQ_LEN.value), train=dict(global_batch_size=_BATCH.value))
  print(f'seq_len={_SEQ_LEN.value} batch={_BATCH.value} tokens per figure={_TOKENS.value:,}')
  for corpus in _CORPORA.value:
    if corpus == 'bundled':
      _bench('bundled corpus', base.replace(data=dict(source='bundled')),
             sources.bundled_path('train'))
    else:
      _make_synthetic(_SYNTHETIC.value, _SIZE.value)
      _bench('synthetic 1 GB JSONL', base.replace(data=dict(
          source='jsonl', train_path=_SYNTHETIC.value)), _SYNTHETIC.value)
  print(f'\nload average at the end: {_load()}')


if __name__ == '__main__':
  app.run(main)
