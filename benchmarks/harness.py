"""lm-evaluation-harness loglikelihood requests per second: our model (inference/harness.py)
next to the harness's own `hf` model, on the same random checkpoint and this machine's CPU.

python benchmarks/harness.py                          # tiny, 64 documents x 4 endings
python benchmarks/harness.py --case=gemma3_640 --docs=32

The requests are shaped like hellaswag's: a context of --context words of the bundled corpus's
eval text and 4 endings of --ending words each, scored as the harness scores multiple choice
(`loglikelihood` on (context, ending) pairs). Both models get the same requests, batch size,
float32 weights and BOS; each runs them once to warm up (our compiles, torch's allocator), then
--repeats times, and the best time is reported. torch uses as many threads as the machine has
CPUs. The load average is printed before and after: other work on the box slows both sides.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.train_step import GEMMA3_640  # pylint: disable=wrong-import-position

TINY = dict(vocab_size=262144, num_layers=8, embed_dim=64, mlp_dim=256, num_heads=4,
            num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16.0, sliding_window=32)


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--case', default='tiny', choices=('tiny', 'gemma3_640'))
  p.add_argument('--docs', type=int, default=64, help='documents (4 requests each)')
  p.add_argument('--context', type=int, default=60, help='words per context')
  p.add_argument('--ending', type=int, default=12, help='words per ending')
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--repeats', type=int, default=2, help='timed runs (best reported)')
  return p.parse_args(argv)


def _export(fields: dict, path: str) -> str:
  """A random Gemma3ForCausalLM of these shapes, exported by gemma3-convert (float32, with the
  tokenizer files the hf model loads)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from gemma3_train.cli import convert as convert_cli  # pylint: disable=g-import-not-at-top
  cfg = transformers.Gemma3TextConfig(
      vocab_size=fields['vocab_size'], hidden_size=fields['embed_dim'],
      intermediate_size=fields['mlp_dim'], num_hidden_layers=fields['num_layers'],
      num_attention_heads=fields['num_heads'], num_key_value_heads=fields['num_kv_heads'],
      head_dim=fields['head_dim'], query_pre_attn_scalar=int(fields['query_pre_attn_scalar']),
      sliding_window=fields['sliding_window'], max_position_embeddings=32768)
  torch.manual_seed(0)
  src, dst = os.path.join(path, 'src'), os.path.join(path, 'hf')
  transformers.Gemma3ForCausalLM(cfg).save_pretrained(src)
  convert_cli.main(['export', f'--src={src}', f'--dst={dst}', '--dtype=float32'])
  return dst


def _requests(docs: int, context: int, ending: int):
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  corpus = importlib.resources.files('gemma3_train') / 'assets' / 'corpus' / 'eval.jsonl.gz'
  with gzip.open(str(corpus), 'rt') as f:
    words = ' '.join(json.loads(line)['text'] for line in f).split()
  out, at = [], 0
  for _ in range(docs):
    ctx = ' '.join(words[at:at + context])
    at += context
    for _ in range(4):
      out.append(Instance('loglikelihood', {}, (ctx, ' ' + ' '.join(words[at:at + ending])),
                          len(out)))
      at += ending
    at %= max(1, len(words) - 5 * (context + ending))
  return out


def _time(lm, requests, repeats: int) -> float:
  lm.loglikelihood(requests, disable_tqdm=True)  # warm-up
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    lm.loglikelihood(requests, disable_tqdm=True)
    best = min(best, time.perf_counter() - t0)
  return best


def main(argv):
  args = _args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from lm_eval.models import huggingface  # pylint: disable=g-import-not-at-top
  import gemma3_train  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  print(f'# {cpu_peak.describe_machine()}', flush=True)
  fields = {**TINY, **(GEMMA3_640 if args.case == 'gemma3_640' else {})}
  before = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  with tempfile.TemporaryDirectory() as tmp:
    path = _export(fields, tmp)
    requests = _requests(args.docs, args.context, args.ending)
    ours = harness.Gemma3LM(gemma3_train.load(path), batch_size=args.batch_size)
    hf = huggingface.HFLM(pretrained=path, backend='causal', device='cpu', dtype='float32',
                          batch_size=args.batch_size, add_bos_token=True)
    t_ours = _time(ours, requests, args.repeats)
    t_hf = _time(hf, requests, args.repeats)
  after = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  n = len(requests)
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average '
        f'{before} before, {after} after; jax {jax.__version__} ({jax.devices()[0].platform}), '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads); case {args.case}, '
        f'{n} requests ({args.docs} docs x 4, {args.context}-word contexts, {args.ending}-word '
        f'endings), batch {args.batch_size}, float32, best of {args.repeats}')
  print('| model | seconds | requests/s |')
  print('|---|---|---|')
  print(f'| ours (Gemma3LM) | {t_ours:.2f} | {n / t_ours:.1f} |')
  print(f'| harness hf | {t_hf:.2f} | {n / t_hf:.1f} |')
  print(f'ratio ours / hf: {t_hf / t_ours:.2f}x')


if __name__ == '__main__':
  main(sys.argv[1:])
