"""DPO pairs per second: gemma3-train (train.objective=dpo) next to TRL's DPOTrainer, on the same
random checkpoint, pairs and CPU; and the share of our step that the reference forward takes.

python benchmarks/dpo.py                    # tiny shape (8 layers, width 64, 262k vocabulary)
python benchmarks/dpo.py --steps=12 --pairs=512

Both start from one random Gemma 3 exported by gemma3-convert (float32, with its tokenizer), and
train on the same JSONL of {prompt, chosen, rejected} strings cut from the bundled corpus, with
the sigmoid loss, beta 0.1, AdamW, a reference that is a frozen copy of the start. TRL pads each
batch of --batch pairs to its longest sequence; we pack whole pairs into rows of --seq_len
tokens (--batch rows a step), so a step holds more pairs. Step times leave out the first
--skip steps (compiles, allocator warm-up). Ours runs twice: the reference online, and
precomputed (dpo.reference_logps=precompute, whose one pass before training is not timed);
online minus precomputed is the reference forward's share of the step. The load average is printed before and after: other work on the box slows every side.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import TINY, _export  # pylint: disable=wrong-import-position


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--pairs', type=int, default=256, help='pairs in the JSONL')
  p.add_argument('--prompt_words', type=int, default=40)
  p.add_argument('--completion_words', type=str, default='8,40', help='min,max words')
  p.add_argument('--batch', type=int, default=8, help='TRL: pairs per step; ours: rows')
  p.add_argument('--seq_len', type=int, default=256, help='our row length (pairs <= half)')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--skip', type=int, default=2, help='first steps left out of the timing')
  return p.parse_args(argv)


def _pairs(path: str, n: int, prompt_words: int, lo: int, hi: int) -> list[dict]:
  import random  # pylint: disable=g-import-not-at-top
  corpus = importlib.resources.files('gemma3_train') / 'assets' / 'corpus' / 'train.jsonl.gz'
  with gzip.open(str(corpus), 'rt') as f:
    words = ' '.join(json.loads(line)['text'] for _, line in zip(range(2000), f)).split()
  rng = random.Random(0)
  rows = []
  for _ in range(n):
    at = rng.randrange(len(words) - prompt_words - 2 * hi)
    prompt = ' '.join(words[at:at + prompt_words])
    c, r = rng.randint(lo, hi), rng.randint(lo, hi)
    at += prompt_words
    rows.append({'prompt': prompt, 'chosen': ' ' + ' '.join(words[at:at + c]),
                 'rejected': ' ' + ' '.join(words[at + c:at + c + r])})
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return rows


def _trl(model_dir: str, rows: list[dict], args, out: str) -> tuple[float, int]:
  """(seconds per step after the first --skip, pairs per step) of TRL's DPOTrainer."""
  import datasets  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  marks = []

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, *_, **__):
      marks.append(time.perf_counter())

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32')
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  cfg = trl.DPOConfig(output_dir=out, per_device_train_batch_size=args.batch,
                      max_steps=args.steps + args.skip, learning_rate=1e-6, beta=0.1,
                      loss_type=['sigmoid'], max_length=args.seq_len // 2, report_to=[],
                      logging_steps=1000, save_strategy='no', use_cpu=True, bf16=False,
                      dataloader_num_workers=0, seed=0,
                      gradient_checkpointing=False)  # TRL's default is on; ours has no remat
  trainer = trl.DPOTrainer(model=model, args=cfg, processing_class=tok,
                           train_dataset=datasets.Dataset.from_list(rows),
                           callbacks=[Clock()])
  trainer.train()
  dt = (marks[-1] - marks[args.skip - 1]) / (len(marks) - args.skip)
  return dt, args.batch


def _ours(model_dir: str, data: str, args, workdir: str, *extra) -> tuple[float, float]:
  """(seconds per step after the first --skip, mean pairs per step) of gemma3-train."""
  cmd = [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.checkpoint.init_from={model_dir}',
         f'--config.data.train_path={data}', f'--config.data.seq_len={args.seq_len}',
         f'--config.train.global_batch_size={args.batch}', '--config.train.objective=dpo',
         f'--config.train.num_steps={args.steps + args.skip}', '--config.train.eval_every=0',
         '--config.logging.log_every=1', '--config.logging.tensorboard=False',
         '--config.checkpoint.every=0', '--config.optim.lr=1e-6', *extra]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(r.stderr[-3000:])
  rows = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))][args.skip:]
  tokens = args.batch * args.seq_len
  seconds = sum(tokens / row['tokens_per_sec'] for row in rows) / len(rows)
  pairs = sum(row.get('pairs', 0.0) for row in rows) / len(rows)
  return seconds, pairs


def main(argv):
  args = _args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  print(f'# {cpu_peak.describe_machine()}', flush=True)
  lo, hi = map(int, args.completion_words.split(','))
  before = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = _export(TINY, tmp)
    data = os.path.join(tmp, 'pairs.jsonl')
    rows = _pairs(data, args.pairs, args.prompt_words, lo, hi)
    online = _ours(model_dir, data, args, os.path.join(tmp, 'online'))
    pre = _ours(model_dir, data, args, os.path.join(tmp, 'pre'),
                '--config.dpo.reference_logps=precompute')
    trl_dt, trl_pairs = _trl(model_dir, rows, args, os.path.join(tmp, 'trl'))
  after = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average '
        f'{before} before, {after} after; jax {jax.__version__} (cpu), torch '
        f'{torch.__version__} ({torch.get_num_threads()} threads); tiny shape, {args.pairs} '
        f'pairs ({args.prompt_words}-word prompts, {lo}-{hi}-word completions), sigmoid, '
        f'float32, {args.steps} timed steps after {args.skip}')
  print('| trainer | pairs/step | s/step | pairs/s |')
  print('|---|---|---|---|')
  for name, (dt, n) in (('gemma3-train, reference online', online),
                        ('gemma3-train, reference precomputed', pre),
                        (f'TRL {__import__("trl").__version__} DPOTrainer', (trl_dt, trl_pairs))):
    print(f'| {name} | {n:.1f} | {dt:.3f} | {n / dt:.1f} |')
  print(f'ratio ours (online) / TRL, pairs/s: {online[1] / online[0] / (trl_pairs / trl_dt):.2f}x')
  share = (online[0] / online[1] - pre[0] / pre[1]) / (online[0] / online[1])
  print(f'reference forward: {share:.0%} of the online step per pair (precompute removes it)')


if __name__ == '__main__':
  main(sys.argv[1:])
