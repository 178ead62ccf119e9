"""Does distillation beat hard labels at tiny size? A teacher, then one student two ways.

  python benchmarks/distill_effect.py [--workdir=/tmp/gemma3_distill_effect] [--teacher_steps=400]
      [--steps=200] [--eval_every=25] [--eval_steps=4] [--loss=kl] [--alpha=0] [--temperature=1]
      [--plot=docs/distill_effect.png] [--seed=0]

Runs the real CLI on one CPU device: the teacher is configs/tiny.py (8 layers) trained
--teacher_steps steps; the students are configs/tiny_distill.py (2 layers, the same width), once
on hard labels (train.objective=ce) and once distilled from that teacher (distill.loss, alpha,
temperature), with the same init, data order, steps, tokens and eval batches. --seed sets
both students' init and data-order seeds (train.seed, data.seed; their workdirs get a _s<seed>
suffix when it is not 0); the teacher is the same for every seed. Each workdir
resumes when it already holds a run, so an interrupted benchmark continues. Prints the held-out
next-token loss of both students at every eval, the distilled student's KL to the teacher, the
teacher's own held-out loss, the machine and its load, and writes the curves to --plot (needs
matplotlib). docs/distillation.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _train(config: str, workdir: pathlib.Path, flags: list[str], log: pathlib.Path) -> float:
  """Runs (or resumes) the CLI; returns the wall seconds."""
  cmd = [sys.executable, '-m', 'gemma3_train.cli.train', f'--config={config}',
         f'--workdir={workdir}', '--config.logging.tensorboard=False', *flags]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  start = time.time()
  with log.open('a') as f:
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=f, stderr=subprocess.STDOUT)
  return time.time() - start


def _evals(workdir: pathlib.Path) -> dict[int, dict]:
  """step -> the eval row of metrics.jsonl (the last one written for a step)."""
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines() if l]
  return {r['step']: r for r in rows if any(k.startswith('eval_') for k in r)}


def _rates(workdir: pathlib.Path) -> list[float]:
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines() if l]
  return [r['tokens_per_sec'] for r in rows if r.get('tokens_per_sec')]


def _plot(path: str, hard: dict, distilled: dict, teacher_loss: float, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for the plot)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
  steps = sorted(hard)
  ax.plot(steps, [hard[s]['eval_loss'] for s in steps], 'o-', label='hard labels (ce)')
  steps = sorted(distilled)
  ax.plot(steps, [distilled[s]['eval_loss/hard'] for s in steps], 's-', label='distilled')
  ax.axhline(teacher_loss, color='gray', ls='--', label=f'teacher ({teacher_loss:.3f})')
  ax.set(xlabel='step', ylabel='held-out next-token loss', title=title)
  ax.legend()
  ax_kl.plot(steps, [distilled[s]['eval_distill/kl_to_teacher'] for s in steps], 's-',
             color='C1')
  ax_kl.set(xlabel='step', ylabel='KL(teacher || student), held out',
            title='distilled student: KL to the teacher')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/gemma3_distill_effect')
  p.add_argument('--teacher_steps', type=int, default=400)
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--eval_every', type=int, default=25)
  p.add_argument('--eval_steps', type=int, default=4)
  p.add_argument('--loss', default='kl')
  p.add_argument('--alpha', type=float, default=0.0)
  p.add_argument('--temperature', type=float, default=1.0)
  p.add_argument('--plot', default=str(ROOT / 'docs' / 'distill_effect.png'))
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args()
  out = pathlib.Path(args.workdir)
  out.mkdir(parents=True, exist_ok=True)
  print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs; load average '
        f'{" ".join(f"{x:.2f}" for x in os.getloadavg())} (1/5/15 min)', flush=True)

  teacher = out / 'teacher'
  seconds = _train('configs/tiny.py', teacher, [
      f'--config.train.num_steps={args.teacher_steps}', '--config.train.eval_every=100',
      f'--config.train.eval_steps={args.eval_steps}'], out / 'teacher.log')
  teacher_loss = _evals(teacher)[args.teacher_steps]['eval_loss']
  print(f'teacher: configs/tiny.py, {args.teacher_steps} steps, held-out loss '
        f'{teacher_loss:.3f} ({seconds:.0f} s this run)', flush=True)

  common = [f'--config.train.num_steps={args.steps}', f'--config.train.eval_every={args.eval_every}',
            f'--config.train.eval_steps={args.eval_steps}', '--config.checkpoint.every=0',
            f'--config.train.seed={args.seed}', f'--config.data.seed={args.seed}']
  suffix = f'_s{args.seed}' if args.seed else ''
  # a loss other than kl gets its own workdir (each one resumes whatever run it holds)
  distilled = 'distilled' if args.loss == 'kl' else f'distilled_{args.loss}'
  arms = {'hard': ['--config.train.objective=ce'],
          distilled: [f'--config.distill.teacher={teacher}', f'--config.distill.loss={args.loss}',
                        f'--config.distill.alpha={args.alpha}',
                        f'--config.distill.temperature={args.temperature}']}
  evals = {}
  for name, flags in arms.items():
    run = out / f'{name}{suffix}'
    seconds = _train('configs/tiny_distill.py', run, common + flags, out / f'{name}{suffix}.log')
    evals[name] = _evals(run)
    rates = sorted(_rates(run))
    median = rates[len(rates) // 2] if rates else float('nan')
    print(f'{name}: {seconds:.0f} s this run, median {median:.0f} tokens/s; load '
          f'{" ".join(f"{x:.2f}" for x in os.getloadavg())}', flush=True)

  hard, distilled = evals['hard'], evals[distilled]
  print(f'\nstep  hard-label loss  distilled loss  gap (hard - distilled)  KL to teacher')
  for s in sorted(set(hard) & set(distilled)):
    h, d = hard[s]['eval_loss'], distilled[s]['eval_loss/hard']
    print(f'{s:4d}  {h:15.3f}  {d:14.3f}  {h - d:+22.3f}  '
          f'{distilled[s]["eval_distill/kl_to_teacher"]:13.3f}')
  title = (f'2-layer student, {args.steps} steps; distill.loss={args.loss}, '
           f'alpha={args.alpha:g}, T={args.temperature:g}')
  try:
    _plot(args.plot, hard, distilled, teacher_loss, title)
    print(f'plot: {args.plot}')
  except ImportError:
    print('plot: skipped (pip install matplotlib)')


if __name__ == '__main__':
  main()
