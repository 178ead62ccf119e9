"""The CPU's matmul peak, measured: a CPU has no datasheet peak, so MFU on CPU is measured
against the XLA matmul throughput of this machine (once, then cached)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp


def measure_cpu_matmul_peak(dtype: str = 'float32', n: int = 2048, repeats: int = 10) -> float:
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


def cached_cpu_matmul_peak(dtype: str, cache_dir: str) -> float:
  """measure_cpu_matmul_peak, measured once per machine and kept in CACHE_DIR/cpu_peak.json
  (keyed by CPU model, usable cores, jax version and dtype); '' measures every time."""
  if not cache_dir:
    return measure_cpu_matmul_peak(dtype, n=1024, repeats=5)
  path = os.path.join(os.path.expanduser(cache_dir), 'cpu_peak.json')
  key = f'{_cpu_model()} | {len(os.sched_getaffinity(0))} cores | jax {jax.__version__} | {dtype}'
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError):
    table = {}
  if key not in table:
    table[key] = measure_cpu_matmul_peak(dtype, n=1024, repeats=5)
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f'{path}.{os.getpid()}.tmp'
      with open(tmp, 'w') as f:
        json.dump(table, f, indent=1)
      os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    except OSError:
      pass  # a read-only home only costs a measurement per run
  return table[key]


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
