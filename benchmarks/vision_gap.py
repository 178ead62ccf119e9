"""Does configs/tiny_vision.py read its images? Held-out caption loss with and without them.

  python benchmarks/vision_gap.py [--steps=200] [--eval_steps=4] [--seeds=0,1,2] [--blank=0]

Runs the real CLI (`gemma3-train --config=configs/tiny_vision.py`, one CPU device) for --steps
steps, then the same run in process with every image blanked: the same init, data order, steps
and eval batches, so only the pixels differ and the blanked model can learn the captions' text
but not read the images. A caption's colour, shape and place are uniformly random given its
text, so only a model that reads the images gets below the blanked run's loss. Prints both
held-out losses, the machine and its load; takes about 20 minutes on a quiet 2-core box
(the 262k-row LM head dominates each step). docs/vision.md has the figures.

--seeds runs each seed (train.seed and data.seed: the init and the data order) and prints the
spread; --blank names the seeds whose blanked arm runs too (default: all of them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def with_images(steps: int, eval_steps: int, workdir: pathlib.Path, seed: int = 0) -> float:
  """The CLI run's final held-out loss."""
  cmd = [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny_vision.py',
         f'--workdir={workdir}', f'--config.train.num_steps={steps}',
         f'--config.train.seed={seed}', f'--config.data.seed={seed}',
         f'--config.train.eval_every={steps}', f'--config.train.eval_steps={eval_steps}',
         '--config.checkpoint.every=0', '--config.logging.tensorboard=False']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r['eval_loss'] for r in rows if 'eval_loss' in r][-1]


def blanked(steps: int, eval_steps: int, seed: int = 0) -> float:
  """The same run in process with every image zeroed, in training and in the eval."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # pylint: disable=g-import-not-at-top  (after the platform is chosen)
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train import data as data_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import loop as train  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import state as train_state

  blank = lambda batch: {**batch, 'images': np.zeros_like(batch['images'])}
  c = config_lib.load_config_file(str(ROOT / 'configs' / 'tiny_vision.py'))
  c = c.replace(train=dict(num_steps=steps, eval_steps=eval_steps, seed=seed),
                data=dict(seed=seed))
  s = train_state.setup(c, sharding.make_mesh(c, jax.devices()[:1]), abstract=True)
  state = s.init_state()
  it = data_lib.make_train_iterator(c, process_index=0, process_count=1)
  with contextlib.closing(it):
    for _ in range(steps):
      batch = data_lib.global_batch(blank(next(it)), s.batch_sharding['inputs'])
      state, _ = s.train_step(state, batch)
  ev = data_lib.make_eval_iterator(c, process_index=0, process_count=1)
  with contextlib.closing(ev):
    return float(train.evaluate(s, state, map(blank, ev), eval_steps)['loss'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--eval_steps', type=int, default=4)
  parser.add_argument('--seeds', default='0', help='comma list of seeds')
  parser.add_argument('--blank', default=None, help='seeds whose blanked arm runs (default all)')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  blank = seeds if args.blank is None else [int(s) for s in args.blank.split(',') if s]
  load = os.getloadavg()[0]
  start = time.perf_counter()
  ours, theirs = {}, {}
  for seed in seeds:
    with tempfile.TemporaryDirectory() as tmp:
      ours[seed] = with_images(args.steps, args.eval_steps, pathlib.Path(tmp) / 'run', seed)
    if seed in blank:
      theirs[seed] = blanked(args.steps, args.eval_steps, seed)
    print(f'seed {seed}: held-out caption loss after {args.steps} steps: {ours[seed]:.3f} with '
          f'images' + (f', {theirs[seed]:.3f} blanked (gap {theirs[seed] - ours[seed]:.3f} '
                       'nats)' if seed in theirs else ''), flush=True)
  print(f'{platform.node()}, {os.cpu_count()} CPUs, load {load:.1f} -> {os.getloadavg()[0]:.1f}, '
        f'{time.perf_counter() - start:.0f} s')
  if len(seeds) > 1:
    import statistics  # pylint: disable=g-import-not-at-top
    for name, d in (('with images', ours), ('blanked', theirs)):
      if len(d) > 1:
        v = list(d.values())
        print(f'{name}: mean {statistics.mean(v):.3f}, std {statistics.stdev(v):.3f}, '
              f'min {min(v):.3f}, max {max(v):.3f} over seeds {sorted(d)}')


if __name__ == '__main__':
  main()
