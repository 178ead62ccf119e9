"""Weight quantization, in one place: int8 / int4 per output channel, llama.cpp's Q8_0 / Q4_0
blocks, and the fake quantization that quantization-aware training (quant.qat) runs through.

A weight is quantized along its input (contracted) axes. Per channel: one float32 scale per
output channel, symmetric absmax (int8: absmax / 127 in [-127, 127]; int4: absmax / 7 in
[-7, 7]). Blocks (GGUF's Q8_0 and Q4_0, ggml-quants.c's reference quantizers): the input axes are
flattened in the order a Hugging Face [out, in] matrix has them (llama.cpp's rows), cut into
blocks of 32, and each block gets one float16 scale d:

  Q8_0  d = absmax / 127, q = round-half-away(x / d) in [-127, 127], x' = q * fp16(d)
  Q4_0  d = m / -8 with m the block's value of largest magnitude (its sign kept),
        q = min(15, trunc(x / d + 8.5)) in [0, 15], x' = (q - 8) * fp16(d)

q is computed with the float32 d and the value with d rounded to float16, as ggml does, so that
`dequantized` gives bit for bit what llama.cpp (and transformers' GGUF loader) read back from a
file that convert/gguf.py writes. Fake quantization returns those float32 numbers in the forward
pass and passes the gradient straight through (the identity) to the float weight.

Not qwix: qwix (installable here) quantizes by intercepting jax ops with symmetric int
quantizers; it has no Q4_0 (the signed-max, offset-by-8 block with a float16 scale), and the
numbers a GGUF file holds must be these exactly (docs/quantization.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

QK = 32  # the block length of Q8_0 and Q4_0
CHANNEL_BITS = {'int8': 8, 'int4_channel': 4}
BLOCK_MODES = ('q8_0', 'q4_0')
MODES = ('int8', 'int4_channel', 'q8_0', 'q4_0')


def channel_quantize(w, in_axes: tuple[int, ...], bits: int = 8):
  """(int8 values, float32 scale with size-1 input axes): symmetric absmax per output channel."""
  qmax = 2 ** (bits - 1) - 1
  w32 = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
  return jnp.clip(jnp.round(w32 / scale), -qmax, qmax).astype(jnp.int8), scale


def channel_dequantize(q, scale, dtype=jnp.float32):
  return q.astype(dtype) * scale.astype(dtype)


def to_rows(w, in_axes: tuple[int, ...]):
  """w with its input axes moved last and flattened: [out..., in] (a HF matrix's row layout)."""
  out_axes = [a for a in range(w.ndim) if a not in in_axes]
  rows = jnp.transpose(w, out_axes + list(in_axes))
  return rows.reshape(rows.shape[:len(out_axes)] + (-1,))


def from_rows(rows, shape: tuple[int, ...], in_axes: tuple[int, ...]):
  """The inverse of to_rows for a weight of `shape`."""
  out_axes = [a for a in range(len(shape)) if a not in in_axes]
  moved = rows.reshape(tuple(shape[a] for a in out_axes) + tuple(shape[a] for a in in_axes))
  order = out_axes + list(in_axes)
  return jnp.transpose(moved, [order.index(a) for a in range(len(shape))])


def _round_half_away(x):
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def block_quantize(rows, kind: str):
  """rows [..., n] (n a multiple of 32) -> (q int8 [..., n/32, 32], d float16 [..., n/32, 1]).
  Q8_0's q is signed; Q4_0's is the stored nibble, 0..15 (the value is q - 8)."""
  if rows.shape[-1] % QK:
    raise ValueError(f'{kind}: rows of {rows.shape[-1]} values, expected a multiple of {QK}')
  x = rows.astype(jnp.float32).reshape(rows.shape[:-1] + (-1, QK))
  if kind == 'q8_0':
    d = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
    q = _round_half_away(x * inv)
  elif kind == 'q4_0':
    i = jnp.argmax(jnp.abs(x), axis=-1, keepdims=True)
    d = jnp.take_along_axis(x, i, axis=-1) / -8.0
    inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
    q = jnp.minimum(15.0, jnp.trunc(x * inv + 8.5))
  else:
    raise ValueError(f'block kind {kind!r}: expected one of {", ".join(BLOCK_MODES)}')
  return q.astype(jnp.int8), d.astype(jnp.float16)


def block_dequantize(q, d, kind: str):
  """(q, d) of block_quantize -> float32 rows [..., n]."""
  values = q.astype(jnp.float32) - (8.0 if kind == 'q4_0' else 0.0)
  x = values * d.astype(jnp.float32)
  return x.reshape(x.shape[:-2] + (-1,))


def dequantized(w, in_axes: tuple[int, ...], mode: str):
  """The float32 numbers `mode` turns w into (quantize, then dequantize), in w's shape."""
  if mode in CHANNEL_BITS:
    return channel_dequantize(*channel_quantize(w, in_axes, CHANNEL_BITS[mode]))
  if mode in BLOCK_MODES:
    rows = block_dequantize(*block_quantize(to_rows(w, in_axes), mode), mode)
    return from_rows(rows, w.shape, in_axes)
  raise ValueError(f'quantization {mode!r}: expected one of {" | ".join(MODES)}')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant(w, in_axes: tuple[int, ...], mode: str):
  """dequantized(w) (float32) in the forward pass; the gradient passes straight through to w."""
  return dequantized(w, in_axes, mode)


def _fake_quant_fwd(w, in_axes, mode):
  return dequantized(w, in_axes, mode), jnp.zeros((), w.dtype)


def _fake_quant_bwd(in_axes, mode, like, g):
  del in_axes, mode
  return (g.astype(like.dtype),)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def check_rows(mode: str, name: str, in_size: int) -> str | None:
  """Why a weight whose rows hold in_size values cannot take `mode` (None when it can)."""
  if mode in BLOCK_MODES and in_size % QK:
    return f'{name} has rows of {in_size} values; {mode} needs a multiple of {QK}'
  return None
