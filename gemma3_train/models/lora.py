"""LoRA adapters and the frozen, optionally int8-quantized base.

A projection y = x W (W contracted over its input axes) with an adapter computes
y = x W + (x A) B * alpha / rank, A [in..., r] ~ normal(0, 1/in), B [r, out...] = 0, so that the
adapted model starts equal to its base (PEFT's LoRA, scaling alpha / r, no rsLoRA; lora.dropout
drops the adapter's input x in training steps only, see set_dropout). Adapters are
`LoraParam`s, a subclass of nnx.Param, added to the Attention and MLP modules after construction
(`adapt`): inside the scanned blocks they are stacked like the weights they adapt and carry
logical axes ('lora_rank' is replicated), so they shard and remat like everything else. The train
state then splits the model in two (training/frozen.py): the trainable LoraParams, and the frozen
'base' (everything else).

Base storage (lora.base_dtype): float32 or bfloat16 casts every base parameter; int8 stores the
seven projection matrices as int8 with one float32 scale per output channel (symmetric absmax over
the input axes, `<weight>_scale` QuantScale variables) and the rest (embedding, norms) in bfloat16;
a weight is dequantized (int8 * scale, in the compute dtype) where its matmul reads it; the int8
math is models/quant.py's. With quant.qat, einsum fake-quantizes the weight it reads, the
adapters merged in first (docs/quantization.md).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.models import quant

# target -> (module attribute holding the weight, the weight's input (contracted) axes).
# Outputs are the other axes; A is [in..., r], B [r, out...], both in the weight's axis order.
TARGETS = {'q': ('q_einsum', (1,)), 'k': ('k_einsum', (1,)), 'v': ('v_einsum', (1,)),
           'o': ('attn_vec_einsum', (0, 1)), 'gate': ('gate', (1,)), 'up': ('up', (1,)),
           'down': ('linear', (0,))}
WEIGHT_TARGET = {w: t for t, (w, _) in TARGETS.items()}
RANK_AXIS = 'lora_rank'


class LoraParam(nnx.Param):
  """A trainable parameter of a LoRA run (adapters; the embedding with lora.train_embedding)."""


class QuantScale(nnx.Variable):
  """The per-output-channel float32 scale of an int8 base weight."""


TRAINABLE = LoraParam
FROZEN = nnx.Not(LoraParam)


def scaling(r: config_lib.LoraConfig) -> float:
  return r.alpha / r.rank


class Adapter(nnx.Module):
  """A [lead..., in..., r] and B [lead..., r, out...] of one projection (lead: the scan axis)."""

  def __init__(self, a, b, a_names, b_names, scale: float):
    self.a = LoraParam(a, logical_axes=a_names)
    self.b = LoraParam(b, logical_axes=b_names)
    self.scale = scale

  def __call__(self, eq: str, x, dtype):
    """(x A) B * scale for the weight einsum `eq` (e.g. 'BLD,NDH->BLNH')."""
    ins, out = eq.split('->')
    xs, ws = ins.split(',')
    contracted = ''.join(ch for ch in ws if ch not in out)
    kept = ''.join(ch for ch in ws if ch in out)
    batch = ''.join(ch for ch in xs if ch in out)
    key = getattr(self, 'dropout_key', None)
    if key is not None:  # training with lora.dropout: set_dropout put a key here
      keep = 1.0 - self.dropout_rate
      mask = jax.random.bernoulli(key.get_value(), keep, x.shape)
      x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
    h = jnp.einsum(f'{xs},{contracted}r->{batch}r', x, self.a[...].astype(dtype))
    y = jnp.einsum(f'{batch}r,r{kept}->{out}', h, self.b[...].astype(dtype))
    return y * jnp.asarray(self.scale, dtype)

  def delta(self, ws: str, in_axes: tuple[int, ...]):
    """B A * scale in float32 in the weight's axis order `ws` (e.g. 'NDH', inputs at in_axes):
    the update a QAT forward merges before it quantizes."""
    ins = ''.join(ws[i] for i in in_axes)
    outs = ''.join(ch for ch in ws if ch not in ins)
    d = jnp.einsum(f'{ins}r,r{outs}->{ws}', self.a[...].astype(jnp.float32),
                   self.b[...].astype(jnp.float32))
    return d * jnp.float32(self.scale)


class DropoutKey(nnx.Variable):
  """One train step's dropout key of one adapter (one per layer when stacked in the blocks)."""


def set_dropout(model: nnx.Module, key: jax.Array, rate: float) -> None:
  """Dropout on every adapter's input (PEFT's lora_dropout: x -> dropout -> A -> B; each
  adapter its own mask), for this model object only: a train step calls it on the model it
  merges; eval, the sampler and export never do, so they run without dropout. Each adapter's
  key is `key` folded with its index in the graph, split per block when stacked, so that every
  layer and projection draws its own mask."""
  adapters = [(tuple(path), node) for path, node in nnx.iter_graph(model)
              if isinstance(node, Adapter)]
  for i, (path, adapter) in enumerate(adapters):
    k = jax.random.fold_in(key, i)
    if _stacked(path):
      k = jax.random.split(k, adapter.a.shape[0])
    adapter.dropout_key = DropoutKey(k)
    adapter.dropout_rate = rate


def einsum(eq: str, x, module: nnx.Module, weight: str, dtype, adapter_eq: str | None = None):
  """x times module.<weight> by `eq`: dequantized when int8, plus its adapter's term if any
  (by adapter_eq, the einsum of the weight as stored, when `eq` reads a relaid-out weight).

  Without quantization and adapter this is jnp.einsum(eq, x, W.astype(dtype)), unchanged.
  """
  w = getattr(module, weight)[...]
  scale = getattr(module, f'{weight}_scale', None)
  adapter = getattr(module, f'{WEIGHT_TARGET[weight]}_lora', None)
  mode = getattr(module, 'qat', '')
  if mode:  # QAT: the (merged) weight fake-quantized in its stored layout (quant.apply)
    return jnp.einsum(eq, x, _qat_weight(w, scale, adapter, eq, adapter_eq or eq, weight, mode)
                      .astype(dtype))
  w = w.astype(dtype) if scale is None else quant.channel_dequantize(w, scale[...], dtype)
  y = jnp.einsum(eq, x, w)
  if adapter is not None:
    y = y + adapter(adapter_eq or eq, x, dtype)
  return y


def _qat_weight(w, scale, adapter, eq: str, stored_eq: str, weight: str, mode: str):
  """The float32 weight a QAT forward multiplies by: (W, dequantized when int8, + B A * s when
  adapted), fake-quantized along its input axes in the stored axis order (which a sampler's
  swapped layout `eq` is transposed to and back), so that an export of the merged weights
  quantizes to these same numbers."""
  spec = lambda e: e.split('->')[0].split(',')[1]
  w = w.astype(jnp.float32) if scale is None else quant.channel_dequantize(w, scale[...])
  if spec(eq) != spec(stored_eq):
    w = jnp.einsum(f'{spec(eq)}->{spec(stored_eq)}', w)
  in_axes = TARGETS[WEIGHT_TARGET[weight]][1]
  if adapter is not None:
    w = w + adapter.delta(spec(stored_eq), in_axes)
  w = quant.fake_quant(w, in_axes, mode)
  if spec(eq) != spec(stored_eq):
    w = jnp.einsum(f'{spec(stored_eq)}->{spec(eq)}', w)
  return w


# --- building the adapted model ------------------------------------------------


def _split_axes(shape, names, in_axes, lead: int):
  """(in shape, in names, out shape, out names) of a weight with `lead` stacked axes."""
  in_axes = tuple(lead + a for a in in_axes)
  out_axes = tuple(a for a in range(lead, len(shape)) if a not in in_axes)
  pick = lambda seq, axes: tuple(seq[a] for a in axes)
  return (pick(shape, in_axes), pick(names, in_axes), pick(shape, out_axes),
          pick(names, out_axes))


def quantize(w, in_axes: tuple[int, ...]):
  """(int8 weight, float32 scale with size-1 input axes): quant.py's int8 per output channel."""
  return quant.channel_quantize(w, in_axes, bits=8)


def _stacked(path: tuple) -> int:
  """1 when the variable at this state path lives in the scanned blocks (a leading axis)."""
  return 1 if path and path[0] == 'blocks' else 0


def weight_in_axes(path: tuple) -> tuple[int, ...]:
  """The input axes of the projection weight at this state path, stacked axis included."""
  name = str(path[-1]).removesuffix('_scale')
  return tuple(_stacked(path) + a for a in TARGETS[WEIGHT_TARGET[name]][1])


def _projection_modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module, str]]:
  """(path, module, weight attribute) of every projection weight in the model."""
  found = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      for weight in WEIGHT_TARGET:
        if isinstance(getattr(node, weight, None), nnx.Param):
          found.append((tuple(path), node, weight))
  return found


def base_dtype(r: config_lib.LoraConfig) -> Any:
  """The storage dtype of the frozen base's float weights (int8 keeps the rest in bfloat16)."""
  return jnp.bfloat16 if r.base_dtype in ('bfloat16', 'int8') else jnp.float32


def adapt(model: nnx.Module, c: config_lib.Config) -> nnx.Module:
  """Adds adapters (c.lora.targets) and converts the base to c.lora.base_dtype, in place."""
  r = c.lora
  key = jax.random.fold_in(jax.random.key(c.train.seed), 0x10AA)
  storage = base_dtype(r)
  projections = _projection_modules(model)
  for _, var in nnx.iter_graph(model):  # every base parameter in the storage dtype
    if isinstance(var, nnx.Param) and not isinstance(var, LoraParam):
      var.set_value(var.get_value().astype(storage))
  pdt = jnp.dtype(c.model.param_dtype)
  targets = r.target_list()
  for i, (path, module, weight) in enumerate(projections):
    var = getattr(module, weight)
    names = tuple(var.get_metadata()['logical_axes'])
    lead = 1 if names[0] == 'layers' else 0
    target = WEIGHT_TARGET[weight]
    if target in targets:
      in_shape, in_names, out_shape, out_names = _split_axes(
          var.shape, names, TARGETS[target][1], lead)
      lead_shape, lead_names = var.shape[:lead], names[:lead]
      fan_in = int(np.prod(in_shape))
      a = jax.random.normal(jax.random.fold_in(key, i), lead_shape + in_shape + (r.rank,),
                            jnp.float32) * fan_in ** -0.5
      b = jnp.zeros(lead_shape + (r.rank,) + out_shape, pdt)
      setattr(module, f'{target}_lora', Adapter(
          a.astype(pdt), b, lead_names + in_names + (RANK_AXIS,),
          lead_names + (RANK_AXIS,) + out_names, scaling(r)))
  if r.base_dtype == 'int8':
    quantize_projections(model)
  if r.train_embedding:
    emb = model.embedder.embedding
    model.embedder.embedding = LoraParam(emb.get_value().astype(pdt), **emb.get_metadata())
  return model


def quantize_projections(model: nnx.Module) -> nnx.Module:
  """Stores the seven projection matrices as int8 with a per-output-channel QuantScale, in place
  (a QLoRA base, or a frozen model held in int8: training/frozen.py); the rest is unchanged."""
  for _, module, weight in _projection_modules(model):
    var = getattr(module, weight)
    names = tuple(var.get_metadata()['logical_axes'])
    lead = 1 if names[0] == 'layers' else 0
    in_axes = tuple(lead + a for a in TARGETS[WEIGHT_TARGET[weight]][1])
    q, scale = quantize(var.get_value(), in_axes)
    var.set_value(q)
    setattr(module, f'{weight}_scale', QuantScale(scale, logical_axes=names))
  return model


# --- the base from loaded weights ----------------------------------------------


# Jitted once per (dtype | axes, sharding): leaves of the same shape then share one compile.
@functools.lru_cache(maxsize=None)
def _cast_fn(dtype, sharding):
  return jax.jit(lambda w: w.astype(dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _quantize_fn(in_axes: tuple[int, ...], part: int, sharding):
  return jax.jit(lambda w: quantize(w, in_axes)[part], out_shardings=sharding)


def cast(w, dtype, sharding):
  """w in dtype, placed in sharding (one compile per dtype and sharding)."""
  return _cast_fn(jnp.dtype(dtype), sharding)(w)


def base_from_params(params: nnx.State, abstract_base: nnx.State) -> nnx.State:
  """Loaded (float) params -> the base as abstract_base stores it, one leaf at a time (int8
  weights quantized on their devices, into their shardings)."""
  loaded = {path: var.get_value() for path, var in nnx.to_flat_state(params)}
  flat = []
  for path, var in nnx.to_flat_state(abstract_base):
    a = var.get_value()
    sharding = getattr(a, 'sharding', None)
    if isinstance(var, QuantScale) or a.dtype == jnp.int8:
      name = str(path[-1]).removesuffix('_scale')
      part = 1 if isinstance(var, QuantScale) else 0
      fn = _quantize_fn(weight_in_axes(path), part, sharding)
      value = fn(loaded[path[:-1] + (name,)])
    else:
      value = cast(loaded[path], a.dtype, sharding)
    flat.append((path, var.replace(value)))
  return nnx.from_flat_state(flat)
