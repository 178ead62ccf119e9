"""cuDNN flash attention (GPU) inside the context shard_map (models/context.py).

jax.nn.dot_product_attention takes a boolean mask and two static flags: is_causal (top-left:
query index i sees key indices <= i) and local_window_size (W - 1, 0). The flags let cuDNN skip
the masked blocks; the mask (cuDNN adds it as a bias) carries segments and whatever depends on
the data or the shard.

Local layers (text rows): the keys are `pad` unused keys, the W - 1 halo keys and the chunk of
C, and the queries are put in front of the same number of unused rows, so queries and keys
both have S = pad + W - 1 + C rows and query i of the chunk sits at index pad + W - 1 + i of
both. Causal plus the window on those indices keep exactly its W keys (the off-by-one of
docs/gemma3.md section 3), and no top-left/bottom-right alignment question arises. The mask is
[S, S] same-segment, with context_splash.NO_SEGMENT (-1) on the pad, the keys off the
sequence's start and the unused query rows; those rows' outputs are dropped. cuDNN computes about S x W of the
[S, S] logits. `pad` makes S a multiple of ALIGN (training with a bias needs even lengths).

Global layers, and local layers of rows with image blocks: the explicit mask of
attention.cross_mask on positions, no flags: the gathered keys are in the layout's order, not
the sequence's, and image blocks see ahead. cuDNN then computes every [T, L] block, twice the
causal minimum (the whole-row path skips the upper triangle); the mask is [T, L] booleans per
row, against the reference's [K, G, T, L] float32 logits.

Off GPU the same arguments run jax.nn.dot_product_attention's 'xla' implementation, which
applies the mask and flags with the same semantics: the tests check the index arithmetic so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma3_train.models import context_splash

ALIGN = 64  # S is rounded up to this: even for cuDNN's bias, and a whole number of tiles


def implementation(platform: str) -> str:
  """'cudnn' on GPU; elsewhere 'xla' (the same mask semantics, for tests on CPU)."""
  return 'cudnn' if platform == 'gpu' else 'xla'


def masked(q_BTNH, k_BSKH, v_BSKH, mask_BTS, impl: str):
  """Attention under an explicit [B, T, S] mask (no flags); S padded to ALIGN with unseen
  keys."""
  pad = -k_BSKH.shape[1] % ALIGN
  k_BSKH, v_BSKH = (context_splash.pad_keys(x, pad) for x in (k_BSKH, v_BSKH))
  mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, 0), (pad, 0)), constant_values=False)
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                      scale=1.0, implementation=impl)


def local(q_BCNH, k_BSKH, v_BSKH, qseg_BC, kseg_BS, valid_BS, window: int, impl: str):
  """A local layer's chunk of C queries against its S = W - 1 + C halo keys (the chunk's own
  keys last); valid_BS is False on keys off the sequence's start."""
  B, C, N, H = q_BCNH.shape
  S = k_BSKH.shape[1]
  pad = -S % ALIGN
  front = pad + S - C  # unused query rows before the chunk's
  # the pad and the keys off the sequence get NO_SEGMENT, as for the splash kernel's halo
  kseg_BS = context_splash.local_kv_segments(kseg_BS, valid_BS, pad)
  qseg_BS = jnp.pad(qseg_BC, ((0, 0), (front, 0)), constant_values=context_splash.NO_SEGMENT)
  k_BSKH, v_BSKH = (context_splash.pad_keys(x, pad) for x in (k_BSKH, v_BSKH))
  q_BSNH = context_splash.pad_keys(q_BCNH, front)
  same_B1SS = qseg_BS[:, None, :, None] == kseg_BS[:, None, None, :]
  out_BSNH = jax.nn.dot_product_attention(
      q_BSNH, k_BSKH, v_BSKH, mask=same_B1SS, scale=1.0, is_causal=True,
      local_window_size=(window - 1, 0), implementation=impl)
  return out_BSNH[:, front:]
