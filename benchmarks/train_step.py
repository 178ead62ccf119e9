"""Train-step throughput and MFU: median wall time of the compiled step on synthetic batches.

python benchmarks/train_step.py                        # tiny + gemma3_640, float32 + bfloat16
python benchmarks/train_step.py --cases=gemma3_640 --dtypes=bfloat16 --profile
python benchmarks/train_step.py --config=configs/1b.py --dtypes=bfloat16 \
    --set=model.attention_impl=cudnn --batch=8 --seq_len=4096  # on a GPU

On CPU the peak is the XLA matmul rate of this machine measured in the same run, per dtype;
it is re-measured after each case's timed steps, since this box may be shared. On TPU/GPU
it is the chip's dense bf16 peak (gemma3_train.infra.hardware.CHIPS).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time

from gemma3_train import config as config_lib  # no jax: safe before XLA_FLAGS is set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The Gemma-3-shaped case: 270m's width with the full 262,144-row vocabulary, 6 layers.
GEMMA3_640 = dict(vocab_size=262144, num_layers=6, embed_dim=640, mlp_dim=2048, num_heads=4,
                  num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256.0, sliding_window=512)


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--cases', default='tiny,gemma3_640',
                 help='comma list of built-in cases: tiny (configs/tiny.py), gemma3_640')
  p.add_argument('--config', default='', help='a config file instead of --cases')
  p.add_argument('--dtypes', default='float32,bfloat16', help='model.dtype values to run')
  p.add_argument('--steps', type=int, default=10, help='timed steps (median reported)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--batch', type=int, default=0, help='global batch (0 = the case default)')
  p.add_argument('--seq_len', type=int, default=0, help='row length (0 = the case default)')
  p.add_argument('--set', action='append', default=[],
                 help='config override section.key=value (repeatable)')
  p.add_argument('--peak_n', type=int, default=2048, help='matmul size for the CPU peak')
  p.add_argument('--profile', action='store_true',
                 help='trace 3 steps and print where the time goes (CPU runtime)')
  p.add_argument('--hlo_text', default='',
                 help='with --profile: write each case\'s optimized HLO to PREFIX_<case>_<dtype>.txt')
  p.add_argument('--hlo_dump', default='', help='XLA_FLAGS --xla_dump_to directory')
  p.add_argument('--json', default='', help='also write the results to this JSON file')
  return p.parse_args(argv)


def _load_config_file(path: str) -> dict:
  try:
    return config_lib.load_config_dict(path).to_dict()
  except config_lib.ConfigError as e:
    raise SystemExit(f'train_step.py: error: --config={e}') from None


def _set(values: dict, dotted: str) -> None:
  key, _, raw = dotted.partition('=')
  section, _, field = key.partition('.')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  values.setdefault(section, {})[field] = value


def _case_configs(args) -> list[tuple[str, dict]]:
  if args.config:
    return [(os.path.basename(args.config).removesuffix('.py'), _load_config_file(args.config))]
  out = []
  for name in filter(None, args.cases.split(',')):
    if name == 'tiny':
      out.append((name, _load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))))
    elif name == 'gemma3_640':
      values = _load_config_file(os.path.join(ROOT, 'configs', 'base.py'))
      values['model'].update(GEMMA3_640, preset='gemma3_640')
      values['data']['seq_len'] = 1024
      values['train']['global_batch_size'] = 2
      out.append((name, values))
    else:
      raise SystemExit(f'--cases: unknown case {name!r}; expected tiny | gemma3_640')
  return out


def _synthetic_batch(c, batch_sharding, seed=0):
  import jax  # pylint: disable=g-import-not-at-top  (jax loads after main() sets XLA_FLAGS)
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  b, l = c.train.global_batch_size, c.data.seq_len
  tokens = rng.integers(0, c.model.vocab_size, size=(b, l + 1), dtype=np.int32)
  host = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
              segment_ids=np.ones((b, l), np.int32), weights=np.ones((b, l), np.float32))
  return {k: jax.device_put(v, batch_sharding[k]) for k, v in host.items()}


def run_case(name: str, values: dict, dtype: str, args, peaks: dict) -> dict:
  # jax, and our modules that import it, load after main() has set XLA_FLAGS.
  import jax  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train.infra import hardware
  from gemma3_train.infra import cpu_peak
  from gemma3_train.training import metrics
  from gemma3_train import sharding
  from gemma3_train.training import loop as train
  from gemma3_train.training import state as train_state

  values = json.loads(json.dumps(values))  # deep copy
  values['model']['dtype'] = dtype
  if args.batch:
    values['train']['global_batch_size'] = args.batch
  if args.seq_len:
    values['data']['seq_len'] = args.seq_len
  values['train']['num_steps'] = max(values['train']['num_steps'], args.warmup + args.steps + 4)
  for item in args.set:
    _set(values, item)
  c = config_lib.from_dict(values)
  mesh = sharding.make_mesh(c)
  devices = mesh.devices.size

  start = time.perf_counter()
  s = train_state.setup(c, mesh)
  jax.block_until_ready(s.state)
  init_s = time.perf_counter() - start
  batch = _synthetic_batch(c, s.batch_sharding)
  state = s.state
  s.state = None  # the step donates it

  start = time.perf_counter()
  state, m = s.train_step(state, batch)
  first_loss = float(m['loss'])
  compile_s = time.perf_counter() - start
  for _ in range(args.warmup):
    state, m = s.train_step(state, batch)
  jax.block_until_ready(m['loss'])
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, m = s.train_step(state, batch)
    jax.block_until_ready(m['loss'])
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)

  platform = jax.devices()[0].platform
  if platform == 'cpu':
    # Simulated CPU devices share the same cores: the whole machine is the one "device".
    # The peak is re-measured right after the timed steps: this box may be shared, and the
    # ratio is only meaningful under the same load.
    peak = cpu_peak.measure_cpu_matmul_peak(dtype, n=args.peak_n)
    peaks.setdefault(dtype, []).append(peak)
    mfu_devices = 1
  else:
    peak, mfu_devices = hardware.peak_tflops(jax.devices()[0], c.logging.peak_tflops), devices
  tokens = c.train.global_batch_size * c.data.seq_len
  flops = flops_lib.model_flops_per_step(c.model, c.data.seq_len, c.train.global_batch_size)
  out = metrics.throughput(step_s, tokens, flops, mfu_devices, peak)
  result = dict(case=name, dtype=dtype, platform=platform, devices=devices,
                device_kind=jax.devices()[0].device_kind, batch=c.train.global_batch_size,
                seq_len=c.data.seq_len, attention_impl=c.model.attention_impl,
                remat_policy=c.model.remat_policy, step_s=step_s, min_step_s=min(times),
                compile_s=compile_s, init_s=init_s, model_flops_per_step=flops,
                peak_tflops=peak, first_loss=first_loss, last_loss=float(m['loss']),
                load_average=os.getloadavg()[0], **out)

  if args.profile:
    import hlo_profile  # pylint: disable=g-import-not-at-top
    holder = {'state': state}

    def one_step():
      holder['state'], metrics_ = s.train_step(holder['state'], batch)
      return metrics_['loss']
    text = s.train_step.lower(state, batch).compile().as_text()
    if args.hlo_text:
      with open(f'{args.hlo_text}_{name}_{dtype}.txt', 'w') as f:
        f.write(text)
    hlo = hlo_profile.HloModule(text)
    op_times = hlo_profile.trace_op_times(one_step, 3, hlo)
    result['profile'] = hlo_profile.breakdown(hlo, op_times, step_s, peak)
  return result


def _line(r: dict) -> str:
  mfu = f'{100 * r["mfu"]:5.1f}%' if r['mfu'] is not None else '  n/a'
  return (f'{r["case"]:<12} {r["dtype"]:<9} B={r["batch"]:<3} L={r["seq_len"]:<5} '
          f'step {1e3 * r["step_s"]:8.1f} ms  {r["tokens_per_sec"]:9.0f} tok/s  '
          f'{r["tflops_per_device"]:8.4f} TFLOP/s/dev  peak {r["peak_tflops"] or 0:.4f}  '
          f'MFU {mfu}  (compile {r["compile_s"]:.0f}s, loss {r["first_loss"]:.3f}'
          f'->{r["last_loss"]:.3f}, load {r["load_average"]:.1f})')


def main(argv=None) -> list[dict]:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  if args.hlo_dump:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_dump_to={args.hlo_dump} --xla_dump_hlo_as_text')
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hlo_profile, beside us
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  dtypes = [d for d in args.dtypes.split(',') if d]
  peaks: dict[str, list[float]] = {}  # CPU matmul peaks measured so far, per dtype
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  print(f'jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'# {cpu_peak.describe_machine()}', flush=True)
  results = []
  for name, values in _case_configs(args):
    for dtype in dtypes:
      r = run_case(name, values, dtype, args, peaks)
      results.append(r)
      print(_line(r), flush=True)
      if 'profile' in r:
        print(r['profile'], flush=True)
  for dtype, values in peaks.items():
    print(f'CPU XLA matmul peak ({dtype}, n={args.peak_n}): '
          f'{", ".join(f"{v:.4f}" for v in values)} TFLOP/s', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
