"""The AOT planner: the remat x batch x (fsdp, tensor) choices that fit a TPU slice, fastest first.

`gemma3-train --config=... --aot_topology=v5p-128 --aot_plan` compiles each candidate with
aot.compile_report (libtpu's compile-only devices, no TPU) and ranks the ones that fit by the
report's estimated tokens/s. Memory grows with the batch, so for each (split, remat) the batch
stops growing at its first misfit; a model whose parameters and optimizer state cannot fit even
fully sharded is refused before any compile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
import numpy as np

from gemma3_train import aot
from gemma3_train import config as config_lib
from gemma3_train import hardware
from gemma3_train import sharding
from gemma3_train import train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlanSpace:
  """The candidates: every remat policy x rows per batch shard x tensor-parallel degree."""
  remat_policies: tuple[str, ...] = config_lib.REMAT_POLICIES
  rows_per_shard: tuple[int, ...] = (1, 2, 4, 8)  # rows per batch shard (fsdp x data x dcn)
  tensor_degrees: tuple[int, ...] = (1, 2, 4, 8)


def parse_plan_space(remat: str = '', rows: str = '', tensor: str = '') -> PlanSpace:
  """PlanSpace from the --aot_plan_* flags (comma lists; empty keeps the default)."""
  def ints(flag: str, text: str, default: tuple[int, ...]) -> tuple[int, ...]:
    if not text:
      return default
    try:
      values = tuple(int(v) for v in text.split(','))
    except ValueError:
      values = ()
    if not values or min(values) < 1:
      raise config_lib.ConfigError(f'--{flag}={text!r}: expected positive integers separated '
                                   'by commas, e.g. 1,2,4')
    return values
  policies = tuple(remat.split(',')) if remat else PlanSpace.remat_policies
  unknown = [p for p in policies if p not in config_lib.REMAT_POLICIES]
  if unknown:
    raise config_lib.ConfigError(f'--aot_plan_remat={remat!r}: unknown policy {unknown[0]!r}; '
                                 f'expected some of {",".join(config_lib.REMAT_POLICIES)}')
  return PlanSpace(remat_policies=policies,
                   rows_per_shard=ints('aot_plan_rows', rows, PlanSpace.rows_per_shard),
                   tensor_degrees=ints('aot_plan_tensor', tensor, PlanSpace.tensor_degrees))


def _with(c: config_lib.Config, *, remat: str, tensor: int, fsdp: int, batch: int
          ) -> config_lib.Config:
  """c with one candidate's remat policy, mesh split and (per-microbatch) batch."""
  return dataclasses.replace(
      c, model=dataclasses.replace(c.model, remat_policy=remat),
      mesh=dataclasses.replace(c.mesh, data=1, fsdp=fsdp, tensor=tensor),
      train=dataclasses.replace(c.train, global_batch_size=batch * c.optim.grad_accum_steps))


def minimum_state_gib(c: config_lib.Config, topo: hardware.Topology) -> float:
  """Parameters + optimizer state per chip when fully sharded over every chip (no compile)."""
  cpu = jax.devices('cpu')[:1]
  mesh = sharding.make_mesh(dataclasses.replace(
      c, mesh=config_lib.MeshConfig(data=1, fsdp=1, tensor=1),
      train=dataclasses.replace(c.train, global_batch_size=c.optim.grad_accum_steps)), cpu)
  state = train.setup(aot.tpu_run_config(c), mesh, abstract=True).abstract_state
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
  return total / topo.total_chips / aot.GIB


def _refuse_if_hopeless(c: config_lib.Config, topo: hardware.Topology) -> None:
  """A one-line ConfigError naming a large enough slice when the state alone cannot fit."""
  need = minimum_state_gib(c, topo)
  if need <= topo.chip.hbm_gib * (1 - aot.HEADROOM):
    return
  total = need * topo.total_chips
  sizes = [n for n in topo.spec.shapes
           if total / (n * topo.num_slices) <= topo.chip.hbm_gib * (1 - aot.HEADROOM) / 2]
  hint = (f'; try {hardware.slice_name(topo.kind, sizes[0])} or larger' if sizes
          else f'; no single {topo.kind} slice size in the table is large enough')
  raise config_lib.ConfigError(
      f'--aot_topology={topo.name}: {c.model.preset} cannot fit: its parameters and optimizer '
      f'state ({c.model.param_dtype}) alone need {need:.1f} GiB per chip over {topo.total_chips} '
      f'chips, more than the {topo.chip.hbm_gib:g} GiB HBM of a {topo.kind} chip less '
      f'{100 * aot.HEADROOM:.0f}% headroom{hint}')


def search_plans(c: config_lib.Config, topo: hardware.Topology,
                 space: PlanSpace = PlanSpace()) -> list[aot.Report]:
  """Compiles each candidate and returns the fitting ones, best estimated throughput first.

  Memory grows with the batch, so for each (split, remat) the batch stops growing at the first
  candidate that does not fit; progress goes to the log. Raises ConfigError when nothing fits.
  """
  _refuse_if_hopeless(c, topo)
  device_list = aot.devices(topo)
  per_slice = topo.chips
  results = []
  splits = [t for t in space.tensor_degrees
            if not per_slice % t and (t == 1 or not c.model.num_kv_heads % t)]
  log.info('Planning %s on %s: up to %d compiles (tensor %s x remat %s x rows per batch shard '
           '%s; a batch stops growing at its first misfit). Each can take minutes; narrow the '
           'search with --aot_plan_remat/_rows/_tensor.', c.model.preset, topo.name,
           len(splits) * len(space.remat_policies) * len(space.rows_per_shard),
           '/'.join(map(str, splits)), '/'.join(space.remat_policies),
           '/'.join(map(str, space.rows_per_shard)))
  for tensor in splits:
    fsdp = per_slice // tensor
    shards = fsdp * c.mesh.dcn_data * c.mesh.dcn_fsdp
    for remat in space.remat_policies:
      for rows in sorted(space.rows_per_shard):  # ascending: the first misfit ends the row
        trial = _with(c, remat=remat, tensor=tensor, fsdp=fsdp, batch=rows * shards)
        r = aot.compile_report(trial, topo, device_list=device_list)
        status = (f'{r.total_gib:.1f} GiB' if r.total_gib is not None else 'OOM') + (
            '' if r.fits else ' (does not fit)')
        log.info('  plan fsdp=%d tensor=%d remat=%s batch=%d: %s (compiled in %.0f s)', fsdp,
                 tensor, remat, r.global_batch, status, r.compile_seconds or 0)
        if not r.fits:
          break
        results.append(r)
  if not results:
    raise config_lib.ConfigError(
        f'--aot_topology={topo.name}: no plan fits {c.model.preset} at seq_len '
        f'{c.data.seq_len} (tried remat {"/".join(space.remat_policies)}, tensor '
        f'{"/".join(map(str, space.tensor_degrees))}); try a larger slice or a shorter '
        'data.seq_len')
  # Ties (the estimate is compute-bound per token, so batch sizes often tie): most headroom first.
  return sorted(results, key=lambda r: (-r.tokens_per_sec, -r.headroom))


def format_plan(results: Sequence[aot.Report]) -> str:
  """The ranked plans as a table, each with the --config flags that select it."""
  lines = [f'{len(results)} fitting plan(s) for {results[0].config} on {results[0].topology}, '
           'best estimated throughput first:',
           f'  {"fsdp":>5} {"tensor":>6} {"remat":<26} {"batch":>6} {"rows/chip":>9} '
           f'{"GiB/chip":>9} {"headroom":>8} {"tokens/s":>12} {"MFU":>6}  flags']
  for r in results:
    flags = (f'--config.mesh.fsdp={r.mesh["fsdp"]} --config.mesh.tensor={r.mesh["tensor"]} '
             f'--config.model.remat_policy={r.remat_policy} '
             f'--config.train.global_batch_size={r.global_batch}')
    lines.append(f'  {r.mesh["fsdp"]:>5} {r.mesh["tensor"]:>6} {r.remat_policy:<26} '
                 f'{r.global_batch:>6} {r.per_chip_batch:>9g} {r.total_gib:>9.2f} '
                 f'{100 * r.headroom:>7.1f}% {r.tokens_per_sec:>12,.0f} {100 * r.mfu:>5.1f}%  '
                 f'{flags}')
  return '\n'.join(lines)


def main(c: config_lib.Config, topology: str, *, report_path: str | None = None,
         space: PlanSpace = PlanSpace()) -> list[aot.Report]:
  """`gemma3-train --aot_topology=NAME --aot_plan [--aot_plan_*] [--aot_report=FILE.json]`."""
  results = search_plans(c, aot.parse_topology(topology, aot.num_slices(c)), space)
  print(format_plan(results))
  if report_path:
    aot.write_report(report_path, results)
  return results
