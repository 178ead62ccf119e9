"""Where a jitted step's time goes: a jax.profiler trace joined with the compiled HLO.

XLA's CPU runtime records one trace event per executed HLO instruction (args.hlo_op). Joining
those with the optimized HLO text gives, per instruction: its wall time, its matmul FLOPs
(from the dot shapes) and the innermost project source line that produced it, so a step can
be broken down into "LM head matmuls at 40 GFLOP/s" or "Adam update elementwise 80 ms".
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import tempfile
from typing import Any, Callable

import jax

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_SHAPE = re.compile(r'^[a-z]\w*\[([\d,]*)\]')


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  dims: tuple[int, ...]
  operands: list[str]
  attrs: str
  op_name: str = ''
  frame: int | None = None
  calls: str | None = None


def _split_type(rest: str) -> tuple[str, str]:
  """('f32[2,3]{1,0}', 'dot(...)...') from an instruction's right-hand side."""
  if rest.startswith('('):  # tuple type: skip the balanced parentheses
    depth = 0
    for i, ch in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(' ')
  return head, tail


def _parse_instr(line: str) -> Instr | None:
  match = _INSTR.match(line)
  if not match:
    return None
  name, rest = match.groups()
  type_str, call = _split_type(rest)
  op = re.match(r'([\w\-]+)\((.*?)\)(.*)$', call)
  if not op:
    return None
  opcode, operands, attrs = op.groups()
  shape = _SHAPE.match(type_str)
  dims = tuple(int(d) for d in shape.group(1).split(',') if d) if shape else ()
  instr = Instr(name, opcode, dims, re.findall(r'%?([\w.\-]+)', operands), attrs)
  if m := re.search(r'op_name="([^"]*)"', attrs):
    instr.op_name = m.group(1)
  if m := re.search(r'stack_frame_id=(\d+)', attrs):
    instr.frame = int(m.group(1))
  if m := re.search(r'calls=%?([\w.\-]+)', attrs):
    instr.calls = m.group(1)
  return instr


class HloModule:
  """The optimized HLO text of one executable: computations, instructions, stack frames."""

  def __init__(self, text: str):
    self.name = re.match(r'HloModule (\S+?),', text).group(1)
    self.computations: dict[str, dict[str, Instr]] = {}
    self.entry = ''
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section, current = None, None
    for line in text.splitlines():
      if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
        section = line
        continue
      if section and (m := re.match(r'^(\d+) (.*)$', line)):
        tables[section][int(m.group(1))] = m.group(2)
        continue
      if m := _COMP.match(line):
        section, current = None, {}
        self.computations[m.group(1)] = current
        if line.startswith('ENTRY'):
          self.entry = m.group(1)
        continue
      if current is not None and (instr := _parse_instr(line)):
        current[instr.name] = instr
    self._files = {k: v.strip('"') for k, v in tables['FileNames'].items()}
    self._funcs = {k: v.strip('"') for k, v in tables['FunctionNames'].items()}
    self._locs = tables['FileLocations']
    self._frames = tables['StackFrames']

  def _frame_chain(self, frame: int | None) -> list[tuple[str, str, int]]:
    """(file, function, line) from the innermost frame outwards."""
    chain, seen = [], set()
    while frame and frame not in seen and frame in self._frames:
      seen.add(frame)
      f = dict(re.findall(r'(\w+)=(\d+)', self._frames[frame]))
      loc = dict(re.findall(r'(\w+)=(\d+)', self._locs.get(int(f['file_location_id']), '')))
      if loc:
        chain.append((self._files.get(int(loc['file_name_id']), '?'),
                      self._funcs.get(int(loc['function_name_id']), '?'), int(loc['line'])))
      frame = int(f.get('parent_frame_id', 0))
    return chain

  def source(self, instr: Instr, prefer: str = 'gemma3_train') -> str:
    """The innermost source line under `prefer` (else the innermost one) as 'file:line fn'."""
    chain = self._frame_chain(instr.frame)
    for file, func, line in chain:
      if prefer in file:
        return f'{file[file.index(prefer):]}:{line} {func}'
    if chain:
      file, func, line = chain[0]
      return f'{os.path.basename(file)}:{line} {func}'
    return '(no source)'

  def matmul_flops(self, instr: Instr, comp: dict[str, Instr] | None = None) -> float:
    """FLOPs of the dots (and convolutions as dots) in an instruction, fusions included."""
    if instr.opcode == 'dot':
      comp = comp if comp is not None else self.computations[self.entry]
      lhs = comp.get(instr.operands[0]) if instr.operands else None
      contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', instr.attrs)
      if lhs is None or contracting is None:
        return 0.0
      k = math.prod(lhs.dims[int(d)] for d in contracting.group(1).split(',') if d)
      return 2.0 * math.prod(instr.dims) * k
    if instr.calls and instr.calls in self.computations:
      body = self.computations[instr.calls]
      return sum(self.matmul_flops(i, body) for i in body.values())
    return 0.0

  def entry_instr(self, name: str) -> Instr | None:
    """An instruction by name, searched in the entry computation first, then everywhere."""
    entry = self.computations.get(self.entry, {})
    if name in entry:
      return entry[name]
    for comp in self.computations.values():
      if name in comp:
        return comp[name]
    return None


def trace_op_times(run: Callable[[], Any], steps: int, hlo: HloModule) -> dict[str, float]:
  """Seconds per step attributed to each HLO instruction of `hlo` over `steps` runs of run().

  A synchronous thunk's trace event spans its work. An Eigen dot (a plain `dot`, not a YNNPACK
  fusion) only dispatches in its event and finishes at a later "end: NAME" marker, so its span
  runs to that marker. Overlapping spans split their shared time evenly, so the per-op times
  add up to the busy wall time instead of double counting concurrent work.
  """
  logdir = tempfile.mkdtemp(prefix='hlo_profile_')
  jax.profiler.start_trace(logdir, create_perfetto_trace=True)
  try:
    for _ in range(steps):
      jax.block_until_ready(run())
  finally:
    jax.profiler.stop_trace()
  paths = glob.glob(f'{logdir}/**/*.trace.json.gz', recursive=True)
  with gzip.open(paths[-1]) as f:
    events = [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X']
  events.sort(key=lambda e: e['ts'])
  ends: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    if e['name'].startswith('end: '):
      ends[e['name'][5:]].append(e['ts'])
  spans = []  # (start, end, op) in microseconds
  for e in events:
    args = e.get('args', {})
    if args.get('hlo_module') != hlo.name or 'hlo_op' not in args:
      continue
    op, start, end = args['hlo_op'], e['ts'], e['ts'] + e['dur']
    instr = hlo.entry_instr(op)
    if instr is not None and instr.opcode in _ASYNC_OPCODES:
      later = [t for t in ends.get(op, ()) if t >= start]
      end = max(end, min(later)) if later else end
    spans.append((start, end, op))
  times: dict[str, float] = collections.defaultdict(float)
  bounds = sorted({t for s in spans for t in s[:2]})
  for lo, hi in zip(bounds, bounds[1:]):  # O(n * spans); fine for a few thousand ops
    active = [op for start, end, op in spans if start <= lo and end >= hi]
    for op in active:
      times[op] += (hi - lo) * 1e-6 / len(active) / steps
  return dict(times)


_ASYNC_OPCODES = ('dot', 'convolution', 'custom-call')


def _kind(instr: Instr | None, flops: float) -> str:
  if instr is None:
    return '?'
  if flops:
    return 'matmul'
  if instr.opcode == 'fusion':
    m = re.search(r'kind=(\w+)', instr.attrs)
    return f'fusion:{m.group(1) if m else "?"}'
  return instr.opcode


def breakdown(hlo: HloModule, op_times: dict[str, float], step_time: float,
              peak_tflops: float | None, top: int = 25) -> str:
  """A text report: time per source line and kind, matmul efficiency, the top instructions."""
  rows = []
  for op, secs in op_times.items():
    instr = hlo.entry_instr(op)
    flops = hlo.matmul_flops(instr) if instr else 0.0
    bwd = bool(instr and 'transpose(' in instr.op_name)
    src = hlo.source(instr) if instr else '?'
    rows.append((op, secs, flops, _kind(instr, flops), 'bwd' if bwd else 'fwd', src,
                 instr.op_name if instr else ''))
  total = sum(r[1] for r in rows)
  mm_time = sum(r[1] for r in rows if r[3] == 'matmul')
  mm_flops = sum(r[2] for r in rows)
  lines = [f'traced op time {1e3 * total:.1f} ms/step (wall step {1e3 * step_time:.1f} ms; '
           f'ops may overlap across threads)',
           f'matmuls: {1e3 * mm_time:.1f} ms/step = {100 * mm_time / max(total, 1e-12):.1f}% of '
           f'op time, {mm_flops / 1e9:.2f} GFLOP, '
           f'{mm_flops / max(mm_time, 1e-12) / 1e12:.4f} TFLOP/s inside matmuls'
           + (f' = {100 * mm_flops / max(mm_time, 1e-12) / 1e12 / peak_tflops:.0f}% of peak'
              if peak_tflops else '')]

  def table(title, key):
    groups: dict[Any, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
      g = groups[key(r)]
      g[0] += r[1]
      g[1] += r[2]
    lines.append(f'\n-- {title} --')
    lines.append(f'{"ms/step":>9} {"%":>6} {"GFLOP":>8} {"TFLOP/s":>8}  what')
    for name, (secs, flops) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
      rate = f'{flops / secs / 1e12:8.4f}' if flops and secs else f'{"":8}'
      lines.append(f'{1e3 * secs:9.2f} {100 * secs / max(total, 1e-12):6.1f} '
                   f'{flops / 1e9:8.2f} {rate}  {name}')

  table('by kind and direction', lambda r: f'{r[3]} {r[4]}')
  table('by source line (innermost gemma3_train frame)', lambda r: f'{r[4]} {r[3]:<14} {r[5]}')
  lines.append(f'\n-- top {top} instructions --')
  for op, secs, flops, kind, direction, src, op_name in sorted(rows, key=lambda r: -r[1])[:top]:
    rate = f' {flops / secs / 1e12:.4f} TFLOP/s' if flops and secs else ''
    lines.append(f'{1e3 * secs:9.2f} ms {100 * secs / max(total, 1e-12):5.1f}%  {op} [{kind} '
                 f'{direction}]{rate}  {src}  {op_name[-90:]}')
  return '\n'.join(lines)
