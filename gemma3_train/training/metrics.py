"""Throughput and MFU, the step timer, the metric writers (stdout, JSONL, TensorBoard), profiling.

MFU = achieved model FLOP/s per device / the device's peak dense bf16 FLOP/s. "Model FLOPs"
(flops.py) are the matmul FLOPs the math needs (fwd + bwd = 3 x fwd), never the remat recompute.
The loop's one clock is StepTimer: it gives the step time and throughput of each logged interval,
and the writer's ETA is that step time times the steps left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterator

import jax
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.infra import progress as progress_lib
from gemma3_train.infra import storage

log = logging.getLogger(__name__)


# --- peaks and throughput ----------------------------------------------------


def throughput(step_time_s: float, tokens_per_step: float, flops_per_step: float,
               num_devices: int, peak_tflops: float | None) -> dict[str, float | None]:
  """tokens/s, achieved model TFLOP/s per device and MFU (None when the peak is unknown)."""
  if step_time_s <= 0:
    raise ValueError(f'step_time_s={step_time_s!r}: expected a positive duration')
  tflops_per_device = flops_per_step / step_time_s / num_devices / 1e12
  mfu = tflops_per_device / peak_tflops if peak_tflops else None
  return dict(tokens_per_sec=tokens_per_step / step_time_s,
              tflops_per_device=tflops_per_device, mfu=mfu)


@dataclasses.dataclass
class StepTimer:
  """Turns wall time between logged steps into step time and throughput (the per-run constants
  live here); the first call only starts the clock."""
  tokens_per_step: float
  flops_per_step: float
  num_devices: int
  peak_tflops: float | None
  _last: tuple[int, float] | None = None

  def update(self, step: int, now: float | None = None) -> dict[str, float | None]:
    """Throughput since the previous call (empty on the first), for steps completed by now."""
    now = time.perf_counter() if now is None else now
    last, self._last = self._last, (step, now)
    if last is None or step <= last[0] or now <= last[1]:
      return {}
    step_time = (now - last[1]) / (step - last[0])
    return dict(step_time_s=step_time, **throughput(
        step_time, self.tokens_per_step, self.flops_per_step, self.num_devices,
        self.peak_tflops))


# --- writers -----------------------------------------------------------------

_REQUIRED = ('step', 'loss', 'grad_norm', 'learning_rate', 'tokens_per_sec',
             'tflops_per_device', 'mfu')


def _scalar(value: Any) -> float | int | None:
  """A JSON-safe Python scalar: arrays become floats, NaN/Inf become None."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, int):
    return value
  value = float(value)
  return value if math.isfinite(value) else None


def _rate(tokens_per_sec: float) -> str:
  for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if tokens_per_sec >= scale:
      return f'{tokens_per_sec / scale:.1f}{suffix}'
  return f'{tokens_per_sec:.1f}'


def _drop_torn_last_line(path: epath.Path) -> None:
  """A run killed (or out of disk) mid-write can leave a partial last row: cut it off, so that
  the resumed run's rows follow whole ones."""
  if not path.exists():
    return
  with open(path, 'rb+') as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b'\n':
      return  # the usual case: one byte read, not the whole file
    f.seek(0)
    keep = f.read().rfind(b'\n') + 1
    f.truncate(keep)
    log.warning('%s: dropped a partial last row (%d bytes) left by the previous run', path,
                size - keep)


def _append_line(path: epath.Path, line: str) -> bool:
  """One row, whole or not at all: False (the partial bytes cut off again) on a full disk."""
  data = line.encode() + b'\n'
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
      done = 0
      while done < len(data):
        done += os.write(fd, data[done:])
    except OSError as e:
      if not storage.is_disk_full(e):
        raise
      os.ftruncate(fd, start)
      return False
  finally:
    os.close(fd)
  return True


def _tensorboardx():
  """tensorboardX, imported without torch: its writer module imports torch, when installed,
  only to accept torch.Tensor values (2.4-3.8 s of every start here; we write Python numbers and
  strings). sys.modules[name] = None makes that `import torch` raise ImportError, which it
  catches; the entry is removed again, so torch imports normally afterwards."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


class MetricWriter:
  """Writes WORKDIR/metrics.jsonl, TensorBoard scalars and a progress line (chief only)."""

  def __init__(self, workdir: str, *, total_steps: int, enable_tensorboard: bool = True,
               is_chief: bool = True):
    self._total = total_steps
    self._chief = is_chief
    self._tb = None
    self._path = epath.Path(workdir) / 'metrics.jsonl'
    # Object stores cannot append: keep the lines and rewrite the file (it stays small).
    self._local = not str(workdir).startswith(('gs://', 's3://'))
    self._lines: list[str] = []
    self._dropped = 0  # rows a full disk took
    self.last_eval: tuple[int, dict[str, Any]] | None = None  # (step, row) of the last eval
    if not is_chief:
      return
    self._path.parent.mkdir(parents=True, exist_ok=True)
    if self._local:
      _drop_torn_last_line(self._path)
    elif self._path.exists():
      self._lines = storage.retry(self._path.read_text, f'Reading {self._path}').splitlines()
    if enable_tensorboard:
      self._tb = _tensorboardx().SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def _append(self, record: dict[str, Any]) -> None:
    line = json.dumps(record, allow_nan=False)
    if self._local:
      # A full disk is the checkpoint's to report (one line with the space it needs; the run
      # stops there): rows lost meanwhile are counted, and the resumed run rewrites them.
      if not _append_line(self._path, line):
        self._dropped += 1
        if self._dropped == 1:
          log.warning('No space left on device for %s: rows are dropped until space frees',
                      self._path)
    else:
      self._lines.append(line)
      text = '\n'.join(self._lines) + '\n'
      # Past the storage client's own retries (a longer outage), ours: a lost row would leave
      # a gap in the run's record.
      storage.retry(lambda: self._path.write_text(text), f'Writing {self._path}')

  def _scalars(self, step: int, record: dict[str, Any]) -> None:
    if self._tb is None:
      return
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def write(self, step: int, metrics: dict[str, Any], *,
            step_time_s: float | None = None) -> None:
    """Logs one training step: a JSONL row (required keys, null if absent), TB, stdout.

    step_time_s (the recent seconds per step, e.g. StepTimer's) gives the progress line an ETA.
    """
    if not self._chief:
      return
    record = {key: None for key in _REQUIRED}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    record['step'] = int(step)
    eta = None if step_time_s is None else step_time_s * max(self._total - step, 0)
    self._append(record)
    self._scalars(step, record)
    print(self._progress_line(step, record, eta), flush=True)

  def _progress_line(self, step: int, r: dict[str, Any], eta: float | None) -> str:
    pct = 100 * step / self._total if self._total else 0.0
    parts = [f'step {step}/{self._total} ({pct:.0f}%)']
    fmt = (('loss', 'loss {:.3f}'), ('grad_norm', 'grad_norm {:.2f}'),
           ('learning_rate', 'lr {:.1e}'))
    parts += [f.format(r[k]) for k, f in fmt if r.get(k) is not None]
    if r.get('tokens_per_sec') is not None:
      parts.append(f'{_rate(r["tokens_per_sec"])} tok/s')
    if r.get('tflops_per_device') is not None:
      parts.append(f'{r["tflops_per_device"]:.3g} TFLOP/s/dev')
    if r.get('mfu') is not None:
      parts.append(f'MFU {100 * r["mfu"]:.1f}%')
    if eta is not None:
      parts.append(f'ETA {progress_lib.duration(eta)}')
    return ' | '.join(parts)

  def write_eval(self, step: int, metrics: dict[str, Any]) -> None:
    """Logs eval metrics with an eval_ prefix (eval_loss, eval_perplexity) to the same sinks."""
    record = {'step': int(step)}
    for key, value in metrics.items():
      record[key if key.startswith('eval_') else f'eval_{key}'] = _scalar(value)
    self.last_eval = (int(step), record)
    if not self._chief:
      return
    self._append(record)
    self._scalars(step, record)
    shown = ' | '.join(f'{k} {v:.4g}' for k, v in record.items()
                       if k != 'step' and isinstance(v, float))
    print(f'eval @ step {step} | {shown}', flush=True)

  def write_scalars(self, step: int, record: dict[str, float], title: str) -> None:
    """Logs a row of named values as they are (e.g. eval/TASK/METRIC) to the same sinks, with
    one stdout line '{title} @ step N | ...'."""
    if not self._chief:
      return
    self._append({'step': int(step), **record})
    self._scalars(step, record)
    shown = ' | '.join(f'{k} {v:.4g}' for k, v in record.items())
    print(f'{title} @ step {step} | {shown}', flush=True)

  def write_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
    """Logs (prompt, continuation) pairs: one metrics.jsonl row each ({step, sample_prompt,
    sample_text}), TensorBoard text under samples/<i>, and stdout."""
    if not self._chief:
      return
    for i, (prompt, text) in enumerate(samples):
      self._append({'step': int(step), 'sample_prompt': prompt, 'sample_text': text})
      if self._tb is not None:
        self._tb.add_text(f'samples/{i}', f'{prompt} **{text}**', step)
      print(f'sample @ step {step} | {prompt!r} -> {text!r}', flush=True)
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def summary_line(*, step: int, total_steps: int, loss: float | None,
                 last_eval: tuple[int, dict[str, Any]] | None, seconds: float, tokens: float,
                 resumed_at: int, checkpoint: tuple[int, str] | None) -> str:
  """The run's last line: where it ended, the final train loss, the last eval loss, the wall
  time, the tokens trained on and the checkpoint that is complete on storage."""
  parts = [f'{"Finished" if step >= total_steps else "Stopped"} at step {step}/{total_steps}']
  if loss is not None:
    parts.append(f'loss {loss:.4f}')
  eval_loss = last_eval[1].get('eval_loss') if last_eval else None
  if eval_loss is not None:
    parts.append(f'eval_loss {eval_loss:.4f} (step {last_eval[0]})')
  since = f' (steps {resumed_at}..{step})' if resumed_at else ''
  parts.append(f'{progress_lib.duration(seconds)} wall')
  parts.append(f'{tokens:,.0f} tokens{since}')
  parts.append(f'checkpoint step {checkpoint[0]} written to {checkpoint[1]}' if checkpoint
               else 'no checkpoint written')
  return ' | '.join(parts)


# --- profiling ---------------------------------------------------------------


def profile_steps(spec: str) -> set[int]:
  """Parses logging.profile_steps ('5,6' -> {5, 6}; '' -> empty)."""
  steps = set()
  for item in filter(None, (s.strip() for s in spec.split(','))):
    if not item.isdigit():
      raise config_lib.ConfigError(
          f"logging.profile_steps={spec!r}: expected a comma list of steps, e.g. '5,6'")
    steps.add(int(item))
  return steps


class Profiler:
  """Traces the chosen steps with jax.profiler into WORKDIR/profile; consecutive steps share one
  trace. Only the chief traces. A step is the train state's step before the update (the trace's
  step_num), as logging.profile_steps counts.

  with profiler.step(step) as trace:
    state, metrics = train_step(state, batch)
    trace.wait_for = metrics  # blocked on before the trace stops, so device work is captured
  """

  def __init__(self, workdir: str, steps: set[int], is_chief: bool = True):
    self._dir = str(epath.Path(workdir) / 'profile')
    self._steps = steps if is_chief else set()
    self._active = False
    self.wait_for: Any = None

  @contextlib.contextmanager
  def step(self, step: int) -> Iterator['Profiler']:
    if step not in self._steps:
      yield self
      return
    if not self._active:
      jax.profiler.start_trace(self._dir)
      self._active = True
    try:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        yield self
    except BaseException:
      self.stop()  # an interrupted trace would otherwise stay open
      raise
    if step + 1 not in self._steps:
      self.stop()

  def stop(self) -> None:
    if self._active:
      jax.block_until_ready(self.wait_for)
      jax.profiler.stop_trace()
      self._active = False
    self.wait_for = None
