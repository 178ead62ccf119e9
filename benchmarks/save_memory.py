"""Resident memory of a bare orbax CheckpointManager over many saves (no trainer around it).

  python benchmarks/save_memory.py [--saves=250] [--reopen_every=0]

Saves 20 float32 arrays of 256 x 512 (async, keep 3) --saves times; prints the growth of RSS
between save 50 and the last, and the Python allocations that grew most over the same span
(tracemalloc). --reopen_every=N closes the manager and makes a new one every N saves. This is how
docs/faults.md attributes the soak's slow RSS rise to orbax + tensorstore.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import tracemalloc

import jax.numpy as jnp
import orbax.checkpoint as ocp
import psutil
from etils import epath


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--saves', type=int, default=250)
  p.add_argument('--reopen_every', type=int, default=0)
  p.add_argument('--top', type=int, default=4, help='allocation sites to print')
  a = p.parse_args()
  root = tempfile.mkdtemp(prefix='save_memory_')
  directory = epath.Path(root) / 'checkpoints'
  state = {f'w{i}': jnp.full((256, 512), float(i)) for i in range(20)}
  options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=True,
                                         create=True)

  def manager():
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers={'state': ocp.StandardCheckpointHandler()})

  proc, m = psutil.Process(), manager()
  tracemalloc.start(12)
  base_rss = base_snap = None
  for step in range(1, a.saves + 1):
    m.wait_until_finished()
    m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    if a.reopen_every and step % a.reopen_every == 0:
      m.wait_until_finished()
      m.close()
      m = manager()
    if step == 50:
      gc.collect()
      base_rss, base_snap = proc.memory_info().rss, tracemalloc.take_snapshot()
  m.wait_until_finished()
  gc.collect()
  grown = proc.memory_info().rss - base_rss
  print(f'machine: {os.cpu_count()} CPUs; saves 50..{a.saves}, reopen_every={a.reopen_every}')
  print(f'RSS growth: {grown / 1e6:.1f} MB ({grown / 1e3 / (a.saves - 50):.0f} KB per save); '
        f'Python allocations now {tracemalloc.get_traced_memory()[0] / 1e6:.1f} MB')
  for stat in tracemalloc.take_snapshot().compare_to(base_snap, 'traceback')[:a.top]:
    print(f'{stat.size_diff / 1e3:9.0f} KB in {stat.count_diff} objects, from:')
    for line in stat.traceback.format()[-4:]:
      print('   ', line)
  m.close()
  shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
