"""The CPU's matmul peak, measured: a CPU has no datasheet peak, so MFU on CPU is measured
against the XLA matmul throughput of this machine.

The peak is measured at n = PEAK_N, where the throughput has reached its plateau (at 1024 an
AVX-512 Xeon read 228 GFLOP/s against 266 at 2048), and cached per machine in
CACHE_DIR/cpu_peak.json under a key made of what sets a CPU's speed: its model, instruction-set
flags, usable cores and top frequency, with the jax version and dtype. A measurement taken while
other work runs reads low, never high, so the cache keeps the best: a new measurement (the first
on a machine, or `gemma3-train --remeasure_peak`) replaces the cached one only when it is higher.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

PEAK_N = 2048


def measure_cpu_matmul_peak(dtype: str = 'float32', n: int = PEAK_N, repeats: int = 10) -> float:
  """TFLOP/s of a jitted n x n jnp.dot on the CPU backend (median of repeats after warm-up)."""
  cpu = jax.devices('cpu')[0]
  a = jax.device_put(jnp.ones((n, n), dtype), cpu)
  b = jax.device_put(jnp.full((n, n), 0.5, dtype), cpu)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()  # compile + warm caches
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e12


def measure_memory_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
  """GB/s of a jitted sum over an mbytes float32 array (best of repeats after warm-up): the
  rate at which this machine streams weights from memory, which bounds a decode step (each
  step reads every weight once)."""
  cpu = jax.devices('cpu')[0]
  a = jax.device_put(jnp.ones((mbytes * 2**20 // 4,), jnp.float32), cpu)
  total = jax.jit(jnp.sum)
  total(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    total(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return a.nbytes / best / 1e9


def describe_machine(dtype: str = 'float32', cache_dir: str = '~/.cache/gemma3_train',
                     bandwidth_gbs: float | None = None) -> str:
  """One line for a benchmark's first output: the CPU (model, usable cores, widest vector
  flags, top MHz), the load average now, its matmul peak (cached, with its date) and its
  memory read bandwidth (measured now unless given), so that a figure travels with what it
  ran on."""
  info = _cpuinfo()
  flags = set(info.get('flags', '').split())
  vector = [f for f in ('avx512f', 'avx512_bf16', 'amx_tile', 'avx2') if f in flags][:2]
  tflops, measured = cached_cpu_matmul_peak(dtype, cache_dir)
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  return (f'{info.get("model name") or platform.processor() or platform.machine()}, '
          f'{len(os.sched_getaffinity(0))} cores, {"+".join(vector) or "no avx2"}, '
          f'{_max_mhz(info)} MHz; load average {load}; {dtype} matmul peak '
          f'{tflops * 1e3:.0f} GFLOP/s (measured {measured}); memory read '
          f'{bandwidth_gbs or measure_memory_bandwidth():.0f} GB/s')


def machine_key(dtype: str) -> str:
  """What identifies this machine's matmul speed (two machines sharing a model name string,
  e.g. 'Intel(R) Xeon(R) Processor', differ in flags, cores or frequency)."""
  info = _cpuinfo()
  flags = hashlib.sha1(' '.join(sorted(info.get('flags', '').split())).encode()).hexdigest()[:10]
  return (f'{info.get("model name") or platform.processor() or platform.machine()} | '
          f'flags {flags} | {len(os.sched_getaffinity(0))} cores | {_max_mhz(info)} MHz | '
          f'jax {jax.__version__} | {dtype}')


def cached_cpu_matmul_peak(dtype: str, cache_dir: str, *, remeasure: bool = False
                           ) -> tuple[float, str]:
  """(TFLOP/s, when measured) of this machine: the best measurement in CACHE_DIR/cpu_peak.json,
  measured now when there is none for this machine or when `remeasure`; '' measures every time
  and keeps nothing."""
  if not cache_dir:
    return measure_cpu_matmul_peak(dtype), _now()
  path = os.path.join(os.path.expanduser(cache_dir), 'cpu_peak.json')
  key = machine_key(dtype)
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError):
    table = {}
  entry = table.get(key)
  if entry is None or remeasure:
    tflops = measure_cpu_matmul_peak(dtype)
    if entry is None or tflops > entry['tflops']:  # a lower reading never lowers the peak
      entry = table[key] = {'tflops': tflops, 'measured': _now(), 'n': PEAK_N}
      _write(path, table)
  return entry['tflops'], entry['measured']


def _write(path: str, table: dict) -> None:
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(table, f, indent=1)
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
  except OSError:
    pass  # a read-only home only costs a measurement per run


def _now() -> str:
  return datetime.datetime.now().strftime('%Y-%m-%d %H:%M')


def _cpuinfo() -> dict[str, str]:
  """The first processor's /proc/cpuinfo fields ({} where there is none)."""
  out: dict[str, str] = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          break
        name, _, value = line.partition(':')
        out.setdefault(name.strip(), value.strip())
  except OSError:
    pass
  return out


def _max_mhz(info: dict[str, str]) -> int:
  """The top frequency (cpufreq's cpuinfo_max_freq), else cpuinfo's current 'cpu MHz'."""
  try:
    with open('/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq') as f:
      return int(f.read().strip()) // 1000
  except (OSError, ValueError):
    pass
  try:
    return round(float(info.get('cpu MHz', '0')) / 100) * 100  # it wanders a little
  except ValueError:
    return 0
