"""GRPO completions per second: gemma3-train (train.objective=grpo) next to TRL's GRPOTrainer, on
the same random checkpoint, prompts, reward and CPU.

python benchmarks/grpo.py                       # tiny shape (8 layers, width 64, 262k vocabulary)
python benchmarks/grpo.py --steps=8 --group=8

Both trainers start from one random Gemma 3 exported by gemma3-convert (float32, with its
tokenizer). Both train on the same JSONL of text prompts cut from the bundled corpus, with the
length reward (-tokens / max_completion_len), the dapo loss, beta 0 and AdamW, and sample at
temperature 1 with no top-k or top-p. A step is one rollout of --prompts x --group completions
of at most --max_new tokens, then one optimizer step on them. The timing covers both sides of a
step (sampling and update) and leaves out the first --skip steps (compiles: ours compiles
the sampler once per prompt length bucket of 16, allocator warm-up); ours is timed from one
rollout's log line to the next. Rollout tokens per second: completion tokens (up to and
including the stop) over the sampling time alone, ours from the rollout log line, TRL's around
its model.generate call. A random model rarely stops, so most completions run to the limit on
both sides. The load average is printed before and after: other work on the box slows every
trainer.
"""

from __future__ import annotations

import argparse
import datetime
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
  p.add_argument('--prompts', type=int, default=2, help='prompts per step')
  p.add_argument('--group', type=int, default=4, help='completions per prompt')
  p.add_argument('--max_new', type=int, default=32, help='max completion tokens')
  p.add_argument('--prompt_words', type=int, default=20)
  p.add_argument('--seq_len', type=int, default=96, help='our row: prompt + completion')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--skip', type=int, default=2, help='first steps left out of the timing')
  return p.parse_args(argv)


def _prompts(path: str, n: int, words_per: int) -> list[dict]:
  corpus = importlib.resources.files('gemma3_train') / 'assets' / 'corpus' / 'train.jsonl.gz'
  with gzip.open(str(corpus), 'rt') as f:
    words = ' '.join(json.loads(line)['text'] for _, line in zip(range(500), f)).split()
  rows = [{'prompt': ' '.join(words[i * words_per:(i + 1) * words_per])} for i in range(n)]
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return rows


def _trl(model_dir: str, rows: list[dict], args, out: str) -> tuple[float, float]:
  """(seconds per step (rollout + update), rollout tokens per second) of TRL's GRPOTrainer,
  after the first --skip; the rollout is its model.generate call, timed around it."""
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top
  marks, generated = [], []  # generated: (seconds, completion tokens) per generate call

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, *_, **__):
      marks.append(time.perf_counter())

  def length(completions, completion_ids, **_):
    return [-len(ids) / args.max_new for ids in completion_ids]

  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32')
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  generate = model.generate

  def timed_generate(*a, **kw):
    start = time.perf_counter()
    ids = generate(*a, **kw)
    prompt_len = (kw.get('input_ids') if 'input_ids' in kw else a[0]).shape[1]
    new = ids[:, prompt_len:]
    stops = torch.isin(new, torch.tensor(list(model.generation_config.eos_token_id or []) +
                                         [tok.eos_token_id]))
    # tokens up to and including each row's first stop (generate pads after it)
    first = torch.where(stops.any(1), stops.int().argmax(1) + 1, new.shape[1])
    generated.append((time.perf_counter() - start, int(first.sum())))
    return ids
  model.generate = timed_generate
  cfg = trl.GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.group,
                       num_generations=args.group, max_completion_length=args.max_new,
                       max_steps=args.steps + args.skip, learning_rate=1e-6, beta=0.0,
                       loss_type='dapo', temperature=1.0, report_to=[], logging_steps=1000,
                       save_strategy='no', use_cpu=True, bf16=False, seed=0,
                       dataloader_num_workers=0)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=[length], args=cfg,
                            processing_class=tok, train_dataset=datasets.Dataset.from_list(rows),
                            callbacks=[Clock()])
  trainer.train()
  timed = generated[args.skip:]
  return ((marks[-1] - marks[args.skip - 1]) / (len(marks) - args.skip),
          sum(n for _, n in timed) / sum(t for t, _ in timed))


def _ours(model_dir: str, data: str, args, workdir: str) -> tuple[float, float, float]:
  """(seconds per step after the first --skip, rollout seconds per step, rollout tokens per
  second) of gemma3-train."""
  B = args.prompts * args.group
  cmd = [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.checkpoint.init_from={model_dir}',
         f'--config.data.train_path={data}', f'--config.data.seq_len={args.seq_len}',
         f'--config.train.global_batch_size={B}', '--config.train.objective=grpo',
         f'--config.rl.prompts_per_step={args.prompts}', f'--config.rl.group_size={args.group}',
         f'--config.rl.max_completion_len={args.max_new}', '--config.rl.rewards=length',
         f'--config.train.num_steps={args.steps + args.skip}', '--config.train.eval_every=0',
         '--config.logging.log_every=1', '--config.logging.tensorboard=False',
         '--config.checkpoint.every=0', '--config.optim.lr=1e-6']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(r.stderr[-3000:])
  # A step's wall time: from one rollout's log line to the next (rollout, update, logging).
  lines = [x for x in r.stderr.splitlines() if 'Rollout for step' in x][args.skip:]
  stamps = [datetime.datetime.strptime(x.split()[1], '%H:%M:%S.%f') for x in lines]
  seconds = (stamps[-1] - stamps[0]).total_seconds() / (len(stamps) - 1)
  rollouts = [float(x.split(' in ')[1].split(' s,')[0]) for x in lines]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = {row['step']: row for row in map(json.loads, f) if 'completions/mean_length' in row}
  B = args.prompts * args.group
  tokens = [logged[step]['completions/mean_length'] * B
            for step in range(args.skip + 1, args.steps + args.skip + 1)]
  return seconds, sum(rollouts) / len(rollouts), sum(tokens) / sum(rollouts)


def main(argv):
  args = _args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  print(f'# {cpu_peak.describe_machine()}', flush=True)
  before = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = _export(TINY, tmp)
    data = os.path.join(tmp, 'prompts.jsonl')
    rows = _prompts(data, 64, args.prompt_words)
    ours, rollout, our_tps = _ours(model_dir, data, args, os.path.join(tmp, 'ours'))
    theirs, their_tps = _trl(model_dir, rows, args, os.path.join(tmp, 'trl'))
  after = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  B = args.prompts * args.group
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average '
        f'{before} before, {after} after; jax {jax.__version__} (cpu), torch '
        f'{torch.__version__} ({torch.get_num_threads()} threads); tiny shape, {args.prompts} '
        f'prompts x {args.group} completions of <= {args.max_new} tokens, dapo, float32, '
        f'{args.steps} timed steps after {args.skip}')
  print('| trainer | completions/step | s/step | completions/s | rollout tokens/s |')
  print('|---|---|---|---|---|')
  for name, dt, tps in (('gemma3-train', ours, our_tps),
                        (f'TRL {__import__("trl").__version__} GRPOTrainer', theirs, their_tps)):
    print(f'| {name} | {B} | {dt:.3f} | {B / dt:.2f} | {tps:.1f} |')
  print(f'ratio ours / TRL: completions/s {theirs / ours:.2f}x, rollout tokens/s '
        f'{our_tps / their_tps:.2f}x; our rollout: {rollout:.3f} s/step ({rollout / ours:.0%} '
        'of the step)')


if __name__ == '__main__':
  main(sys.argv[1:])
