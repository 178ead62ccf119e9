"""Stop strings in the sampler: a batch whose rows meet their stop string early, against the same
batch run to max_new_tokens, and against a stop string never met (the cost of the chunks).

python benchmarks/stop_strings.py [--new=256] [--at=24] [--repeats=3]

Random tiny model (benchmarks/harness.py's TINY, float32), 8 prompts, temperature 1 (a random
model's greedy run repeats one token), no stop tokens. Each row's stop string is the last three
characters of its own first --at tokens' text, taken from a free run with the same seed, so the
rows stop at token --at. Best of --repeats after a warm-up; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from flax import nnx

from benchmarks.harness import TINY
from gemma3_train import config as config_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import sampler as sample
# pylint: enable=wrong-import-position


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--new', type=int, default=256, help='max_new_tokens')
  p.add_argument('--at', type=int, default=24, help='the token where each row stops')
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args(argv)
  cfg = config_lib.ModelConfig(preset='test', param_dtype='float32', dtype='float32', **TINY)
  s = sample.Sampler(sample.Gemma3(cfg, rngs=nnx.Rngs(0)))
  tok = tokenizer_lib.Tokenizer()
  prompts = [[tokenizer_lib.BOS] + tok.encode(f'Question {i}: what is {i} + {i}? Answer:')
             for i in range(8)]
  hot = sample.Sampling(1.0)
  free = s.generate(prompts, args.new, hot, stop_tokens=())
  strings = [[tok.decode(r[:args.at])[-3:]] for r in free]
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  print(f'# {cpu_peak.describe_machine()}', flush=True)
  for label, kw in (('none', {}), ('met', dict(stop_strings=strings)),
                    ('never met', dict(stop_strings=['\x00never']))):
    s.generate(prompts, args.new, hot, stop_tokens=(), detokenize=tok.decode, **kw)  # warm-up
    best = float('inf')
    for _ in range(args.repeats):
      start = time.perf_counter()
      out = s.generate(prompts, args.new, hot, stop_tokens=(), detokenize=tok.decode, **kw)
      best = min(best, time.perf_counter() - start)
    print(f'stop strings {label:>9}: {best:6.2f} s, longest row {max(map(len, out))} tokens')
  print(f'load average after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
