"""Attention with the sequence split over the context mesh axis (mesh.context > 1).

Each of the c shards holds T = L / c positions of every row, as m chunks of C = T / m:

  contiguous (m = 1)  shard s holds chunk s;
  balanced   (m = 2)  shard s holds chunks s and 2c - 1 - s: one from each end of the sequence,
                      so every shard has the same share of the causal triangle's work.

The decoder moves its activations into the balanced order after the embedding and back before
the final norm (to_balanced / from_balanced), so the data, the loss and every objective see
rows in their own order; only the layers run permuted.

Global layers gather K/V (with the keys' positions, segments and image blocks) over the axis
(Gemma 3 has few KV heads). The mask is attention.make_mask's, on positions, so the order in
which the chunks arrive does not matter.

Local layers exchange only halos by ppermute: a query at position q sees q - W < k <= q, so a
chunk needs the W - 1 keys before it (not W: the query's own key is in the chunk), from the
chunk that precedes it in the sequence (several when W - 1 > C). With image blocks, which see
themselves in both directions and may straddle a chunk boundary, also the
tokens_per_image - 1 keys after it. When positions count up by one inside each segment (what
the data pipeline produces, and what the cudnn and splash kernels assume too), every key the
full-row mask shows a query lies inside these halos, so each query sees the same keys with the
same mask: the same attention. Keys before the sequence's start are masked out.

Inside the shard the kernel is the one attention.resolve picks: splash (TPU, text rows:
models/context_splash.py), cudnn (GPU: models/context_cudnn.py), else attention.reference.

Sampling (inference/sampler.py) runs the prompt through attend as training does, and keeps a
KV cache whose columns are split over the same axes; decode_attend adds one token per row to
such a cache and attends it: each shard over its own columns, the partial softmaxes combined
exactly by log-sum-exp (one pmax and two psums of [B, N, H]-sized values per layer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gemma3_train import sharding
from gemma3_train.models import attention
from gemma3_train.models import context_cudnn
from gemma3_train.models import context_splash


def chunk_ids(c: int, layout: str) -> np.ndarray:
  """[c, m] int: the chunk of the sequence (0 .. c m - 1) that slot j of shard s holds."""
  s = np.arange(c)
  if layout == 'balanced':
    return np.stack([s, 2 * c - 1 - s], axis=1)
  if layout == 'contiguous':
    return s[:, None]
  raise ValueError(f'model.context_layout={layout!r}: expected balanced | contiguous')


def _fetch(pieces, held_SM: np.ndarray, want_SM: np.ndarray, axes):
  """Per slot b, the pieces of chunk want_SM[s, b] from the shard that holds it (held_SM: the
  layout the pieces are in), zeros where want_SM < 0. pieces: one pytree per slot of held_SM.
  One ppermute per (source slot, destination slot) pair that moves anything between shards;
  a chunk that is already on its shard is selected, not sent."""
  where = {int(g): (s, j) for (s, j), g in np.ndenumerate(held_SM)}
  shard = jax.lax.axis_index(axes)
  out = []
  for b in range(want_SM.shape[1]):
    got = None
    for a in range(held_SM.shape[1]):
      pairs = [(where[g][0], s) for s, g in enumerate(want_SM[:, b].tolist())
               if g >= 0 and where[g][1] == a]
      perm = [(i, j) for i, j in pairs if i != j]
      here = [j for i, j in pairs if i == j]
      if perm:
        moved = jax.tree.map(functools.partial(jax.lax.ppermute, axis_name=axes, perm=perm),
                             pieces[a])
        got = moved if got is None else jax.tree.map(jnp.add, got, moved)
      if here:
        keep = jnp.isin(shard, jnp.asarray(here))
        kept = jax.tree.map(lambda x, keep=keep: jnp.where(keep, x, jnp.zeros_like(x)),
                            pieces[a])
        got = kept if got is None else jax.tree.map(jnp.add, got, kept)
    out.append(jax.tree.map(jnp.zeros_like, pieces[0]) if got is None else got)
  return out


def _slots(x_BT, m: int):
  """[B, T, ...] -> m arrays [B, T / m, ...]."""
  return jnp.split(x_BT, m, axis=1)


def _halo_keys(keys, ids_SM: np.ndarray, before: int, after: int, axes):
  """Per slot, the chunk's keys with `before` keys of the sequence before it and `after` after
  it, and a [B, S] validity (False for keys off either end of the sequence).

  keys: a tuple of [B, T, ...] arrays (k, v, positions, segments[, blocks]) in ids_SM's layout.
  """
  c, m = ids_SM.shape
  slot_keys = list(zip(*[_slots(x, m) for x in keys]))  # per slot, a tuple of [B, C, ...]
  B, C = keys[2].shape[0], keys[2].shape[1] // m
  shard = jax.lax.axis_index(axes)
  parts = [[[x for x in own] for own in slot_keys]]  # per part, per slot, the key arrays
  valid = [[jnp.ones((B, C), bool)] * m]
  for sign, count in ((1, before), (-1, after)):
    for r in range(1, -(-count // C) + 1):  # r chunks away, the farthest one cut to what is left
      n = min(C, count - (r - 1) * C)
      cut = (lambda x, n=n: x[:, C - n:]) if sign > 0 else (lambda x, n=n: x[:, :n])
      want_SM = ids_SM - sign * r
      want_SM = np.where((want_SM >= 0) & (want_SM < c * m), want_SM, -1)
      got = _fetch([tuple(cut(x) for x in own) for own in slot_keys], ids_SM, want_SM, axes)
      ok_M = jnp.asarray(want_SM >= 0)[shard]
      part = [list(g) for g in got]
      ok = [jnp.broadcast_to(ok_M[b], (B, n)) for b in range(m)]
      # keys in sequence order: the farthest chunk before first, after the chunk last
      parts, valid = ([part] + parts, [ok] + valid) if sign > 0 else (parts + [part],
                                                                      valid + [ok])
  merged = [tuple(jnp.concatenate([p[b][i] for p in parts], axis=1)
                  for i in range(len(keys))) for b in range(m)]
  return merged, [jnp.concatenate([v[b] for v in valid], axis=1) for b in range(m)]


def _natural_order(x_BL, ids_SM: np.ndarray):
  """[B, L, ...] gathered in the layout's order (shard-major, then slot) -> sequence order."""
  chunks = _slots(x_BL, ids_SM.size)
  return jnp.concatenate([chunks[i] for i in np.argsort(ids_SM.reshape(-1))], axis=1)


def _shard_attention(q_BTNH, k_BTKH, v_BTKH, pos_BT, seg_BT, blk_BT, *, window, lookahead,
                     ids_SM, axes, splash=None, cudnn=None):
  """One shard's attention: global layers against the gathered keys, local ones against each
  chunk's halo keys (module doc). splash: None, or a dict with the global kernel (a shard_map
  argument), block and interpret; cudnn: None, or jax.nn.dot_product_attention's
  implementation; neither: the reference."""
  if window is None:
    gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=1, tiled=True)
    k_BLKH, v_BLKH, pos_BL, seg_BL = map(gather, (k_BTKH, v_BTKH, pos_BT, seg_BT))
    if splash is not None:
      k_BLKH, v_BLKH, seg_BL = (_natural_order(x, ids_SM) for x in (k_BLKH, v_BLKH, seg_BL))
      return context_splash.run(splash['kernel'], q_BTNH, k_BLKH, v_BLKH, seg_BT, seg_BL)
    blk_BL = None if blk_BT is None else gather(blk_BT)
    mask_BTL = attention.cross_mask(pos_BT, seg_BT, pos_BL, seg_BL, None, blk_BT, blk_BL)
    if cudnn is not None:
      return context_cudnn.masked(q_BTNH, k_BLKH, v_BLKH, mask_BTL, cudnn)
    return attention.reference(q_BTNH, k_BLKH, v_BLKH, mask_BTL)
  m = ids_SM.shape[1]
  keys = (k_BTKH, v_BTKH, pos_BT, seg_BT) + (() if blk_BT is None else (blk_BT,))
  after = lookahead if blk_BT is not None else 0
  merged, valid = _halo_keys(keys, ids_SM, window - 1, after, axes)
  queries = list(zip(*[_slots(x, m) for x in (q_BTNH, pos_BT, seg_BT)]))
  outs = []
  for b in range(m):
    q_BCNH, qpos_BC, qseg_BC = queries[b]
    k_BSKH, v_BSKH, kpos_BS, kseg_BS = merged[b][:4]
    if splash is not None:  # text rows only (attention.resolve): no image blocks here
      C, G = q_BCNH.shape[1], q_BCNH.shape[2] // k_BSKH.shape[2]
      pad = -(window - 1) % splash['block']  # keys a multiple of the kernel's block
      kernel = context_splash.local_kernel(C, pad, window - 1, window, G, splash['block'],
                                           splash['interpret'])
      kseg_BS = context_splash.local_kv_segments(kseg_BS, valid[b], pad)
      k_BSKH, v_BSKH = (context_splash.pad_keys(x, pad) for x in (k_BSKH, v_BSKH))
      outs.append(context_splash.run(kernel, q_BCNH, k_BSKH, v_BSKH, qseg_BC, kseg_BS))
      continue
    if cudnn is not None and blk_BT is None:
      outs.append(context_cudnn.local(q_BCNH, k_BSKH, v_BSKH, qseg_BC, kseg_BS, valid[b],
                                      window, cudnn))
      continue
    qblk_BC = None if blk_BT is None else _slots(blk_BT, m)[b]
    kblk_BS = None if blk_BT is None else merged[b][4]
    mask_BCS = attention.cross_mask(qpos_BC, qseg_BC, kpos_BS, kseg_BS, window, qblk_BC,
                                    kblk_BS) & valid[b][:, None, :]
    if cudnn is not None:
      outs.append(context_cudnn.masked(q_BCNH, k_BSKH, v_BSKH, mask_BCS, cudnn))
      continue
    outs.append(attention.reference(q_BCNH, k_BSKH, v_BSKH, mask_BCS))
  return jnp.concatenate(outs, axis=1)


def attend(q_BLNH, k_BLKH, v_BLKH, positions_BL, segment_ids_BL, image_blocks_BL=None, *,
           window: int | None, lookahead: int, layout: str, impl: str = 'reference',
           block_size: int = 512):
  """attention.attend's result with the sequence split over the active mesh's 'act_len' axes:
  one shard_map over the mesh, rows on the batch axes, kv heads on the tensor axis.
  lookahead: the longest image block - 1 (keys a local layer needs after a chunk).
  impl: model.attention_impl; splash or cudnn (as attention.resolve picks them) run in the
  shard (context_splash, context_cudnn), the reference otherwise."""
  mesh, rules = sharding.active()
  B, L, N, H = q_BLNH.shape
  K = k_BLKH.shape[2]
  axes = sharding.sequence_axes(L)
  c = sharding.sequence_shards(L)
  ids_SM = chunk_ids(c, layout)
  batch, seq, heads = sharding.logical_to_spec(('act_batch', 'act_len', 'act_kv_heads'),
                                               rules, (B, L, K), mesh)
  row = P(batch, seq)
  kv = P(batch, seq, heads, None)
  q_spec = P(batch, seq, heads, None, None)

  images = image_blocks_BL is not None
  resolved = attention.resolve(impl, q_BLNH.dtype, images=images)
  use_splash = resolved == 'splash'
  cudnn = (context_cudnn.implementation(attention.target_platform())
           if resolved == 'cudnn' else None)
  splash = None
  if use_splash:
    C = L // ids_SM.size
    splash = dict(block=context_splash.block_for(block_size, C),
                  interpret=attention.target_platform() != 'tpu')

  def run(q_BTKGH, k_BTKH, v_BTKH, pos_BT, seg_BT, *rest):
    blk_BT = rest[0] if images else None
    kernel = dict(splash, kernel=rest[-1]) if splash is not None and window is None else splash
    Bs, T, Ks, G, _ = q_BTKGH.shape
    out_BTNH = _shard_attention(q_BTKGH.reshape(Bs, T, Ks * G, H), k_BTKH, v_BTKH, pos_BT,
                                seg_BT, blk_BT, window=window, lookahead=lookahead,
                                ids_SM=ids_SM, axes=axes, splash=kernel, cudnn=cudnn)
    return out_BTNH.reshape(Bs, T, Ks, G, H)

  args = (q_BLNH.reshape(B, L, K, N // K, H), k_BLKH, v_BLKH, positions_BL, segment_ids_BL)
  specs = (q_spec, kv, kv, row, row)
  if images:
    args, specs = args + (image_blocks_BL,), specs + (row,)
  if splash is not None and window is None:
    # the global kernel's block masks are per query row: each shard takes its own rows
    kernel = context_splash.global_kernel(ids_SM, L // ids_SM.size, N // K, splash['block'],
                                          splash['interpret'])
    args, specs = args + (kernel,), specs + (context_splash.global_kernel_spec(kernel, mesh,
                                                                                axes),)
  out = jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
  return out.reshape(B, L, N, H)


def _relayout(arrays_BL, src: str, dst: str):
  """[B, L, ...] arrays split over the active 'act_len' axes, moved from layout src to dst."""
  mesh, rules = sharding.active()
  B, L = arrays_BL[0].shape[:2]
  axes = sharding.sequence_axes(L)
  c = sharding.sequence_shards(L)
  # Both layouts as two chunks per shard: contiguous shard s holds chunks 2s and 2s + 1.
  held_SM = chunk_ids(c, src) if src == 'balanced' else np.arange(2 * c).reshape(c, 2)
  want_SM = chunk_ids(c, dst) if dst == 'balanced' else np.arange(2 * c).reshape(c, 2)
  batch, seq = sharding.logical_to_spec(('act_batch', 'act_len'), rules, (B, L), mesh)
  specs = tuple(P(batch, seq, *[None] * (x.ndim - 2)) for x in arrays_BL)

  def run(*xs_BT):
    pieces = list(zip(*[_slots(x, 2) for x in xs_BT]))
    moved = _fetch(pieces, held_SM, want_SM, axes)
    return tuple(jnp.concatenate([moved[0][i], moved[1][i]], axis=1) for i in range(len(xs_BT)))
  return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=specs,
                       check_vma=False)(*arrays_BL)


def active_layout(layout: str, length: int) -> str | None:
  """The layout the layers run in for a sequence of `length`: None when it is not split (no
  mesh, or context degree 1), else layout (model.context_layout)."""
  return layout if sharding.sequence_axes(length) else None


def to_balanced(*arrays_BL):
  """The arrays (natural order, split over the context axis) in the balanced layout."""
  return _relayout(arrays_BL, 'contiguous', 'balanced')


def from_balanced(*arrays_BL):
  """Inverse of to_balanced."""
  return _relayout(arrays_BL, 'balanced', 'contiguous')


def decode_attend(q_B1NH, k_B1KH, v_B1KH, k_BCKH, v_BCKH, slot, valid_BC, names):
  """One new query per row against a KV cache whose columns are split over the active mesh
  (the sampler's cache, laid out by the logical `names` of its [B, C, K, H] dimensions): k and
  v written at column `slot` by the shard that holds it, then attention over the valid columns
  (valid_BC), each shard over its own, combined by log-sum-exp. Returns (out [B, 1, N, H], the
  updated k and v caches)."""
  mesh, rules = sharding.active()
  B, C, K, H = k_BCKH.shape
  N = q_B1NH.shape[2]
  cache = sharding.logical_to_spec(names, rules, k_BCKH.shape, mesh)
  batch, seq, heads = cache[0], cache[1], cache[2]
  axes = (seq,) if isinstance(seq, str) else tuple(seq)
  Cs = C // int(np.prod([mesh.shape[a] for a in axes]))  # columns per shard
  new, head = P(batch, None, heads, None), P(batch, heads, None, None)

  def run(q_BKGH, k_B1KH, v_B1KH, k_BCKH, v_BCKH, slot, valid_BC):
    local = slot - jax.lax.axis_index(axes) * Cs
    here = (local >= 0) & (local < Cs)
    at = jnp.clip(local, 0, Cs - 1)

    def write(buf_BCKH, x_B1KH):  # other shards write back what they hold
      old_B1KH = jax.lax.dynamic_slice_in_dim(buf_BCKH, at, 1, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(buf_BCKH, jnp.where(here, x_B1KH, old_B1KH),
                                                 at, axis=1)
    k_BCKH, v_BCKH = write(k_BCKH, k_B1KH), write(v_BCKH, v_B1KH)
    logits_BKGC = jnp.einsum('BKGH,BCKH->BKGC', q_BKGH, k_BCKH,
                             preferred_element_type=jnp.float32)
    logits_BKGC = jnp.where(valid_BC[:, None, None, :], logits_BKGC, attention.MASK_VALUE)
    # The row's maximum over all shards: masked columns (a whole shard of them, past t) get
    # exp(MASK_VALUE - max) = 0; the query's own column is always valid.
    max_BKG1 = jax.lax.pmax(jnp.max(logits_BKGC, axis=-1, keepdims=True), axes)
    probs_BKGC = jnp.exp(logits_BKGC - max_BKG1)
    sum_BKG = jax.lax.psum(jnp.sum(probs_BKGC, axis=-1), axes)
    out_BKGH = jax.lax.psum(jnp.einsum('BKGC,BCKH->BKGH', probs_BKGC.astype(v_BCKH.dtype),
                                       v_BCKH, preferred_element_type=jnp.float32), axes)
    return (out_BKGH / sum_BKG[..., None]).astype(v_BCKH.dtype), k_BCKH, v_BCKH

  q_BKGH = q_B1NH.reshape(B, K, N // K, H)
  out_BKGH, k_BCKH, v_BCKH = jax.shard_map(
      run, mesh=mesh, in_specs=(head, new, new, cache, cache, P(), P(batch, seq)),
      out_specs=(head, cache, cache), check_vma=False)(q_BKGH, k_B1KH, v_B1KH, k_BCKH,
                                                       v_BCKH, slot, valid_BC)
  return out_BKGH.reshape(B, 1, N, H), k_BCKH, v_BCKH
