"""The sampler's two jitted programs over the KV cache (sampler.py drives them): prefill runs the
left-padded prompts [B, P] and writes a fresh cache; decode_loop feeds one token per step at
column t = P + j inside one compiled while loop.

Cache (per decoder layer, keys and values [B, C, K, H] in the compute dtype):
  global layers  C = S: column c lives in slot c;
  local layers   C = min(sliding_window, S), a ring buffer: column c lives in slot c % C, so a
                 local layer's cache is O(window), not O(length). After column t is written,
                 slot s holds column t - ((t - s) mod C): exactly the window (t - W, t].
Under context parallelism (the mesh's 'act_len' axes, mesh.context > 1) the prompt runs with its
columns split over those axes, as training runs a row (models/context.py: global layers gather
K/V, local layers take a halo), and the cache's columns are split by the same rule (CACHE_NAMES:
'act_len' on the column axis, where the degree divides it); a decode step attends each shard's
columns and combines them by log-sum-exp (context.decode_attend). Prompts are then padded to a
multiple of the layout's chunk count too (prompt_bucket) and the global layers' C rounded up to a
multiple of the degree (the extra columns are never valid). At degree 1 none of this applies.
The scanned blocks of six keep their stacked parameters (as trained): the cache of each of the
six layers of a block carries the same leading [num_blocks] axis, and both steps scan over
blocks. Attention goes through the modules' own code (Attention.qkv / output, the MLP, the
norms: DecoderLayer.apply), so whatever those modules add (LoRA adapters) applies here too.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gemma3_train.inference import draws
from gemma3_train.models import attention
from gemma3_train.models import context
from gemma3_train.models import decoder
from gemma3_train import sharding

PROMPT_BUCKET = 16
# Logical names of a layer's cache [B, C, K, H]; scanned blocks stack it on a leading axis.
CACHE_NAMES = ('act_batch', 'act_len', 'act_kv_heads', None)


# --- the cache's layout --------------------------------------------------------


def context_degree(mesh: Mesh | None, rules: dict[str, tuple[str, ...]]) -> int:
  """How many shards the mesh's 'act_len' axes (the context axis) split a sequence into."""
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in rules.get('act_len', ())]))


def prompt_bucket(degree: int, layout: str) -> int:
  """Prompt columns are a multiple of this: PROMPT_BUCKET, and at context degree > 1 also of
  the layout's chunk count (2 per shard balanced, 1 contiguous), so the prompt splits."""
  if degree == 1:
    return PROMPT_BUCKET
  return int(np.lcm(PROMPT_BUCKET, degree * (2 if layout == 'balanced' else 1)))


def cache_sharding(shape, mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> NamedSharding:
  """How the sampler lays out one cache array of this shape: [B, C, K, H] by CACHE_NAMES, any
  leading (stacked block) axes replicated."""
  names = (None,) * (len(shape) - len(CACHE_NAMES)) + CACHE_NAMES
  return NamedSharding(mesh, sharding.logical_to_spec(names, rules, shape, mesh))


def _columns_split(shape) -> bool:
  """Whether the active mesh splits a [B, C, K, H] cache's columns (CACHE_NAMES)."""
  active = sharding.active()
  if active is None:
    return False
  mesh, rules = active
  return sharding.logical_to_spec(CACHE_NAMES, rules, shape, mesh)[1] is not None


def _to_cache(x_BPKH, C: int):
  """The prompt's keys or values [B, P, K, H] as a cache of C columns: column c in slot c % C,
  the last min(P, C) columns kept. Static pads and rolls, which the partitioner moves between
  shards without gathering the row."""
  P = x_BPKH.shape[1]
  n = min(P, C)
  last_BnKH = x_BPKH[:, P - n:]
  if n < C:  # P < C: columns 0 .. P - 1 in slots 0 .. P - 1
    return jnp.pad(last_BnKH, ((0, 0), (0, C - n), (0, 0), (0, 0)))
  return jnp.roll(last_BnKH, (P - n) % C, axis=1)


# --- one layer over the cache --------------------------------------------------


def _ring_columns(t, size: int):
  """The column each slot of a ring of `size` holds once column t is written."""
  s = jnp.arange(size, dtype=jnp.int32)
  return t - jnp.mod(t - s, size)


def _prefill_attend(positions_BP, segment_ids_BP, blocks_BP, cache_sizes: dict[bool, int],
                    layout: str | None, new_cache: list):
  """attend(attn, h) for the prompt: the training kernel over the prompt itself (with its image
  blocks, or None), and the prompt's keys and values written to a fresh cache (appended to
  new_cache). layout: the context layout the prompt runs in (its columns split over the
  context axis, in that order), or None (whole)."""
  def attend(attn, h_BPD):
    q_BPNH, k_BPKH, v_BPKH = attn.qkv(h_BPD, positions_BP)
    impl = attention.resolve(attn.impl, q_BPNH.dtype, images=blocks_BP is not None)
    P = h_BPD.shape[1]
    chunks = 1 if layout is None else context.chunk_ids(sharding.sequence_shards(P), layout).size
    if impl == 'splash' and not attention.splash_fits(P // chunks, attn.block_size):
      impl = 'reference'  # a prompt bucket (a multiple of 16) the kernel's blocks can't tile
    if layout is None:
      out_BPNH = attention.attend(q_BPNH, k_BPKH, v_BPKH, positions_BP, segment_ids_BP,
                                  window=attn.window, impl=impl, block_size=attn.block_size,
                                  image_blocks_BL=blocks_BP)
    else:
      out_BPNH = context.attend(q_BPNH, k_BPKH, v_BPKH, positions_BP, segment_ids_BP, blocks_BP,
                                window=attn.window, lookahead=attn.lookahead, layout=layout,
                                impl=impl, block_size=attn.block_size)
    if layout == 'balanced':  # the cache holds columns in their own order
      k_BPKH, v_BPKH = context.from_balanced(k_BPKH, v_BPKH)
    C = cache_sizes[attn.is_global]
    new_cache.append({name: sharding.constrain(_to_cache(x_BPKH, C), CACHE_NAMES)
                      for name, x_BPKH in (('k', k_BPKH), ('v', v_BPKH))})
    return attn.output(out_BPNH)
  return attend


def _decode_attend(t, pad_B, caches: list[dict], new_cache: list):
  """attend(attn, h) for one new token at column t: write its key/value, attend the cache."""
  it = iter(caches)

  def attend(attn, h_B1D):
    cache = next(it)
    positions_B1 = (t - pad_B)[:, None]
    q_B1NH, k_B1KH, v_B1KH = attn.qkv(h_B1D, positions_B1, swapped=True)
    C = cache['k'].shape[1]
    slot = t if attn.is_global else jnp.mod(t, C)
    if attn.is_global:
      cols_C = jnp.arange(C, dtype=jnp.int32)
      valid_BC = (cols_C[None, :] <= t) & (cols_C[None, :] >= pad_B[:, None])
    else:  # the ring holds the window (t - C, t]; C <= W
      valid_BC = _ring_columns(t, C)[None, :] >= pad_B[:, None]
    if _columns_split(cache['k'].shape):  # each shard attends its columns (context axis)
      out_B1NH, k_BCKH, v_BCKH = context.decode_attend(
          q_B1NH, k_B1KH, v_B1KH, cache['k'], cache['v'], slot, valid_BC, CACHE_NAMES)
    else:
      k_BCKH = jax.lax.dynamic_update_slice_in_dim(cache['k'], k_B1KH, slot, axis=1)
      v_BCKH = jax.lax.dynamic_update_slice_in_dim(cache['v'], v_B1KH, slot, axis=1)
      k_BCKH = sharding.constrain(k_BCKH, CACHE_NAMES)
      v_BCKH = sharding.constrain(v_BCKH, CACHE_NAMES)
      out_B1NH = attention.reference(q_B1NH, k_BCKH, v_BCKH, valid_BC[:, None, :])
    new_cache.append({'k': k_BCKH, 'v': v_BCKH})
    return attn.output(out_B1NH, swapped=True)
  return attend


def _layers(model, x_BTD, make_attend: Callable, cache):
  """Runs every decoder layer with attention from make_attend(layer caches, new caches);
  returns (x, new cache) in the cache's layout: {'blocks': [6 x {k, v}] stacked over blocks,
  'tail': [...]} for scanned models, {'layers': [...]} otherwise. cache None: prefill."""
  new = {}
  if model.cfg.scan_layers:
    new['tail'] = []
    if model.blocks is not None:
      graphdef, state = nnx.split(model.blocks)

      def body(x_BTD, xs):
        block_state, block_cache = xs
        out = []
        attend = make_attend(block_cache, out)
        for layer in nnx.merge(graphdef, block_state).layers:
          x_BTD = layer.apply(x_BTD, attend)
        return x_BTD, out
      x_BTD, new['blocks'] = jax.lax.scan(
          body, x_BTD, (state, None if cache is None else cache['blocks']))
    attend = make_attend(None if cache is None else cache['tail'], new['tail'])
    for layer in model.tail:
      x_BTD = layer.apply(x_BTD, attend)
  else:
    new['layers'] = []
    attend = make_attend(None if cache is None else cache['layers'], new['layers'])
    for layer in model.layers:
      x_BTD = layer.apply(x_BTD, attend)
  return x_BTD, new


def _logits_last(model, x_BTD):
  return model.embedder.decode_one(model.final_norm(x_BTD[:, -1:])[:, 0])


# --- the jitted steps ------------------------------------------------------------


def prefill(graphdef, state, tokens_BP, pad_B, key, knobs, images=None, *, total: int, mesh,
            rules):
  """(cache, first new token [B], its logits [B, V]) for left-padded prompts (left_pad; under
  context parallelism a multiple of prompt_bucket columns): the model's graphdef and state,
  tokens [B, P], pad counts [B], the PRNG key, sampling_knobs, images float32
  [B, N, S, S, 3] or None; total: P + max_new_tokens; mesh and rules: the sharded run's, or
  None. The cache is {'blocks' | 'tail' | 'layers': [{'k', 'v'}]} laid out by cache_sharding."""
  with maybe_mesh(mesh, rules):
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    B, P = tokens_BP.shape
    cols_P = jnp.arange(P, dtype=jnp.int32)
    positions_BP = jnp.maximum(cols_P[None, :] - pad_B[:, None], 0)
    segment_ids_BP = (cols_P[None, :] >= pad_B[:, None]).astype(jnp.int32)
    # Global layers' columns: total rounded up so that the context degree splits them.
    degree = context_degree(mesh, rules)
    S = -(-total // degree) * degree
    sizes = {True: S, False: min(cfg.sliding_window, S)}
    if images is None:
      x_BPD, blocks_BP = model.embedder.encode(tokens_BP), None
    else:  # the model's own merge of the soft tokens, and the image blocks of the mask
      x_BPD, blocks_BP = model._embed(tokens_BP, images)  # pylint: disable=protected-access
    x_BPD = sharding.constrain(x_BPD, decoder.ACT)
    # Under context parallelism the layers run in the model's layout, as in training.
    layout = context.active_layout(cfg.context_layout, P)
    if layout is not None and P % prompt_bucket(degree, layout):
      raise ValueError(f'tokens_BP: {P} columns; expected a multiple of '
                       f'{prompt_bucket(degree, layout)} (prompt_bucket) at context degree '
                       f'{degree}, model.context_layout={layout}')
    if layout == 'balanced':
      x_BPD, positions_BP, segment_ids_BP = context.to_balanced(x_BPD, positions_BP,
                                                                segment_ids_BP)
      if blocks_BP is not None:
        blocks_BP, = context.to_balanced(blocks_BP)
    x_BPD, cache = _layers(
        model, x_BPD,
        lambda _, out: _prefill_attend(positions_BP, segment_ids_BP, blocks_BP, sizes, layout,
                                       out), None)
    if layout == 'balanced':
      x_BPD, = context.from_balanced(x_BPD)
    logits_BV = _logits_last(model, x_BPD)
    return cache, draws.sample_logits(logits_BV, jax.random.fold_in(key, 0), knobs), logits_BV


def decode_loop(graphdef, state, carry, end, P, pad_B, key, knobs, stops, *, mesh, rules):
  """Decode steps carry['step'] .. end - 1 inside one compiled loop (no host round trip per
  token), ending early once every row has produced a stop token. P: the prompt's columns;
  stops: the stop token ids; the rest as prefill's.

  carry: 'cache'; 'tokens' [B] the latest new token (index step, at column P + step);
  'done' [B] whether a row has produced a stop token; 'step'; 'out' [N, B] the new tokens so
  far; 'logits' [N, B, V] the logits that chose them, or None (not computed). Step j feeds
  token j at column t = P + j and writes token j + 1, drawn with fold_in(key, t + 1).
  """
  with maybe_mesh(mesh, rules):
    # The q and output projections, laid out for the per-token dot once, before the loop.
    laid = jax.lax.optimization_barrier(swap_projections(state))

    def body(c):
      model = nnx.merge(graphdef, laid)
      j = c['step']
      t = P + j
      x_B1D = model.embedder.encode(c['tokens'][:, None])
      x_B1D, cache = _layers(model, x_B1D, lambda cc, out: _decode_attend(t, pad_B, cc, out),
                             c['cache'])
      logits_BV = _logits_last(model, x_B1D)
      tokens_B = draws.sample_logits(logits_BV, jax.random.fold_in(key, t + 1), knobs)
      new = dict(c, cache=cache, tokens=tokens_B, step=j + 1,
                 done=c['done'] | jnp.any(tokens_B[:, None] == stops[None, :], axis=-1),
                 out=c['out'].at[j + 1].set(tokens_B))
      if c['logits'] is not None:
        new['logits'] = c['logits'].at[j + 1].set(logits_BV.astype(c['logits'].dtype))
      return new

    return jax.lax.while_loop(lambda c: (c['step'] < end) & ~jnp.all(c['done']), body, carry)


# Weights (and int8 scales) whose two per-layer leading axes a decode step's dot wants
# swapped: q [N, D, H] is read as [D, N*H], the output projection [N, H, D] as [H*N, D]. XLA's
# CPU layout pass adds that copy after loop-invariant code motion, so it would run inside the
# while loop for every token (12 copies, ~1/6 of a gemma3_640 batch-1 step in a trace);
# swapping once before the loop, behind an optimization barrier, removes them.
_SWAPPED = ('q_einsum', 'attn_vec_einsum', 'q_einsum_scale', 'attn_vec_einsum_scale')


def swap_projections(state):
  """state with _SWAPPED weights as Attention(swapped=True) reads them."""
  return nnx.from_flat_state([
      (path, var.replace(jnp.swapaxes(var.get_value(), -3, -2)) if path[-1] in _SWAPPED else var)
      for path, var in nnx.to_flat_state(state)])


def maybe_mesh(mesh, rules):
  return sharding.use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext()
