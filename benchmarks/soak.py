"""Soak: a long gemma3-train run, sampled for leaks (memory, file descriptors, threads, disk).

  python benchmarks/soak.py --workdir=/tmp/soak               # 3,000 steps of configs/tiny.py
  python benchmarks/soak.py --workdir=/tmp/soak --steps=300   # the short version

Starts the real CLI (checkpoint every 10 steps, keep 3) and, each time metrics.jsonl reaches a
multiple of --every steps, samples the training process: resident memory (RSS), open file
descriptors, threads, and the workdir's size on disk. Prints one row per sample, then the
spread of each after warm-up (samples from step 2 x --every on). --small trains the test
suite's small model (vocabulary 512, synthetic data) instead, for a quick check.

An async save in flight holds files, threads and a host copy of the state, so a single reading
depends on when it falls. Between samples the process is also polled every 50 ms: each row
carries the floor (minimum) of RSS, fds and threads since the previous row, which a leak raises
and a write in flight does not, and --json rows also name the threads (by count per name, from
/proc), so a step in the thread count can be traced to its pool.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ['--config.data.source=synthetic', '--config.model.vocab_size=512',
         '--config.model.num_layers=7', '--config.data.seq_len=32',
         '--config.train.global_batch_size=8', '--config.train.eval_every=0',
         '--config.logging.tensorboard=False', '--config.optim.warmup_steps=5']


def _du_mb(path: pathlib.Path) -> float:
  """Bytes of the files under path. Old checkpoints are deleted while we walk the tree: a
  directory that vanished is skipped (os.walk ignores its listing error; pathlib's rglob
  raises it), and so is a file."""
  total = 0
  for parent, _, files in os.walk(path):
    for name in files:
      try:
        total += os.stat(os.path.join(parent, name)).st_size
      except FileNotFoundError:
        pass
  return total / 1e6


def _last_step(metrics: pathlib.Path) -> int:
  if not metrics.exists():
    return 0
  lines = [l for l in metrics.read_text().splitlines() if l.strip()]
  steps = [json.loads(l).get('step', 0) for l in lines[-5:]]
  return max(steps, default=0)


def _thread_names(pid: int) -> dict[str, int]:
  names = collections.Counter()
  for task in pathlib.Path(f'/proc/{pid}/task').glob('*'):
    try:
      names[(task / 'comm').read_text().strip()] += 1
    except OSError:  # the thread ended while we listed them
      pass
  return dict(sorted(names.items()))


def _poll(proc: psutil.Process) -> dict:
  return {'rss_mb': round(proc.memory_info().rss / 1e6, 1), 'fds': proc.num_fds(),
          'threads': proc.num_threads()}


def sample(now: dict, floor: dict, workdir: pathlib.Path, step: int, t0: float,
           pid: int) -> dict:
  return {'step': step, **now, **{f'{k}_floor': v for k, v in floor.items()},
          'workdir_mb': round(_du_mb(workdir), 1), 'elapsed_s': round(time.time() - t0, 1),
          'thread_names': _thread_names(pid)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--every', type=int, default=100, help='sample every N steps')
  parser.add_argument('--checkpoint_every', type=int, default=10)
  parser.add_argument('--keep', type=int, default=3)
  parser.add_argument('--small', action='store_true', help="the tests' small model")
  parser.add_argument('--json', help='also write the samples to this file (after each)')
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir)
  if workdir.exists() and any(workdir.iterdir()):
    sys.exit(f'soak.py: error: --workdir={workdir} is not empty (a soak starts fresh)')
  cmd = [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.train.num_steps={args.steps}',
         f'--config.checkpoint.every={args.checkpoint_every}',
         f'--config.checkpoint.keep={args.keep}', '--config.logging.log_every=10',
         *(SMALL if args.small else [])]
  print(f'machine: {platform.node()}, {os.cpu_count()} CPUs, '
        f'{psutil.virtual_memory().total / 2**30:.0f} GiB; load average at start '
        f'{os.getloadavg()[0]:.1f}', flush=True)
  print(' '.join(cmd[2:]), flush=True)
  t0 = time.time()
  log_path = workdir.parent / f'{workdir.name}.log'
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(log_path, 'w') as log:
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    proc = psutil.Process(child.pid)
    rows, due, floor = [], args.every, {}
    print(f'{"step":>6} {"rss_mb":>8} {"(floor)":>8} {"fds":>5} {"(floor)":>7} {"threads":>7} '
          f'{"(floor)":>7} {"workdir_mb":>10} {"elapsed_s":>9}', flush=True)
    while child.poll() is None and due <= args.steps:
      try:
        now = _poll(proc)
        floor = {k: min(floor.get(k, v), v) for k, v in now.items()}
        row = None
        if _last_step(workdir / 'metrics.jsonl') >= due:
          row, floor = sample(now, floor, workdir, due, t0, proc.pid), {}
      except psutil.NoSuchProcess:
        break
      if row:
        rows.append(row)
        print(f'{row["step"]:>6} {row["rss_mb"]:>8} {row["rss_mb_floor"]:>8} {row["fds"]:>5} '
              f'{row["fds_floor"]:>7} {row["threads"]:>7} {row["threads_floor"]:>7} '
              f'{row["workdir_mb"]:>10} {row["elapsed_s"]:>9}', flush=True)
        due += args.every
        if args.json:  # after each sample, so that a soak stopped early keeps its figures
          pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
      time.sleep(0.05)
    child.wait()
  if child.returncode:
    sys.exit(f'soak.py: error: training exited {child.returncode}; see {log_path}')
  warm = [r for r in rows if r['step'] >= 2 * args.every]
  for key in ('rss_mb', 'rss_mb_floor', 'fds', 'fds_floor', 'threads', 'threads_floor',
              'workdir_mb'):
    values = [r[key] for r in warm]
    if values:
      print(f'after warm-up ({len(values)} samples): {key} min {min(values)} max '
            f'{max(values)} spread {max(values) - min(values):.1f}')
  print(f'wall time {time.time() - t0:.0f} s, load average at end {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
