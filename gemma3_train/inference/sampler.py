"""KV-cache sampling: a jitted prefill over the prompts, then the decode steps inside one jitted
while loop (one call for the whole continuation, one call per token when streaming, or one per
STOP_CHUNK tokens when the host looks for stop strings between calls; the cache carries over),
so no host round trip, parameter flattening or logits transfer happens per token.

Prompts of different lengths are left-padded to one length P (rounded up to a multiple of
PROMPT_BUCKET, so that nearby lengths share a compiled step). Column c of a row holds the token
at position c - pad; padding columns are their own segment, so they are never attended to.
Token columns run 0 .. S-1 with S = P + max_new_tokens.

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

Images (model.vision; image_prompts.py lays them out): the prefill embeds each prompt's image
blocks and attends them both ways, as training does; every image token is in the prompt, so the
decode steps are unchanged.

Sampling: temperature 0 is greedy; otherwise logits / temperature, then top-k and top-p
(nucleus: the smallest set of most likely tokens whose probability reaches top_p), then a
draw (draws.py) with jax.random.fold_in(PRNGKey(seed), step). A row stops after EOS or
<end_of_turn>; generation ends when every row has stopped or max_new_tokens is reached.

Decode at small batch is bound by reading the weights once per token, mostly the tied
[vocab, embed] LM head (262k x 640 float32 = 671 MB at the gemma3_640 width); parameters are
therefore put on the device once (host arrays would be copied in again every call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gemma3_train import config as config_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import draws
from gemma3_train.inference import image_prompts
from gemma3_train.models import attention
from gemma3_train.models import context
from gemma3_train.models import decoder
from gemma3_train import sharding

log = logging.getLogger(__name__)

STOP_TOKENS = (tokenizer_lib.EOS, tokenizer_lib.END_OF_TURN)
PROMPT_BUCKET = 16
# Decode steps per loop call between the host's stop-string checks: a row overshoots its stop
# string by at most this many tokens; each check costs a host round trip and a detokenize.
STOP_CHUNK = 16
# The context length of the released models (HF max_position_embeddings, docs/gemma3.md
# section 1): 32k for the sizes without global RoPE scaling (270m, 1b), 128k with it (4b+).
CONTEXT_UNSCALED, CONTEXT_SCALED = 32_768, 131_072
# Logical names of a layer's cache [B, C, K, H]; scanned blocks stack it on a leading axis.
CACHE_NAMES = ('act_batch', 'act_len', 'act_kv_heads', None)


PromptError = image_prompts.PromptError  # empty, too long, or with images that do not fit


def context_length(cfg: config_lib.ModelConfig) -> int:
  """Tokens a model of this shape attends over: prompt plus generated tokens."""
  return CONTEXT_SCALED if cfg.global_rope_scale > 1.0 else CONTEXT_UNSCALED


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_k / top_p None = off. The released models recommend
  temperature 1.0, top_k 64, top_p 0.95 (RECOMMENDED)."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature}: expected >= 0')
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f'top_k={self.top_k}: expected >= 1 (or None)')
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p}: expected in (0, 1] (or None)')


RECOMMENDED = Sampling(temperature=1.0, top_k=64, top_p=0.95)


def sampling_knobs(s: Sampling) -> dict[str, jax.Array]:
  """The sampling settings as traced scalars (one compiled step serves every setting;
  top_k 0 and top_p 1 mean off)."""
  return {'temperature': jnp.float32(s.temperature), 'top_k': jnp.int32(s.top_k or 0),
          'top_p': jnp.float32(1.0 if s.top_p is None else s.top_p)}


def filter_logits(logits_BV: jax.Array, knobs: dict[str, jax.Array]) -> jax.Array:
  """float32 logits / temperature with everything outside top-k and top-p set to -inf."""
  z_BV = logits_BV.astype(jnp.float32) / jnp.maximum(knobs['temperature'], 1e-6)
  return draws.cutoffs(z_BV, knobs)


def sample_logits(logits_BV: jax.Array, key: jax.Array, s: Sampling | dict) -> jax.Array:
  """Next token ids [B] (int32): the first largest logit at temperature 0, else a draw from
  filter_logits."""
  knobs = sampling_knobs(s) if isinstance(s, Sampling) else s
  return jax.lax.cond(knobs['temperature'] == 0, lambda: draws.argmax(logits_BV),
                      lambda: draws.categorical(filter_logits(logits_BV, knobs), key))


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
  with _maybe_mesh(mesh, rules):
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
    return cache, sample_logits(logits_BV, jax.random.fold_in(key, 0), knobs), logits_BV


def decode_loop(graphdef, state, carry, end, P, pad_B, key, knobs, stops, *, mesh, rules):
  """Decode steps carry['step'] .. end - 1 inside one compiled loop (no host round trip per
  token), ending early once every row has produced a stop token. P: the prompt's columns;
  stops: the stop token ids; the rest as prefill's.

  carry: 'cache'; 'tokens' [B] the latest new token (index step, at column P + step);
  'done' [B] whether a row has produced a stop token; 'step'; 'out' [N, B] the new tokens so
  far; 'logits' [N, B, V] the logits that chose them, or None (not computed). Step j feeds
  token j at column t = P + j and writes token j + 1, drawn with fold_in(key, t + 1).
  """
  with _maybe_mesh(mesh, rules):
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
      tokens_B = sample_logits(logits_BV, jax.random.fold_in(key, t + 1), knobs)
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


def _maybe_mesh(mesh, rules):
  return sharding.use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext()


def left_pad(prompts: Sequence[Sequence[int]], bucket: int = PROMPT_BUCKET
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P] int32 left-padded with PAD, pad counts [B]); P a multiple of bucket."""
  lengths = [len(p) for p in prompts]
  P = -(-max(lengths) // bucket) * bucket
  tokens = np.full((len(prompts), P), tokenizer_lib.PAD, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, P - len(p):] = p
  return tokens, np.asarray([P - n for n in lengths], np.int32)


def _row_stop_strings(stop_strings, B: int) -> list[tuple[str, ...]]:
  """Each row's non-empty stop strings from one list for all rows or one list per row."""
  if isinstance(stop_strings, str):
    stop_strings = [stop_strings]
  rows = list(stop_strings)
  if not rows or all(isinstance(x, str) for x in rows):
    rows = [rows] * B
  elif len(rows) != B:
    raise ValueError(f'stop_strings: {len(rows)} lists for {B} prompts')
  return [tuple(x for x in ([r] if isinstance(r, str) else r) if x) for r in rows]


def _row_end(row: list[int], seen: int, stop_tokens, strings: Sequence[str],
             detokenize: Callable[[list[int]], str] | None,
             on_token: Callable[[int], None] | None) -> int | None:
  """The row's length if it has stopped within row[seen:] (after its first stop token, or
  after the token whose text completes one of strings), else None; on_token(t) for each new
  token up to there."""
  end = None
  for j in range(seen, len(row)):
    if row[j] in stop_tokens:
      end = j + 1
      break
  text_end = end - 1 if end is not None else len(row)  # the stop token's text is not searched
  if strings and text_end > seen and any(x in detokenize(row[:text_end]) for x in strings):
    # The first prefix whose text holds a stop string (earlier prefixes were checked before).
    end = next(k for k in range(seen + 1, text_end + 1)
               if k == text_end or any(x in detokenize(row[:k]) for x in strings))
  if on_token is not None:
    for t in row[seen:end]:
      on_token(t)
  return end


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) array's full value on this host: over processes, every process
  gathers it (a collective: all of them must ask)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Sampler:
  """Jitted prefill/decode over a model's graph; params come with each call (so training can
  sample its current state) or from the model given at construction.

  mesh/rules: run sharded as training does (sharding.make_mesh / parse_rules); params are then
  placed by their logical axes, the cache by CACHE_NAMES (its columns over the context axis).
  """

  def __init__(self, model, mesh: Mesh | None = None,
               rules: dict[str, tuple[str, ...]] | None = None):
    self.graphdef, state = nnx.split(model)
    self.cfg = model.cfg
    self.mesh = mesh
    self.rules = rules if rules is not None else dict(sharding.DEFAULT_RULES)
    self.bucket = prompt_bucket(context_degree(mesh, self.rules), self.cfg.context_layout)
    self.state = self.place(state)
    self._steps: dict[int, tuple[Callable, Callable]] = {}

  def place(self, state):
    """state on the device(s): sharded over the mesh by its logical axes, else on the default
    device. Host (numpy) params would otherwise be copied in again at every step."""
    if self.mesh is None:
      return jax.device_put(state)
    return jax.device_put(state, sharding.state_shardings(state, self.mesh, self.rules))

  def _jitted(self, total: int):
    """(prefill, decode loop) for S = total columns; jit caches one compile per input shape
    (and per carry with / without logits)."""
    if total not in self._steps:
      common = dict(mesh=self.mesh, rules=self.rules)
      first = jax.jit(functools.partial(prefill, self.graphdef, total=total, **common))
      loop = jax.jit(functools.partial(decode_loop, self.graphdef, **common),
                     donate_argnums=(1,))  # the carry: cache and buffers updated in place
      self._steps[total] = (first, loop)
    return self._steps[total]

  def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raises PromptError for an empty prompt or one the context cannot extend."""
    limit = context_length(self.cfg)
    for i, p in enumerate(prompts):
      if not len(p):  # pylint: disable=g-explicit-length-test
        raise PromptError(f'prompt {i} is empty (it needs at least BOS)')
      if len(p) + max_new_tokens > limit:
        raise PromptError(f'prompt {i} has {len(p)} tokens; with max_new_tokens='
                          f'{max_new_tokens} that exceeds the model context of {limit} tokens')

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0, *, params=None,
               on_token: Callable[[int, int], None] | None = None,
               return_logits: bool = False, stop_tokens: Sequence[int] = STOP_TOKENS,
               images: Sequence[Sequence] | None = None,
               stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
               detokenize: Callable[[list[int]], str] | None = None,
               stop_chunk: int = STOP_CHUNK):
    """New token ids per prompt (each ending with its first stop token, or with the token that
    completes its first stop string, if one came).

    params: a state to sample instead of the model's (e.g. training's current params);
    on_token(row, token) is called as each row's tokens arrive (streaming);
    return_logits: also return the logits [steps, B, V] that chose each token (tests);
    images: one list per prompt, image k filling its k-th <start_of_image> (image_prompts);
    stop_strings: texts that also end a row (one list for all rows, or one per prompt): the
    loop runs stop_chunk tokens per call, and between calls the host decodes each row's new
    tokens with detokenize (default: the bundled tokenizer's decode) and looks for them;
    generation ends once every row has stopped. The text to keep is the row's decoded text cut
    before its first stop string (as lm-eval cuts it); the tokens drawn do not depend on it.
    """
    prompts, pixels = image_prompts.prepare(prompts, images, self.cfg)
    self.check(prompts, max_new_tokens)
    if max_new_tokens <= 0:
      return ([[] for _ in prompts], np.zeros((0, len(prompts), self.cfg.vocab_size))
              ) if return_logits else [[] for _ in prompts]
    tokens_BP, pad_B = left_pad(prompts, self.bucket)
    B, P = tokens_BP.shape
    N = max_new_tokens
    prefill, decode = self._jitted(P + N)
    knobs = sampling_knobs(sampling)
    state = self.state if params is None else params
    key = jax.random.PRNGKey(seed)
    pad_B = jnp.asarray(pad_B)
    stops = jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1)
    cache, tokens_B, logits_BV = prefill(state, jnp.asarray(tokens_BP), pad_B, key, knobs,
                                         None if pixels is None else jnp.asarray(pixels))
    carry = {'cache': cache, 'tokens': tokens_B, 'step': jnp.int32(0),
             'done': jnp.any(tokens_B[:, None] == stops[None, :], axis=-1),
             'out': jnp.zeros((N, B), jnp.int32).at[0].set(tokens_B),
             'logits': jnp.zeros((N, B, logits_BV.shape[-1]), jnp.float32).at[0].set(
                 logits_BV.astype(jnp.float32)) if return_logits else None}
    args = (jnp.int32(P), pad_B, key, knobs, stops)
    strings_B = _row_stop_strings(stop_strings, B)
    if any(strings_B) and detokenize is None:
      detokenize = tokenizer_lib.Tokenizer().decode
    # Tokens per loop call: one when streaming, a chunk between stop-string checks, else all.
    chunk = 1 if on_token is not None else max(1, stop_chunk) if any(strings_B) else N
    ends: list[int | None] = [None] * B  # a row's length once it has stopped
    steps, seen = 1, 0  # tokens drawn per row; tokens the host has looked at
    while True:
      out_NB = to_host(carry['out'])[:steps]
      for b in (b for b in range(B) if ends[b] is None):
        ends[b] = _row_end(out_NB[:, b].tolist(), seen, stop_tokens, strings_B[b], detokenize,
                           None if on_token is None else functools.partial(on_token, b))
      seen = steps
      if steps == N or all(e is not None for e in ends):
        break
      carry = decode(state, carry, jnp.int32(min(steps - 1 + chunk, N - 1)), *args)
      steps = int(carry['step']) + 1
    out = [row[:end] for row, end in zip(out_NB.T.tolist(), ends)]
    if return_logits:
      return out, to_host(carry['logits'])[:steps]
    return out


def chat_prompt(messages: list[dict], tok: tokenizer_lib.Tokenizer,
                cfg: config_lib.ModelConfig | None = None) -> list[int]:
  """The Gemma 3 chat template with the generation prompt: the conversation as training formats
  it (data.format_chat: BOS, then <start_of_turn>{role}\\n{text}<end_of_turn>\\n per turn), less
  its closing EOS, then <start_of_turn>model\\n. cfg (a vision model's): each <start_of_image>
  in the text becomes an image block, as training lays it out."""
  from gemma3_train.data import documents  # pylint: disable=g-import-not-at-top  (grain)
  encode = image_prompts.chat_encoder(tok, cfg) if cfg is not None and cfg.vision else None
  tokens, _ = documents.format_chat(messages, tok, encode=encode)
  return [int(x) for x in tokens[:-1]] + [tokenizer_lib.START_OF_TURN] + tok.encode('model\n')


def prompt_tokens(text: str, tok: tokenizer_lib.Tokenizer) -> list[int]:
  """A plain-text prompt: BOS then its pieces (as training documents start)."""
  return [tokenizer_lib.BOS] + tok.encode(text)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, images: Sequence[Sequence] | None = None,
             stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
             detokenize: Callable[[list[int]], str] | None = None) -> list[list[int]]:
  """One-off sampling of a model (compiles for these shapes); Gemma3.generate below."""
  return Sampler(model).generate(prompts, max_new_tokens,
                                 Sampling(temperature, top_k, top_p), seed, images=images,
                                 stop_strings=stop_strings, detokenize=detokenize)


class Gemma3(decoder.Gemma3):
  """The decoder with generate(): the class gemma3_train.load returns (a model does not import
  inference; the sampler adds it here)."""

  def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               images=None, stop_strings=(), detokenize=None):
    """Token-id lists (any lengths) -> the new token ids per prompt, ending with the first EOS
    or <end_of_turn> when one is produced; temperature 0 is greedy. images: one list per
    prompt (paths, PIL images, uint8 arrays), image k where the prompt's k-th
    <start_of_image> is (image_prompts.encode lays text out as Hugging Face's processor).
    stop_strings: texts that also end a row, at the token that completes one (its text via
    detokenize, by default the bundled tokenizer's; Sampler.generate)."""
    return generate(self, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed, images=images, stop_strings=stop_strings,
                    detokenize=detokenize)
