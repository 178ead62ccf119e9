"""Attention kernels with one mask semantics, chosen by ModelConfig.attention_impl.

A query at position q sees a key at position k when both are in the same segment and
k <= q (causal), and on sliding-window (local) layers also q - W < k: W keys including itself
(Gemma 3's sliding_window counts the query's own key). Kernels that take an inclusive left
distance get W - 1.

The reference works on *positions*; the cudnn and splash kernels work on *indices* within the
row. The two agree for packed rows whose positions count up by one inside each segment, which is
what the data pipeline produces. Segment 0 (padding) is treated as one more segment, so no row of
the mask is empty; padded outputs are garbage that the loss mask ignores.

Image blocks (Gemma 3's vision path): each contiguous run of image placeholder tokens in a row is
one block (image_blocks numbers them 1, 2, ... per row; 0 = text), and the tokens of one block see
each other in both directions. As Hugging Face composes it (create_masks_for_vision_model):
global layers allow same segment AND (causal OR same block); local layers same segment AND
window AND (causal OR same block), so a block wider than the window loses its far past keys on
local layers but keeps all its future ones. Splash cannot take such a data-dependent mask:
with image blocks, resolve() turns splash into the reference; cudnn gets the explicit mask.

Queries arrive already scaled (by query_pre_attn_scalar ** -0.5), so every kernel uses scale 1.
Shapes: q [B, T, N, H], k and v [B, S, K, H] with N = K * G; query head n uses kv head n // G.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma3_train import sharding

log = logging.getLogger(__name__)

MASK_VALUE = -2.3819763e38  # the gemma library's K_MASK: large but finite, so no inf - inf NaNs
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's flash attention takes


def image_blocks(tokens_BL: jax.Array, placeholder_id: int) -> jax.Array:
  """int32 [B, L]: 0 on text, k on the k-th contiguous run of placeholder tokens of the row."""
  is_image_BL = tokens_BL == placeholder_id
  prev_BL = jnp.pad(is_image_BL[:, :-1], ((0, 0), (1, 0)))
  starts_BL = (is_image_BL & ~prev_BL).astype(jnp.int32)
  return jnp.where(is_image_BL, jnp.cumsum(starts_BL, axis=1), 0).astype(jnp.int32)


def make_mask(positions_BL: jax.Array, segment_ids_BL: jax.Array, window: int | None,
              image_blocks_BL: jax.Array | None = None) -> jax.Array:
  """Boolean [B, T, S] mask: same segment, causal on positions (or the same image block), and
  the window if given."""
  return cross_mask(positions_BL, segment_ids_BL, positions_BL, segment_ids_BL, window,
                    image_blocks_BL, image_blocks_BL)


def cross_mask(q_positions_BT, q_segments_BT, k_positions_BS, k_segments_BS,
               window: int | None, q_blocks_BT=None, k_blocks_BS=None) -> jax.Array:
  """make_mask between T queries and S other keys (context parallelism: a shard's queries
  against gathered or halo keys), each side with its own positions, segments and blocks."""
  q_BT1 = q_positions_BT[:, :, None]
  k_B1S = k_positions_BS[:, None, :]
  visible_BTS = k_B1S <= q_BT1
  if q_blocks_BT is not None:
    block_BT1 = q_blocks_BT[:, :, None]
    visible_BTS |= (block_BT1 == k_blocks_BS[:, None, :]) & (block_BT1 > 0)
  mask_BTS = (q_segments_BT[:, :, None] == k_segments_BS[:, None, :]) & visible_BTS
  if window is not None:
    mask_BTS &= k_B1S > q_BT1 - window
  return mask_BTS


def reference(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """Einsum attention with an explicit mask; logits and softmax in float32."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  logits_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def dot_product(q_BTNH, k_BSKH, v_BSKH, segment_ids_BL, window: int | None,
                implementation: str = 'cudnn', positions_BL=None, image_blocks_BL=None):
  """jax.nn.dot_product_attention (cuDNN flash attention on GPU) with our mask semantics.

  implementation='xla' runs the same arguments on any backend; tests use it to check the
  window translation (W keys including self -> left window W - 1). With image blocks the
  kernel gets the explicit make_mask (no causal flag, no window argument).
  """
  if image_blocks_BL is not None:
    mask_BTS = make_mask(positions_BL, segment_ids_BL, window, image_blocks_BL)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None],
                                        scale=1.0, implementation=implementation)
  mask_B1TS = (segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :])
  return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, scale=1.0, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)


def _splash_kernel(T: int, G: int, window: int | None, block: int, interpret: bool):
  """A single-device splash MQA kernel over G query heads sharing one kv head."""
  # Imported here: Pallas's TPU kernels load Mosaic, which only attention_impl='splash' needs.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as mask_lib)
  if window is None:
    one = mask_lib.CausalMask((T, T))
  else:
    # LocalMask keeps q - left <= k <= q + right (indices); left = W - 1 gives W keys.
    one = mask_lib.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
  blocks = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mqa_single_device(
      mask_lib.MultiHeadMask([one] * G), block_sizes=blocks, interpret=interpret), splash


# The splash kernel's blocks are multiples of this (its compute blocks: "bkv_compute must be a
# multiple of 128" on TPU).
SPLASH_ALIGN = 128


def splash_fits(T: int, block_size: int) -> bool:
  """Whether splash can run a length-T sequence with block_size (a shorter T is one block)."""
  block = min(block_size, T)
  return T % block == 0 and block % SPLASH_ALIGN == 0


def splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BL, window: int | None, *,
           block_size: int = 512, interpret: bool = False):
  """Pallas splash attention (TPU; interpret=True runs anywhere, slowly).

  One MQA kernel per (row, kv head), vmapped. Under an active mesh (sharding.use_mesh) the
  kernel runs inside shard_map with rows on the batch axes and kv heads on the tensor axis.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  block = min(block_size, T)
  if T % block:
    raise ValueError(f'model.attention_block_size={block_size}: splash attention needs a block '
                     f'size dividing the sequence length {T}')
  kernel, splash_lib = _splash_kernel(T, G, window, block, interpret)
  q_BKGTH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)

  def run(q_BKGTH, k_BKSH, v_BKSH, seg_BL):
    def one_row(q_KGTH, k_KSH, v_KSH, seg_L):
      ids = splash_lib.SegmentIds(q=seg_L, kv=seg_L)
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGTH, k_KSH, v_KSH)
    return jax.vmap(one_row)(q_BKGTH, k_BKSH, v_BKSH, seg_BL)

  context = sharding.active()
  if context is not None:
    mesh, rules = context
    batch, heads = sharding.logical_to_spec(('act_batch', 'act_kv_heads'), rules, (B, K), mesh)
    spec_q = P(batch, heads, None, None, None)
    spec_kv = P(batch, heads, None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, P(batch, None)),
                        out_specs=spec_q, check_vma=False)
  out_BKGTH = run(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BL)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def target_platform() -> str:
  """The platform being compiled for: the active mesh's devices (a TPU topology when compiling
  ahead of time on a CPU host), else the default backend."""
  context = sharding.active()
  if context is not None:
    return context[0].devices.flat[0].platform
  return jax.default_backend()


_LOGGED_IMAGE_FALLBACK = []


def resolve(impl: str, dtype, images: bool = False) -> str:
  """'auto' -> splash on TPU, cudnn on GPU with 16-bit compute, else the reference.

  With image blocks (images=True), splash (chosen or named) becomes the reference: its mask is
  static and cannot depend on where a row's images are. Logged once per process.
  """
  if images:
    chosen = resolve(impl, dtype)
    if chosen != 'splash':
      return chosen
    if not _LOGGED_IMAGE_FALLBACK:
      _LOGGED_IMAGE_FALLBACK.append(True)
      log.info('attention: rows with images need a data-dependent mask that splash cannot '
               'express; using the reference (einsum) attention instead')
    return 'reference'
  if impl != 'auto':
    return impl
  backend = target_platform()
  if backend == 'tpu':
    return 'splash'
  if backend == 'gpu' and jnp.dtype(dtype) in CUDNN_DTYPES:
    return 'cudnn'
  return 'reference'


def attend(q_BTNH, k_BSKH, v_BSKH, positions_BL, segment_ids_BL, *, window: int | None,
           impl: str, block_size: int = 512, image_blocks_BL=None):
  """Dispatches to the implementation named by ModelConfig.attention_impl; image_blocks_BL
  (image_blocks of the tokens) adds the bidirectional image blocks."""
  impl = resolve(impl, q_BTNH.dtype, images=image_blocks_BL is not None)
  if impl == 'reference':
    return reference(q_BTNH, k_BSKH, v_BSKH,
                     make_mask(positions_BL, segment_ids_BL, window, image_blocks_BL))
  if impl == 'cudnn':
    return dot_product(q_BTNH, k_BSKH, v_BSKH, segment_ids_BL, window, 'cudnn', positions_BL,
                       image_blocks_BL)
  if impl == 'splash':
    # Off TPU the Pallas kernel can only be interpreted (slow; for tests).
    return splash(q_BTNH, k_BSKH, v_BSKH, segment_ids_BL, window, block_size=block_size,
                  interpret=target_platform() != 'tpu')
  raise ValueError(f'model.attention_impl={impl!r}: expected reference | cudnn | splash | auto')

