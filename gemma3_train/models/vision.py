"""Gemma 3's image path in Flax NNX: the SigLIP encoder, the exit into the decoder, the merge.

An image [S, S, 3] in [-1, 1] is cut into G x G patches of P x P pixels (G = S / P), embedded by
a [P, P, 3, W] kernel with a bias, plus a learned position embedding per patch; `depth`
pre-LayerNorm encoder layers follow (LayerNorm eps 1e-6 with scale and bias; biased multi-head
attention with Nv heads of Hv = W / Nv, scale Hv ** -0.5, every patch sees every patch; a
gelu-tanh MLP), then a final LayerNorm. The exit average-pools the G x G grid in pool x pool
windows (stride = pool) to T = (G / pool)^2 soft tokens, applies a Gemma RMSNorm (1 + scale,
eps 1e-6) and projects W -> D. The soft tokens replace the image placeholder tokens (id =
model.vocab_size) after the text embedding's sqrt(D) scaling; they are not scaled.

Parameters are float32 whatever model.param_dtype is (as the released checkpoints keep them);
matmuls run in model.dtype, LayerNorm, RMSNorm and the softmax in float32. Encoder layers are
scanned (model.scan_layers; one stacked leaf per parameter) or kept as a list, each layer under
jax.checkpoint with model.remat_policy. Unless model.vision_trainable, no gradient reaches the
encoder (the projector still trains). Facts and the HF / Kaggle names: docs/vision.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gemma3_train import config as config_lib
from gemma3_train.models import layers
from gemma3_train import sharding

LN_EPS = 1e-6  # SigLIP's LayerNorm eps, also the projector RMSNorm's
ACT = ('act_batch', 'act_len', 'act_embed')


def _row(x, ndim: int):
  """A [W] vector shaped to broadcast over the last axis of an ndim-array."""
  return x.reshape((1,) * (ndim - 1) + (-1,))


def _zeros(shape, names) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=names)


def _normal(rngs: nnx.Rngs, shape, fan_in: int, names) -> nnx.Param:
  return layers.param(rngs, shape, fan_in, jnp.float32, names)


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias, in float32, cast back to x's dtype."""

  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=('norm',))
    self.bias = _zeros((dim,), ('norm',))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
    return (y * _row(self.scale[...], x.ndim) + _row(self.bias[...], x.ndim)).astype(x.dtype)


class VisionAttention(nnx.Module):
  """Bidirectional multi-head attention with biases; logits and softmax in float32."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    W, Nv = cfg.vision_width, cfg.vision_num_heads
    Hv = W // Nv
    names_in = ('vision_embed', 'vision_heads', 'vision_head_dim')
    for n in ('query', 'key', 'value'):
      setattr(self, n, _normal(rngs, (W, Nv, Hv), W, names_in))
      setattr(self, f'{n}_bias', _zeros((Nv, Hv), ('vision_heads', 'vision_head_dim')))
    self.out = _normal(rngs, (Nv, Hv, W), W, ('vision_heads', 'vision_head_dim', 'vision_embed'))
    self.out_bias = _zeros((W,), ('norm',))
    self.scale = Hv ** -0.5
    self.dtype = cfg.dtype

  def _proj(self, x_BLW, name: str):
    w = getattr(self, name)[...].astype(self.dtype)
    b = getattr(self, f'{name}_bias')[...].astype(self.dtype)
    return jnp.einsum('BLW,WNH->BLNH', x_BLW, w) + b[None, None]

  def __call__(self, x_BLW):
    q_BLNH = checkpoint_name(self._proj(x_BLW, 'query'), 'query_proj')
    k_BLNH = checkpoint_name(self._proj(x_BLW, 'key'), 'key_proj')
    v_BLNH = checkpoint_name(self._proj(x_BLW, 'value'), 'value_proj')
    logits_BNLS = jnp.einsum('BLNH,BSNH->BNLS', q_BLNH, k_BLNH,
                             preferred_element_type=jnp.float32) * self.scale
    probs_BNLS = jax.nn.softmax(logits_BNLS, axis=-1).astype(self.dtype)
    out_BLNH = checkpoint_name(jnp.einsum('BNLS,BSNH->BLNH', probs_BNLS, v_BLNH),
                               'attention_out')
    y_BLW = jnp.einsum('BLNH,NHW->BLW', out_BLNH, self.out[...].astype(self.dtype))
    return checkpoint_name(y_BLW + _row(self.out_bias[...].astype(self.dtype), 3), 'out_proj')


class VisionMLP(nnx.Module):
  """fc2(gelu_tanh(fc1(x))), both with biases."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    W, M = cfg.vision_width, cfg.vision_mlp_dim
    self.fc1 = _normal(rngs, (W, M), W, ('vision_embed', 'vision_mlp'))
    self.fc1_bias = _zeros((M,), ('vision_mlp',))
    self.fc2 = _normal(rngs, (M, W), M, ('vision_mlp', 'vision_embed'))
    self.fc2_bias = _zeros((W,), ('norm',))
    self.dtype = cfg.dtype

  def __call__(self, x_BLW):
    dt = self.dtype
    h_BLM = jnp.einsum('BLW,WM->BLM', x_BLW, self.fc1[...].astype(dt))
    h_BLM = checkpoint_name(h_BLM + _row(self.fc1_bias[...].astype(dt), 3), 'mlp_up')
    h_BLM = jax.nn.gelu(h_BLM, approximate=True)
    out_BLW = jnp.einsum('BLM,MW->BLW', h_BLM, self.fc2[...].astype(dt))
    return checkpoint_name(out_BLW + _row(self.fc2_bias[...].astype(dt), 3), 'mlp_out')


class EncoderLayer(nnx.Module):
  """Pre-LayerNorm block: x + attn(ln1(x)), then + mlp(ln2(.))."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.ln1 = LayerNorm(cfg.vision_width)
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.ln2 = LayerNorm(cfg.vision_width)
    self.mlp = VisionMLP(cfg, rngs=rngs)

  def __call__(self, x_BLW):
    x_BLW = checkpoint_name(sharding.constrain(x_BLW, ACT), 'vision_layer_input')
    x_BLW = x_BLW + self.attn(self.ln1(x_BLW))
    return x_BLW + self.mlp(self.ln2(x_BLW))


class Encoder(nnx.Module):
  """Images [B', S, S, 3] -> final-normed patch features [B', G*G, W] in model.dtype."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    P, W = cfg.vision_patch_size, cfg.vision_width
    G = cfg.vision_image_size // P
    self.cfg = cfg
    self.patch_kernel = _normal(rngs, (P, P, 3, W), P * P * 3, (None, None, None, 'vision_embed'))
    self.patch_bias = _zeros((W,), ('norm',))
    self.pos_embedding = _normal(rngs, (G * G, W), W, (None, 'vision_embed'))
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.vision_depth)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return EncoderLayer(cfg, rngs=rngs)
      self.blocks = make_blocks(rngs)
      layers.stack_names(self.blocks)
    else:
      self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.vision_depth)])
    self.final_norm = LayerNorm(W)

  def embed(self, images_BSS3):
    """Patch embedding (a stride-P convolution as reshape + einsum) plus positions."""
    B, S = images_BSS3.shape[:2]
    P, dt = self.cfg.vision_patch_size, self.cfg.dtype
    G = S // P
    # [B, G, P, G, P, 3] -> [B, G*G, P, P, 3]: patches row-major over the grid.
    patches = images_BSS3.reshape(B, G, P, G, P, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(B, G * G, P, P, 3).astype(dt)
    x_BLW = jnp.einsum('BLPQC,PQCW->BLW', patches, self.patch_kernel[...].astype(dt))
    pos_BLW = self.pos_embedding[...].astype(dt)[None]
    x_BLW = x_BLW + _row(self.patch_bias[...].astype(dt), 3) + pos_BLW
    return x_BLW.astype(dt)

  def __call__(self, images_BSS3):
    x_BLW = self.embed(images_BSS3)

    def run(graphdef, state, x_BLW):  # one layer under its own checkpoint
      fn = lambda state, x_BLW: nnx.merge(graphdef, state)(x_BLW)
      return layers.remat(fn, self.cfg.remat_policy)(state, x_BLW)
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      x_BLW, _ = jax.lax.scan(lambda x_BLW, s: (run(graphdef, s, x_BLW), None), x_BLW, state)
    else:
      for layer in self.layers:
        x_BLW = run(*nnx.split(layer), x_BLW)
    return self.final_norm(x_BLW)


class Projector(nnx.Module):
  """Patch features [B', G*G, W] -> soft tokens [B', T, D]: pool, Gemma RMSNorm, projection."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    # The decoder's RMSNorm (1 + scale), with SigLIP's eps and float32 storage.
    self.soft_norm = layers.RMSNorm(
        cfg.vision_width, dataclasses.replace(cfg, param_dtype='float32', rms_norm_eps=LN_EPS),
        rngs=rngs)
    self.projection = _normal(rngs, (cfg.vision_width, cfg.embed_dim), cfg.vision_width,
                              ('vision_embed', 'embed'))
    self.pool = cfg.vision_pool
    self.dtype = cfg.dtype

  def __call__(self, x_BLW):
    B, L, W = x_BLW.shape
    G, k = int(round(L ** 0.5)), self.pool
    g = G // k
    x = x_BLW.reshape(B, g, k, g, k, W).astype(jnp.float32)
    x_BTW = jnp.mean(x, axis=(2, 4)).reshape(B, g * g, W).astype(x_BLW.dtype)
    x_BTW = self.soft_norm(x_BTW)
    return jnp.einsum('BTW,WD->BTD', x_BTW, self.projection[...].astype(self.dtype))


# Where the image encoder's parameters live in a Gemma3 model's state (Gemma3.vision.encoder):
# what a frozen tower leaves out of training (training/frozen.py) and of checkpoints.
ENCODER_PATH = ('vision', 'encoder')


class Vision(nnx.Module):
  """The encoder and the projector: images [B, N, S, S, 3] -> soft tokens [B, N, T, D]."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.encoder = Encoder(cfg, rngs=rngs)
    self.projector = Projector(cfg, rngs=rngs)
    self.trainable = cfg.vision_trainable
    self.dtype = cfg.dtype

  def __call__(self, images_BNSS3):
    B, N, S = images_BNSS3.shape[:3]
    feats = self.encoder(images_BNSS3.reshape(B * N, S, S, 3))
    if not self.trainable:  # a frozen tower: no gradient into the encoder
      feats = jax.lax.stop_gradient(feats)
    soft = self.projector(feats).astype(self.dtype)
    return soft.reshape(B, N, soft.shape[1], soft.shape[2])


def encode_images(model_vision: Vision, images_BNSS3) -> jax.Array:
  """Soft tokens [B, N, T, D] in model.dtype of float32 images [B, N, S, S, 3] in [-1, 1]."""
  return model_vision(images_BNSS3)


def merge(x_BLD, tokens_BL, soft_BNTD, placeholder_id: int):
  """x with its placeholder positions replaced by the soft tokens, in order: the j-th placeholder
  of a row takes soft token j of that row's images flattened ([N*T]), so the k-th run of T
  placeholders takes image k; soft tokens past the row's placeholders are ignored."""
  B, N, T, D = soft_BNTD.shape
  is_image_BL = tokens_BL == placeholder_id
  index_BL = jnp.clip(jnp.cumsum(is_image_BL, axis=1) - 1, 0, N * T - 1)
  soft_BMD = soft_BNTD.reshape(B, N * T, D).astype(x_BLD.dtype)
  taken_BLD = jnp.take_along_axis(soft_BMD, index_BL[:, :, None], axis=1)
  return jnp.where(is_image_BL[:, :, None], taken_BLD, x_BLD)
