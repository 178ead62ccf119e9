"""Device mesh, logical axis names and the one rules table that maps them to mesh axes.

The model names every parameter axis (`nnx.Param(..., logical_axes=('vocab', 'embed'))`) and
constrains key activations with `constrain(x, ('act_batch', 'act_len', 'act_embed'))`. This
module alone decides which mesh axes those names land on, so a new parallelism layout is a
change of the table (or of `--config.mesh.rules`), never of the model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import contextvars
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma3_train import config as config_lib

MESH_AXES = config_lib.MESH_AXES
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over both (FSDP = ZeRO-3 DP)

# logical name -> mesh axes. FSDP shards every weight's embed dimension over all chips;
# tensor parallelism (mesh.tensor > 1) splits heads and the MLP hidden dimension; context
# parallelism (mesh.context > 1) splits the sequence of every activation (models/context.py).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    'layers': (),
    'vocab': ('tensor',),
    'embed': ('fsdp', 'context'),  # context chips hold distinct positions: ZeRO-3 over them too
    'mlp': ('tensor',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': (),
    'norm': (),
    'act_batch': BATCH_AXES,
    'act_len': ('context',),
    'act_embed': (),
    'act_heads': ('tensor',),
    'act_kv_heads': ('tensor',),
    'act_mlp': ('tensor',),
    'act_vocab': ('tensor',),
    # The SigLIP image encoder (vision.py): its width FSDP-sharded like 'embed', its heads and
    # MLP hidden dimension on the tensor axis.
    'vision_embed': ('fsdp', 'context'),
    'vision_mlp': ('tensor',),
    'vision_heads': ('tensor',),
    'vision_head_dim': (),
}


def parse_rules(overrides: str) -> dict[str, tuple[str, ...]]:
  """DEFAULT_RULES updated by 'name=axis[+axis],...' (an empty axis means replicated)."""
  rules = dict(DEFAULT_RULES)
  for item in filter(None, overrides.split(',')):
    name, axes = item.split('=')
    if name not in rules:
      raise config_lib.ConfigError(f'mesh.rules: unknown logical axis {name!r}; expected one '
                                   f'of {", ".join(rules)}')
    bad = [a for a in axes.split('+') if a and a not in MESH_AXES]
    if bad:
      raise config_lib.ConfigError(f'mesh.rules: {name}={axes}: unknown mesh axis {bad[0]!r}; '
                                   f'expected {" | ".join(MESH_AXES)}')
    rules[name] = tuple(a for a in axes.split('+') if a)
  return rules


_require = config_lib.require


def mesh_shape(c: config_lib.Config, num_devices: int, num_slices: int = 1) -> dict[str, int]:
  """Resolves -1 degrees against the device count; checks the product and the batch.

  Returns {'dcn_<axis>': degree, '<axis>': degree} over MESH_AXES, ICI degrees per slice.
  Raises ConfigError when the mesh cannot cover exactly num_devices devices or the global batch
  does not divide over the data-parallel degree.
  """
  m = c.mesh
  dcn = list(m.dcn())
  _require(-1 not in dcn, 'mesh.dcn_*', tuple(dcn), 'explicit degrees (no -1) across slices')
  _require(math.prod(dcn) == num_slices, 'mesh.dcn_*', tuple(dcn),
           f'a product equal to the number of slices ({num_slices})')
  per_slice, rem = divmod(num_devices, num_slices)
  _require(rem == 0, 'mesh.dcn_*', tuple(dcn), f'slices dividing {num_devices} devices')
  ici = list(m.ici())
  if -1 in ici:
    known = math.prod(v for v in ici if v != -1)
    fill, rem = divmod(per_slice, known)
    _require(rem == 0 and fill >= 1, 'mesh', tuple(ici),
             f'degrees whose product divides the {per_slice} devices per slice')
    ici = [fill if v == -1 else v for v in ici]
  _require(math.prod(ici) == per_slice, f'mesh.({", ".join(MESH_AXES)})', tuple(ici),
           f'a product equal to the device count ({per_slice} per slice)')
  shape = {f'dcn_{a}': d for a, d in zip(MESH_AXES, dcn)}
  shape.update(zip(MESH_AXES, ici))
  batch_degree = shape['data'] * shape['fsdp'] * shape['dcn_data'] * shape['dcn_fsdp']
  micro = c.train.global_batch_size // c.optim.grad_accum_steps
  _require(micro % batch_degree == 0, 'train.global_batch_size', c.train.global_batch_size,
           f'a batch (per microbatch: {micro}) divisible by the data-parallel degree '
           f'{batch_degree} (data x fsdp x dcn)')
  context = shape['context'] * shape['dcn_context']
  if context > 1:  # the balanced layout cuts the sequence into two chunks per shard
    pieces = context * (2 if c.model.context_layout == 'balanced' else 1)
    _require(c.data.seq_len % pieces == 0, 'data.seq_len', c.data.seq_len,
             f'a length divisible by {pieces} (context degree {context}'
             f'{" x 2: model.context_layout=balanced" if pieces > context else ""})')
  return shape


def make_mesh(c: config_lib.Config, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh over MESH_AXES and all devices; DCN degrees multiply in across slices."""
  devices = list(jax.devices() if devices is None else devices)
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  shape = mesh_shape(c, len(devices), num_slices)
  ici = tuple(shape[a] for a in MESH_AXES)
  dcn = tuple(shape[f'dcn_{a}'] for a in MESH_AXES)
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (ValueError, NotImplementedError, AssertionError):
      # Topology-aware placement is not known for every device kind (e.g. CPU); order is fine.
      grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None,
                    rules: dict[str, tuple[str, ...]],
                    shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical axis names. A mesh axis is used once, on the first name wanting
  it, and only where it divides the dimension (so a 1-kv-head model stays unsplit on tensor)."""
  if names is None:
    return P()
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = [a for a in (rules.get(name, ()) if name else ()) if a not in used]
    if mesh is not None:
      axes = [a for a in axes if mesh.shape[a] > 1]
      if shape is not None:
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if shape[i] % size:
          axes = []
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> Any:
  """NamedShardings for a pytree of nnx Variables / arrays carrying `logical_axes` metadata.

  Optimizer moments inherit the metadata of the parameter they track (nnx.Optimizer copies it),
  so the same table places them. Leaves without names are replicated.
  """
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get('logical_axes')
      value = leaf.get_value()
      spec = logical_to_spec(names, rules, getattr(value, 'shape', None), mesh)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --- activation constraints ---------------------------------------------------

_CONTEXT: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    'gemma3_sharding', default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict[str, tuple[str, ...]]):
  """Activates `constrain` while tracing model code (no-op outside this context)."""
  token = _CONTEXT.set((mesh, rules))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def active() -> tuple[Mesh, dict[str, tuple[str, ...]]] | None:
  """(mesh, rules) of the enclosing use_mesh, or None (kernels that need shard_map ask)."""
  return _CONTEXT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, when a mesh is active; identity otherwise."""
  context = _CONTEXT.get()
  if context is None:
    return x
  mesh, rules = context
  spec = logical_to_spec(names, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def sequence_axes(length: int) -> tuple[str, ...]:
  """The mesh axes (of the active use_mesh) that split a sequence of `length` positions:
  'act_len''s, where they divide it; () without a mesh or at context degree 1."""
  context = _CONTEXT.get()
  if context is None:
    return ()
  mesh, rules = context
  spec = logical_to_spec((None, 'act_len'), rules, (1, length), mesh)[1]
  return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def sequence_shards(length: int) -> int:
  """How many pieces sequence_axes(length) cut a sequence into (1: whole)."""
  axes = sequence_axes(length)
  return math.prod(_CONTEXT.get()[0].shape[a] for a in axes) if axes else 1


def batch_sharding(mesh: Mesh, shape: Sequence[int] | None = None,
                   rules: dict[str, tuple[str, ...]] | None = None) -> NamedSharding:
  """Sharding of input arrays: rows over the data-parallel axes and, for a [B, L] array
  (shape given, rank 2), positions over the axes of 'act_len' (the context axis), the layout
  the model's activations take."""
  if shape is not None and len(shape) == 2:
    seq = logical_to_spec((None, 'act_len'), rules or DEFAULT_RULES, shape, mesh)[1]
    if seq is not None:
      return NamedSharding(mesh, P(BATCH_AXES, seq))
  return NamedSharding(mesh, P(BATCH_AXES))


# --- data groups --------------------------------------------------------------


class DataGroup(NamedTuple):
  """Processes whose devices hold the same rows of every batch; they load those rows alike."""
  index: int  # this group's place among the groups: the data iterator's process_index
  count: int  # how many groups split the batch: the data iterator's process_count
  processes: tuple[int, ...]  # ascending
  row_shards: tuple[int, ...]  # ascending, of `shards` equal blocks of the batch's rows
  shards: int

  def rows(self, batch: int) -> np.ndarray:
    """The global row indices this group loads, ascending: its local batch's rows, in order."""
    per_shard = batch // self.shards
    return (np.asarray(self.row_shards)[:, None] * per_shard + np.arange(per_shard)).ravel()


def data_groups(devices: np.ndarray, axis_names: Sequence[str],
                row_axes: Sequence[str] = BATCH_AXES) -> list[DataGroup]:
  """The data groups of a device grid (a Mesh's `devices`, each with a process_index) whose
  batches put rows on `row_axes` (batch_sharding: data x fsdp) and positions on context.

  Processes whose devices hold the same row shards form a group, and the groups split the
  global batch: a process's data iterator gets its group's index and the group count in
  place of process_index / process_count, so every process of a group loads the same rows in
  the same order, and data.global_batch gives each device its rows and positions of them.
  With the context axis (and tensor) within each process every process is a group of its own
  (index and count are the process's: nothing changes); a context group over 4 hosts (long_27b
  on a v5p-32) is one group, each host loading the whole row. Groups are ordered by their
  first process. Raises ConfigError when processes hold overlapping but different rows.
  """
  grid = np.asarray(devices)
  axes = [list(axis_names).index(a) for a in row_axes if a in axis_names]
  sizes = [grid.shape[i] for i in axes]
  held: dict[int, set[int]] = {}  # process -> the row shards its devices hold
  for where in np.ndindex(grid.shape):
    # NamedSharding numbers the shards of P(row_axes) row-major over row_axes.
    shard = int(np.ravel_multi_index([where[i] for i in axes], sizes)) if axes else 0
    held.setdefault(int(grid[where].process_index), set()).add(shard)
  by_rows: dict[tuple[int, ...], list[int]] = {}
  for p in sorted(held):
    by_rows.setdefault(tuple(sorted(held[p])), []).append(p)
  order = sorted(by_rows.items(), key=lambda kv: kv[1][0])
  shards = math.prod(sizes)
  flat = [r for rows, _ in order for r in rows]
  if len(flat) != len(set(flat)) or len({len(rows) for rows, _ in order}) > 1:
    raise config_lib.ConfigError(
        f'mesh={dict(zip(axis_names, grid.shape))}: processes hold overlapping or unequal '
        f'sets of batch rows ({[p for _, p in order]}); expected a layout where processes '
        'holding rows in common hold the same rows')
  return [DataGroup(i, len(order), tuple(procs), rows, shards)
          for i, (rows, procs) in enumerate(order)]


@functools.lru_cache(maxsize=8)
def data_group(batch: NamedSharding) -> DataGroup:
  """This process's data group (data_groups) under a batch sharding: rows on the mesh axes of
  its first dimension (batch_sharding(mesh): data x fsdp)."""
  rows = batch.spec[0] if batch.spec else None
  row_axes = () if rows is None else (rows,) if isinstance(rows, str) else tuple(rows)
  me = jax.process_index()
  return next(g for g in data_groups(batch.mesh.devices, batch.mesh.axis_names, row_axes)
              if me in g.processes)
