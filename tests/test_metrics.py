"""MFU arithmetic, the writers and profile-step parsing."""

import json
import math
import pathlib
import re
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from gemma3_train import config as config_lib
from gemma3_train.infra import cpu_peak
from gemma3_train.training import metrics
from tests import helpers


def test_throughput_arithmetic():
  # 8e12 FLOPs in 2 s on 4 devices = 1 TFLOP/s each; peak 2.5 -> 40%.
  out = metrics.throughput(2.0, 4096, 8e12, 4, 2.5)
  assert out == pytest.approx(dict(tokens_per_sec=2048.0, tflops_per_device=1.0, mfu=0.4))
  assert metrics.throughput(2.0, 4096, 8e12, 4, None)['mfu'] is None
  with pytest.raises(ValueError, match='step_time_s'):
    metrics.throughput(0.0, 1, 1, 1, 1.0)


def test_step_timer():
  timer = metrics.StepTimer(tokens_per_step=100, flops_per_step=3e12, num_devices=1,
                            peak_tflops=2.0)
  assert timer.update(10, now=5.0) == {}
  out = timer.update(20, now=35.0)  # 10 steps in 30 s
  assert out['step_time_s'] == pytest.approx(3.0)
  assert out['tokens_per_sec'] == pytest.approx(100 / 3)
  assert out['mfu'] == pytest.approx(0.5)


def test_cpu_matmul_peak_is_2n3_over_the_median_time(monkeypatch):
  # Three timed runs of 1, 5 and 2 ms: the median is 2 ms.
  clock = iter([0.0, 0.001, 1.0, 1.005, 2.0, 2.002])
  monkeypatch.setattr(cpu_peak.time, 'perf_counter', lambda: next(clock))
  peak = cpu_peak.measure_cpu_matmul_peak('float32', n=100, repeats=3)
  assert peak == pytest.approx(2 * 100**3 / 0.002 / 1e12)


def test_cached_peak_keeps_the_best_reading_and_refreshes_on_request(tmp_path, monkeypatch):
  """The first reading is cached; a remeasure that reads lower (a busy box) keeps the old peak
  and its date, a higher one replaces both; a cached peak is not measured again."""
  readings = iter([0.30, 0.20, 0.35])
  calls = []

  def measure(dtype):
    calls.append(dtype)
    return next(readings)
  monkeypatch.setattr(cpu_peak, 'measure_cpu_matmul_peak', measure)
  stamps = iter(['2026-12-01 10:00', '2026-12-03 10:00'])  # taken only when a peak is kept
  monkeypatch.setattr(cpu_peak, '_now', lambda: next(stamps))
  cache = str(tmp_path)
  assert cpu_peak.cached_cpu_matmul_peak('float32', cache) == (0.30, '2026-12-01 10:00')
  assert cpu_peak.cached_cpu_matmul_peak('float32', cache) == (0.30, '2026-12-01 10:00')
  assert len(calls) == 1  # cached: not measured again
  assert cpu_peak.cached_cpu_matmul_peak('float32', cache, remeasure=True) == (
      0.30, '2026-12-01 10:00')  # 0.20 read on a busy box never lowers it
  assert cpu_peak.cached_cpu_matmul_peak('float32', cache, remeasure=True) == (
      0.35, '2026-12-03 10:00')
  table = json.loads((tmp_path / 'cpu_peak.json').read_text())
  assert table == {cpu_peak.machine_key('float32'): {'tflops': 0.35,
                                                     'measured': '2026-12-03 10:00',
                                                     'n': cpu_peak.PEAK_N}}


def test_memory_bandwidth_is_bytes_over_the_best_time(monkeypatch):
  clock = iter([0.0, 0.004, 1.0, 1.002, 2.0, 2.003])  # 4, 2 and 3 ms: the best is 2
  monkeypatch.setattr(cpu_peak.time, 'perf_counter', lambda: next(clock))
  assert cpu_peak.measure_memory_bandwidth(mbytes=4, repeats=3) == pytest.approx(
      4 * 2**20 / 0.002 / 1e9)


def test_speed_benchmarks_print_machine_load_peak_and_bandwidth(tmp_path, monkeypatch):
  """Every benchmark that reports a speed starts with describe_machine's line."""
  (tmp_path / 'cpu_peak.json').write_text(json.dumps({cpu_peak.machine_key('float32'): {
      'tflops': 0.266, 'measured': '2026-12-06 10:00', 'n': cpu_peak.PEAK_N}}))
  monkeypatch.setattr(cpu_peak, 'measure_memory_bandwidth', lambda: 71.6)
  line = cpu_peak.describe_machine('float32', str(tmp_path))
  assert re.fullmatch(r'.+, \d+ cores, .+, \d+ MHz; load average [\d.]+, [\d.]+, [\d.]+; '
                      r'float32 matmul peak 266 GFLOP/s \(measured 2026-12-06 10:00\); '
                      r'memory read 72 GB/s', line), line
  for name in ('decode', 'dpo', 'grpo', 'harness', 'stop_strings', 'train_step',
               'data_throughput', 'startup'):
    assert 'cpu_peak.describe_machine(' in (helpers.ROOT / 'benchmarks' / f'{name}.py'
                                              ).read_text(), name


def test_peak_cache_key_names_what_sets_the_speed():
  key = cpu_peak.machine_key('bfloat16')
  assert re.fullmatch(r'.+ \| flags [0-9a-f]{10} \| \d+ cores \| \d+ MHz \| jax [\d.]+ \| bfloat16',
                      key), key
  assert key != cpu_peak.machine_key('float32')


def test_remeasure_peak_cli_prints_and_keeps_it(tmp_path):
  """gemma3-train --remeasure_peak without --workdir: one line with the peak, kept in the
  cache, exit 0."""
  r = subprocess.run([str(pathlib.Path(sys.executable).parent / 'gemma3-train'),
                      '--config=configs/tiny.py', '--remeasure_peak',
                      f'--config.train.cache_dir={tmp_path}'], cwd=helpers.ROOT,
                     env=helpers.cli_env(devices=1), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  line, = r.stdout.splitlines()
  gflops = float(re.fullmatch(r'CPU matmul peak \(float32\): ([\d.]+) GFLOP/s, measured '
                              r'\d{4}-\d\d-\d\d \d\d:\d\d in .+cpu_peak\.json', line).group(1))
  (entry,) = json.loads((tmp_path / 'cpu_peak.json').read_text()).values()
  assert entry['tflops'] * 1e3 == pytest.approx(gflops, abs=0.05)


def _matmul_times(n, repeats):
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return times


def test_cpu_matmul_peak_agrees_with_a_timed_matmul():
  """The measured peak matches a matmul of the same size timed here (before and after it),
  within 2x of the fastest and slowest run: a wrong FLOP count, unit or an unawaited (merely
  dispatched) matmul would be off by far more."""
  n = 512
  times = _matmul_times(n, 5)
  peak = cpu_peak.measure_cpu_matmul_peak('float32', n=n, repeats=5)
  times += _matmul_times(n, 5)
  fastest, slowest = (2 * n**3 / t / 1e12 for t in (min(times), max(times)))
  assert slowest / 2 <= peak <= fastest * 2, (peak, slowest, fastest)


def _events(logdir):
  """(tag, step, value) of every scalar in the TensorBoard event files (TFRecord framing)."""
  out = []
  for path in sorted(logdir.rglob('events.out.tfevents.*')):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_metric_writer(tmp_path, capsys):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=300)
  writer.write(100, dict(loss=jnp.float32(3.5), grad_norm=0.9, learning_rate=3e-3,
                         tokens_per_sec=41200.0, tflops_per_device=1.23, mfu=None))
  writer.write(120, dict(loss=3.412, grad_norm=0.91, learning_rate=3e-3, tokens_per_sec=41234.0,
                         tflops_per_device=1.234, mfu=0.381, extra=7), step_time_s=0.5)
  writer.write_eval(120, dict(loss=3.3, perplexity=math.exp(3.3)))
  writer.close()

  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert len(rows) == 3
  for row in rows[:2]:
    assert {'step', 'loss', 'grad_norm', 'learning_rate', 'tokens_per_sec',
            'tflops_per_device', 'mfu'} <= set(row)
  assert rows[0]['mfu'] is None and rows[0]['loss'] == 3.5
  assert rows[1]['extra'] == 7 and rows[1]['step'] == 120
  assert rows[2] == dict(step=120, eval_loss=3.3, eval_perplexity=pytest.approx(math.exp(3.3)))

  lines = capsys.readouterr().out.splitlines()
  # 0.5 s/step, 180 steps left -> 90 s.
  assert lines[1] == ('step 120/300 (40%) | loss 3.412 | grad_norm 0.91 | lr 3.0e-03 | '
                      '41.2k tok/s | 1.23 TFLOP/s/dev | MFU 38.1% | ETA 1m30s')
  assert 'MFU' not in lines[0] and 'ETA' not in lines[0]
  assert re.match(r'eval @ step 120 \| eval_loss 3\.3 \| eval_perplexity 27\.1', lines[2])

  scalars = _events(tmp_path / 'tensorboard')
  assert ('loss', 120, pytest.approx(3.412)) in scalars
  assert ('eval_loss', 120, pytest.approx(3.3)) in scalars
  assert not any(tag == 'mfu' and step == 100 for tag, step, _ in scalars)  # None skipped


def test_metric_writer_non_chief_writes_nothing(tmp_path, capsys):
  writer = metrics.MetricWriter(str(tmp_path / 'w'), total_steps=10, is_chief=False)
  writer.write(1, dict(loss=1.0))
  writer.write_eval(1, dict(loss=1.0))
  writer.close()
  assert not (tmp_path / 'w').exists()
  assert capsys.readouterr().out == ''


def test_profile_steps_parsing():
  assert metrics.profile_steps('') == set()
  assert metrics.profile_steps('5,6') == {5, 6}
  assert metrics.profile_steps(' 7 ,9') == {7, 9}
  with pytest.raises(config_lib.ConfigError, match='logging.profile_steps'):
    metrics.profile_steps('5-6')


def test_profiler_traces_chosen_steps(tmp_path):
  profiler = metrics.Profiler(str(tmp_path), {1, 2, 5})
  f = jax.jit(lambda x: x @ x)
  x = jnp.ones((64, 64))
  for step in range(7):
    with profiler.step(step) as trace:
      trace.wait_for = f(x)
    if step == 3:
      time.sleep(1.1)  # jax names a trace directory by the second it starts
  # Consecutive steps share one trace; a gap starts another.
  runs = sorted(p.name for p in (tmp_path / 'profile' / 'plugins' / 'profile').iterdir())
  assert len(runs) == 2, runs
  assert helpers.traced_steps(tmp_path) == [[1, 2], [5]]


def test_profiler_non_chief_traces_nothing(tmp_path):
  profiler = metrics.Profiler(str(tmp_path), {0}, is_chief=False)
  with profiler.step(0):
    pass
  assert not (tmp_path / 'profile').exists()


def test_hlo_profile_counts_matmul_flops_and_times_ops():
  # benchmarks/ is scripts, not a package: on sys.path for this test only.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / 'benchmarks'))
  import hlo_profile  # pylint: disable=g-import-not-at-top

  def loss(w, x_BD):
    h_BF = jnp.tanh(x_BD @ w['in_DF'])
    return jnp.mean((h_BF @ w['out_FD']) ** 2)
  b, d, f = 16, 32, 48
  w = {'in_DF': jnp.ones((d, f)) / d, 'out_FD': jnp.ones((f, d)) / f}
  x = jnp.ones((b, d))
  step = jax.jit(jax.grad(loss))
  hlo = hlo_profile.HloModule(step.lower(w, x).compile().as_text())
  entry = hlo.computations[hlo.entry].values()
  # fwd: 2 matmuls; bwd: dW and dX for the second, dW for the first (dX of x is not needed).
  assert sum(hlo.matmul_flops(i) for i in entry) == 2 * b * d * f * (2 + 3)
  step(w, x)
  times = hlo_profile.trace_op_times(lambda: step(w, x), 2, hlo)
  assert times and all(t >= 0 for t in times.values())
  assert set(times) <= {i.name for c in hlo.computations.values() for i in c.values()}
  assert 'matmul' in hlo_profile.breakdown(hlo, times, 1e-3, 0.05)


def test_a_torn_last_row_is_dropped_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
  writer = metrics.MetricWriter(str(tmp_path), total_steps=5, enable_tensorboard=False)
  writer.write(2, dict(loss=1.5))
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in rows] == [(1, 2.0), (2, 1.5)]
