"""Gemma 3 text decoder in Flax NNX: exact (equal to Hugging Face's Gemma3ForCausalLM), scanned,
rematerialized.

Layers run as scanned blocks of six (five sliding-window layers, then one global layer) plus an
unscanned tail for the remainder; scan_layers=False keeps one module per layer and computes the
same function (layout.py maps both to the released checkpoints' layout). scan_unit='layer' runs
each block's six layers as an inner scan over single layers (docs/memory.md). Every parameter
carries `logical_axes` metadata that sharding.py maps to mesh axes; stacked block parameters carry a
leading 'layers' axis. The seven projections go through lora.einsum, which adds a LoRA run's
adapters and dequantizes an int8 base (lora.adapt installs both after construction), and with
quant.qat fake-quantizes them (set_qat marks the modules; models/quant.py).

Parameters are stored in ModelConfig.param_dtype and cast to ModelConfig.dtype for matmuls;
norms, RoPE, attention logits/softmax and the output logits run in float32. The architecture
facts (norms, embedding scale, QK-norm, RoPE, window, GeGLU) are in docs/gemma3.md sections 1-3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gemma3_train import config as config_lib
from gemma3_train.models import attention
from gemma3_train.models import context
from gemma3_train.models import layers
from gemma3_train.models import lora
from gemma3_train.models import quant
from gemma3_train.models import vision
from gemma3_train import sharding

ACT = ('act_batch', 'act_len', 'act_embed')

class Embedder(nnx.Module):
  """Token embedding scaled by sqrt(D) (rounded to the table dtype); tied output logits."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.embedding = layers.param(rngs, (cfg.vocab_size, cfg.embed_dim), cfg.embed_dim,
                            cfg.param_dtype, ('vocab', 'embed'))
    self.dtype = cfg.dtype

  def table(self):
    """The embedding table as the model reads it: fake-quantized (float32) with
    quant.embedding (quant.apply sets self.qat), else as stored."""
    mode = getattr(self, 'qat', '')
    return quant.fake_quant(self.embedding[...], (1,), mode) if mode else self.embedding[...]

  def encode(self, tokens_BL):
    table_VD = self.table()
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0)
    # As HF: sqrt(D) as a float32 tensor, cast to the weight dtype (bf16: 50.596 -> 50.5).
    scale = jnp.asarray(np.float32(x_BLD.shape[-1] ** 0.5)).astype(self.embedding.dtype)
    return (x_BLD * scale.astype(table_VD.dtype)).astype(self.dtype)

  def decode(self, x_BLD):
    table_VD = self.table().astype(self.dtype)
    logits_BLV = jnp.einsum('BLD,VD->BLV', x_BLD, table_VD, preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BLV, ('act_batch', 'act_len', 'act_vocab'))

  def decode_one(self, x_BD):
    """decode for one position per row: logits [B, V], as decode([:, None])[:, 0] computes
    them. The product is formed as [V, B] and transposed after a barrier: XLA's CPU dot that
    writes [B, V] reads the table at ~10 GB/s, the [V, B] one at ~16 (gemma3_640's 671 MB
    table at batch 8: 70 vs 40 ms, benchmarks/decode.py), and a decode step is mostly that."""
    table_VD = self.table().astype(self.dtype)
    logits_VB = jnp.einsum('VD,BD->VB', table_VD, x_BD, preferred_element_type=jnp.float32)
    logits_VB = jax.lax.optimization_barrier(logits_VB)  # else XLA folds the .T into the dot
    return sharding.constrain(logits_VB.T, ('act_batch', 'act_vocab'))


def rope_inv_freq(H: int, base: float, scale: float):
  """RoPE inverse frequencies [H / 2]: base^(-2i/H) / scale, in float32."""
  return 1.0 / (base ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H)) / scale


def apply_rope(x_BLNH, positions_BL, inv_freq):
  """Rotate-half RoPE over the full head dim; angle = pos * inv_freq (rope_inv_freq)."""
  angle_BLh = positions_BL.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  sin, cos = jnp.sin(angle_BLh)[:, :, None, :], jnp.cos(angle_BLh)[:, :, None, :]
  x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNH.dtype)


class Attention(nnx.Module):
  """GQA with QK-norm before RoPE, per-layer RoPE and window, query_pre_attn_scalar scaling.

  swapped=True (the sampler's decode loop, kv_cache.swap_projections): q_einsum and
  attn_vec_einsum (and their int8 scales) come with their two per-layer leading axes swapped,
  [D, N, H] and [H, N, D], the layouts XLA's CPU dot reads them in.

  is_global (a traced bool, model.scan_unit='layer'): one module computes a local or a global
  layer by data, as an inner scan over single layers needs; it selects the RoPE frequencies and
  runs the kernel under lax.cond (local and global layers have the same parameter shapes). None:
  the layer's own type, fixed at construction.
  """

  # einsums of (q, output projection): as stored, and swapped
  _EQS = {False: ('BLD,NDH->BLNH', 'BLNH,NHD->BLD'), True: ('BLD,DNH->BLNH', 'BLNH,HND->BLD')}

  def __init__(self, cfg: config_lib.ModelConfig, is_global: bool, *, rngs: nnx.Rngs):
    N, K, D, H = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim
    pd = cfg.param_dtype
    self.q_einsum = layers.param(rngs, (N, D, H), D, pd, ('heads', 'embed', 'head_dim'))
    self.k_einsum = layers.param(rngs, (K, D, H), D, pd, ('kv_heads', 'embed', 'head_dim'))
    self.v_einsum = layers.param(rngs, (K, D, H), D, pd, ('kv_heads', 'embed', 'head_dim'))
    self.attn_vec_einsum = layers.param(rngs, (N, H, D), N * H, pd, ('heads', 'head_dim', 'embed'))
    self.query_norm = layers.RMSNorm(H, cfg, rngs=rngs)
    self.key_norm = layers.RMSNorm(H, cfg, rngs=rngs)
    self.is_global = is_global
    self.window = None if is_global else cfg.sliding_window
    self.local_window = cfg.sliding_window
    self.head_dim = H
    # (base, scale) of a local and of a global layer
    self.rope = {False: (cfg.local_rope_base, 1.0),
                 True: (cfg.global_rope_base, cfg.global_rope_scale)}
    self.query_scale = cfg.query_pre_attn_scalar ** -0.5
    self.impl = cfg.attention_impl
    self.block_size = cfg.attention_block_size
    self.context_layout = cfg.context_layout
    # an image block sees itself both ways: a local layer's halo reaches this far ahead
    self.lookahead = cfg.tokens_per_image - 1 if cfg.vision else 0
    self.dtype = cfg.dtype

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, image_blocks_BL=None,
               is_global=None):
    q_BLNH, k_BLKH, v_BLKH = self.qkv(x_BLD, positions_BL, is_global=is_global)
    layout = context.active_layout(self.context_layout, x_BLD.shape[1])

    def kernel(window):
      if layout is not None:  # the sequence is split over the context axis
        return lambda q, k, v: context.attend(
            q, k, v, positions_BL, segment_ids_BL, image_blocks_BL, window=window,
            lookahead=self.lookahead, layout=layout, impl=self.impl,
            block_size=self.block_size)
      return lambda q, k, v: attention.attend(
          q, k, v, positions_BL, segment_ids_BL, window=window, impl=self.impl,
          block_size=self.block_size, image_blocks_BL=image_blocks_BL)
    if is_global is None:
      out_BLNH = kernel(self.window)(q_BLNH, k_BLKH, v_BLKH)
    else:
      out_BLNH = jax.lax.cond(is_global, kernel(None), kernel(self.local_window),
                              q_BLNH, k_BLKH, v_BLKH)
    return self.output(out_BLNH)

  def inv_freq(self, is_global=None):
    """RoPE frequencies of this layer, or of the type the traced flag is_global selects."""
    H = self.head_dim
    if is_global is None:
      return rope_inv_freq(H, *self.rope[self.is_global])
    return jnp.where(is_global, rope_inv_freq(H, *self.rope[True]),
                     rope_inv_freq(H, *self.rope[False]))

  def qkv(self, x_BLD, positions_BL, swapped: bool = False, is_global=None):
    """Projected, QK-normed, RoPE'd q (already scaled), k, v; the training path and the
    sampler's cached path (inference/sampler.py) both call it."""
    dt = self.dtype
    # lora.einsum: W (dequantized when int8) plus its adapter, when a LoRA run added them.
    q_BLNH = lora.einsum(self._EQS[swapped][0], x_BLD, self, 'q_einsum', dt,
                         adapter_eq=self._EQS[False][0])
    k_BLKH = lora.einsum('BLD,KDH->BLKH', x_BLD, self, 'k_einsum', dt)
    v_BLKH = lora.einsum('BLD,KDH->BLKH', x_BLD, self, 'v_einsum', dt)
    q_BLNH = checkpoint_name(q_BLNH, 'query_proj')
    k_BLKH = checkpoint_name(k_BLKH, 'key_proj')
    v_BLKH = checkpoint_name(v_BLKH, 'value_proj')
    q_BLNH = sharding.constrain(q_BLNH, ('act_batch', 'act_len', 'act_heads', None))
    k_BLKH = sharding.constrain(k_BLKH, ('act_batch', 'act_len', 'act_kv_heads', None))
    v_BLKH = sharding.constrain(v_BLKH, ('act_batch', 'act_len', 'act_kv_heads', None))
    inv_freq = self.inv_freq(is_global)
    q_BLNH = apply_rope(self.query_norm(q_BLNH), positions_BL, inv_freq)
    k_BLKH = apply_rope(self.key_norm(k_BLKH), positions_BL, inv_freq)
    q_BLNH = (q_BLNH.astype(jnp.float32) * self.query_scale).astype(dt)
    return q_BLNH, k_BLKH, v_BLKH

  def output(self, out_BLNH, swapped: bool = False):
    """Attention output [B, L, N, H] -> [B, L, D] (the output projection)."""
    dt = self.dtype
    out_BLNH = checkpoint_name(out_BLNH, 'attention_out')
    y_BLD = lora.einsum(self._EQS[swapped][1], out_BLNH, self, 'attn_vec_einsum', dt,
                        adapter_eq=self._EQS[False][1])
    return checkpoint_name(y_BLD, 'out_proj')


class MLP(nnx.Module):
  """GeGLU: gelu_tanh(x W_gate) * (x W_up), then W_linear; weights [F, D] as in the checkpoints."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    D, F, pd = cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype
    self.gate = layers.param(rngs, (F, D), D, pd, ('mlp', 'embed'))
    self.up = layers.param(rngs, (F, D), D, pd, ('mlp', 'embed'))
    self.linear = layers.param(rngs, (F, D), F, pd, ('mlp', 'embed'))
    self.dtype = cfg.dtype

  def __call__(self, x_BLD):
    dt = self.dtype
    gate_BLF = checkpoint_name(lora.einsum('BLD,FD->BLF', x_BLD, self, 'gate', dt),
                               'mlp_gate')
    up_BLF = checkpoint_name(lora.einsum('BLD,FD->BLF', x_BLD, self, 'up', dt), 'mlp_up')
    h_BLF = jax.nn.gelu(gate_BLF, approximate=True) * up_BLF
    h_BLF = sharding.constrain(h_BLF, ('act_batch', 'act_len', 'act_mlp'))
    out_BLD = lora.einsum('BLF,FD->BLD', h_BLF, self, 'linear', dt)
    return checkpoint_name(out_BLD, 'mlp_out')


class DecoderLayer(nnx.Module):
  """Sandwich-norm block: x + post_norm(attn(pre_norm(x))), then the same around the MLP."""

  def __init__(self, cfg: config_lib.ModelConfig, layer: int, *, rngs: nnx.Rngs):
    D = cfg.embed_dim
    self.pre_attention_norm = layers.RMSNorm(D, cfg, rngs=rngs)
    self.attn = Attention(cfg, cfg.is_global(layer), rngs=rngs)
    self.post_attention_norm = layers.RMSNorm(D, cfg, rngs=rngs)
    self.pre_ffw_norm = layers.RMSNorm(D, cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    self.post_ffw_norm = layers.RMSNorm(D, cfg, rngs=rngs)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, image_blocks_BL=None,
               is_global=None):
    return self.apply(x_BLD, lambda attn, h_BLD: attn(h_BLD, positions_BL, segment_ids_BL,
                                                      image_blocks_BL, is_global))

  def apply(self, x_BLD, attend):
    """The block with attention given as attend(self.attn, normed x) -> [B, L, D]: the training
    path passes Attention.__call__, the sampler one that reads and writes a KV cache."""
    x_BLD = checkpoint_name(sharding.constrain(x_BLD, ACT), 'decoder_layer_input')
    h_BLD = attend(self.attn, self.pre_attention_norm(x_BLD))
    x_BLD = x_BLD + self.post_attention_norm(h_BLD)
    h_BLD = self.mlp(self.pre_ffw_norm(x_BLD))
    return x_BLD + self.post_ffw_norm(h_BLD)


class Block(nnx.Module):
  """Six consecutive layers (five local, one global): the unit the scan repeats."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([DecoderLayer(cfg, j, rngs=rngs)
                            for j in range(config_lib.GLOBAL_EVERY)])

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, image_blocks_BL=None):
    for layer in self.layers:
      x_BLD = layer(x_BLD, positions_BL, segment_ids_BL, image_blocks_BL)
    return x_BLD


def _remat_layer(layer: DecoderLayer, x_BLD, args, policy: str):
  """layer(x_BLD, *args) under its own checkpoint (model.remat_unit='layer'), nested in the
  checkpoint of its group: the group's replay saves only the layer inputs, and the backward
  pass then replays one layer at a time."""
  graphdef, state = nnx.split(layer)

  def fn(state, x_BLD):
    return nnx.merge(graphdef, state)(x_BLD, *args)
  return layers.remat(fn, policy, prevent_cse=True)(state, x_BLD)


def _scan_block(block: Block, x_BLD, args, policy: str):
  """block(x_BLD, *args) as a scan over its six layers (model.scan_unit='layer'), each step one
  layer under its own checkpoint (policy; 'none' for no checkpoint). The six layers' parameters
  are stacked here, in their sharded layout, so FSDP gathers one layer's weights per step
  rather than the block's six at once; the layer type (local/global) is scanned as data."""
  graphdef = nnx.graphdef(block.layers[0])  # a local layer: Attention takes the type as data
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(l) for l in block.layers])
  is_global_S = jnp.asarray([layer.attn.is_global for layer in block.layers])

  def body(x_BLD, xs):
    state, is_global = xs
    return nnx.merge(graphdef, state)(x_BLD, *args, is_global=is_global), None
  x_BLD, _ = jax.lax.scan(layers.remat(body, policy), x_BLD, (stacked, is_global_S))
  return x_BLD


class Gemma3(nnx.Module):
  """The Gemma 3 decoder: tokens [B, L] -> float32 logits [B, L, V] (tied embedding)."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs=rngs)
    num_blocks, num_tail = divmod(cfg.num_layers, config_lib.GLOBAL_EVERY)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=max(num_blocks, 1))
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return Block(cfg, rngs=rngs)
      blocks = make_blocks(rngs) if num_blocks else None
      if blocks is not None:
        layers.stack_names(blocks)
      self.blocks = nnx.data(blocks)
      first = num_blocks * config_lib.GLOBAL_EVERY
      self.tail = nnx.List([DecoderLayer(cfg, first + j, rngs=rngs) for j in range(num_tail)])
    else:
      self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.embed_dim, cfg, rngs=rngs)
    if cfg.vision:  # built last: a text model's parameters draw the same random numbers
      self.vision = vision.Vision(cfg, rngs=rngs)

  def _run(self, modules, x_BLD, positions_BL, segment_ids_BL, image_blocks_BL=None):
    """Applies modules in order under the remat policy: one checkpoint around all of them and,
    with model.remat_unit='layer', one more around each of their layers (a Block's six). With
    model.scan_unit='layer' a Block's six layers run as an inner scan (_scan_block)."""
    graphdef, state = nnx.split(modules)
    policy = self.cfg.remat_policy
    args = (positions_BL, segment_ids_BL, image_blocks_BL)
    num_layers = sum(len(m.layers) if isinstance(m, Block) else 1 for m in modules)
    per_layer = self.cfg.remat_unit == 'layer' and policy != 'none' and num_layers > 1

    def fn(state, x_BLD):
      for module in nnx.merge(graphdef, state):
        if isinstance(module, Block) and self.cfg.scan_unit == 'layer':
          x_BLD = _scan_block(module, x_BLD, args, policy if per_layer else 'none')
          continue
        if not per_layer:
          x_BLD = module(x_BLD, *args)
          continue
        for layer in (module.layers if isinstance(module, Block) else [module]):
          x_BLD = _remat_layer(layer, x_BLD, args, policy)
      return x_BLD
    return layers.remat(fn, policy)(state, x_BLD)

  def _embed(self, tokens_BL, images):
    """Scaled token embeddings with the image soft tokens merged in, and the image block ids
    (attention.image_blocks; None without images)."""
    if not self.cfg.vision:
      return self.embedder.encode(tokens_BL), None
    placeholder = self.cfg.vocab_size  # one past the table: looked up as row 0, then replaced
    x_BLD = self.embedder.encode(jnp.where(tokens_BL == placeholder, 0, tokens_BL))
    if images is None:
      return x_BLD, None
    soft_BNTD = vision.encode_images(self.vision, images)
    x_BLD = vision.merge(x_BLD, tokens_BL, soft_BNTD, placeholder)
    return x_BLD, attention.image_blocks(tokens_BL, placeholder)

  def hidden(self, tokens_BL, positions_BL=None, segment_ids_BL=None, images=None):
    """Final-normed hidden states [B, L, D] in the compute dtype. images: float32
    [B, N, S, S, 3] in [-1, 1] (model.vision); run k of placeholder tokens takes image k."""
    B, L = tokens_BL.shape
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :], (B, L))
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((B, L), jnp.int32)
    x_BLD, blocks_BL = self._embed(tokens_BL, images)
    x_BLD = sharding.constrain(x_BLD, ACT)
    # Under context parallelism the layers may run in the balanced order (models/context.py).
    balanced = context.active_layout(self.cfg.context_layout, L) == 'balanced'
    if balanced:
      x_BLD, positions_BL, segment_ids_BL = context.to_balanced(x_BLD, positions_BL,
                                                                segment_ids_BL)
      if blocks_BL is not None:
        blocks_BL, = context.to_balanced(blocks_BL)
    six = config_lib.GLOBAL_EVERY
    if self.cfg.scan_layers:
      if self.blocks is not None:
        graphdef, state = nnx.split(self.blocks)

        def body(x_BLD, block_state):
          return self._run([nnx.merge(graphdef, block_state)], x_BLD, positions_BL,
                           segment_ids_BL, blocks_BL), None
        x_BLD, _ = jax.lax.scan(body, x_BLD, state)
      for layer in self.tail:
        x_BLD = self._run([layer], x_BLD, positions_BL, segment_ids_BL, blocks_BL)
    else:
      # Same checkpoint granularity as the scan: one per block of six, one per tail layer.
      num_blocks = self.cfg.num_layers // six
      groups = [list(self.layers[b * six:(b + 1) * six]) for b in range(num_blocks)]
      groups += [[layer] for layer in list(self.layers)[num_blocks * six:]]
      for group in groups:
        x_BLD = self._run(group, x_BLD, positions_BL, segment_ids_BL, blocks_BL)
    if balanced:
      x_BLD, = context.from_balanced(x_BLD)
    return sharding.constrain(self.final_norm(x_BLD), ACT)

  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, images=None):
    return self.embedder.decode(self.hidden(tokens_BL, positions_BL, segment_ids_BL, images))


def build(c: config_lib.Config, rngs: nnx.Rngs | None = None) -> Gemma3:
  """The model of a config: Gemma3, adapted when lora.rank > 0 (random base: the seed's), with
  quantization-aware training set up by quant.*."""
  model = Gemma3(c.model, rngs=rngs or nnx.Rngs(c.train.seed))
  model = lora.adapt(model, c) if c.lora.rank else model
  return set_qat(model, c.quant.qat, c.quant.embedding)


def set_qat(model: Gemma3, qat: str, embedding: str = '') -> Gemma3:
  """Marks the decoder's projections (Attention, MLP: lora.einsum reads the mark) and the
  embedding to run fake-quantized; '' leaves them float. In place; returns the model."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (Attention, MLP)) and qat:
      node.qat = qat
    elif isinstance(node, Embedder) and embedding:
      node.qat = embedding
  return model


def abstract_state(cfg: config_lib.ModelConfig) -> nnx.State:
  """nnx.state(model, nnx.Param) of an abstract (shape-only) model."""
  return nnx.state(nnx.eval_shape(lambda: Gemma3(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def param_count(cfg: config_lib.ModelConfig) -> tuple[int, int]:
  """(non-embedding, embedding) parameter counts, from shapes only."""
  total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(abstract_state(cfg)))
  embedding = cfg.vocab_size * cfg.embed_dim
  return total - embedding, embedding
