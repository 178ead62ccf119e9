"""The splash kernel (TPU) inside the context shard_map (models/context.py).

The masks are static and work on indices; segment ids carry packing and everything that
depends on the data or the shard (attention.py's module doc: indices and positions agree when
positions count up by one inside each segment).

Local layers: queries are one chunk of C, keys are `pad` unused keys, the `before` = W - 1
halo keys and the chunk itself, so query i sits at key index i + pad + before and
LocalMask(window (W - 1, 0), offset pad + before) keeps exactly its W keys. The same mask
serves every shard; the pad (a block multiple for the kernel's grid) and the halo keys off
the sequence's start get segment -1, which no query has.

Global layers: all shards' queries form one [L, L] mask whose rows are in the layout's order
(shard s: its chunks ids_SM[s]) and whose keys are in sequence order (the gathered K/V
reordered by chunk). Each row carries its sequence position (the mask's q_sequence), so the
mask is causal on positions, and the kernel is built with q_seq_shards = c: shard s runs rows
s T .. (s + 1) T with the block-sparsity of its own rows, so the balanced layout's two chunks
skip the masked blocks like the whole-row kernel does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
# Pallas's TPU kernels load Mosaic lazily; importing the modules is cheap on any backend.
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

NO_SEGMENT = -1  # kv segment id of keys no query may see (padding, before the sequence)


class LayoutCausalMask(mask_lib._ComputableMask):  # pylint: disable=protected-access
  """Causal on sequence positions for query rows in any order (q_positions, one per row)
  against keys in sequence order."""

  def __init__(self, q_positions: np.ndarray, kv_len: int):
    super().__init__((len(q_positions), kv_len), lambda q_ids, kv_ids: q_ids >= kv_ids)
    self.q_sequence = np.asarray(q_positions, np.int32)

  def __eq__(self, other: object):
    return (isinstance(other, LayoutCausalMask) and self.shape == other.shape
            and np.array_equal(self.q_sequence, other.q_sequence))

  def __hash__(self):
    return hash((LayoutCausalMask, self.shape, self.q_sequence.tobytes()))


def layout_positions(ids_SM: np.ndarray, C: int) -> np.ndarray:
  """[c m C] the sequence position of each row of the layout (shard-major, then slot)."""
  return (ids_SM.reshape(-1)[:, None] * C + np.arange(C)).reshape(-1)


def global_mask(ids_SM: np.ndarray, C: int) -> LayoutCausalMask:
  positions = layout_positions(ids_SM, C)
  return LayoutCausalMask(positions, positions.size)


def local_mask(C: int, pad: int, before: int, window: int) -> mask_lib.LocalMask:
  """[C, pad + before + C]: query i at key index i + pad + before sees its W = window keys."""
  return mask_lib.LocalMask((C, pad + before + C), window_size=(window - 1, 0),
                            offset=pad + before)


def dense(mask: mask_lib.Mask) -> np.ndarray:
  """The mask as a boolean array (for tests)."""
  return np.asarray(mask[slice(None), slice(None)])


def _blocks(block: int) -> splash.BlockSizes:
  return splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def block_for(block_size: int, C: int) -> int:
  """The kernel's block: block_size, or C if that is shorter; it must divide a chunk."""
  block = min(block_size, C)
  if C % block:
    raise ValueError(f'model.attention_block_size={block_size}: splash attention under '
                     f'context parallelism needs a block dividing the chunk length {C}')
  return block


@functools.lru_cache(maxsize=32)
def _global_kernel(ids_key: bytes, shape: tuple[int, int], C: int, G: int, block: int,
                   interpret: bool):
  ids_SM = np.frombuffer(ids_key, np.int64).reshape(shape)
  mask = mask_lib.MultiHeadMask([global_mask(ids_SM, C)] * G)
  return splash.make_splash_mqa(mask, block_sizes=_blocks(block), head_shards=1,
                                q_seq_shards=shape[0], interpret=interpret)


def global_kernel(ids_SM: np.ndarray, C: int, G: int, block: int, interpret: bool):
  """The MQA kernel of a global layer over G query heads, for all c shards (q_seq_shards c):
  pass it through shard_map with global_kernel_spec."""
  ids = np.asarray(ids_SM, np.int64)
  return _global_kernel(ids.tobytes(), ids.shape, C, G, block, interpret)


def global_kernel_spec(kernel, mesh, axes):
  """shard_map in_spec of the kernel: its block masks split by query rows over `axes`."""
  return kernel.manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axes)))


@functools.lru_cache(maxsize=32)
def local_kernel(C: int, pad: int, before: int, window: int, G: int, block: int,
                 interpret: bool):
  mask = mask_lib.MultiHeadMask([local_mask(C, pad, before, window)] * G)
  return splash.make_splash_mqa_single_device(mask, block_sizes=_blocks(block),
                                              interpret=interpret)


def local_kv_segments(seg_BS, valid_BS, pad: int):
  """[B, pad + S] kv segment ids of a chunk's halo keys: NO_SEGMENT on the pad and off the
  sequence's start."""
  seg_BS = jnp.where(valid_BS, seg_BS, NO_SEGMENT)
  return jnp.pad(seg_BS, ((0, 0), (pad, 0)), constant_values=NO_SEGMENT)


def pad_keys(x_BS, pad: int):
  """[B, S, ...] -> [B, pad + S, ...] with zeros in front."""
  return jnp.pad(x_BS, ((0, 0), (pad, 0)) + ((0, 0),) * (x_BS.ndim - 2))


def run(kernel, q_BTNH, k_BSKH, v_BSKH, qseg_BT, kseg_BS):
  """The MQA kernel per (row, kv head): q [B, T, N, H], k and v [B, S, K, H]."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)

  def one_row(q_KGTH, k_KSH, v_KSH, qseg_T, kseg_S):
    ids = splash.SegmentIds(q=qseg_T, kv=kseg_S)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGTH, k_KSH, v_KSH)
  out_BKGTH = jax.vmap(one_row)(q_BKGTH, k_BKSH, v_BKSH, qseg_BT, kseg_BS)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
