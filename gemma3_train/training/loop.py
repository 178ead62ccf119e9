"""The train loop: `train_and_evaluate(config, workdir)` (state.py builds what it runs).

`train_and_evaluate` runs four sections, each a function below:
  restore or init  the newest checkpoint in the workdir, else checkpoint.init_from (params only;
                   the optimizer state is built from them), else a random init born sharded;
  compile          the train step, before the first batch; processes then wait for each other;
  the loop         step N+1 is dispatched before step N's metrics are fetched, so the host never
                   stalls the device; checkpoints, evals, preemption and profiling;
  flush            fetches one step's metrics, stops on NaN, logs the due steps with throughput.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Callable, Iterator

import jax
import orbax.checkpoint as ocp
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train import data as data_lib
from gemma3_train.inference import scoring
from gemma3_train.infra import cpu_peak
from gemma3_train.infra import hardware
from gemma3_train.infra import lease as lease_lib
from gemma3_train import sharding
from gemma3_train.training import checkpoint as checkpoint_lib
from gemma3_train.training import flops as flops_lib
from gemma3_train.training import init_from
from gemma3_train.training import metrics as metrics_lib
from gemma3_train.training import objectives
from gemma3_train.training import restore as restore_lib
from gemma3_train.training import samples as samples_lib
from gemma3_train.training.state import Setup, State, abstract_batch, setup

log = logging.getLogger(__name__)


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed for multi-process runs: explicit flags, else auto-detect on TPU/GKE."""
  if coordinator:
    # XLA's CPU backend has no cross-process collectives of its own; gloo provides them. The
    # setting only concerns the CPU backend, and nothing may touch a backend before initialize().
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _on_cloud_tpu():
    jax.distributed.initialize()


def _on_cloud_tpu() -> bool:
  return bool(os.environ.get('TPU_WORKER_HOSTNAMES')
              or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))


# --- compile -------------------------------------------------------------------


def compile_train_step(s: Setup) -> Callable[[State, dict], tuple[State, dict]]:
  """s.train_step compiled for s's abstract state and batch, before the first step.

  In a multi-process run every process then waits until all have compiled: gloo (the CPU
  collectives) gives a peer only 30 s to join the first collective, and processes finish
  compiling at different times. The barrier is the coordination service's, not a collective
  (jax.experimental.multihost_utils.sync_global_devices is one, with gloo's 30 s).
  """
  start = time.perf_counter()
  compiled = s.train_step.lower(s.abstract_state, abstract_batch(s.config, s.mesh)).compile()
  log.info('Compiled the train step in %.1f s', time.perf_counter() - start)
  if jax.process_count() > 1 and jax.distributed.is_initialized():
    # jax exposes its coordination client only privately; orbax wraps it in a public barrier.
    wait = ocp.multihost.get_barrier_sync_fn()
    wait(key='gemma3_train_compiled', timeout_ms=3_600_000)
  return compiled


def _peak_tflops(c: config_lib.Config) -> float | None:
  """The per-device peak MFU is measured against (None: unknown, no MFU)."""
  device = jax.devices()[0]
  peak = hardware.peak_tflops(device, c.logging.peak_tflops)
  if peak is None and device.platform == 'cpu':
    # No datasheet for a CPU: the XLA matmul peak measured on this machine (the best reading,
    # cached), shared by the simulated devices (they run on the same cores).
    machine, measured = cpu_peak.cached_cpu_matmul_peak(c.model.dtype, c.train.cache_dir)
    peak = machine / jax.local_device_count()
    log.info('MFU against the CPU matmul peak (%s): %.4f TFLOP/s for the machine, measured %s '
             '(gemma3-train --remeasure_peak measures again); %.4f per device', c.model.dtype,
             machine, measured, peak)
  return peak


# --- flush ---------------------------------------------------------------------


def _to_host(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, m: dict[str, float], workdir: str) -> None:
  if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])):
    raise FloatingPointError(
        f'step {step}: loss={m["loss"]} grad_norm={m["grad_norm"]} is not finite; stopping. '
        f'The last good checkpoint in {workdir}/checkpoints is intact (lower optim.lr or '
        f'raise optim.warmup_steps, then rerun to resume from it).')


@dataclasses.dataclass
class _Flush:
  """Fetches one step's metrics, stops on NaN, and logs every log_every-th step, the first and
  the last, with the throughput since the previous logged step (none on the first: its
  interval includes compilation)."""
  writer: metrics_lib.MetricWriter
  timer: metrics_lib.StepTimer
  workdir: str
  log_every: int
  always: tuple[int, int]  # the run's first and last step
  data_tokens: Callable[[int], dict] = lambda step: {}  # data.mixture's tokens/NAME at a step
  step: int = 0  # the last step fetched
  tokens: float = 0.0  # the weighted targets of the steps fetched (the run's summary)

  def __call__(self, step: int, metrics: dict) -> dict[str, float]:
    host = _to_host(metrics)
    _check_finite(step, host, self.workdir)
    self.step, self.tokens = step, self.tokens + host.get('tokens', 0.0)
    if step % self.log_every == 0 or step in self.always:
      timing = self.timer.update(step)
      step_time = timing.pop('step_time_s', None)
      host.update(timing)
      host.update(self.data_tokens(step))
      self.writer.write(step, host, step_time_s=step_time)
    return host


# --- the loop ------------------------------------------------------------------


def evaluate(s: Setup, state: State, eval_iter: Iterator[dict], num_batches: int) -> dict:
  """The objective's eval metrics over up to num_batches batches of eval_iter."""
  step = lambda local: s.eval_step(state, data_lib.global_batch(local, s.batch_sharding))
  totals, _ = scoring.sum_batches(step, eval_iter, max_batches=num_batches)
  return s.objective.eval_summary(totals)


def _run_eval(s: Setup, state: State, step: int, writer: metrics_lib.MetricWriter) -> None:
  c = s.config
  group = sharding.data_group(sharding.batch_sharding(s.mesh))
  eval_iter = data_lib.make_eval_iterator(c, process_index=group.index,
                                          process_count=group.count)
  with contextlib.closing(eval_iter):
    result = evaluate(s, state, eval_iter, c.train.eval_steps)
  writer.write_eval(step, {k: v for k, v in result.items() if k != 'tokens'})


def _check_eval_tasks(c: config_lib.Config) -> None:
  """train.eval_tasks: lm-eval is installed and knows every name (ConfigError otherwise)."""
  try:
    from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if not (e.name or '').startswith('lm_eval'):
      raise
    raise config_lib.ConfigError(
        f'train.eval_tasks={c.train.eval_tasks!r} needs lm-evaluation-harness: '
        "pip install 'gemma3-train[eval]'") from None
  try:
    harness.task_manager(tuple(harness.task_names(c.train.eval_tasks)),
                         c.train.eval_tasks_include_path)
  except harness.HarnessError as e:
    raise config_lib.ConfigError(f'train.eval_tasks: {e}') from None


def _run_eval_tasks(s: Setup, state: State, step: int, writer: metrics_lib.MetricWriter,
                    tasks) -> object:
  """Runs train.eval_tasks (harness.TrainTasks, built on the first call and returned) and logs
  eval/TASK/METRIC to metrics.jsonl and TensorBoard, in a row of its own."""
  from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top  (lm-eval)
  tasks = tasks or harness.TrainTasks(s)
  start = time.perf_counter()
  record = tasks(state)
  log.info('Ran train.eval_tasks in %.1f s', time.perf_counter() - start)
  if record:  # (write_eval would prefix every key with eval_)
    writer.write_scalars(step, record, 'eval tasks')
  return tasks


def _loop(s: Setup, state: State, start_step: int, train_step, train_iter: Iterator[dict],
          ckpt: checkpoint_lib.Checkpointer, writer: metrics_lib.MetricWriter,
          profiler: metrics_lib.Profiler, flush: _Flush) -> dict[str, float]:
  """Steps start_step..num_steps; returns the last step's metrics."""
  c = s.config
  samples = samples_lib.TrainSamples(s, writer)
  tasks = None  # harness.TrainTasks, on the first train.eval_tasks_every step
  pending: tuple[int, dict] | None = None  # (step, device metrics) not yet fetched
  last: dict[str, float] = {}
  step = saved = start_step
  while step < c.train.num_steps:
    try:  # an objective that makes its batches (RL) reads train_iter itself, below
      local_batch = None if s.objective.makes_batches else next(train_iter)
    except StopIteration:  # a finite source ran out (data.mixture_exhausted=stop)
      if pending is not None:  # fetched first, so that a NaN is never saved
        last, pending = flush(*pending), None
      _end_of_data(step, saved, state, train_iter, ckpt, c)
      break
    with profiler.step(step) as trace:
      if local_batch is None:
        batch = s.objective.make_batches(s, state, step, train_iter)
      else:
        batch = data_lib.global_batch(local_batch, s.batch_sharding)
      state, metrics = train_step(state, batch)
      trace.wait_for = metrics
    step += 1
    if pending is not None:
      last = flush(*pending)
    pending = (step, metrics)
    stop = ckpt.should_stop(step)
    save_due = stop or step == c.train.num_steps or bool(
        c.checkpoint.every and step % c.checkpoint.every == 0)
    eval_due = bool(c.train.eval_every and step % c.train.eval_every == 0 and c.train.eval_steps)
    tasks_due = bool(c.train.eval_tasks_every and step % c.train.eval_tasks_every == 0)
    if save_due or eval_due or tasks_due:  # fetched now: a NaN is never saved or evaluated
      last, pending = flush(*pending), None
    if eval_due:
      _run_eval(s, state, step, writer)
    if c.train.sample_every and step % c.train.sample_every == 0:
      if s.objective.makes_batches:  # a few of its own completions
        writer.write_samples(step, s.objective.samples())
      else:
        samples(state, step)
    if tasks_due:
      tasks = _run_eval_tasks(s, state, step, writer, tasks)
    if save_due:
      ckpt.save(step, state, train_iter, force=True)
      saved = step
      if stop and step < c.train.num_steps:
        ckpt.wait()
        log.warning('Stopped by %s: checkpoint at step %d written to %s; exiting 0. Rerun '
                    'the same command to resume.', ckpt.stop_reason, step, ckpt.directory)
        break
  if pending is not None:
    last = flush(*pending)
  return last


def _end_of_data(step: int, saved: int, state: State, train_iter, ckpt, c) -> None:
  """Saves (unless this step is saved already) and says why the run stops early."""
  if step > saved:
    ckpt.save(step, state, train_iter, force=True)
  log.warning('The training data ran out at step %d of train.num_steps=%d '
              '(data.mixture_exhausted=stop); checkpoint at step %d in %s; stopping.', step,
              c.train.num_steps, step, ckpt.directory)


def preflight(c: config_lib.Config, *, resuming: bool, process_index: int = 0,
              process_count: int = 1) -> None:
  """Checks what the user's files can make fail later, before the workdir is touched (the train
  data and tokenizer are checked by building the train iterator): the eval data, when evals
  are due, and checkpoint.init_from (exists, a known kind, this model's shapes), when it will
  be read; train.eval_tasks' names, when they will run. Raises ConfigError or data.DataError
  (one line)."""
  if c.train.eval_every and c.train.eval_steps and c.train.eval_every <= c.train.num_steps:
    data_lib.make_dataset(c.replace(data=dict(num_workers=0)), 'eval',
                          process_index=process_index, process_count=process_count)
  if c.checkpoint.init_from and not resuming:
    init_from.open_init_source(c.checkpoint.init_from, c)
  if c.train.eval_tasks_every and c.train.eval_tasks_every <= c.train.num_steps:
    _check_eval_tasks(c)


def enable_compilation_cache(c: config_lib.Config) -> None:
  """jax's persistent compilation cache under train.cache_dir: a rerun or resume of the same
  config loads its compiled steps instead of compiling them again."""
  if not c.train.cache_dir:
    return
  path = os.path.join(os.path.expanduser(c.train.cache_dir), 'jax')
  jax.config.update('jax_compilation_cache_dir', path)
  # jax caches only compiles over 1 s by default; the tiny config's eval step takes less.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)


def train_and_evaluate(c: config_lib.Config, workdir: str) -> dict[str, float]:
  """Trains to c.train.num_steps, resuming from workdir; returns the last step's metrics.

  A workdir already at num_steps returns {} at once: nothing is built, compiled or written.
  Otherwise process 0 ends with one summary line on stdout, once the checkpoint writes are
  complete (summary_line: losses, wall time, tokens, the checkpoint).
  """
  start = time.perf_counter()
  done = checkpoint_lib.latest_step(workdir)
  if done is not None and done >= c.train.num_steps:
    checkpoint_lib.check_compatible(epath.Path(workdir) / 'checkpoints' / str(done), c)
    log.info('%s is already at step %d of train.num_steps=%d; nothing to do', workdir, done,
             c.train.num_steps)
    return {}
  # Everything that can reject the config runs before the workdir is touched.
  c = objectives.get(c).resolve(c, workdir)
  enable_compilation_cache(c)
  mesh = sharding.make_mesh(c)
  pid, nproc = jax.process_index(), jax.process_count()
  # The rows this process loads: its own, or its context group's (every host of it alike).
  group = sharding.data_group(sharding.batch_sharding(mesh))
  log.info('Process %d/%d, %d devices, mesh %s, data group %d/%d', pid, nproc,
           jax.device_count(), dict(mesh.shape), group.index, group.count)
  peak = _peak_tflops(c)  # said in the first lines: every MFU of the run is against it
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(data_lib.sources.log_summary)  # skipped rows per file, when the run ends
    train_iter = cleanup.enter_context(contextlib.closing(
        objectives.get(c).train_iterator(c, process_index=group.index,
                                         process_count=group.count)))
    preflight(c, resuming=done is not None, process_index=group.index,
              process_count=group.count)
    s = setup(c, mesh, abstract=True)
    # The first write to the workdir; a second run on it stops here (lease.py).
    cleanup.callback(lease_lib.acquire(workdir, c.checkpoint.lease_timeout_s).release)
    ckpt = checkpoint_lib.Checkpointer(workdir, c)
    s.objective.prepare(s, workdir, functools.partial(restore_lib.initial_state, s))
    state, start_step = restore_lib.restore_or_init(s, ckpt, train_iter)
    cleanup.callback(ckpt.close)
    ckpt.install_signal_handlers()

    tokens = c.train.global_batch_size * c.data.seq_len
    flops = flops_lib.train_flops_per_step(c)  # LoRA: no weight gradients for the base
    writer = metrics_lib.MetricWriter(workdir, total_steps=c.train.num_steps,
                                      enable_tensorboard=c.logging.tensorboard,
                                      is_chief=pid == 0)
    cleanup.callback(writer.close)
    timer = metrics_lib.StepTimer(tokens, flops, jax.device_count(), peak)
    profiler = metrics_lib.Profiler(workdir, metrics_lib.profile_steps(c.logging.profile_steps),
                                    is_chief=pid == 0)
    cleanup.callback(profiler.stop)  # a trace still open when the run ends
    flush = _Flush(writer, timer, workdir, c.logging.log_every,
                   always=(start_step + 1, c.train.num_steps),
                   data_tokens=functools.partial(data_lib.tokens_drawn, train_iter))
    log.info('Training steps %d..%d: %d tokens/step, %.3g model FLOPs/step', start_step,
             c.train.num_steps, tokens, flops)

    if start_step == 0:  # a fresh run: what the objective logs once (a teacher's eval loss)
      eval_batches = functools.partial(data_lib.make_eval_iterator, c,
                                       process_index=group.index, process_count=group.count)
      record = s.objective.start_metrics(s, state, eval_batches)
      if record:
        writer.write_scalars(0, record, 'at start')
    train_step = compile_train_step(s)
    last = _loop(s, state, start_step, train_step, train_iter, ckpt, writer, profiler, flush)
  # Here the checkpointer is closed: its background writes are complete (or raised).
  if pid == 0:
    saved = checkpoint_lib.latest_step(workdir)
    print(metrics_lib.summary_line(
        step=flush.step, total_steps=c.train.num_steps, loss=last.get('loss'),
        last_eval=writer.last_eval, seconds=time.perf_counter() - start, tokens=flush.tokens,
        resumed_at=start_step,
        checkpoint=None if saved is None else (saved, str(ckpt.directory / str(saved)))),
        flush=True)
  return last
