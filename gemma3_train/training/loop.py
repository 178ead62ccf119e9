"""Train state, the jitted train/eval steps and the loop: `train_and_evaluate(config, workdir)`.

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
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma3_train.training import checkpoint as checkpoint_lib
from gemma3_train import config as config_lib
from gemma3_train import data as data_lib
from gemma3_train.training import flops as flops_lib
from gemma3_train.infra import cpu_peak
from gemma3_train.infra import hardware
from gemma3_train.training import init_from
from gemma3_train.infra import lease as lease_lib
from gemma3_train.models import lora as lora_lib
from gemma3_train.models import lm_head as loss_lib
from gemma3_train.training import metrics as metrics_lib
from gemma3_train.models import decoder as model_lib
from gemma3_train.training import optimizer as optimizer_lib
from gemma3_train.training import restore as restore_lib
from gemma3_train.training import samples as samples_lib
from gemma3_train import sharding
from gemma3_train.data import images as images_lib

log = logging.getLogger(__name__)

# A train state is a plain dict pytree: {'step': int32[], 'params': nnx.State of Params,
# 'opt_state': optax state}. Params keep their nnx.Variable wrappers so that the logical axis
# metadata travels with them (and with the Adam moments optax builds from them).
State = dict[str, Any]


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


# --- setup: abstract state, shardings, jitted steps ---------------------------


@dataclasses.dataclass
class Setup:
  config: config_lib.Config
  mesh: Mesh
  rules: dict[str, tuple[str, ...]]
  graphdef: Any
  abstract_state: State  # ShapeDtypeStructs with shardings; nothing allocated
  state_shardings: State
  batch_sharding: dict[str, NamedSharding]
  schedule: optax.Schedule
  init_state: Callable[[], State]  # jitted random init, born sharded
  init_opt_state: Callable[[Any], Any]  # jitted tx.init: params -> sharded optimizer state
  train_step: Callable[[State, dict], tuple[State, dict]]  # jitted, state donated
  eval_step: Callable[[State, dict], dict]
  state: State | None = None
  # LoRA (lora.rank > 0): the state also holds 'base', frozen and never saved; jitted inits of
  # the rest (adapters, optimizer state, step) and of the seed's random base.
  init_trainable: Callable[[], State] | None = None
  init_base: Callable[[], Any] | None = None


def _new_state(c: config_lib.Config, tx: optax.GradientTransformation) -> State:
  if c.lora.rank:
    return lora_lib.new_state(c, tx)
  model = model_lib.Gemma3(c.model, rngs=nnx.Rngs(c.train.seed))
  params = nnx.state(model, nnx.Param)
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt_state': optimizer_lib.init_state(c, tx, params)}


def _loss_sums(params, graphdef, batch: dict, c: config_lib.Config,
               base=None, dropout_key=None, frozen=None) -> tuple[jax.Array, dict]:
  """Summed (not averaged) loss over the batch's weighted targets, and its parts.

  base (LoRA) and frozen (an untrained image encoder) are parts of the model that are inputs,
  not differentiated.
  """
  model = nnx.merge(graphdef, params, *(p for p in (base, frozen) if p is not None))
  if dropout_key is not None:  # LoRA adapter dropout: training steps only
    lora_lib.set_dropout(model, dropout_key, c.lora.dropout)
  x_BLD = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'],
                       images=images_lib.from_batch(batch))
  targets, weights = loss_lib.mask_image_targets(batch['targets'], batch['weights'],
                                                 c.model.vocab_size)
  sums = loss_lib.chunked_cross_entropy(
      x_BLD, model.embedder.embedding[...], targets, weights,
      chunk_size=c.train.loss_chunk_size, z_loss=c.train.z_loss,
      vocab_parallel=c.train.loss_vocab_parallel)
  total = sums['loss_sum'] + c.train.z_loss * sums['z_loss_sum']
  return total, sums


def _train_step(state: State, batch: dict, *, graphdef, tx, schedule, c: config_lib.Config,
                mesh: Mesh, rules) -> tuple[State, dict]:
  """One optimizer step over the global batch, accumulated over microbatches by a scan."""
  with sharding.use_mesh(mesh, rules):
    # LoRA's base and a frozen image encoder are inputs of the loss, not differentiated.
    params, frozen = optimizer_lib.split_frozen(c, state['params'])
    grad_fn = jax.grad(functools.partial(_loss_sums, base=state.get('base'), frozen=frozen),
                       has_aux=True)
    A = c.optim.grad_accum_steps
    key = _dropout_key(c, state['step'])  # None unless lora.dropout
    drop = lambda k: {} if k is None else {'dropout_key': k}
    if A == 1:
      grads, sums = grad_fn(params, graphdef, batch, c, **drop(key))
    else:
      # Strided microbatches (row j*A + a goes to microbatch a) keep every device's rows local.
      def split(x):
        x = x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, 'act_batch', 'act_len')[:x.ndim])
      micro = jax.tree.map(split, batch)

      def body(carry, mb):
        mb, a = mb
        g, s = grad_fn(params, graphdef, mb, c,
                       **drop(None if key is None else jax.random.fold_in(key, a)))
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      zero_sums = jax.eval_shape(lambda: grad_fn(params, graphdef, jax.tree.map(
          lambda x: x[0], micro), c)[1])
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
      (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (micro, jnp.arange(A)))
    weight = jnp.maximum(sums['weight_sum'], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    if frozen is not None:
      new_params = nnx.merge_state(new_params, frozen)
    new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state}
    if 'base' in state:
      new_state['base'] = state['base']
    metrics = {'loss': sums['loss_sum'] / weight,
               'z_loss': sums['z_loss_sum'] / weight,
               'accuracy': sums['correct_sum'] / weight,
               'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state['step']),
               'tokens': sums['weight_sum']}
  return new_state, metrics


def _dropout_key(c: config_lib.Config, step: jax.Array) -> jax.Array | None:
  """The LoRA adapter dropout key of a train step: a function of train.seed and the step, so
  that a resumed run draws the same masks (None without lora.dropout)."""
  if not (c.lora.rank and c.lora.dropout):
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(c.train.seed), 0xD50), step)


def _eval_step(state: State, batch: dict, *, graphdef, c: config_lib.Config, mesh, rules):
  with sharding.use_mesh(mesh, rules):
    _, sums = _loss_sums(state['params'], graphdef, batch, c, base=state.get('base'))
  return sums



def abstract_batch(c: config_lib.Config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch: [B, L] token arrays; with model.vision also 'images' uint8
  [B, data.max_images, S, S, 3] and 'image_counts' int32 [B]. Rows over the batch axes."""
  B, m = c.train.global_batch_size, c.model
  shapes = {k: ((B, c.data.seq_len), dtype) for k, dtype in data_lib.BATCH_DTYPES.items()}
  if m.vision:
    S = m.vision_image_size
    image_shapes = {'images': (B, c.data.max_images, S, S, 3), 'image_counts': (B,)}
    shapes.update({k: (image_shapes[k], dtype)
                   for k, dtype in data_lib.IMAGE_BATCH_DTYPES.items()})
  s = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
          for k, (shape, dtype) in shapes.items()}


def _init_program(fn: Callable[[], Any], out_shardings: Any, mesh: Mesh) -> Callable[[], Any]:
  """jit(fn) for a random init, which runs once. On CPU it is compiled at LLVM -O0 (on its
  first call): threefry makes a long program that the default level compiles in 12.5 s for
  configs/tiny.py and -O0 in 6.9 s; the values differ from -O3's in the last bit at most."""
  jitted = jax.jit(fn, out_shardings=out_shardings)
  if mesh.devices.flat[0].platform != 'cpu':
    return jitted
  compiled = []

  def init():
    if not compiled:
      compiled.append(jitted.lower().compile(
          compiler_options={'xla_backend_optimization_level': 0}))
    return compiled[0]()
  return init


def setup(c: config_lib.Config, mesh: Mesh, *, abstract: bool = False) -> Setup:
  """Builds the jitted steps and (unless abstract) the initialized, sharded state."""
  rules = sharding.parse_rules(c.mesh.rules)
  tx, schedule = optimizer_lib.make_optimizer(c)
  new_state = functools.partial(_new_state, c, tx)
  abstract_state = jax.eval_shape(new_state)
  state_shardings = sharding.state_shardings(abstract_state, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lora_lib.build(c, nnx.Rngs(0))))
  batch_sharding = {k: sharding.batch_sharding(mesh) for k in abstract_batch(c, mesh)}
  replicated = NamedSharding(mesh, P())
  train_step = jax.jit(
      functools.partial(_train_step, graphdef=graphdef, tx=tx, schedule=schedule, c=c,
                        mesh=mesh, rules=rules),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(
      functools.partial(_eval_step, graphdef=graphdef, c=c, mesh=mesh, rules=rules),
      in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)
  init_state = _init_program(new_state, state_shardings, mesh)
  init_opt_state = jax.jit(functools.partial(optimizer_lib.init_state, c, tx),
                           out_shardings=state_shardings['opt_state'])
  s = Setup(config=c, mesh=mesh, rules=rules, graphdef=graphdef, abstract_state=abstract_state,
            state_shardings=state_shardings, batch_sharding=batch_sharding, schedule=schedule,
            init_state=init_state, init_opt_state=init_opt_state, train_step=train_step,
            eval_step=eval_step)
  if c.lora.rank:  # jit drops what each does not return: no random base when it is loaded
    rest = {k: v for k, v in state_shardings.items() if k != 'base'}
    s.init_trainable = _init_program(
        lambda: {k: v for k, v in new_state().items() if k != 'base'}, rest, mesh)
    s.init_base = _init_program(lambda: new_state()['base'], state_shardings['base'], mesh)
  if not abstract:
    s.state = init_state()
  return s


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
    # No datasheet for a CPU: the XLA matmul peak measured on this machine (once, then
    # cached), shared by the simulated devices (they run on the same cores).
    peak = cpu_peak.cached_cpu_matmul_peak(c.model.dtype, c.train.cache_dir)
    peak /= jax.local_device_count()
    log.info('CPU matmul peak (%s): %.4f TFLOP/s per device', c.model.dtype, peak)
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

  def __call__(self, step: int, metrics: dict) -> dict[str, float]:
    host = _to_host(metrics)
    _check_finite(step, host, self.workdir)
    if step % self.log_every == 0 or step in self.always:
      timing = self.timer.update(step)
      step_time = timing.pop('step_time_s', None)
      host.update(timing)
      host.update(self.data_tokens(step))
      self.writer.write(step, host, step_time_s=step_time)
    return host


# --- the loop ------------------------------------------------------------------


def evaluate(s: Setup, state: State, eval_iter: Iterator[dict], num_batches: int) -> dict:
  totals: dict[str, float] = {}
  for _ in range(num_batches):
    try:
      local = next(eval_iter)
    except StopIteration:
      break
    sums = s.eval_step(state, data_lib.global_batch(local, s.batch_sharding['inputs']))
    for k, v in _to_host(sums).items():
      totals[k] = totals.get(k, 0.0) + v
  weight = max(totals.get('weight_sum', 0.0), 1.0)
  loss = totals.get('loss_sum', float('nan')) / weight
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'accuracy': totals.get('correct_sum', 0.0) / weight, 'tokens': weight}


def _run_eval(s: Setup, state: State, step: int, writer: metrics_lib.MetricWriter) -> None:
  c = s.config
  eval_iter = data_lib.make_eval_iterator(c, process_index=jax.process_index(),
                                          process_count=jax.process_count())
  with contextlib.closing(eval_iter):
    result = evaluate(s, state, eval_iter, c.train.eval_steps)
  writer.write_eval(step, {'eval_loss': result['loss'], 'eval_perplexity': result['perplexity'],
                           'eval_accuracy': result['accuracy']})


def _loop(s: Setup, state: State, start_step: int, train_step, train_iter: Iterator[dict],
          ckpt: checkpoint_lib.Checkpointer, writer: metrics_lib.MetricWriter,
          profiler: metrics_lib.Profiler, flush: _Flush) -> dict[str, float]:
  """Steps start_step..num_steps; returns the last step's metrics."""
  c = s.config
  samples = samples_lib.TrainSamples(s, writer)
  pending: tuple[int, dict] | None = None  # (step, device metrics) not yet fetched
  last: dict[str, float] = {}
  step = saved = start_step
  while step < c.train.num_steps:
    try:
      local_batch = next(train_iter)
    except StopIteration:  # a finite source ran out (data.mixture_exhausted=stop)
      if pending is not None:  # fetched first, so that a NaN is never saved
        last, pending = flush(*pending), None
      _end_of_data(step, saved, state, train_iter, ckpt, c)
      break
    with profiler.step(step) as trace:
      batch = data_lib.global_batch(local_batch, s.batch_sharding['inputs'])
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
    if save_due or eval_due:  # fetched now, so that a NaN is never saved or evaluated
      last, pending = flush(*pending), None
    if eval_due:
      _run_eval(s, state, step, writer)
    if c.train.sample_every and step % c.train.sample_every == 0:
      samples(state, step)
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
  be read. Raises ConfigError or data.DataError (one line)."""
  if c.train.eval_every and c.train.eval_steps and c.train.eval_every <= c.train.num_steps:
    data_lib.make_dataset(c.replace(data=dict(num_workers=0)), 'eval',
                          process_index=process_index, process_count=process_count)
  if c.checkpoint.init_from and not resuming:
    init_from.open_init_source(c.checkpoint.init_from, c)


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
  """
  done = checkpoint_lib.latest_step(workdir)
  if done is not None and done >= c.train.num_steps:
    checkpoint_lib.check_compatible(epath.Path(workdir) / 'checkpoints' / str(done), c)
    log.info('%s is already at step %d of train.num_steps=%d; nothing to do', workdir, done,
             c.train.num_steps)
    return {}
  # Everything that can reject the config runs before the workdir is touched.
  enable_compilation_cache(c)
  mesh = sharding.make_mesh(c)
  pid, nproc = jax.process_index(), jax.process_count()
  log.info('Process %d/%d, %d devices, mesh %s', pid, nproc, jax.device_count(),
           dict(mesh.shape))
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(data_lib.sources.log_summary)  # skipped rows per file, when the run ends
    train_iter = cleanup.enter_context(contextlib.closing(
        data_lib.make_train_iterator(c, process_index=pid, process_count=nproc)))
    preflight(c, resuming=done is not None, process_index=pid, process_count=nproc)
    s = setup(c, mesh, abstract=True)
    # The first write to the workdir; a second run on it stops here (lease.py).
    cleanup.callback(lease_lib.acquire(workdir, c.checkpoint.lease_timeout_s).release)
    ckpt = checkpoint_lib.Checkpointer(workdir, c)
    state, start_step = restore_lib.restore_or_init(s, ckpt, train_iter)
    cleanup.callback(ckpt.close)
    ckpt.install_signal_handlers()

    tokens = c.train.global_batch_size * c.data.seq_len
    flops = flops_lib.train_flops_per_step(c)  # LoRA: no weight gradients for the base
    writer = metrics_lib.MetricWriter(workdir, total_steps=c.train.num_steps,
                                      enable_tensorboard=c.logging.tensorboard,
                                      is_chief=pid == 0)
    cleanup.callback(writer.close)
    timer = metrics_lib.StepTimer(tokens, flops, jax.device_count(), _peak_tflops(c))
    profiler = metrics_lib.Profiler(workdir, metrics_lib.profile_steps(c.logging.profile_steps),
                                    is_chief=pid == 0)
    cleanup.callback(profiler.stop)  # a trace still open when the run ends
    flush = _Flush(writer, timer, workdir, c.logging.log_every,
                   always=(start_step + 1, c.train.num_steps),
                   data_tokens=functools.partial(data_lib.tokens_drawn, train_iter))
    log.info('Training steps %d..%d: %d tokens/step, %.3g model FLOPs/step', start_step,
             c.train.num_steps, tokens, flops)

    train_step = compile_train_step(s)
    return _loop(s, state, start_step, train_step, train_iter, ckpt, writer, profiler, flush)
