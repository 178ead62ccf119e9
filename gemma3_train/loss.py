"""Next-token cross-entropy over the tied embedding, in sequence chunks.

With a 262k vocabulary the [B, L, V] logits are the largest tensor of a step (17 GB in fp32 for
8 x 2048), so they are never materialized: a scan walks the sequence in chunks, computes each
chunk's float32 logits from x @ embedding.T, reduces them to sums, and is rematerialized so the
backward pass recomputes one chunk at a time instead of keeping all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma3_train import sharding


def _chunk_sums(x_BCD, table_VD, targets_BC, weights_BC, z_loss: float):
  """Sums of the weighted loss, z-loss, weights and correct predictions for one chunk."""
  logits_BCV = jnp.einsum('BCD,VD->BCV', x_BCD, table_VD.astype(x_BCD.dtype),
                          preferred_element_type=jnp.float32)
  logits_BCV = sharding.constrain(logits_BCV, ('act_batch', 'act_len', 'act_vocab'))
  lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  w_BC = weights_BC.astype(jnp.float32)
  correct_BC = (jnp.argmax(logits_BCV, axis=-1) == targets_BC).astype(jnp.float32)
  z_sum = jnp.sum(w_BC * jnp.square(lse_BC)) if z_loss else jnp.zeros((), jnp.float32)
  return {'loss_sum': jnp.sum(w_BC * (lse_BC - target_BC)), 'z_loss_sum': z_sum,
          'weight_sum': jnp.sum(w_BC), 'correct_sum': jnp.sum(w_BC * correct_BC)}


def chunked_cross_entropy(x_BLD, embedding_VD, targets_BL, weights_BL, *, chunk_size: int,
                          z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Float32 sums {loss_sum, z_loss_sum, weight_sum, correct_sum}; the caller divides.

  x_BLD are the final-normed hidden states, embedding_VD the (tied) table, targets_BL the next
  tokens and weights_BL the loss mask. Chunks are chunk_size positions of every row, so the batch
  dimension keeps its sharding; a ragged last chunk is padded with weight 0. z_loss_sum is the
  unscaled sum(w * logsumexp^2), computed only when z_loss > 0 (the trainer adds
  z_loss * z_loss_sum to the objective).
  """
  B, L, D = x_BLD.shape
  if chunk_size < 1:
    raise ValueError(f'train.loss_chunk_size={chunk_size}: expected >= 1')
  C = min(chunk_size, L)
  num_chunks = -(-L // C)
  pad = num_chunks * C - L
  if pad:
    x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))
  # [B, n*C, ...] -> [n, B, C, ...]: the scan axis leads, rows stay where they are.
  x_nBCD = x_BLD.reshape(B, num_chunks, C, D).swapaxes(0, 1)
  targets_nBC = targets_BL.reshape(B, num_chunks, C).swapaxes(0, 1)
  weights_nBC = weights_BL.reshape(B, num_chunks, C).swapaxes(0, 1)

  @jax.checkpoint
  def body(totals, chunk):
    x_BCD, targets_BC, weights_BC = chunk
    sums = _chunk_sums(x_BCD, embedding_VD, targets_BC, weights_BC, z_loss)
    return jax.tree.map(jnp.add, totals, sums), None

  zero = jnp.zeros((), jnp.float32)
  totals = {'loss_sum': zero, 'z_loss_sum': zero, 'weight_sum': zero, 'correct_sum': zero}
  totals, _ = jax.lax.scan(body, totals, (x_nBCD, targets_nBC, weights_nBC))
  return totals
