"""The tied LM head applied in sequence chunks: next-token cross-entropy sums with a fused
gradient, and per-token log-probabilities, without ever forming [B, L, V] logits.

With a 262k vocabulary the [B, L, V] logits are the largest tensor of a step (17 GB in fp32 for
8 x 2048), so they are never materialized: a scan walks the sequence in chunks, computes each
chunk's float32 logits from x @ embedding.T and reduces them to per-position sums.

The gradient is a jax.custom_vjp whose forward pass (used only under differentiation) also writes
the chunk's unnormalized softmax e = exp(logits - max) once and runs the two gradient matmuls
p @ E and p^T @ (w x) on it (p = e / sum(e); the 1/sum(e) scales [B, C, D] arrays instead), so
the LM head costs the three matmuls the model FLOP count assumes, one exp pass, and no argmax,
recompute or scatter-add over the logits. The backward pass only scales those saved products
by the incoming cotangents. It is exact for any cotangents, not only the trainer's, because
d loss_sum / d logits = w (p - onehot) and d z_loss_sum / d logits = 2 w lse p are both linear
in p; the one-hot part is a gather of E rows (for dx) and a T-row scatter into dE (for dE),
applied in float32 so it is not rounded with p in bfloat16. With bfloat16 compute e is stored in
bfloat16 and the differentiated forward's sum(e) adds those rounded values (in float32), so its
loss differs from the plain forward's by ~1e-4 relative; float32 compute is unaffected.

vocab_parallel (train.loss_vocab_parallel): under FSDP every chip would otherwise gather the
whole table [V, D] for its own rows and form a whole-vocabulary [D, V] float32 partial of
p^T @ (w x) before the reduce-scatter: for 4b that is 1.25 GiB of table and 2.5 GiB of partial
per chip, the largest temporaries of the step (docs/memory.md). With vocab_parallel the
differentiated forward gathers each chunk's rows instead (a few MiB) and splits the vocabulary
over the batch axes: each chip computes every row's logits for its V / n slice of the table, the
max and sum(e) over the vocabulary become all-reduces of [B, C] values, p @ E a reduce-scatter
of [B, C, D], and p^T @ (w x) is complete on each chip for its slice. Same sums and gradients.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gemma3_train import sharding

LOGITS = ('act_batch', 'act_len', 'act_vocab')
# vocab_parallel: the vocabulary split over the batch axes, the chunk's rows on every chip
_VP_LOGITS = (None, None, 'act_batch')
_VP_TABLE = ('act_batch', None)
_ROWS = ('act_batch', None, None)
SUM_KEYS = ('loss_sum', 'z_loss_sum', 'weight_sum', 'correct_sum')


def chunk_logits(x_BCD, table_VD, names=LOGITS):
  logits_BCV = jnp.einsum('BCD,VD->BCV', x_BCD, table_VD.astype(x_BCD.dtype),
                          preferred_element_type=jnp.float32)
  return sharding.constrain(logits_BCV, names)


def chunk_stats(logits_BCV, targets_BC):
  """(logsumexp, target logit, max logit) per position, float32."""
  max_BC = jnp.max(logits_BCV, axis=-1)
  lse_BC = max_BC + jnp.log(jnp.sum(jnp.exp(logits_BCV - max_BC[..., None]), axis=-1))
  return lse_BC, target_logit(logits_BCV, targets_BC), max_BC


def target_logit(logits_BCV, targets_BC):
  # A gather of B*C values; a masked sum over the vocabulary would be one more full pass.
  return jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]


def chunk_sums(lse_BC, target_BC, max_BC, weights_BC, z_loss: float) -> dict[str, jax.Array]:
  w_BC = weights_BC.astype(jnp.float32)
  # Correct when the target's logit is the largest; a tie with another token counts as correct
  # (argmax would pick the lower index). Reusing the max saves an argmax pass over the logits.
  correct_BC = (target_BC >= max_BC).astype(jnp.float32)
  z_sum = jnp.sum(w_BC * jnp.square(lse_BC)) if z_loss else jnp.zeros((), jnp.float32)
  return {'loss_sum': jnp.sum(w_BC * (lse_BC - target_BC)), 'z_loss_sum': z_sum,
          'weight_sum': jnp.sum(w_BC), 'correct_sum': jnp.sum(w_BC * correct_BC)}


def scan_chunks(body, init, xs, num_chunks: int):
  """lax.scan, or one direct call when there is one chunk (no loop-carried copies)."""
  if num_chunks == 1:
    carry, ys = body(init, jax.tree.map(lambda a: a[0], xs))
    return carry, jax.tree.map(lambda a: a[None], ys)
  return jax.lax.scan(body, init, xs)


def zero_sums():
  return {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}


def chunks(chunk_size: int, *arrays_BL):
  """[B, L, ...] arrays -> [n, B, C, ...] (C = min(chunk_size, L)), a ragged last chunk padded
  with zeros: the scan axis leads and rows stay where they are (the batch keeps its sharding).

  With the sequence split over s context shards (sharding.sequence_shards), a chunk takes C / s
  positions from each shard's slice instead of C consecutive ones, so that every chunk keeps
  the sequence's sharding and all shards work on every step of the scan (sums do not depend on
  the order; unchunk undoes it for per-position results)."""
  if chunk_size < 1:
    raise ValueError(f'train.loss_chunk_size={chunk_size}: expected >= 1')
  B, L = arrays_BL[0].shape[:2]
  s = sharding.sequence_shards(L)
  T = L // s
  Cs = min(-(-chunk_size // s), T)  # positions per shard in a chunk
  n = -(-T // Cs)
  out = []
  for a in arrays_BL:
    a = a.reshape(B, s, T, *a.shape[2:])
    if n * Cs > T:
      a = jnp.pad(a, ((0, 0), (0, 0), (0, n * Cs - T)) + ((0, 0),) * (a.ndim - 3))
    a = jnp.moveaxis(a.reshape(B, s, n, Cs, *a.shape[3:]), 2, 0)
    a = a.reshape(n, B, s * Cs, *a.shape[4:])
    if s > 1:
      a = sharding.constrain(a, (None, 'act_batch', 'act_len') + (None,) * (a.ndim - 3))
    out.append(a)
  return out


def unchunk(a_nBC, L: int):
  """chunks' inverse for one [n, B, C, ...] array of per-position results: [B, L, ...]."""
  n, B, C = a_nBC.shape[:3]
  s = sharding.sequence_shards(L)
  a = a_nBC.reshape(n, B, s, C // s, *a_nBC.shape[3:])
  a = jnp.moveaxis(a, 0, 2).reshape(B, s, n * (C // s), *a_nBC.shape[3:])
  return a[:, :, :L // s].reshape(B, L, *a_nBC.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sums_nBC(x_nBCD, table_VD, targets_nBC, weights_nBC, z_loss: float,
              vocab_parallel: bool):
  """Summed loss terms over chunks [n, B, C]; no gradient work (eval, or the primal)."""
  del vocab_parallel  # no [D, V] partial without gradients; the table gather is the cost

  def body(totals, chunk):
    x_BCD, targets_BC, weights_BC = chunk
    logits_BCV = chunk_logits(x_BCD, table_VD)
    sums = chunk_sums(*chunk_stats(logits_BCV, targets_BC), weights_BC, z_loss)
    return jax.tree.map(jnp.add, totals, sums), None

  totals, _ = scan_chunks(body, zero_sums(), (x_nBCD, targets_nBC, weights_nBC),
                          x_nBCD.shape[0])
  return totals


def _sums_fwd(x_nBCD, table_VD, targets_nBC, weights_nBC, z_loss: float, vocab_parallel: bool):
  """The sums, plus p @ E per position and p^T @ (w x) [, p^T @ (2 w lse x)] over the table."""
  D = x_nBCD.shape[-1]
  dt = x_nBCD.dtype
  table_c = table_VD.astype(dt)  # as stored (embed over fsdp): target rows are gathered from it
  # the logits' table: a vocabulary slice per chip, or whole (gathered) on every chip
  table_l = sharding.constrain(table_c, _VP_TABLE) if vocab_parallel else table_c

  def body(carry, chunk):
    totals, pX_VK = carry
    x_BCD, targets_BC, weights_BC = chunk
    own_targets_BC, own_w_BC = targets_BC, weights_BC.astype(jnp.float32)  # this chip's rows
    if vocab_parallel:
      x_BCD = sharding.constrain(x_BCD, (None, None, None))  # this chunk's rows, all of them
      targets_BC = sharding.constrain(targets_BC, (None, None))
      weights_BC = sharding.constrain(weights_BC, (None, None))
      logits_BCV = chunk_logits(x_BCD, table_l, _VP_LOGITS)
    else:
      logits_BCV = chunk_logits(x_BCD, table_VD)
    max_BC = jnp.max(logits_BCV, axis=-1)
    # e = exp(logits - max) is written once, in the matmul dtype, and both the normalizer and
    # the matmuls read it; p = e / sum(e) is never formed: 1/sum(e) scales the [B, C, D]
    # operands and results instead of a [B, C, V] array. The barrier keeps XLA from fusing the
    # exp into the sum's reduction (on CPU that recomputed it in a slow reduction kernel).
    e_BCV = jax.lax.optimization_barrier(jnp.exp(logits_BCV - max_BC[..., None]).astype(dt))
    e_BCV = sharding.constrain(e_BCV, _VP_LOGITS if vocab_parallel else LOGITS)
    sum_BC = jnp.sum(e_BCV.astype(jnp.float32), axis=-1)
    lse_BC = max_BC + jnp.log(sum_BC)
    if vocab_parallel:  # a masked sum, local to each slice (a gather would collect the logits)
      V = logits_BCV.shape[-1]
      hit_BCV = jax.lax.broadcasted_iota(jnp.int32, (1, 1, V), 2) == targets_BC[..., None]
      target_BC = jnp.sum(jnp.where(hit_BCV, logits_BCV, 0.0), axis=-1)
    else:
      target_BC = target_logit(logits_BCV, targets_BC)
    sums = chunk_sums(lse_BC, target_BC, max_BC, weights_BC, z_loss)
    inv_BC = 1.0 / sum_BC
    eE_BCD = jnp.einsum('BCV,VD->BCD', e_BCV, table_l, preferred_element_type=jnp.float32)
    if vocab_parallel:  # summed over the slices and handed back to the rows' chips
      eE_BCD = sharding.constrain(eE_BCD, _ROWS)
    pE_BCD = inv_BC[..., None] * eE_BCD
    w_BC = weights_BC.astype(jnp.float32)
    # The [B, C, K] operand of p^T @ (.): each term's per-position dlogits scale, over sum(e).
    xs_BCK = x_BCD.astype(jnp.float32) * (w_BC * inv_BC)[..., None]
    if z_loss:
      xs_BCK = jnp.concatenate([xs_BCK, xs_BCK * (2.0 * lse_BC[..., None])], axis=-1)
    # (x^T e)^T rather than e^T x: the [K, V] result is transposed, not the [B, C, V] operand.
    # The barrier stops XLA from folding the transpose back into the dot (which then needs
    # e transposed, and as a plain bf16 x bf16 -> f32 dot is not supported by XLA:CPU).
    contrib_KV = jnp.einsum('BCK,BCV->KV', xs_BCK.astype(dt), e_BCV,
                            preferred_element_type=jnp.float32)
    if vocab_parallel:  # complete on each chip for its vocabulary slice: no reduction
      contrib_KV = sharding.constrain(contrib_KV, (None, 'act_batch'))
    contrib_VK = jax.lax.optimization_barrier(contrib_KV).T
    pX_VK = contrib_VK if pX_VK is None else pX_VK + contrib_VK
    # dx of loss_sum: w (p @ E - E[target]); of z_loss_sum: 2 w lse (p @ E). Each chip forms
    # its own rows' (with vocab_parallel the sums above saw every row).
    target_rows_BCD = jnp.take(table_c, own_targets_BC, axis=0).astype(jnp.float32)
    dx_loss_BCD = own_w_BC[..., None] * (pE_BCD - target_rows_BCD)
    dx_z_BCD = (2.0 * own_w_BC * lse_BC)[..., None] * pE_BCD if z_loss else None
    return (jax.tree.map(jnp.add, totals, sums), pX_VK), (dx_loss_BCD, dx_z_BCD)

  n = x_nBCD.shape[0]
  xs = (x_nBCD, targets_nBC, weights_nBC)
  if n == 1:
    (totals, pX_VK), ys = scan_chunks(body, (zero_sums(), None), xs, 1)
  else:
    K = 2 * D if z_loss else D
    pX_VK = sharding.constrain(jnp.zeros((table_VD.shape[0], K), jnp.float32),
                               _VP_TABLE if vocab_parallel else ('vocab', None))
    (totals, pX_VK), ys = scan_chunks(body, (zero_sums(), pX_VK), xs, n)
  # A zero-size array carries the table's dtype (residuals must be arrays).
  return totals, (ys, pX_VK, x_nBCD, targets_nBC, weights_nBC, jnp.zeros((0,), table_VD.dtype))


def _sums_bwd(z_loss: float, vocab_parallel: bool, res, g):
  (dx_loss_nBCD, dx_z_nBCD), pX_VK, x_nBCD, targets_nBC, weights_nBC, table_dtype = res
  D = x_nBCD.shape[-1]
  g_loss, g_z = g['loss_sum'], g['z_loss_sum']
  dx_nBCD = g_loss * dx_loss_nBCD
  dE_VD = g_loss * pX_VK[:, :D]
  if z_loss:
    dx_nBCD = dx_nBCD + g_z * dx_z_nBCD
    dE_VD = dE_VD + g_z * pX_VK[:, D:]
  if vocab_parallel:  # to the table's own layout before the scatter into its rows
    dE_VD = sharding.constrain(dE_VD, ('vocab', 'embed'))
  # The one-hot part of dlogits: row target of dE loses w x (T rows, not a pass over the logits).
  w_nBC = weights_nBC.astype(jnp.float32)
  rows_TD = (x_nBCD.astype(jnp.float32) * (g_loss * w_nBC)[..., None]).reshape(-1, D)
  dE_VD = dE_VD.at[targets_nBC.reshape(-1)].add(-rows_TD)
  return dx_nBCD.astype(x_nBCD.dtype), dE_VD.astype(table_dtype.dtype), None, None


_sums_nBC.defvjp(_sums_fwd, _sums_bwd)


def chunked_cross_entropy(x_BLD, embedding_VD, targets_BL, weights_BL, *, chunk_size: int,
                          z_loss: float = 0.0, vocab_parallel: bool = False
                          ) -> dict[str, jax.Array]:
  """Float32 sums {loss_sum, z_loss_sum, weight_sum, correct_sum}; the caller divides.

  x_BLD are the final-normed hidden states, embedding_VD the (tied) table, targets_BL the next
  tokens and weights_BL the loss mask. Chunks are chunk_size positions of every row, so the batch
  dimension keeps its sharding; a ragged last chunk is padded with weight 0. z_loss_sum is the
  unscaled sum(w * logsumexp^2), computed only when z_loss > 0 (the trainer adds
  z_loss * z_loss_sum to the objective). correct_sum counts positions whose target logit equals
  the maximum logit (ties count as correct). Gradients flow to x_BLD and embedding_VD.
  vocab_parallel: the gradient pass splits the vocabulary over the batch axes (module doc).
  """
  x_nBCD, targets_nBC, weights_nBC = chunks(chunk_size, x_BLD, targets_BL, weights_BL)
  return _sums_nBC(x_nBCD, embedding_VD, targets_nBC, weights_nBC, float(z_loss),
                   bool(vocab_parallel))


def mask_image_targets(targets_BL, weights_BL, vocab_size: int):
  """(targets, weights) with weight 0 and target 0 wherever a target is not a text token.

  Image soft-token placeholders carry the id vocab_size, one past the table: the data pipeline
  gives those positions weight 0 already, but a gather at that row reads NaN (and 0 * NaN is
  NaN), so such targets are replaced by a valid row and their weight forced to 0 here.
  """
  image_BL = targets_BL >= vocab_size
  return (jnp.where(image_BL, 0, targets_BL),
          jnp.where(image_BL, jnp.zeros((), weights_BL.dtype), weights_BL))


# --- a model's next-token sums, and their summary -------------------------------------


def next_token_sums(model, batch: dict, images=None, *, chunk_size: int, z_loss: float = 0.0,
                    vocab_parallel: bool = False) -> dict[str, jax.Array]:
  """chunked_cross_entropy of a Gemma3 model on a packed batch ({inputs, targets, weights,
  positions, segment_ids}; images: the model's float images input or None)."""
  x_BLD = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'], images=images)
  targets, weights = mask_image_targets(batch['targets'], batch['weights'],
                                        model.cfg.vocab_size)
  return chunked_cross_entropy(x_BLD, model.embedder.table(), targets, weights,
                               chunk_size=chunk_size, z_loss=z_loss,
                               vocab_parallel=vocab_parallel)


def summarize(totals: dict[str, float]) -> dict[str, float]:
  """{loss, perplexity, accuracy, tokens} from sums added over batches (host floats); NaN
  metrics when no target had weight."""
  weight = totals.get('weight_sum', 0.0)
  if not weight:
    return {'loss': math.nan, 'perplexity': math.nan, 'accuracy': math.nan, 'tokens': 0.0}
  loss = totals['loss_sum'] / weight
  return {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
          'accuracy': totals['correct_sum'] / weight, 'tokens': weight}


# --- per-token log-probabilities ---------------------------------------------------------


def token_logprobs(x_BLD, embedding_VD, targets_BL, *, chunk_size: int) -> jax.Array:
  """log p(target) per position, float32 [B, L], from final-normed hidden states and the tied
  table, chunk_size positions of every row at a time.

  The objectives that compare sequences (preference tuning, RL, distillation) build on these.
  Each chunk's [B, C, V] logits live only inside its scan step, under jax.checkpoint: the
  backward pass recomputes them chunk by chunk instead of keeping every chunk's (which would be
  the [B, L, V] array again). Gradients flow to x_BLD and embedding_VD.
  """
  L = x_BLD.shape[1]
  x_nBCD, targets_nBC = chunks(chunk_size, x_BLD, targets_BL)
  n = targets_nBC.shape[0]

  @jax.checkpoint
  def chunk(x_BCD, targets_BC):
    logits_BCV = chunk_logits(x_BCD, embedding_VD)
    lse_BC, target_BC, _ = chunk_stats(logits_BCV, targets_BC)
    return target_BC - lse_BC

  def body(_, xs):
    return None, chunk(*xs)

  _, logp_nBC = scan_chunks(body, None, (x_nBCD, targets_nBC), n)
  return unchunk(logp_nBC, L)
