"""Time from launch to the first step's progress line of the tiny main job, cold and warm.

  python benchmarks/startup.py [--runs=3]

Each run is the README's main job (`gemma3-train --config=configs/tiny.py`) in a fresh workdir,
stopped after a few steps. 'cold' starts with an empty train.cache_dir (compiles everything and
measures the CPU matmul peak); 'warm' reuses the cache the cold run filled, as a rerun or a
resume on the same machine does. Prints seconds from launch to each milestone line; the median
over --runs for each. Run it on a quiet machine: it reports the load average beside the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

MILESTONES = (('data', 'data: bundled train batches'), ('compiled', 'Compiled the train step'),
              ('step 1', 'step 1/'))


def one_run(cache_dir: str, workdir: str) -> dict[str, float]:
  cmd = [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.train.cache_dir={cache_dir}',
         '--config.train.num_steps=3', '--config.train.eval_every=0',
         '--config.logging.log_every=1']  # TensorBoard on, as the main job has it
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(
                              __file__))))
  seen: dict[str, float] = {}
  for line in proc.stdout:
    for name, marker in MILESTONES:
      if name not in seen and marker in line:
        seen[name] = time.perf_counter() - start
  proc.wait()
  if proc.returncode:
    raise SystemExit(f'run failed with status {proc.returncode}: {" ".join(cmd)}')
  return seen


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=3)
  args = parser.parse_args()
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  print(f'# {cpu_peak.describe_machine()}', flush=True)
  results: dict[str, list[dict[str, float]]] = {'cold': [], 'warm': []}
  for _ in range(args.runs):
    with tempfile.TemporaryDirectory() as tmp:
      cache = os.path.join(tmp, 'cache')
      results['cold'].append(one_run(cache, os.path.join(tmp, 'a')))
      results['warm'].append(one_run(cache, os.path.join(tmp, 'b')))
  print(f'load average before/after: {os.getloadavg()[0]:.2f} (1 min); '
        f'{os.cpu_count()} cpus; {args.runs} runs each, median seconds from launch')
  print(f'{"cache":6} ' + ' '.join(f'{name:>10}' for name, _ in MILESTONES))
  for kind, runs in results.items():
    cells = [statistics.median(r[name] for r in runs) for name, _ in MILESTONES]
    print(f'{kind:6} ' + ' '.join(f'{v:10.1f}' for v in cells))


if __name__ == '__main__':
  main()
