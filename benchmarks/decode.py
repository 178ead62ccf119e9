"""Prefill and decode tokens/s of the KV-cache sampler next to transformers' generate, on the same
random weights in the same run (greedy, float32, this machine's CPU).

python benchmarks/decode.py                       # tiny + gemma3_640, batch 1 and 8
python benchmarks/decode.py --cases=tiny --batches=1 --new=64

Prefill tokens/s = batch x prompt length / prefill time (a 1-token generate); decode tokens/s =
batch x (new - 1) / (time of a `new`-token generate - the 1-token one), both sides timed alike,
after a warm-up run that compiles; the best of --repeats runs. transformers runs
Gemma3ForCausalLM.generate(do_sample=False, use_cache=True) on the same weights in eager
attention with torch's threads set to the cores jax uses (--torch_threads to change).

The LM head floor: a decode step must read the whole tied [vocab, embed] float32 table (671 MB
for gemma3_640), so `head tok/s` times that matmul and its argmax alone, per step, on each side
(jax: the sampler's Embedder.decode_one + argmax; torch: F.linear + argmax), best of --repeats x (new - 1)
steps. `head floor tok/s` = batch x the memory read bandwidth (measured at the start) / the
table's bytes: the most tokens/s any float32 decoder that reads the table once a step can
reach on this machine; a head near it streams at the memory bandwidth and cannot be made faster.
`ceiling` = HF's decode step time / our head-only time: the most any float32 decoder reading
that table could gain over this HF run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from benchmarks.train_step import GEMMA3_640  # pylint: disable=wrong-import-position


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--cases', default='tiny,gemma3_640')
  p.add_argument('--batches', default='1,8')
  p.add_argument('--prompt', type=int, default=64, help='prompt tokens per row')
  p.add_argument('--new', type=int, default=64, help='new tokens per row')
  p.add_argument('--repeats', type=int, default=3, help='timed runs (best reported)')
  p.add_argument('--torch_threads', type=int, default=0,
                 help="torch's threads (0 = the CPU count); on a loaded box 1 can be faster")
  return p.parse_args(argv)


def _case(name):
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  fields = config_lib.load_config_file(os.path.join(ROOT, 'configs/tiny.py')).model
  fields = {k: getattr(fields, k) for k in config_lib.MODEL_SHAPE_FIELDS + (
      'query_pre_attn_scalar', 'sliding_window')}
  if name == 'gemma3_640':
    fields.update(GEMMA3_640)
  elif name != 'tiny':
    raise SystemExit(f'--cases: unknown case {name!r}; expected tiny | gemma3_640')
  return fields


def _head_step_times(ours, hf_model, batch: int, steps: int, repeats: int):
  """Seconds per step of the LM head alone (logits of `batch` rows and their argmax), jax and
  torch, on the same float32 table; best of `repeats` runs of `steps` steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(ours.embedder)
  D = ours.embedder.embedding.shape[1]
  x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, D), np.float32))
  # The sampler's own head (Embedder.decode_one), on the same parameters.
  head = jax.jit(lambda x, st: jnp.argmax(nnx.merge(graphdef, st).decode_one(x), axis=-1))
  table = jax.device_put(state)
  head(x, table).block_until_ready()
  weight = hf_model.lm_head.weight.detach()
  tx = torch.from_numpy(np.asarray(x))
  best, hf_best = float('inf'), float('inf')
  with torch.no_grad():
    torch.nn.functional.linear(tx, weight).argmax(-1)
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        y = head(x, table)
        y.block_until_ready()
      best = min(best, (time.perf_counter() - t0) / steps)
      t0 = time.perf_counter()
      for _ in range(steps):
        torch.nn.functional.linear(tx, weight).argmax(-1)
      hf_best = min(hf_best, (time.perf_counter() - t0) / steps)
  return best, hf_best


def main(argv):
  args = _args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import test_hf_reference as hf_ref  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import sampler as sample  # pylint: disable=g-import-not-at-top
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  bandwidth = cpu_peak.measure_memory_bandwidth()
  print(f'# {cpu_peak.describe_machine(bandwidth_gbs=bandwidth)}', flush=True)
  torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average '
        f'{load} (before the run), jax {jax.__version__}, torch {torch.__version__}, '
        f'{torch.get_num_threads()} torch threads, prompt {args.prompt}, new {args.new}, '
        'float32, greedy')
  print('| case | batch | ours prefill tok/s | ours decode tok/s | HF prefill tok/s | '
        'HF decode tok/s | decode ratio | ours head tok/s | HF head tok/s | head floor tok/s | '
        'ceiling |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for name in args.cases.split(','):
    fields = _case(name)
    hf_ref.VOCAB = fields['vocab_size']
    kw = {k: v for k, v in fields.items() if k not in ('vocab_size', 'embed_dim', 'mlp_dim')}
    cfg, hf_cfg = hf_ref._configs(**kw)  # pylint: disable=protected-access
    import dataclasses  # pylint: disable=g-import-not-at-top
    cfg = dataclasses.replace(cfg, vocab_size=fields['vocab_size'], embed_dim=fields['embed_dim'],
                              mlp_dim=fields['mlp_dim'])
    hf_cfg.vocab_size, hf_cfg.hidden_size = fields['vocab_size'], fields['embed_dim']
    hf_cfg.intermediate_size = fields['mlp_dim']
    hf_cfg.max_position_embeddings = 4096
    hf_model = hf_ref._hf_model(hf_cfg)  # pylint: disable=protected-access
    ours = hf_ref._ours(cfg, hf_model)  # pylint: disable=protected-access
    sampler = sample.Sampler(ours)
    for B in map(int, args.batches.split(',')):
      rng = np.random.default_rng(0)
      prompts = [[2] + list(rng.integers(200, 1000, args.prompt - 1)) for _ in range(B)]
      stops = ()
      ours_times = []
      for r in range(args.repeats + 1):  # timed as transformers' below: (new) - (1 token)
        t0 = time.perf_counter()
        sampler.generate(prompts, 1, stop_tokens=stops)  # prefill only
        t1 = time.perf_counter()
        sampler.generate(prompts, args.new, stop_tokens=stops)
        t2 = time.perf_counter()
        if r:
          ours_times.append((t1 - t0, t2 - t1 - (t1 - t0)))
      prefill = min(t for t, _ in ours_times)
      decode = min(t for _, t in ours_times)
      ids = torch.tensor(prompts)
      hf_times = []
      with torch.no_grad():
        for r in range(args.repeats + 1):
          t0 = time.perf_counter()
          hf_model.generate(ids, max_new_tokens=1, do_sample=False, use_cache=True,
                            pad_token_id=0, eos_token_id=None)
          t1 = time.perf_counter()
          hf_model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new,
                            do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
          t2 = time.perf_counter()
          if r:
            hf_times.append((t1 - t0, t2 - t1 - (t1 - t0)))
      hf_prefill = min(t for t, _ in hf_times)
      hf_decode = min(t for _, t in hf_times)
      n = B * (args.new - 1)
      table_bytes = 4 * fields['vocab_size'] * fields['embed_dim']
      head, hf_head = _head_step_times(ours, hf_model, B, args.new - 1, args.repeats)
      steps = args.new - 1
      print(f'| {name} | {B} | {B * args.prompt / prefill:,.0f} | {n / decode:,.0f} | '
            f'{B * args.prompt / hf_prefill:,.0f} | {n / hf_decode:,.0f} | '
            f'{hf_decode / decode:.2f}x | {B / head:,.0f} | {B / hf_head:,.0f} | '
            f'{B * bandwidth * 1e9 / table_bytes:,.0f} | {hf_decode / steps / head:.2f}x |',
            flush=True)
  print(f'# load average after: {", ".join(f"{x:.1f}" for x in os.getloadavg())}')


if __name__ == '__main__':
  main(sys.argv[1:])
