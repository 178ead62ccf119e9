"""The LM head against soft targets, for distillation (training/objectives/distill.py), in the
sequence chunks of lm_head.py (no [B, L, V] logits):

  teacher_targets    the ids and renormalized probabilities of distill.samples draws from a
                     teacher's distribution (or its top-k), keyed by (seed, record, position)
  soft_target_sums   the student's cross-entropy over those ids, with ce's sums beside it
  soft_target_loss   their weighted objective with a fused gradient (ce's cost)
  kl_sums            the full-vocabulary KL(teacher || student)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma3_train import sharding
from gemma3_train.models import lm_head


def draw_ids(p_BCV, u_BCK):
  """Ids drawn from p by inverse CDF: per position the first id whose cumulative probability
  exceeds u * total (an id of probability 0 is never drawn). Memory [B, C, V], where
  jax.random.categorical's Gumbel noise would be [B, C, K, V]."""
  cdf_BCV = jnp.cumsum(p_BCV, axis=-1)
  search = jax.vmap(jax.vmap(functools.partial(jnp.searchsorted, side='right')))
  ids = search(cdf_BCV, u_BCK * cdf_BCV[..., -1:])
  return jnp.minimum(ids, p_BCV.shape[-1] - 1).astype(jnp.int32)


_DRAW_TAG = 0xD157  # folded into the seed's key: draws of their own, not dropout's


def position_uniforms(seed: int, record_BC, pos_BC, k: int):
  """[B, C, k] values in [0, 1): a position's come from the key fold_in(key(seed), tag,
  record, pos) alone (its document's record index, its place in the document), so the online
  loss and `gemma3-data prepare --teacher` draw the same ids whatever the packing, chunking,
  step, microbatches or mesh."""
  key = jax.random.fold_in(jax.random.key(seed), _DRAW_TAG)

  def position(record, pos):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, record), pos), (k,))
  return jax.vmap(jax.vmap(position))(record_BC, pos_BC)


def _distinct_first(ids_BCK, p_BCK):
  """Sorted ids -> (ids, p) with each distinct id once, in order, at the front; repeats (p 0)
  after them. Stored targets keep the front only (data/teacher.py)."""
  B, C, _ = ids_BCK.shape
  first_BCK = jnp.concatenate([jnp.ones((B, C, 1), bool),
                               ids_BCK[..., 1:] != ids_BCK[..., :-1]], axis=-1)
  order_BCK = jnp.argsort(~first_BCK, axis=-1, stable=True)
  ids_BCK = jnp.take_along_axis(ids_BCK, order_BCK, axis=-1)
  first_BCK = jnp.take_along_axis(first_BCK, order_BCK, axis=-1)
  return ids_BCK, jnp.where(first_BCK, jnp.take_along_axis(p_BCK, order_BCK, axis=-1), 0.0)


def teacher_targets(x_BLD, embedding_VD, *, k: int, temperature: float, chunk_size: int,
                    seed: int | None = None, record_BL=None, pos_BL=None
                    ) -> tuple[jax.Array, jax.Array]:
  """A teacher's targets per position: (ids [B, L, k] int32, q [B, L, k] float32, q summing
  to 1 over a position's ids), p = softmax(logits / temperature), chunk by chunk. Not
  differentiated (the teacher is frozen).

  seed None: the k most probable ids, q their p renormalized (top-k). Else k ids drawn from p
  with replacement, with position_uniforms(seed, record, pos); q is p on the distinct drawn
  ids renormalized (the Gemma 3 report's targets): the distinct ids first, ascending, then the
  repeats with q 0.
  """
  x_nBCD, = lm_head.chunks(chunk_size, jax.lax.stop_gradient(x_BLD))
  table_VD = jax.lax.stop_gradient(embedding_VD)
  n, B, C, _ = x_nBCD.shape
  if seed is None:
    keys = (jnp.zeros((n, B, C), jnp.int32),) * 2  # (unused)
  else:
    keys = tuple(lm_head.chunks(chunk_size, record_BL, pos_BL))

  def body(_, xs):
    x_BCD, record_BC, pos_BC = xs
    logp_BCV = jax.nn.log_softmax(lm_head.chunk_logits(x_BCD, table_VD) / temperature, axis=-1)
    if seed is None:
      logp_BCK, ids_BCK = jax.lax.top_k(logp_BCV, k)
      p_BCK = jnp.exp(logp_BCK)
    else:
      p_BCV = jnp.exp(logp_BCV)
      ids_BCK = jnp.sort(draw_ids(p_BCV, position_uniforms(seed, record_BC, pos_BC, k)),
                         axis=-1)
      ids_BCK, p_BCK = _distinct_first(ids_BCK, jnp.take_along_axis(p_BCV, ids_BCK, axis=-1))
    return None, (ids_BCK.astype(jnp.int32), p_BCK / jnp.sum(p_BCK, axis=-1, keepdims=True))

  _, (ids_nBCK, q_nBCK) = lm_head.scan_chunks(body, None, (x_nBCD, *keys), n)
  L = x_BLD.shape[1]
  return lm_head.unchunk(ids_nBCK, L), lm_head.unchunk(q_nBCK, L)


def _soft_scan(chunk, arrays_BL, chunk_size: int) -> dict[str, jax.Array]:
  """Sums of chunk(*chunk's arrays) over the chunks; chunk runs under jax.checkpoint, so the
  backward pass recomputes each chunk's [B, C, V] logits instead of keeping them."""
  chunk = jax.checkpoint(chunk)

  def body(totals, xs):
    return jax.tree.map(jnp.add, totals, chunk(*xs)), None

  xs = lm_head.chunks(chunk_size, *arrays_BL)
  zeros = {**lm_head.zero_sums(), 'soft_sum': jnp.zeros((), jnp.float32)}
  totals, _ = lm_head.scan_chunks(body, zeros, tuple(xs), xs[0].shape[0])
  return totals


def _hard_sums(logits_BCV, targets_BC, weights_BC, z_loss: float):
  """(the ce sums of a chunk, logsumexp [B, C])."""
  lse_BC, target_BC, max_BC = lm_head.chunk_stats(logits_BCV, targets_BC)
  return lm_head.chunk_sums(lse_BC, target_BC, max_BC, weights_BC, z_loss), lse_BC


def soft_target_sums(x_BLD, embedding_VD, ids_BLK, q_BLK, targets_BL, weights_BL, *,
                     chunk_size: int, z_loss: float = 0.0) -> dict[str, jax.Array]:
  """chunked_cross_entropy's sums of the hard targets plus soft_sum = sum over positions of
  w * -sum_k q_k log p(ids_k): the cross-entropy to soft targets on k ids per position, from
  the log-softmax over the whole vocabulary. Gradients flow to x_BLD and embedding_VD, for any
  combination of the sums, by plain autodiff under jax.checkpoint (the backward pass
  recomputes each chunk's logits); the distill objective differentiates soft_target_loss, the
  fused form of its one combination, instead."""
  def chunk(x_BCD, ids_BCK, q_BCK, targets_BC, weights_BC):
    logits_BCV = lm_head.chunk_logits(x_BCD, embedding_VD)
    sums, lse_BC = _hard_sums(logits_BCV, targets_BC, weights_BC, z_loss)
    at_ids_BCK = jnp.take_along_axis(logits_BCV, ids_BCK, axis=-1)
    soft_BC = jnp.sum(q_BCK * (lse_BC[..., None] - at_ids_BCK), axis=-1)
    return {**sums, 'soft_sum': jnp.sum(weights_BC.astype(jnp.float32) * soft_BC)}
  return _soft_scan(chunk, (x_BLD, ids_BLK, q_BLK, targets_BL, weights_BL), chunk_size)


_SOFT_KEYS = lm_head.SUM_KEYS + ('soft_sum',)


def _soft_chunk(x_BCD, table_VD, ids_BCK, q_BCK, targets_BC, weights_BC, z_loss: float):
  """A chunk's logits, e = exp(logits - max) in the compute dtype, sum(e), and its sums
  (soft_target_sums')."""
  logits_BCV = lm_head.chunk_logits(x_BCD, table_VD)
  max_BC = jnp.max(logits_BCV, axis=-1)
  # As in lm_head's _sums_fwd: e is written once and read by the sum and the matmuls.
  e_BCV = jax.lax.optimization_barrier(
      jnp.exp(logits_BCV - max_BC[..., None]).astype(x_BCD.dtype))
  e_BCV = sharding.constrain(e_BCV, lm_head.LOGITS)
  sum_BC = jnp.sum(e_BCV.astype(jnp.float32), axis=-1)
  lse_BC = max_BC + jnp.log(sum_BC)
  target_BC = lm_head.target_logit(logits_BCV, targets_BC)
  sums = lm_head.chunk_sums(lse_BC, target_BC, max_BC, weights_BC, z_loss)
  at_ids_BCK = jnp.take_along_axis(logits_BCV, ids_BCK, axis=-1)
  soft_BC = jnp.sum(q_BCK * (lse_BC[..., None] - at_ids_BCK), axis=-1)
  sums['soft_sum'] = jnp.sum(weights_BC.astype(jnp.float32) * soft_BC)
  return e_BCV, sum_BC, lse_BC, sums


def weighted_objective(sums, coefs):
  """soft * soft_sum + hard * loss_sum + z * z_loss_sum, coefs = (soft, hard, z): the mixed
  distillation objective, whichever loss gave the sums."""
  soft, hard, z = coefs
  return soft * sums['soft_sum'] + hard * sums['loss_sum'] + z * sums['z_loss_sum']


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _soft_objective_nBC(x_nBCD, table_VD, ids_nBCK, q_nBCK, targets_nBC, weights_nBC, coefs):
  """(objective, sums) over chunks [n, B, C]; no gradient work (eval, or the primal)."""
  def body(totals, chunk):
    x_BCD, ids_BCK, q_BCK, targets_BC, weights_BC = chunk
    sums = _soft_chunk(x_BCD, table_VD, ids_BCK, q_BCK, targets_BC, weights_BC, coefs[2])[3]
    return jax.tree.map(jnp.add, totals, sums), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in _SOFT_KEYS}
  totals, _ = lm_head.scan_chunks(
      body, zeros, (x_nBCD, ids_nBCK, q_nBCK, targets_nBC, weights_nBC), x_nBCD.shape[0])
  return weighted_objective(totals, coefs), totals


def _soft_objective_fwd(x_nBCD, table_VD, ids_nBCK, q_nBCK, targets_nBC, weights_nBC, coefs):
  """The objective's dlogits, per position, are
      m p - c_soft w Q - c_hard w onehot(target) + z_s p,
  m = w (c_soft sum(q) + c_hard), z_s = 2 c_z w lse, Q the q scattered onto their ids.
  With p = e / sum(e), m p - c_soft w Q = (m / sum(e)) e', e' = e - sum(e) (c_soft w / m) Q:
  the q go into e by a scatter of k values per position (where m = 0, c_soft w q is 0 too:
  q >= 0), and the two gradient matmuls on e' are ce's (lm_head's _sums_fwd), with its one-hot
  part.
  z_s p, where wanted, takes two more matmuls on e before the scatter. bfloat16 compute rounds
  the q in e' as it rounds e."""
  c_soft, c_hard, c_z = coefs
  n, D = x_nBCD.shape[0], x_nBCD.shape[-1]
  dt = x_nBCD.dtype
  table_c = table_VD.astype(dt)

  def body(carry, chunk):
    totals, dE_VD = carry
    x_BCD, ids_BCK, q_BCK, targets_BC, weights_BC = chunk
    e_BCV, sum_BC, lse_BC, sums = _soft_chunk(x_BCD, table_VD, ids_BCK, q_BCK, targets_BC,
                                              weights_BC, c_z)
    w_BC = weights_BC.astype(jnp.float32)
    inv_BC = 1.0 / sum_BC
    m_BC = w_BC * (c_soft * jnp.sum(q_BCK, axis=-1) + c_hard)
    dx_BCD = -c_hard * w_BC[..., None] * jnp.take(table_c, targets_BC, axis=0).astype(
        jnp.float32)
    contrib_KV = None
    if c_z:
      z_BC = 2.0 * c_z * w_BC * lse_BC * inv_BC
      dx_BCD += z_BC[..., None] * jnp.einsum('BCV,VD->BCD', e_BCV, table_c,
                                             preferred_element_type=jnp.float32)
      contrib_KV = jnp.einsum('BCK,BCV->KV', (x_BCD.astype(jnp.float32) * z_BC[..., None]
                                              ).astype(dt), e_BCV,
                              preferred_element_type=jnp.float32)
    rho_BC = jnp.where(m_BC > 0, c_soft * w_BC * sum_BC / jnp.where(m_BC > 0, m_BC, 1.0), 0.0)
    B, C, K = ids_BCK.shape
    b_BCK = jax.lax.broadcasted_iota(jnp.int32, (B, C, K), 0)
    c_BCK = jax.lax.broadcasted_iota(jnp.int32, (B, C, K), 1)
    e_BCV = e_BCV.at[b_BCK, c_BCK, ids_BCK].add((-rho_BC[..., None] * q_BCK).astype(dt))
    e_BCV = sharding.constrain(e_BCV, lm_head.LOGITS)
    a_BC = m_BC * inv_BC
    dx_BCD += a_BC[..., None] * jnp.einsum('BCV,VD->BCD', e_BCV, table_c,
                                           preferred_element_type=jnp.float32)
    # (x^T e')^T, as in lm_head's _sums_fwd: the [D, V] result is transposed, not the [B, C, V]
    # operand.
    ax_BCD = (x_BCD.astype(jnp.float32) * a_BC[..., None]).astype(dt)
    own_KV = jnp.einsum('BCK,BCV->KV', ax_BCD, e_BCV, preferred_element_type=jnp.float32)
    contrib_KV = own_KV if contrib_KV is None else contrib_KV + own_KV
    contrib_VD = jax.lax.optimization_barrier(contrib_KV).T
    dE_VD = contrib_VD if dE_VD is None else dE_VD + contrib_VD
    return (jax.tree.map(jnp.add, totals, sums), dE_VD), dx_BCD

  xs = (x_nBCD, ids_nBCK, q_nBCK, targets_nBC, weights_nBC)
  zeros = {k: jnp.zeros((), jnp.float32) for k in _SOFT_KEYS}
  dE_VD = None
  if n > 1:
    dE_VD = sharding.constrain(jnp.zeros((table_VD.shape[0], D), jnp.float32), ('vocab', None))
  (totals, dE_VD), dx_nBCD = lm_head.scan_chunks(body, (zeros, dE_VD), xs, n)
  res = (dx_nBCD, dE_VD, x_nBCD, targets_nBC, weights_nBC, jnp.zeros((0,), table_VD.dtype))
  return (weighted_objective(totals, coefs), totals), res


def _soft_objective_bwd(coefs, res, g):
  """g: the objective's cotangent (the sums are values: soft_target_loss stops their
  gradient)."""
  dx_nBCD, dE_VD, x_nBCD, targets_nBC, weights_nBC, table_dtype = res
  g_obj = g[0]
  D = x_nBCD.shape[-1]
  # the hard term's one-hot part: row target of dE loses c_hard w x (lm_head's _sums_bwd)
  if coefs[1]:
    w_nBC = weights_nBC.astype(jnp.float32) * coefs[1]
    rows_TD = (x_nBCD.astype(jnp.float32) * w_nBC[..., None]).reshape(-1, D)
    dE_VD = dE_VD.at[targets_nBC.reshape(-1)].add(-rows_TD)
  return ((g_obj * dx_nBCD).astype(x_nBCD.dtype), (g_obj * dE_VD).astype(table_dtype.dtype),
          None, None, None, None)


_soft_objective_nBC.defvjp(_soft_objective_fwd, _soft_objective_bwd)


def soft_target_loss(x_BLD, embedding_VD, ids_BLK, q_BLK, targets_BL, weights_BL, *,
                     soft: float, hard: float = 0.0, z_loss: float = 0.0, chunk_size: int
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(objective, sums): soft_target_sums' sums as values (no gradient) and objective = soft *
  soft_sum + hard * loss_sum + z_loss * z_loss_sum, differentiated with a fused gradient: the
  forward pass under differentiation writes each chunk's e = exp(logits - max) once, folds
  the soft targets into it with a scatter and runs ce's two gradient matmuls on it (no
  recompute of the logits, no [B, C, V] gradient of a log-softmax). soft, hard >= 0 (a
  distillation loss's weights). Gradients flow to x_BLD and embedding_VD."""
  if soft < 0 or hard < 0:
    raise ValueError(f'soft_target_loss: soft={soft}, hard={hard}: expected >= 0')
  x_nBCD, ids_nBCK, q_nBCK, targets_nBC, weights_nBC = lm_head.chunks(
      chunk_size, x_BLD, ids_BLK, q_BLK, targets_BL, weights_BL)
  objective, sums = _soft_objective_nBC(x_nBCD, embedding_VD, ids_nBCK, q_nBCK, targets_nBC,
                                        weights_nBC, (float(soft), float(hard), float(z_loss)))
  return objective, jax.lax.stop_gradient(sums)


def kl_sums(x_BLD, embedding_VD, teacher_x_BLD, teacher_VD, targets_BL, weights_BL, *,
            temperature: float, chunk_size: int, z_loss: float = 0.0) -> dict[str, jax.Array]:
  """chunked_cross_entropy's sums of the hard targets plus soft_sum = sum over positions of
  w * KL(p_teacher || p) over the whole vocabulary (p_teacher = softmax(teacher logits /
  temperature)), chunk by chunk: no [B, L, V] logits of either model. The teacher's inputs
  are not differentiated; gradients flow to x_BLD and embedding_VD."""
  teacher_x_BLD = jax.lax.stop_gradient(teacher_x_BLD)
  teacher_VD = jax.lax.stop_gradient(teacher_VD)

  def chunk(x_BCD, tx_BCD, targets_BC, weights_BC):
    logits_BCV = lm_head.chunk_logits(x_BCD, embedding_VD)
    sums, lse_BC = _hard_sums(logits_BCV, targets_BC, weights_BC, z_loss)
    logp_BCV = jax.nn.log_softmax(lm_head.chunk_logits(tx_BCD, teacher_VD) / temperature, axis=-1)
    kl_BC = jnp.sum(jnp.exp(logp_BCV) * (logp_BCV - logits_BCV + lse_BC[..., None]), axis=-1)
    return {**sums, 'soft_sum': jnp.sum(weights_BC.astype(jnp.float32) * kl_BC)}
  return _soft_scan(chunk, (x_BLD, teacher_x_BLD, targets_BL, weights_BL), chunk_size)
