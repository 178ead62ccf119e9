"""The AOT report's step-time estimate (aot.compile_report, aot.throughput_bound, the planner).

Figures and where they come from:
  XLA time      the larger of the compiler's figure (cost_analysis optimal_seconds, else a
                roofline of its per-chip flops and bytes) and the executed matmul FLOPs from
                the shapes (model FLOPs less attention, plus the remat replay) at peak: XLA's
                cost analysis counts a scanned loop body once, so for scanned layers the
                compiler sees one block of six and the count from the shapes rules;
  splash time   cost analysis does not see Pallas kernels, so the splash attention FLOPs are
                counted here from the kernel's block grid (forward, dq and dkv kernels, plus the
                remat replay of the forward) and added at the chip's peak;
  context time  with mesh.context > 1, the bytes the busiest chip receives over the context
                axis in a step (comms.context_traffic: global layers' K/V gathers, local
                layers' halos, the balanced relayout) over the chip's ICI bandwidth
                (hardware.TpuKind.ici_gbps; DCN's when the axis crosses slices).
The step is XLA + splash + context time: a sum, not max(compute, comms). A global layer's kernel
needs its gathered K/V before it starts, so the gather sits on the critical path; XLA overlaps
the halos' and gathers' ppermutes with other work only partly; the sum never promises more
than a run can give, and the stated ICI bandwidth (every link of the chip, where a ring over one
mesh axis uses some) errs the other way. The other collectives (FSDP gathers, gradient
reductions, tensor-parallel ones) are not counted: they cost the same for every split of the
chips between fsdp and context, which is what the context term ranks.
"""

from __future__ import annotations


from gemma3_train import config as config_lib
from gemma3_train.infra import hardware
from gemma3_train.models import layers
from gemma3_train.planning import comms
from gemma3_train.training import flops


# --- splash attention FLOPs (invisible to the compiler's cost analysis) ----------


def _kernel_blocks(seq_len: int, block: int, window: int | None) -> int:
  """(q block, kv block) pairs a splash kernel visits for a causal or sliding-window mask."""
  n = seq_len // block
  count = 0
  for i in range(n):
    q_lo, q_hi = i * block, (i + 1) * block - 1
    lo = 0 if window is None else max(q_lo - window + 1, 0)
    count += q_hi // block - lo // block + 1
  return count


def splash_flops_per_step(c: config_lib.Config) -> float:
  """Hardware FLOPs of the splash kernels over one step (all chips, all microbatches).

  Per visited block pair and query head, with block sizes bq = bk = b and head width H:
  forward 2 matmuls (QK^T, PV), dq kernel 3, dkv kernel 4, each 2 b^2 H; remat policies that
  do not save the attention output replay the forward once more in the backward pass.
  """
  m = c.model
  T = c.data.seq_len
  b = min(m.attention_block_size, T)
  per_block = 2 * b * b * m.head_dim
  replay = 2 if _replays_attention(m.remat_policy) else 0
  blocks = sum(_kernel_blocks(T, b, None if m.is_global(i) else m.sliding_window)
               * (2 + 3 + 4 + replay * (2 if i < _nested_layers(m) else 1))
               for i in range(m.num_layers))
  return blocks * per_block * m.num_heads * c.train.global_batch_size


def _replays_attention(policy: str) -> bool:
  """Whether the backward pass reruns the forward kernel (the policy drops attention_out)."""
  saved = layers.REMAT_SAVED_NAMES.get(policy, ())
  return policy != 'none' and 'attention_out' not in saved


def _attention_shards(c: config_lib.Config, mesh_shape: dict[str, int]) -> int:
  """Chips sharing the attention work: batch rows over data/fsdp, positions over context, kv
  heads over tensor."""
  return (comms.batch_shards(mesh_shape) * comms.context_degree(mesh_shape)
          * comms.kv_head_shards(c.model, mesh_shape))


# --- executed FLOPs and the step time ----------------------------------------


def _replayed_flops_per_token(m: config_lib.ModelConfig) -> int:
  """Forward projection/MLP FLOPs per token that the remat policy recomputes in the backward."""
  if m.remat_policy == 'none':
    return 0
  saved = set(layers.REMAT_SAVED_NAMES.get(m.remat_policy, ()))
  per_layer = sum(v for name, v in flops.layer_matmul_flops(m).items() if name not in saved)
  return (m.num_layers + _nested_layers(m)) * per_layer


def _nested_layers(m: config_lib.ModelConfig) -> int:
  """Layers replayed twice in the backward (model.remat_unit='layer': their block's replay,
  then their own checkpoint's): every layer of a block of six, not the tail's."""
  if m.remat_unit != 'layer' or m.remat_policy == 'none':
    return 0
  return m.num_layers // config_lib.GLOBAL_EVERY * config_lib.GLOBAL_EVERY


def executed_flops_per_step(c: config_lib.Config) -> tuple[float, float]:
  """(XLA matmul FLOPs, splash kernel FLOPs) the chips execute in one step, from the shapes.

  XLA part: the model FLOPs without attention, plus the forward projections and MLP that the
  remat policy replays. Splash part: splash_flops_per_step (block-granular, with its replay).
  """
  m, T, B = c.model, c.data.seq_len, c.train.global_batch_size
  # fwd + bwd attention, run by splash, not XLA; with model.vision XLA runs the reference.
  kernel = 0.0 if m.vision else 3 * flops.attention_flops_per_row(m, T) * B
  replay = _replayed_flops_per_token(m) * T * B
  splash = splash_flops_per_step(c) if m.attention_impl == 'splash' and not m.vision else 0.0
  return flops.train_flops_per_step(c) - kernel + replay, splash


def fill_time(r, c: config_lib.Config, topo: hardware.Topology, cost: dict[str, float]) -> None:
  """Sets r's (an aot.Report's) FLOPs, time, tokens/s and MFU fields from c's shapes and the
  compiler's cost analysis (an empty dict: the shapes alone, as aot.throughput_bound needs)."""
  peak = topo.chip.peak_bf16_tflops * 1e12
  r.compiler_flops = float(cost.get('flops', 0.0))
  r.compiler_bytes = float(cost.get('bytes accessed', 0.0))
  optimal = float(cost.get('optimal_seconds', -1.0))
  r.compiler_seconds = optimal if optimal > 0 else None
  xla_flops, splash = executed_flops_per_step(c)
  r.executed_flops = xla_flops / r.chips
  r.splash_flops = splash / _attention_shards(c, r.mesh)
  # XLA's cost analysis counts a while loop's body once, whatever its trip count, so with
  # scanned layers it sees one block of six: the count from the shapes is the floor.
  if r.compiler_seconds is not None:
    compiler, how = r.compiler_seconds, 'compiler optimal_seconds'
  else:
    compiler = max(r.compiler_flops / peak, r.compiler_bytes / (topo.spec.hbm_gbps * 1e9))
    how = 'roofline of compiler flops and bytes'
  shapes = r.executed_flops / peak
  if compiler >= shapes:
    r.xla_seconds, source = compiler, f'XLA: {how}'
  else:
    r.xla_seconds = shapes
    source = (f'XLA: executed matmul FLOPs from the shapes at peak (the {how}, {compiler:.3g} s, '
              'counts each scanned loop body once)')
  r.splash_seconds = r.splash_flops / peak
  r.context_bytes, r.context_seconds, context_note = _context_time(c, topo, r.mesh)
  r.step_seconds = r.xla_seconds + r.splash_seconds + r.context_seconds
  r.step_source = source + '; splash: kernel FLOPs from its block grid at peak' + context_note
  r.tokens_per_sec = c.train.global_batch_size * c.data.seq_len / r.step_seconds
  r.mfu = r.model_flops_per_step / r.chips / r.step_seconds / peak


def _context_time(c: config_lib.Config, topo: hardware.Topology, mesh_shape: dict[str, int]
                  ) -> tuple[float, float, str]:
  """(bytes, seconds, a note for step_source) of the context axis in one step: the busiest
  chip's bytes (comms.context_traffic) over its ICI bandwidth, or DCN's when the axis crosses
  slices (a ring over the axis then waits on its slowest links)."""
  traffic = comms.context_traffic(c, mesh_shape)
  if not traffic.total:
    return 0.0, 0.0, ''
  dcn = mesh_shape.get('dcn_context', 1) > 1
  gbps = topo.spec.dcn_gbps if dcn else topo.spec.ici_gbps
  if not gbps:
    return traffic.total, 0.0, (f'; context: {traffic.total:.3g} bytes, not timed (no stated '
                                f'DCN bandwidth for {topo.kind})')
  return traffic.total, traffic.total / (gbps * 1e9), (
      f'; context: {traffic.total:.3g} bytes at {gbps:g} GB/s {"DCN" if dcn else "ICI"}, '
      'added (not overlapped)')
