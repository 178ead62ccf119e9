"""The AOT planner: the remat x batch x (fsdp, context, tensor) choices that fit a TPU slice,
fastest first.

`gemma3-train --config=... --aot_topology=v5p-128 --aot_plan` compiles candidates with
aot.compile_report (libtpu's compile-only devices, no TPU) and ranks the ones that fit by the
report's estimated tokens/s. Memory grows with the batch, so for each (split, remat, layout) the
batch stops growing at its first misfit; a model whose parameters and optimizer state cannot fit
even fully sharded is refused before any compile.

By default the search is best first: a candidate's estimate can never exceed its bound, the
executed FLOPs from its shapes at the chip's peak plus the context axis's transfers at the
chip's ICI bandwidth (estimate.fill_time takes the larger of the former and the compiler's
figures, and adds the same transfers), which needs no compile. Candidates are compiled in
order of that bound and the search stops once the best plan with aot.HEADROOM free outranks
every bound left: its top plan is the one the full search would rank first. --aot_plan_all compiles every candidate.

With --aot_plan_confirm=N the search has two stages: (1) predict each candidate's per-chip
memory, extrapolated per scanned block from compiles of the model shortened to PROBE_BLOCKS
blocks (its tail kept), pruning on the prediction; (2) compile the best predicted candidates
whole until N of them fit. The plans' memory figures are those full compiles', never a
prediction. Stage 1 pays only when a shortened compile is much cheaper than a full one: for
scanned layers it is not (compile time does not grow with depth), see docs/tpu_gpu.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import types
from typing import Sequence

import jax
import numpy as np

from gemma3_train import config as config_lib
from gemma3_train.infra import hardware
from gemma3_train.planning import aot
from gemma3_train.planning import estimate
from gemma3_train import sharding
from gemma3_train.training import flops
from gemma3_train.training import state as train_state

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlanSpace:
  """The candidates: every remat policy x rows per batch shard x tensor-parallel degree, and how
  many of the best predicted ones to confirm with a full compile (0: compile every one whole,
  no prediction)."""
  remat_policies: tuple[str, ...] = config_lib.REMAT_POLICIES
  rows_per_shard: tuple[int, ...] = (1, 2, 4, 8)  # rows per batch shard (fsdp x data x dcn)
  tensor_degrees: tuple[int, ...] = (1, 2, 4, 8)
  # context-parallel degrees (mesh.context); () = auto: 1, and for long rows each degree that
  # leaves a shard at least LONG_SHARD positions (context_degrees)
  context_degrees: tuple[int, ...] = ()
  confirm: int = 0
  # memory layouts 'REMAT_UNIT/SCAN_UNIT' (model.remat_unit, model.scan_unit), tried in this
  # order for each candidate until one fits: the first is the fastest (no second replay), the
  # later ones trade a replay of the forward for memory (docs/memory.md)
  layouts: tuple[str, ...] = ('block/block', 'layer/layer')
  every: bool = False  # compile every candidate (--aot_plan_all), not best first


def parse_plan_space(remat: str = '', rows: str = '', tensor: str = '', confirm: str = '',
                     layouts: str = '', every: bool = False, context: str = '') -> PlanSpace:
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
  if confirm and not (confirm.isdigit() and confirm.isascii()):
    raise config_lib.ConfigError(f'--aot_plan_confirm={confirm!r}: expected a count of '
                                 'predicted plans to compile whole, or 0 to compile every '
                                 'candidate whole')
  layout_list = tuple(layouts.split(',')) if layouts else PlanSpace.layouts
  for layout in layout_list:
    remat_unit, _, scan_unit = layout.partition('/')
    if remat_unit not in config_lib.REMAT_UNITS or scan_unit not in config_lib.SCAN_UNITS:
      raise config_lib.ConfigError(
          f'--aot_plan_layouts={layouts!r}: {layout!r} is not REMAT_UNIT/SCAN_UNIT; expected '
          f'each of {"|".join(config_lib.REMAT_UNITS)} / {"|".join(config_lib.SCAN_UNITS)}, '
          'e.g. block/block,layer/layer')
  return PlanSpace(remat_policies=policies, layouts=layout_list,
                   rows_per_shard=ints('aot_plan_rows', rows, PlanSpace.rows_per_shard),
                   tensor_degrees=ints('aot_plan_tensor', tensor, PlanSpace.tensor_degrees),
                   context_degrees=ints('aot_plan_context', context, PlanSpace.context_degrees),
                   confirm=int(confirm) if confirm else PlanSpace.confirm, every=every)


@dataclasses.dataclass
class PlanReport(aot.Report):
  """A candidate's Report, and how its memory figures were found."""
  predicted: bool = False  # memory extrapolated from the shortened compiles, not compiled whole
  predicted_gib: float | None = None  # stage 1's total per chip, kept on a confirmed plan
  probe_seconds: tuple[float, ...] = ()  # the shortened compiles behind the prediction


def _plan_report(r: aot.Report, **changes) -> PlanReport:
  return PlanReport(**{**{f.name: getattr(r, f.name) for f in dataclasses.fields(r)}, **changes})


def _unsplit() -> dict[str, int]:
  """Degree 1 on every mesh axis: the planner then sets the fsdp, context and tensor degrees it
  tries."""
  return {a: 1 for a in config_lib.MESH_AXES}


# Auto context degrees: only rows long enough that each shard keeps this many positions.
LONG_SHARD = 4096


def context_degrees(c: config_lib.Config, space: PlanSpace) -> tuple[int, ...]:
  """The context degrees to try: space's, else 1 and each of 2, 4, 8, 16 that leaves every
  shard at least LONG_SHARD positions; only those the sequence divides into (2 chunks per
  shard with model.context_layout=balanced)."""
  pieces = 2 if c.model.context_layout == 'balanced' else 1
  degrees = space.context_degrees or tuple(
      d for d in (1, 2, 4, 8, 16) if d == 1 or c.data.seq_len // d >= LONG_SHARD)
  return tuple(d for d in degrees if d == 1 or not c.data.seq_len % (d * pieces))


def _with(c: config_lib.Config, *, remat: str, tensor: int, fsdp: int, batch: int,
          layout: str = 'block/block', context: int = 1) -> config_lib.Config:
  """c with one candidate's remat policy, memory layout, mesh split and (per-microbatch) batch."""
  remat_unit, scan_unit = layout.split('/')
  return dataclasses.replace(
      c, model=dataclasses.replace(c.model, remat_policy=remat, remat_unit=remat_unit,
                                   scan_unit=scan_unit),
      mesh=dataclasses.replace(c.mesh, **{**_unsplit(), 'fsdp': fsdp, 'tensor': tensor,
                                          'context': context}),
      train=dataclasses.replace(c.train, global_batch_size=batch * c.optim.grad_accum_steps))


def minimum_state_gib(c: config_lib.Config, topo: hardware.Topology) -> float:
  """Parameters + optimizer state per chip when fully sharded over every chip (no compile)."""
  cpu = jax.devices('cpu')[:1]
  mesh = sharding.make_mesh(dataclasses.replace(
      c, mesh=config_lib.MeshConfig(**_unsplit()),
      train=dataclasses.replace(c.train, global_batch_size=c.optim.grad_accum_steps)), cpu)
  state = train_state.setup(aot.tpu_run_config(c), mesh, abstract=True).abstract_state
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


# --- stage 1: predict from shortened compiles -------------------------------------------

# Scanned blocks of six in the shortened models behind a prediction. Not 1: XLA drops a scan of
# one step and the program differs (1b on v5e-8 needs 0.67 GiB more temporaries with one block
# than with two); from two blocks on, 1b's memory is affine in the blocks.
PROBE_BLOCKS = (2, 3)
# Per-chip memory components, each extrapolated on its own (as aot._fill_memory reads them).
_MEMORY = dict(argument_gib='argument_size_in_bytes', output_gib='output_size_in_bytes',
               alias_gib='alias_size_in_bytes', temp_gib='temp_size_in_bytes',
               code_gib='generated_code_size_in_bytes')


def _with_blocks(c: config_lib.Config, blocks: int) -> config_lib.Config:
  """c with `blocks` scanned blocks of six and its tail: the tail's layers keep their local or
  global type, which follows the layer index (is_global), as 6 k + j has the type of j."""
  tail = c.model.num_layers % config_lib.GLOBAL_EVERY
  return dataclasses.replace(c, model=dataclasses.replace(
      c.model, num_layers=blocks * config_lib.GLOBAL_EVERY + tail))


def _extrapolate(y0: float, y1: float, x0: int, x1: int, x: int) -> float:
  return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def predict_report(c: config_lib.Config, topo: hardware.Topology, device_list: Sequence
                   ) -> PlanReport:
  """c's report with per-chip memory extrapolated per block from compiles of c shortened to
  PROBE_BLOCKS blocks (same tail, batch and mesh); a model no deeper than the probes is compiled
  whole (predicted=False). Memory is affine in the blocks when a block's state, saved inputs
  and residuals are all that grows with depth (the block's working set is the same whatever the
  depth); XLA's schedule of the loop can still change with its trip count. A probe that does not
  fit predicts a misfit (the full model is larger). Step time is the full config's:
  estimate.fill_time counts the executed FLOPs from the shapes.
  """
  blocks = c.model.num_layers // config_lib.GLOBAL_EVERY
  if blocks <= PROBE_BLOCKS[-1]:
    return _plan_report(aot.compile_report(c, topo, device_list=device_list))
  probes = []
  for n in PROBE_BLOCKS:
    probes.append(aot.compile_report(_with_blocks(c, n), topo, device_list=device_list))
    if not probes[-1].fits:
      break
  last = probes[-1]
  r = _plan_report(last, predicted=True, probe_seconds=tuple(p.compile_seconds or 0.0
                                                             for p in probes))
  r.compile_seconds = sum(r.probe_seconds)
  if not last.fits:  # its memory, a lower bound for the full model's, stays as the compiler said
    r.error = f'the {PROBE_BLOCKS[len(probes) - 1]}-block model does not fit' + (
        f': {last.error}' if last.error else '')
    return r
  one, two = probes
  extrapolated = {name: _extrapolate(getattr(one, name), getattr(two, name), *PROBE_BLOCKS,
                                     blocks) * aot.GIB
                  for name in _MEMORY}
  aot._fill_memory(r, types.SimpleNamespace(  # the total and fit rule of a compile
      **{_MEMORY[name]: value for name, value in extrapolated.items()}))
  r.state_gib = _extrapolate(one.state_gib, two.state_gib, *PROBE_BLOCKS, blocks)
  full = aot.tpu_run_config(c)
  r.model_flops_per_step = flops.train_flops_per_step(full)
  # The compiler's cost analysis counts a scanned loop body once, so the probe's figures stand
  # for the full model's; the executed FLOPs come from the full config's shapes.
  estimate.fill_time(r, full, topo, {'flops': two.compiler_flops,
                                     'bytes accessed': two.compiler_bytes,
                                     'optimal_seconds': two.compiler_seconds or -1.0})
  return r


def search_plans(c: config_lib.Config, topo: hardware.Topology,
                 space: PlanSpace = PlanSpace()) -> list[PlanReport]:
  """The plans whose full compile fits, best estimated throughput first: best first by default
  (the top plan is the full search's, fewer compiles), every candidate compiled whole with
  space.every, or (space.confirm > 0) each predicted and the best compiled whole.

  Memory grows with the batch, so for each (split, remat, layout) the batch stops growing at the
  first candidate (predicted) not to fit; progress goes to the log. Raises ConfigError when
  nothing fits.
  """
  _refuse_if_hopeless(c, topo)
  device_list = aot.devices(topo)
  candidates = _candidates(c, topo, space)
  blocks = c.model.num_layers // config_lib.GLOBAL_EVERY
  stage = ('best first: in order of the throughput bound (executed FLOPs from the shapes at '
           'peak, plus the context axis\'s transfers), stopping once the best plan outranks '
           'every bound left'
           if not (space.every or space.confirm) else
           'one full compile each' if not space.confirm or blocks <= PROBE_BLOCKS[-1] else
           f'predicted from {len(PROBE_BLOCKS)} compiles each of the model shortened to '
           f'{" and ".join(map(str, PROBE_BLOCKS))} of its {blocks} blocks, then the best '
           f'{space.confirm} compiled whole')
  log.info('Planning %s on %s: up to %d candidates (tensor %s x context %s x remat %s x rows '
           'per batch shard %s x layouts %s; a batch stops growing at its first misfit; a layout is '
           'compiled only when none before it fits with 10%% free), %s. Each compile can take '
           'minutes; narrow the search with --aot_plan_remat/_rows/_tensor/_layouts.',
           c.model.preset, topo.name, len(candidates),
           '/'.join(map(str, sorted({k.tensor for k in candidates}))),
           '/'.join(map(str, sorted({k.context for k in candidates}))),
           '/'.join(space.remat_policies), '/'.join(map(str, space.rows_per_shard)),
           ', '.join(space.layouts), stage)
  if space.every or space.confirm:
    plans = _confirm(_search_every(candidates, topo, device_list, space.confirm), topo,
                     device_list, space.confirm)
  else:
    plans = _search_best_first(candidates, topo, device_list)
  if not plans:
    raise config_lib.ConfigError(
        f'--aot_topology={topo.name}: no plan fits {c.model.preset} at seq_len '
        f'{c.data.seq_len} (tried remat {"/".join(space.remat_policies)}, tensor '
        f'{"/".join(map(str, space.tensor_degrees))}); try a larger slice or a shorter '
        'data.seq_len')
  return sorted(plans, key=_rank)


@dataclasses.dataclass(frozen=True)
class _Candidate:
  tensor: int
  context: int
  remat: str
  rows: int  # per batch shard
  layout: str  # 'REMAT_UNIT/SCAN_UNIT'
  trial: config_lib.Config
  bound: float  # tokens/s that no compile of trial can be estimated above


def _candidates(c: config_lib.Config, topo: hardware.Topology,
                space: PlanSpace) -> list[_Candidate]:
  """Every candidate in the search's nested order (tensor, remat, rows ascending, layout)."""
  splits = [(t, x) for t in space.tensor_degrees for x in context_degrees(c, space)
            if not topo.chips % (t * x) and (t == 1 or not c.model.num_kv_heads % t)]
  out = []
  for tensor, context in splits:
    fsdp = topo.chips // (tensor * context)
    shards = fsdp * c.mesh.dcn_data * c.mesh.dcn_fsdp
    for remat in space.remat_policies:
      # Without remat there is no checkpoint to place per layer: one layout is enough.
      layouts = space.layouts[:1] if remat == 'none' else space.layouts
      for rows in sorted(space.rows_per_shard):
        for layout in layouts:
          trial = _with(c, remat=remat, tensor=tensor, fsdp=fsdp, batch=rows * shards,
                        layout=layout, context=context)
          out.append(_Candidate(tensor, context, remat, rows, layout, trial,
                                aot.throughput_bound(trial, topo)))
  return out


def _compile(k: _Candidate, topo: hardware.Topology, device_list: Sequence,
             predict: bool = False) -> PlanReport:
  r = (predict_report(k.trial, topo, device_list) if predict else
       _plan_report(aot.compile_report(k.trial, topo, device_list=device_list)))
  log.info('  plan fsdp=%d context=%d tensor=%d remat=%s layout=%s batch=%d: %s',
           r.mesh['fsdp'], k.context, k.tensor, k.remat, k.layout, r.global_batch, _describe(r))
  return r


def _search_every(candidates: Sequence[_Candidate], topo: hardware.Topology,
                  device_list: Sequence, confirm: int
                  ) -> list[tuple[config_lib.Config, PlanReport]]:
  """Each candidate compiled (or predicted) in the nested order, the (trial, report) of those
  that fit: a layout only when none before it fits with aot.HEADROOM free, rows until no
  layout fits."""
  found, ended = [], set()  # (tensor, context, remat) whose batch stopped growing
  for (tensor, context, remat, rows), group in itertools.groupby(
      candidates, key=lambda k: (k.tensor, k.context, k.remat, k.rows)):
    if (tensor, context, remat) in ended:
      continue
    fits = False
    for k in group:
      r = _compile(k, topo, device_list, predict=bool(confirm))
      if r.fits:
        found.append((k.trial, r))
        fits = True
        if r.headroom >= aot.HEADROOM:
          break
    if not fits:
      ended.add((tensor, context, remat))
  return found


def _search_best_first(candidates: Sequence[_Candidate], topo: hardware.Topology,
                       device_list: Sequence) -> list[PlanReport]:
  """Compiles candidates in order of their bound (ties: smaller tensor degree, then fewer
  rows, as _rank breaks them) until the best plan with aot.HEADROOM free outranks the next bound:
  no candidate left can then be ranked above it. A layout is compiled only when none compiled
  before it for the same candidate fits with aot.HEADROOM free (a plan with less is ranked
  last); rows beyond a misfit of the same layout are skipped."""
  order = sorted(candidates, key=_bound_key)  # stable: ties keep the nested order
  plans: list[PlanReport] = []
  misfit_rows: dict[tuple, int] = {}  # smallest rows that did not fit
  # (tensor, context, remat, rows) with a layout that fits with aot.HEADROOM free
  roomy: set[tuple] = set()
  compiled = 0
  for k in order:
    best = min((p for p in plans if p.headroom >= aot.HEADROOM), key=_rank, default=None)
    if best is not None and _bound_key(k) > _rank(best)[1:5]:
      log.info('Stopped after %d compiles of %d candidates: the best plan (%.0f tokens/s '
               'estimated) outranks the bound of every one left (at most %.0f); '
               '--aot_plan_all compiles them all', compiled, len(order),
               best.tokens_per_sec, k.bound)
      break
    if (k.tensor, k.context, k.remat, k.rows) in roomy or k.rows >= misfit_rows.get(
        (k.tensor, k.context, k.remat, k.layout), math.inf):
      continue
    r = _compile(k, topo, device_list)
    compiled += 1
    if r.fits:
      plans.append(r)
      if r.headroom >= aot.HEADROOM:
        roomy.add((k.tensor, k.context, k.remat, k.rows))
    else:
      key = (k.tensor, k.context, k.remat, k.layout)
      misfit_rows[key] = min(k.rows, misfit_rows.get(key, k.rows))
  else:
    log.info('Compiled %d of %d candidates (the others: a batch beyond a misfit, or a layout '
             'after one that fits with %.0f%% free)', compiled, len(order), 100 * aot.HEADROOM)
  return plans


def _bound_key(k: _Candidate) -> tuple[float, int, int, int]:
  """The best _rank key (after the headroom test) a compile of k can get."""
  return -_six_digits(k.bound), k.tensor, k.context, k.trial.train.global_batch_size


def _six_digits(x: float) -> float:
  return float(f'{x:.6g}')


def _describe(r: PlanReport) -> str:
  """A progress line's verdict: GiB (or OOM), fit, and the compile seconds behind it."""
  gib = f'{r.total_gib:.1f} GiB' if r.total_gib is not None else 'OOM'
  how = (f'predicted from {len(r.probe_seconds)} shortened compile(s) in '
         f'{" + ".join(f"{s:.0f}" for s in r.probe_seconds)} s' if r.predicted
         else f'compiled in {r.compile_seconds or 0:.0f} s')
  return f'{gib}{"" if r.fits else " (does not fit)"} ({how})'


def _rank(r: PlanReport) -> tuple[bool, float, int, int, int, float]:
  """Sort key, best first: plans that leave aot.HEADROOM of HBM free before those that do not
  (a shipped config must), then estimated tokens/s. The estimate is compute-bound per token plus
  the context axis's transfers (comms.py), so batch sizes and tensor degrees often tie (to
  rounding, hence 6 digits); then the smaller tensor degree (less traffic, which the estimate does
  not count), the smaller context degree (the estimate counts its traffic, so this breaks only
  exact ties), the smaller batch (more headroom, for the same split), the most headroom."""
  return (r.headroom < aot.HEADROOM, -_six_digits(r.tokens_per_sec), r.mesh['tensor'],
          r.mesh.get('context', 1), r.global_batch, -r.headroom)


# --- stage 2: confirm the best with full compiles --------------------------------------


def _confirm(predictions: Sequence[tuple[config_lib.Config, PlanReport]],
             topo: hardware.Topology, device_list: Sequence, confirm: int) -> list[PlanReport]:
  """Full compiles of the best predicted fits until `confirm` of them fit; a candidate compiled
  whole in stage 1 is a plan already. A candidate whose full compile does not fit is dropped."""
  plans = [r for _, r in predictions if not r.predicted]
  candidates = sorted(((t, r) for t, r in predictions if r.predicted), key=lambda p: _rank(p[1]))
  for trial, predicted in candidates:
    if len(plans) >= confirm:
      break
    r = _plan_report(aot.compile_report(trial, topo, device_list=device_list),
                     predicted_gib=predicted.total_gib, probe_seconds=predicted.probe_seconds)
    log.info('  confirm fsdp=%d tensor=%d remat=%s layout=%s/%s batch=%d: %s, predicted %.1f '
             'GiB (%s)', r.mesh['fsdp'], r.mesh['tensor'], r.remat_policy, r.remat_unit,
             r.scan_unit, r.global_batch, _describe(r), predicted.total_gib, _error_text(r))
    if r.fits:
      plans.append(r)
  return plans


def prediction_error(r: PlanReport) -> float | None:
  """(predicted - compiled) / compiled total GiB of a confirmed plan; None without both."""
  if r.predicted_gib is None or r.total_gib is None:
    return None
  return (r.predicted_gib - r.total_gib) / r.total_gib


def _error_text(r: PlanReport) -> str:
  error = prediction_error(r)
  return 'no compiled total' if error is None else f'prediction error {100 * error:+.1f}%'


def format_plan(results: Sequence[PlanReport]) -> str:
  """The ranked plans as a table, each with the --config flags that select it: GiB/chip is the
  full compile's; predicted and error are stage 1's total and its error against that compile."""
  lines = [f'{len(results)} fitting plan(s) for {results[0].config} on {results[0].topology}, '
           f'best estimated throughput first, those with under {100 * aot.HEADROOM:.0f}% of HBM '
           'free last (memory from full compiles):',
           f'  {"fsdp":>5} {"tensor":>6} {"remat":<26} {"layout":<12} {"batch":>6} '
           f'{"rows/chip":>9} {"GiB/chip":>9} {"predicted":>9} {"error":>6} {"headroom":>8} '
           f'{"tokens/s":>12} {"MFU":>6}  flags']
  for r in results:
    flags = (f'--config.mesh.fsdp={r.mesh["fsdp"]} --config.mesh.tensor={r.mesh["tensor"]} '
             + (f'--config.mesh.context={r.mesh["context"]} '
                if r.mesh.get('context', 1) > 1 else '') +
             f'--config.model.remat_policy={r.remat_policy} '
             f'--config.model.remat_unit={r.remat_unit} --config.model.scan_unit={r.scan_unit} '
             f'--config.train.global_batch_size={r.global_batch}')
    error = prediction_error(r)
    predicted, error = (('-', '-') if error is None
                        else (f'{r.predicted_gib:.2f}', f'{100 * error:+.1f}%'))
    layout = f'{r.remat_unit}/{r.scan_unit}'
    lines.append(f'  {r.mesh["fsdp"]:>5} {r.mesh["tensor"]:>6} {r.remat_policy:<26} '
                 f'{layout:<12} {r.global_batch:>6} {r.per_chip_batch:>9g} {r.total_gib:>9.2f} '
                 f'{predicted:>9} {error:>6} {100 * r.headroom:>7.1f}% '
                 f'{r.tokens_per_sec:>12,.0f} {100 * r.mfu:>5.1f}%  {flags}')
  return '\n'.join(lines)


def main(c: config_lib.Config, topology: str, *, report_path: str | None = None,
         space: PlanSpace = PlanSpace()) -> list[aot.Report]:
  """`gemma3-train --aot_topology=NAME --aot_plan [--aot_plan_*] [--aot_report=FILE.json]`."""
  results = search_plans(c, aot.parse_topology(topology, aot.num_slices(c)), space)
  print(format_plan(results))
  if report_path:
    aot.write_report(report_path, results)
  return results
