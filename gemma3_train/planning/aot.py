"""Ahead-of-time compile of the real train step for a TPU topology, on any machine with libtpu.

`gemma3-train --config=configs/27b.py --aot_topology=v5p-128` builds the same mesh, shardings and
jitted train step as a run on that slice, over libtpu's compile-only devices (no TPU needed), and
reports per-chip memory from the compiler, whether it fits the chip's HBM, the model FLOPs and an
estimated step time and MFU. `--aot_plan` (plan.py) searches remat x batch x (fsdp, tensor)
for what fits.

Figures and where they come from:
  memory        the TPU compiler's memory_analysis() (exact for the compiled program);
  model FLOPs   flops.train_flops_per_step (3 x forward matmuls, no recompute; LoRA: 2 x for
                the frozen base, whose weights get no gradient; + 1 x for a DPO reference);
  step time     estimate.py: the XLA, splash and context-axis parts and how they are counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import topologies

from gemma3_train import config as config_lib
from gemma3_train.infra import hardware
from gemma3_train.models import attention
from gemma3_train.planning import estimate
from gemma3_train import sharding
from gemma3_train.training import flops
from gemma3_train.training import state as train_state

GIB = 2**30
HEADROOM = 0.10  # shipped configs must leave this fraction of HBM free


def parse_topology(name: str, num_slices: int = 1) -> hardware.Topology:
  """hardware.parse_topology, its error as a one-line `--aot_topology=...` ConfigError."""
  try:
    return hardware.parse_topology(name, num_slices)
  except ValueError as e:
    raise config_lib.ConfigError(f'--aot_topology={e}') from None


def num_slices(c: config_lib.Config) -> int:
  """Slices implied by the DCN degrees (multi-slice runs set --config.mesh.dcn_*)."""
  dcn = c.mesh.dcn()
  if min(dcn) < 1:
    raise config_lib.ConfigError(f'mesh.dcn_*={dcn}: AOT needs explicit DCN degrees >= 1 '
                                 '(their product is the number of slices)')
  return math.prod(dcn)


# --- libtpu's compile-only devices ---------------------------------------------


def libtpu_available() -> bool:
  """Whether jax can load libtpu: jax looks at TPU_LIBRARY_PATH, then the libtpu package."""
  path = os.environ.get('TPU_LIBRARY_PATH')
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec('libtpu') is not None


@contextlib.contextmanager
def _libtpu_env(accelerator: str) -> Iterator[None]:
  """Env for initializing libtpu on a host without TPUs; restored afterwards.

  Several processes may load libtpu at once (pytest-xdist, a trainer beside us); without TPUs
  there is no metadata server to ask; the host name and accelerator type silence its warnings.
  Restoring matters: training/loop.py reads TPU_WORKER_HOSTNAMES to detect a Cloud TPU VM.
  """
  env = dict(ALLOW_MULTIPLE_LIBTPU_LOAD='1', TPU_SKIP_MDS_QUERY='1',
             TPU_WORKER_HOSTNAMES='localhost', TPU_ACCELERATOR_TYPE=accelerator)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update({k: v for k, v in env.items() if saved[k] is None})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)


def _prefer_cpu_backend() -> None:
  """Makes the host default backend CPU unless jax already chose one (AOT needs no TPU)."""
  if jax.config.jax_platforms is None:
    try:
      jax.config.update('jax_platforms', 'cpu')
    except RuntimeError:  # backends already initialized: keep what the process has
      pass


@contextlib.contextmanager
def _no_persistent_cache() -> Iterator[None]:
  """Turns off jax's persistent compilation cache for a compile-only program.

  A compile-only client cannot load a cached executable: each read fails with a warning.
  """
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)


def devices(topo: hardware.Topology) -> list[Any]:
  """libtpu's compile-only devices for the slice(s); one device per chip."""
  if not libtpu_available():
    raise config_lib.ConfigError(
        f'--aot_topology={topo.name}: needs libtpu (pip install "gemma3-train[tpu]", which '
        'pins the libtpu release matching jax); no TPU is needed')
  _prefer_cpu_backend()
  spec = topo.spec
  kwargs: dict[str, Any] = dict(chip_config_name=spec.chip_config)
  if topo.chips == 1:
    kwargs['chips_per_host_bounds'] = (1, 1, 1)
  if topo.num_slices > 1:
    kwargs['num_slices'] = topo.num_slices
  with _libtpu_env(topo.accelerator_type):
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=f'{topo.kind}:{spec.shapes[topo.chips]}', **kwargs)
  return list(desc.devices)


# --- the report --------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """One compile: every figure per chip unless the name says otherwise."""
  config: str
  topology: str
  chip: str
  chips: int  # all slices
  num_slices: int
  mesh: dict[str, int]
  remat_policy: str
  seq_len: int
  global_batch: int
  per_chip_batch: float
  param_dtype: str
  dtype: str
  attention: str
  hbm_gib: float
  fits: bool
  total_gib: float | None = None  # arguments + outputs - aliased + temporaries + code
  argument_gib: float | None = None
  output_gib: float | None = None
  alias_gib: float | None = None
  temp_gib: float | None = None
  code_gib: float | None = None
  headroom: float | None = None  # 1 - total / HBM
  state_gib: float | None = None  # parameters + optimizer state, from the shardings alone
  model_flops_per_step: float | None = None
  compiler_flops: float | None = None  # per chip, XLA ops only (no Pallas kernels)
  compiler_bytes: float | None = None
  compiler_seconds: float | None = None  # cost_analysis optimal_seconds, None when not given
  executed_flops: float | None = None  # per chip, XLA matmuls incl. remat replay, from shapes
  splash_flops: float | None = None  # per chip, counted by estimate.py
  xla_seconds: float | None = None
  splash_seconds: float | None = None
  context_bytes: float | None = None  # per step, received by the busiest chip of the context axis
  context_seconds: float | None = None  # context_bytes over the chip's ICI (or DCN) bandwidth
  step_seconds: float | None = None
  step_source: str = ''
  tokens_per_sec: float | None = None
  mfu: float | None = None
  compile_seconds: float | None = None
  tpu_kernels: int | None = None  # Mosaic (Pallas TPU) custom calls in the compiled program
  error: str = ''  # the compiler's out-of-memory message when it refused
  remat_unit: str = 'block'  # model.remat_unit
  scan_unit: str = 'block'  # model.scan_unit
  loss_vocab_parallel: bool = False  # train.loss_vocab_parallel


def _gib(n: float) -> float:
  return n / GIB


def _state_bytes(abstract_state: Any) -> int:
  """Bytes of one chip's shard of every state leaf (the shardings are exact, no compile)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _parse_oom(message: str) -> float | None:
  """GiB the compiler said it needed, from a RESOURCE_EXHAUSTED message (None if absent)."""
  units = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
  for pattern in (r'Used ([\d.]+)([KMGT]) of', r'required for [\w ]+ \(([\d.]+)([KMGT])\)'):
    match = re.search(pattern, message)
    if match:
      return float(match.group(1)) * units[match.group(2)] / GIB
  return None


def tpu_run_config(c: config_lib.Config) -> config_lib.Config:
  """The config as a TPU run would see it: the splash kernel, whatever the host backend."""
  return dataclasses.replace(c, model=dataclasses.replace(c.model, attention_impl='splash'))


def attention_path(c: config_lib.Config) -> str:
  """The decoder attention c's train step runs (attention.resolve): with model.vision the
  image blocks' mask depends on the data, which splash cannot take, so the reference."""
  return attention.resolve(c.model.attention_impl, c.model.dtype, images=c.model.vision)


def _attention_note(c: config_lib.Config) -> str:
  path = attention_path(c)
  if path != c.model.attention_impl:
    return (f'{path} (not {c.model.attention_impl}: model.vision rows need the data-dependent '
            'image-block mask, which splash cannot express)')
  return path


def _base_report(c: config_lib.Config, topo: hardware.Topology, shape: dict[str, int]) -> Report:
  return Report(
      config=c.model.preset, topology=topo.name, chip=topo.chip.name, chips=topo.total_chips,
      num_slices=topo.num_slices, mesh=shape, remat_policy=c.model.remat_policy,
      remat_unit=c.model.remat_unit, scan_unit=c.model.scan_unit,
      loss_vocab_parallel=c.train.loss_vocab_parallel,
      seq_len=c.data.seq_len, global_batch=c.train.global_batch_size,
      per_chip_batch=c.train.global_batch_size / topo.total_chips,
      param_dtype=c.model.param_dtype, dtype=c.model.dtype, attention=c.model.attention_impl,
      hbm_gib=topo.chip.hbm_gib, fits=False)


StepBuilder = Callable[[config_lib.Config, Any], tuple[Any, tuple[Any, ...], Any]]


def train_step_builder(c: config_lib.Config, mesh) -> tuple[Any, tuple[Any, ...], Any]:
  """(jitted train step, abstract arguments, abstract state) exactly as the trainer builds them
  (training/state.py)."""
  s = train_state.setup(c, mesh, abstract=True)
  return s.train_step, (s.abstract_state, train_state.abstract_batch(c, mesh)), s.abstract_state


def compile_report(c: config_lib.Config, topo: hardware.Topology, *,
                   device_list: Sequence[Any] | None = None,
                   builder: StepBuilder = train_step_builder) -> Report:
  """Compiles c's train step for topo and fills a Report (fits=False on a compiler OOM)."""
  c = tpu_run_config(c)
  device_list = devices(topo) if device_list is None else device_list
  mesh = sharding.make_mesh(c, device_list)
  shape = sharding.mesh_shape(c, len(device_list), topo.num_slices)
  r = _base_report(c, topo, shape)
  r.attention = _attention_note(c)
  step, args, state = builder(c, mesh)
  r.state_gib = _gib(_state_bytes(state))
  r.model_flops_per_step = flops.train_flops_per_step(c)  # LoRA: no base weight gradients
  if r.state_gib > r.hbm_gib:  # hopeless: skip a compile that can only fail
    r.total_gib = r.state_gib
    r.error = 'parameters and optimizer state alone exceed HBM'
    return r
  start = time.perf_counter()
  try:
    with _no_persistent_cache():
      compiled = step.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    r.compile_seconds = time.perf_counter() - start
    r.error = ' '.join(str(e).split())[:300]
    r.total_gib = _parse_oom(str(e))
    return r
  r.compile_seconds = time.perf_counter() - start
  # 0 with attention 'splash' means the kernel was interpreted (as XLA ops), not the TPU kernel
  # a real run uses: then memory and time describe the wrong program.
  r.tpu_kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  if attention_path(c) == 'splash' and not r.tpu_kernels:
    r.error = ('splash attention was interpreted, not compiled as the TPU kernel (attention.py '
               'must choose interpret from the mesh devices, not jax.default_backend())')
  _fill_memory(r, compiled.memory_analysis())
  estimate.fill_time(r, c, topo, compiled.cost_analysis())
  return r


def _fill_memory(r: Report, mem: Any) -> None:
  r.argument_gib = _gib(mem.argument_size_in_bytes)
  r.output_gib = _gib(mem.output_size_in_bytes)
  r.alias_gib = _gib(mem.alias_size_in_bytes)
  r.temp_gib = _gib(mem.temp_size_in_bytes)
  r.code_gib = _gib(mem.generated_code_size_in_bytes)
  r.total_gib = r.argument_gib + r.output_gib - r.alias_gib + r.temp_gib + r.code_gib
  r.headroom = 1 - r.total_gib / r.hbm_gib
  r.fits = r.total_gib <= r.hbm_gib


def throughput_bound(c: config_lib.Config, topo: hardware.Topology) -> float:
  """The highest tokens/s compile_report can estimate for c, without compiling: fill_time's
  step time with the compiler's cost analysis at zero (it takes the larger of that and the
  executed FLOPs from the shapes at peak, plus the splash kernels' and the context axis's
  transfers, both from the shapes alone, as in the estimate)."""
  c = tpu_run_config(c)
  r = _base_report(c, topo, sharding.mesh_shape(c, topo.total_chips, topo.num_slices))
  r.model_flops_per_step = flops.train_flops_per_step(c)
  estimate.fill_time(r, c, topo, {})
  return r.tokens_per_sec


def format_report(r: Report) -> str:
  m = r.mesh
  mesh = ' '.join(f'{k}={v}' for k, v in m.items() if v != 1 or k in ('fsdp', 'tensor'))
  lines = [
      f'AOT compile of {r.config} for {r.topology} ({r.chips} {r.chip} chips, '
      f'{r.num_slices} slice{"s" * (r.num_slices > 1)}; mesh {mesh})',
      f'  batch {r.global_batch} x {r.seq_len} tokens ({r.per_chip_batch:g} per chip), '
      f'remat {r.remat_policy} per {r.remat_unit}, scan per {r.scan_unit}, params '
      f'{r.param_dtype}, compute {r.dtype}, attention {r.attention}',
  ]
  if r.error and r.argument_gib is None:
    need = f'{r.total_gib:.2f} GiB' if r.total_gib is not None else 'more than HBM'
    lines.append(f'  DOES NOT FIT: needs {need} per chip of {r.hbm_gib:g} GiB HBM '
                 f'({r.error})')
    return '\n'.join(lines)
  verdict = 'fits' if r.fits else 'DOES NOT FIT'
  lines += [
      '  per-chip memory (compiler memory_analysis):',
      f'    arguments    {r.argument_gib:8.2f} GiB  (parameters + optimizer state '
      f'{r.state_gib:.2f} GiB, batch)',
      f'    outputs      {r.output_gib:8.2f} GiB  ({r.alias_gib:.2f} GiB aliased to the donated '
      'arguments)',
      f'    temporaries  {r.temp_gib:8.2f} GiB',
      f'    code         {r.code_gib:8.2f} GiB',
      f'    total        {r.total_gib:8.2f} GiB of {r.hbm_gib:g} GiB HBM: {verdict}, '
      f'{100 * r.headroom:.1f}% headroom',
      f'  model FLOPs per step {r.model_flops_per_step:.3e} (3 x forward matmuls and any '
      'frozen forward: flops.train_flops_per_step)',
      f'  per chip: compiler FLOPs {r.compiler_flops:.3e} (cost analysis: no Pallas kernels, '
      'scanned loop bodies once), executed XLA matmuls',
      f'    {r.executed_flops:.3e} (from the shapes, with remat replay), splash attention '
      f'{r.splash_flops:.3e} (from the kernel block grid)',
      f'  estimated step {r.step_seconds:.3f} s = XLA {r.xla_seconds:.3f} s + splash '
      f'{r.splash_seconds:.3f} s + context {r.context_seconds or 0:.3f} s -> '
      f'{r.tokens_per_sec:,.0f} tokens/s, MFU {100 * r.mfu:.1f}%',
      f'    ({r.step_source}; other collectives are not included)',
      f'  compiled in {r.compile_seconds:.1f} s, {r.tpu_kernels} Pallas TPU kernel calls',
  ]
  if r.error:
    lines.append(f'  WARNING: {r.error}')
  return '\n'.join(lines)


# --- entrypoint --------------------------------------------------------------------


def write_report(path: str, reports: Report | Sequence[Report]) -> None:
  """--aot_report: one report (a compile) or a list (the planner's fitting plans) as JSON."""
  payload = (dataclasses.asdict(reports) if isinstance(reports, Report)
             else [dataclasses.asdict(r) for r in reports])
  epath.Path(path).write_text(json.dumps(payload, indent=2))


def main(c: config_lib.Config, topology: str, *, report_path: str | None = None) -> Report:
  """`gemma3-train --aot_topology=NAME [--aot_report=FILE.json]` (--aot_plan: plan.main)."""
  r = compile_report(c, parse_topology(topology, num_slices(c)))
  print(format_report(r))
  if report_path:
    write_report(report_path, r)
  if not r.fits:
    raise config_lib.ConfigError(
        f'--aot_topology={topology}: {r.config} does not fit: '
        f'{"%.2f GiB" % r.total_gib if r.total_gib else "more than HBM"} per chip of '
        f'{r.hbm_gib:g} GiB HBM; try --aot_plan, another model.remat_policy, a smaller '
        'train.global_batch_size or a larger slice')
  return r
