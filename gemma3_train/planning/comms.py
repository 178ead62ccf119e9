"""What the context axis (mesh.context) moves in one train step: the planner's cost model for it.

models/context.py splits every row's L positions over the c chips of the axis, m chunks of
C = L / (c m) per chip (balanced m = 2, contiguous m = 1). Per train step a chip receives
(R rows per chip over the step's microbatches, K kv heads per chip, H the head width, b the
compute dtype's bytes, e = 2 K H b the bytes of one key's K and V):

  global layers   an all-gather of K and V: (c - 1) / c x L keys x e per forward run of the
                  layer, and in the backward pass its transpose, a reduce-scatter of the same
                  size; the keys' positions and segment ids (4 bytes each; image blocks with
                  images) travel with the forward gather;
  local layers    a ppermute of the W - 1 keys before each chunk (from several chunks back
                  when W - 1 > C) and, with images, tokens_per_image - 1 keys after it: e and
                  the keys' ids per key per forward run, e per key in the backward pass;
  relayout        balanced only: context.to_balanced moves the [B, T, D] embeddings (and the
                  positions and segment ids) into the layout after the embedding and
                  from_balanced moves the hidden states back before the final norm; both
                  again, transposed, in the backward pass.

A forward run is the forward pass plus each remat replay (forward_runs): a layer's replay
reruns its gather or halo, since the attention's backward needs the gathered keys, which no
remat policy saves. The halo and relayout counts follow the layout's chunk placement exactly
(a chunk already on its chip is not sent), and a step takes as long as its busiest chip, so the
figures are the busiest chip's.

Checked against the collectives of models/context.py in train steps compiled for the 8-device
CPU mesh (tests/test_plan.py::test_context_traffic_equals_the_compiled_train_step): K, V and the
activations to the byte, but for the tail layers (those after the last block of six): their
checkpoint is not in a scan, and XLA may merge a tail layer's replay with its forward, which the
count keeps (27b's two tail layers' replays: 0.08% of its bytes). The positions and segment ids
are counted per forward run of each layer; XLA moves them once for all the layers of a loop body
(they are the same for every layer), so the count is an upper bound there: 4 to 12 bytes a key
against 2 K H b (8,192 for 27b).

Not counted: the parameters' FSDP gathers and gradient reductions, which run over fsdp x
context as one group (the same bytes per chip whatever the split between the two); what the
SPMD partitioner adds around the embedding lookup for a sequence split over context (on the
CPU mesh the lookup's backward all-gathers each row's [L, D] over the axis; not looked into on
TPU, where for 27b at 128k that would be 2.6 GB a step in float32, 6% of the count here);
a DPO reference's or a distillation teacher's extra forward; sampling.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from gemma3_train import config as config_lib
from gemma3_train.models import attention
from gemma3_train.models import context
from gemma3_train import sharding

INDEX_BYTES = 4  # an int32 position, segment id or image block per key


@dataclasses.dataclass(frozen=True)
class ContextTraffic:
  """Bytes the busiest chip of the context axis receives in one train step, by cause."""
  gather: float = 0.0  # global layers: K/V all-gathers and their reduce-scatters
  halo: float = 0.0  # local layers: K/V of the W - 1 (+ look-ahead) keys around each chunk
  relayout: float = 0.0  # to_balanced / from_balanced of the activations
  ids: float = 0.0  # the positions, segment ids (image blocks) beside the keys and activations
  degree: int = 1  # the context degree (ICI x DCN)

  @property
  def total(self) -> float:
    return self.gather + self.halo + self.relayout + self.ids


def context_degree(mesh_shape: dict[str, int]) -> int:
  return mesh_shape.get('context', 1) * mesh_shape.get('dcn_context', 1)


def batch_shards(mesh_shape: dict[str, int]) -> int:
  """Chips a step's rows are split over (sharding.BATCH_AXES, ICI x DCN)."""
  return math.prod(mesh_shape[a] * mesh_shape[f'dcn_{a}'] for a in sharding.BATCH_AXES)


def kv_head_shards(m: config_lib.ModelConfig, mesh_shape: dict[str, int]) -> int:
  """Chips the kv heads are split over: the tensor degree, or 1 where it does not divide them
  (sharding.logical_to_spec then leaves them whole)."""
  heads = mesh_shape['tensor'] * mesh_shape['dcn_tensor']
  return 1 if m.num_kv_heads % heads else heads


def forward_runs(m: config_lib.ModelConfig, layer: int) -> int:
  """How often layer's forward (and so its gather or halo) runs in a train step: once, plus
  one replay under a remat policy, plus one more for a layer nested in its block's checkpoint
  (model.remat_unit='layer': the block's replay, then the layer's own). The block's replay
  skips its last layer (a global one) when the six layers are unrolled (scan_unit='block'):
  nothing after it in the block needs its output; a scan over the six cannot skip a step."""
  if m.remat_policy == 'none':
    return 1
  six = config_lib.GLOBAL_EVERY
  in_block = layer < m.num_layers // six * six
  if m.remat_unit != 'layer' or not in_block:
    return 2
  last = layer % six == six - 1
  return 2 if last and m.scan_unit == 'block' else 3


def halo_keys(c: int, layout: str, chunk: int, before: int, after: int = 0) -> np.ndarray:
  """[c] keys each shard receives for one local layer's halo: per slot, `before` keys of the
  chunks before it and `after` of those after it, r chunks away for r = 1, 2, ..., the
  farthest cut to what is left; none off either end of the sequence or already on the shard."""
  held = context.chunk_ids(c, layout)
  owner = {int(g): s for (s, _), g in np.ndenumerate(held)}
  keys = np.zeros(c, np.int64)
  for sign, count in ((1, before), (-1, after)):
    for r in range(1, -(-count // chunk) + 1):
      n = min(chunk, count - (r - 1) * chunk)
      for (s, _), g in np.ndenumerate(held):
        want = int(g) - sign * r
        if 0 <= want < held.size and owner[want] != s:
          keys[s] += n
  return keys


def relayout_chunks(c: int) -> tuple[np.ndarray, np.ndarray]:
  """([c], [c]): chunks of L / 2c each shard receives in to_balanced and in from_balanced
  (context._relayout views contiguous shard s as holding chunks 2s and 2s + 1)."""
  contiguous, balanced = np.arange(2 * c).reshape(c, 2), context.chunk_ids(c, 'balanced')

  def moved(src, dst):
    owner = {int(g): s for (s, _), g in np.ndenumerate(src)}
    return np.array([sum(owner[int(g)] != s for g in row) for s, row in enumerate(dst)])
  return moved(contiguous, balanced), moved(balanced, contiguous)


def context_traffic(c: config_lib.Config, mesh_shape: dict[str, int]) -> ContextTraffic:
  """The bytes the busiest chip of the context axis receives in one train step of c on a mesh
  of mesh_shape (sharding.mesh_shape's, ICI and DCN degrees); zeros at degree 1."""
  degree = context_degree(mesh_shape)
  if degree == 1:
    return ContextTraffic()
  m, L = c.model, c.data.seq_len
  layout = m.context_layout
  chunks = 2 if layout == 'balanced' else 1
  rows = c.train.global_batch_size / batch_shards(mesh_shape)
  kv_heads = m.num_kv_heads // kv_head_shards(m, mesh_shape)
  b = jnp.dtype(m.dtype).itemsize
  kv = 2 * kv_heads * m.head_dim * b  # K and V of one key
  # ids per key: splash reads only the segment ids (the positions are static in its masks);
  # the reference path's mask takes positions and segment ids, and image blocks with images
  splash = attention.resolve(m.attention_impl, m.dtype, images=m.vision) == 'splash'
  ids = INDEX_BYTES * (1 if splash else 2 + m.vision)
  chunk = L // (degree * chunks)
  lookahead = m.tokens_per_image - 1 if m.vision else 0
  halo_S = halo_keys(degree, layout, chunk, m.sliding_window - 1, lookahead)
  # per key: forward runs move K, V and ids; the backward moves the K and V gradients back
  gathered = (degree - 1) / degree * L  # keys into each shard per global layer
  gather = gather_ids = halo = halo_ids = 0.0
  for i in range(m.num_layers):
    runs = forward_runs(m, i)
    if m.is_global(i):
      gather, gather_ids = gather + gathered * (runs + 1) * kv, gather_ids + gathered * runs * ids
    else:
      halo, halo_ids = halo + (runs + 1) * kv, halo_ids + runs * ids
  relayout_S = relayout_ids_S = np.zeros(degree)
  if layout == 'balanced':
    to_S, from_S = relayout_chunks(degree)
    # forward and backward each move the activations both ways; the ids only forward, into it
    relayout_S = chunk * 2 * m.embed_dim * b * (to_S + from_S)
    relayout_ids_S = chunk * INDEX_BYTES * (2 + m.vision) * to_S
  ids_S = gather_ids + halo_ids * halo_S + relayout_ids_S
  total_S = gather + halo * halo_S + relayout_S + ids_S
  s = int(np.argmax(total_S))  # the busiest chip
  return ContextTraffic(gather=rows * gather, halo=rows * halo * float(halo_S[s]),
                        relayout=rows * float(relayout_S[s]), ids=rows * float(ids_S[s]),
                        degree=degree)
