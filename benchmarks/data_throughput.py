"""Input-pipeline throughput for one process, next to the SentencePiece limit, measured together.

python benchmarks/data_throughput.py [--corpora=bundled,1gb] [--workers=0,1,2] [--seq_len=1024]
  [--batch=8] [--tokens=1000000] [--repeats=3] [--synthetic_path=$TMPDIR/gemma3_data_1gb.jsonl]

For each corpus (the bundled Shakespeare, and a synthetic 1 GB JSONL generated once at
--synthetic_path) it prints, in tokens/s of real (non-padding) tokens:
  raw SentencePiece encode of the same documents, in 1 process and in 2 (the on-the-fly limit);
  make_train_iterator with data.num_workers 0, 1, 2 (tokenize + split + pack + batch);
  gemma3-data prepare of a slice of the corpus (2 processes), then data.source=prepared reads.
Raw encodes run over --tokens tokens, on-the-fly iterators over 4x that and prepared-shard
ones over 20x (a fixed amount of work, whatever the corpus size), from the steady state: the
first batch (worker start-up, reported apart) and the rows of the packing groups made for it
are not timed, and a longer window keeps the rows a packer holds at either end (up to a group,
~250k tokens per worker) within a few percent of the work timed. The machine and its load come
first: the box may be shared, and the load average says how far to trust the wall-clock
figures. Figures are also given per CPU-second (of the encoding processes; of this process and
its worker processes), which a busy machine disturbs much less: on-the-fly tokenization at X%
of raw's tokens per CPU-second reaches X% of raw speed wherever it keeps as many cores busy.

A shared machine's load moves within seconds, so a ratio of two figures taken at different
moments is noise: each on-the-fly figure is measured right after a raw 2-process encode of the
same documents, in --repeats rounds (worker counts in turn), and its ratio to that raw figure
is reported as the median over the rounds with the lowest and highest (the spread). The two
prepared-shard configurations with 0 workers alternate in the same rounds.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import psutil

from gemma3_train.cli import data as data_cli
from gemma3_train import config as config_lib
from gemma3_train import data
from gemma3_train.data import packing
from gemma3_train.data import sources
from gemma3_train.infra import cpu_peak

_CORPORA = flags.DEFINE_list('corpora', ['bundled', '1gb'], 'bundled | 1gb')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'data.num_workers values')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'data.seq_len')
_BATCH = flags.DEFINE_integer('batch', 8, 'rows per batch (one process)')
_TOKENS = flags.DEFINE_integer('tokens', 1_000_000, 'tokens per measurement')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'rounds of alternating measurements')
_SYNTHETIC = flags.DEFINE_string(
    'synthetic_path', os.path.join(tempfile.gettempdir(), 'gemma3_data_1gb.jsonl'),
    'where the 1 GB JSONL is generated (once)')
_SIZE = flags.DEFINE_float('synthetic_gb', 1.0, 'size of the synthetic JSONL in GB')


def _load() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


_LOADS: list[float] = []  # the 1-minute load average after each measurement of a section


def _loads() -> str:
  """The 1-minute load average's range over the section's measurements, then clears it."""
  lo, hi = min(_LOADS, default=0.0), max(_LOADS, default=0.0)
  _LOADS.clear()
  return f'load {lo:.2f}-{hi:.2f} during the rounds'


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


def _encode_count(texts: list[str]) -> int:
  return sum(len(ids) for ids in _SP.encode(texts))


def _raw_rate(texts: list[str], processes: int) -> tuple[float, float]:
  """SentencePiece encode of texts split across processes (fork): (tokens/s, tokens per
  CPU-second of the processes that encode)."""
  global _SP
  _SP = data.Tokenizer()._sp  # pylint: disable=protected-access
  parts = [texts[i::processes] for i in range(processes)]
  if processes == 1:
    t0, cpu = time.perf_counter(), _cpu_seconds()
    n = _encode_count(texts)
    dt, dcpu = time.perf_counter() - t0, _cpu_seconds() - cpu
  else:
    with multiprocessing.get_context('fork').Pool(processes) as pool:
      pool.map(_encode_count, [['warm up'] for _ in range(processes)])
      t0, cpu = time.perf_counter(), _cpu_seconds()
      n = sum(pool.map(_encode_count, parts))
      dt, dcpu = time.perf_counter() - t0, _cpu_seconds() - cpu
  _LOADS.append(os.getloadavg()[0])
  return n / dt, n / dcpu


def _cpu_seconds() -> float:
  """CPU time of this process and its live children (grain's worker processes)."""
  me = psutil.Process()
  total = 0.0
  for p in [me, *me.children(recursive=True)]:
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def _iterator_rate(c: config_lib.Config, tokens: int) -> tuple[float, float, float, float]:
  """(real tokens/s, real tokens per CPU-second, packing efficiency, seconds to the first
  batch). The CPU rate counts this process's threads and its worker processes: the CPU the
  pipeline needs per token, which a busy machine disturbs much less than the wall clock."""
  t0 = time.perf_counter()
  it = data.make_train_iterator(c)
  next(it)
  first = time.perf_counter() - t0
  # The first batch waits for a whole packing group (per worker), which then serves many
  # batches: measuring from there counted rows made before the clock started (up to 2x with
  # 2 workers at 1M tokens). Drain those groups' slots first, so that the clock starts in the
  # steady state.
  warm = 0
  while warm < max(c.data.num_workers, 1) * packing.GROUP * c.data.seq_len:
    warm += next(it)['segment_ids'].size
  t1, cpu = time.perf_counter(), _cpu_seconds()
  real = slots = 0
  while real < tokens:
    seg = next(it)['segment_ids']
    real += int(np.count_nonzero(seg))
    slots += seg.size
  dt, dcpu = time.perf_counter() - t1, _cpu_seconds() - cpu
  _LOADS.append(os.getloadavg()[0])
  it.close()
  return real / dt, real / dcpu, real / slots, first


def _spread(values: list[float], fmt: str) -> str:
  """'median (lowest-highest)' of a repeated figure."""
  lo, mid, hi = min(values), statistics.median(values), max(values)
  return f'{fmt.format(mid)} ({fmt.format(lo)}-{fmt.format(hi)})' if len(values) > 1 else \
      fmt.format(mid)


def _head_texts(train_path: str, tokens: int) -> list[str]:
  """The first documents of the corpus holding `tokens` tokens."""
  texts, got = [], 0
  tok = data.Tokenizer()
  for t in _texts(train_path, 1 << 62):
    texts.append(t)
    got += len(tok.encode(t))
    if got >= tokens:
      break
  return texts


def _on_the_fly(c: config_lib.Config, texts: list[str], tokens: int) -> tuple[float, float]:
  """Raw SentencePiece and the iterator at each worker count, in alternating rounds; returns
  the best on-the-fly medians: (tokens/s, tokens per CPU-second)."""
  raw1, raw1_cpu, raw2, raw2_cpu = [], [], [], []
  fly: dict[int, list[tuple[float, float, float]]] = {int(w): [] for w in _WORKERS.value}
  fly_cpu: dict[int, list[float]] = {}
  extra = {}
  for _ in range(_REPEATS.value):
    rate, cpu_rate = _raw_rate(texts, 1)
    raw1.append(rate)
    raw1_cpu.append(cpu_rate)
    for w in fly:
      raw, raw_cpu = _raw_rate(texts, 2)  # just before the figure it is compared with
      raw2.append(raw)
      raw2_cpu.append(raw_cpu)
      rate, cpu_rate, eff, start = _iterator_rate(c.replace(data=dict(num_workers=w)),
                                                  4 * tokens)
      # Per CPU-second against raw with as many processes busy: 2 busy vCPUs may share a
      # physical core, which slows each (raw 2-process is then no faster than 1-process).
      fly[w].append((rate, rate / raw, cpu_rate / (raw_cpu if w > 1 else raw1_cpu[-1])))
      fly_cpu.setdefault(w, []).append(cpu_rate)
      extra[w] = f'first batch {start:.1f} s, packing {eff:.3f}'
  fmt = '{:,.0f}'
  print(f'  raw SentencePiece encode: {_spread(raw1, fmt)} tokens/s (1 process), '
        f'{_spread(raw2, fmt)} tokens/s (2 processes); per CPU-second {_spread(raw1_cpu, fmt)} '
        f'(1 process), {_spread(raw2_cpu, fmt)} (2) [{_loads()}]')
  for w, runs in fly.items():
    print(f'  on the fly, {w} workers: {_spread([r for r, _, _ in runs], fmt)} tokens/s = '
          f'{_spread([x for _, x, _ in runs], "{:.0%}")} of raw 2-process measured just before; '
          f'per CPU-second (all processes) {_spread([x for _, _, x in runs], "{:.0%}")} of raw '
          f'{max(w, 1)}-process ({extra[w]})')
  return (max(statistics.median(r for r, _, _ in runs) for runs in fly.values()),
          max(statistics.median(x) for x in fly_cpu.values()))


def _prepared(c: config_lib.Config, prep: str, tokens: int, best_fly: tuple[float, float]
              ) -> None:
  """Prepared-shard reads; 0 workers with and without data.prefetch alternate in rounds."""
  # The default data.prefetch=2 reads the next records in a thread (prepared.Pieces); with 0
  # the reader runs alone. Worker processes hand each batch over: measured once.
  configs = [(0, 2), (0, 0)] * _REPEATS.value + [(2, 2)]
  runs: dict[tuple[int, int], list[tuple[float, float]]] = {}
  extra = {}
  for w, prefetch in configs:
    pc = c.replace(data=dict(source='prepared', train_path=prep, num_workers=w,
                             prefetch=prefetch))
    rate, cpu_rate, eff, start = _iterator_rate(pc, 20 * tokens)  # (~1 s at 20M tokens/s)
    runs.setdefault((w, prefetch), []).append((rate, cpu_rate))
    extra[(w, prefetch)] = f'first batch {start:.1f} s, packing {eff:.3f}'
  print(f'  prepared shards [{_loads()}]:')
  for (w, prefetch), rs in runs.items():
    rates = [r for r, _ in rs]
    cpu_rates = [x for _, x in rs]
    print(f'    {w} workers, prefetch {prefetch}: {_spread(rates, "{:,.0f}")} tokens/s = '
          f'{statistics.median(rates) / best_fly[0]:.1f}x the best on-the-fly median; '
          f'{_spread(cpu_rates, "{:,.0f}")} tokens per CPU-second = '
          f'{statistics.median(cpu_rates) / best_fly[1]:.1f}x the best on the fly '
          f'({extra[(w, prefetch)]})')


def _bench(name: str, c: config_lib.Config, train_path: str) -> None:
  tokens = _TOKENS.value
  print(f'\n== {name}: {train_path} (load {_load()})')
  texts = _head_texts(train_path, tokens)
  best_fly = _on_the_fly(c, texts, tokens)
  with tempfile.TemporaryDirectory() as tmp:
    head = os.path.join(tmp, 'head.jsonl')
    with open(head, 'w') as f:
      f.writelines(json.dumps({'text': t}) + '\n' for t in texts)
    t0 = time.perf_counter()
    manifest = data_cli.main(['prepare', f'--src={head}', f'--dst={tmp}/prep',
                              '--workers=2', f'--rows_per_shard={max(len(texts) // 8, 1)}'])
    dt = time.perf_counter() - t0
    print(f'  gemma3-data prepare (2 processes): {manifest["tokens"] / dt:,.0f} tokens/s '
          f'({manifest["tokens"]:,} tokens incl. BOS/EOS, start-up included)')
    _prepared(c, f'{tmp}/prep', tokens, best_fly)


def main(_):
  print(f'# {cpu_peak.describe_machine()}', flush=True)
  print(f'machine: {platform.node()} {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs; load average {_load()} (1/5/15 min)')
  base = config_lib.Config().replace(
      data=dict(seq_len=_SEQ_LEN.value), train=dict(global_batch_size=_BATCH.value))
  print(f'seq_len={_SEQ_LEN.value} batch={_BATCH.value} tokens per figure={_TOKENS.value:,} '
        f'rounds={_REPEATS.value}; figures: median (lowest-highest) over the rounds')
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
