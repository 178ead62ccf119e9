"""The model FLOP count: the matmul FLOPs of one training step, from the model's shapes.

"Model FLOPs" are fwd + bwd = 3 x the forward matmuls, never the remat recompute; MFU divides
them by wall time and the chip's peak (train), the AOT report by its step-time estimate (aot).
The per-layer terms are keyed by the names models/decoder.py gives the matmul outputs with
jax.ad_checkpoint.checkpoint_name, so that aot can count what a remat policy replays.
"""

from __future__ import annotations

from gemma3_train import config as config_lib
from gemma3_train.training.objectives import distill  # the teacher's shape


def layer_matmul_flops(m: config_lib.ModelConfig) -> dict[str, int]:
  """Forward FLOPs per token of one decoder layer's projections, by checkpoint name.

  With D embed, F mlp, N/K q/kv heads and H head_dim: q, k, v and out projections, and the
  GeGLU MLP's gate, up and down matmuls, 2 FLOPs per multiply-add.
  """
  d, n, k, h, f = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  return dict(query_proj=2 * d * n * h, key_proj=2 * d * k * h, value_proj=2 * d * k * h,
              out_proj=2 * n * h * d, mlp_gate=2 * d * f, mlp_up=2 * d * f, mlp_out=2 * f * d)


def attention_pairs(seq_len: int, window: int | None) -> int:
  """(query, key) pairs a causal row of seq_len attends: sum over p of min(W, p + 1)."""
  if window is None or window >= seq_len:
    return seq_len * (seq_len + 1) // 2
  # p < W: p + 1 keys (sum W(W+1)/2); the remaining seq_len - W queries see W keys each.
  return window * (window + 1) // 2 + (seq_len - window) * window


def attention_flops_per_row(m: config_lib.ModelConfig, seq_len: int) -> int:
  """Forward attention FLOPs of one row over all layers: 4NH per (query, key) pair.

  QK^T and probs @ V are 2NH each per pair; local layers see min(W, p + 1) keys, global p + 1.
  """
  pairs = sum(attention_pairs(seq_len, None if m.is_global(i) else m.sliding_window)
              for i in range(m.num_layers))
  return 4 * m.num_heads * m.head_dim * pairs


def model_flops_per_token(m: config_lib.ModelConfig, seq_len: int) -> float:
  """Training matmul FLOPs per token (fwd + bwd = 3 x fwd), averaged over a row of seq_len.

  A token's forward costs the layers' projections (layer_matmul_flops), its share of the
  attention (attention_flops_per_row / seq_len) and the tied LM head, 2DV. The embedding
  gather, norms, RoPE and softmax are not counted.
  """
  dense = m.num_layers * sum(layer_matmul_flops(m).values())
  head = 2 * m.embed_dim * m.vocab_size
  return 3 * (dense + attention_flops_per_row(m, seq_len) / seq_len + head)


def model_flops_per_step(m: config_lib.ModelConfig, seq_len: int, global_batch: int) -> float:
  """Training FLOPs of one optimizer step over global_batch rows of seq_len tokens."""
  return model_flops_per_token(m, seq_len) * seq_len * global_batch


def lora_flops_per_token(c: config_lib.Config, seq_len: int) -> float:
  """Training matmul FLOPs per token of a LoRA run (lora.rank > 0), averaged over a row.

  The frozen base gets no weight gradients: its projections and LM head cost the forward plus
  the activation gradients, 2 x forward (3 x for the head with lora.train_embedding); attention
  has no weights and costs 3 x forward as in full training. Each adapter (A [in, r], B [r, out])
  costs 2r(in + out) forward, 3 x that with its weight gradients.
  """
  m, r = c.model, c.lora.rank
  dims = config_lib.lora_dims(m)
  dense = m.num_layers * sum(layer_matmul_flops(m).values())
  head = 2 * m.embed_dim * m.vocab_size
  adapters = m.num_layers * sum(2 * r * sum(dims[t]) for t in c.lora.target_list())
  return (2 * dense + 3 * attention_flops_per_row(m, seq_len) / seq_len
          + (3 if c.lora.train_embedding else 2) * head + 3 * adapters)


def vision_forward_flops(m: config_lib.ModelConfig) -> tuple[int, int]:
  """(encoder, projector) forward matmul FLOPs of one image (model.vision).

  With G^2 = (S / P)^2 patches of width W, MLP size M: the patch embedding 2 G^2 P^2 3 W; per
  encoder layer the q, k, v, out projections 8 G^2 W^2, the MLP 4 G^2 W M and bidirectional
  attention over all G^2 x G^2 patch pairs 4 G^4 W; the projector 2 T W D on the T pooled
  tokens (pooling, norms and softmax are not counted).
  """
  W, M, P = m.vision_width, m.vision_mlp_dim, m.vision_patch_size
  patches = (m.vision_image_size // P) ** 2
  layer = 8 * patches * W * W + 4 * patches * W * M + 4 * patches * patches * W
  encoder = 2 * patches * P * P * 3 * W + m.vision_depth * layer
  return encoder, 2 * m.tokens_per_image * W * m.embed_dim


def vision_flops_per_step(c: config_lib.Config) -> float:
  """Training FLOPs of the image path over one step: every image slot (global batch x
  data.max_images) runs the encoder forward; the backward (2 x forward) only for what trains:
  the projector always, the encoder with model.vision_trainable. A LoRA run trains neither
  (both are in its frozen base, and no gradient flows into them)."""
  if not c.model.vision:
    return 0.0
  encoder, projector = vision_forward_flops(c.model)
  if c.lora.rank:
    per_image = encoder + projector
  elif c.model.vision_trainable:
    per_image = 3 * (encoder + projector)
  else:
    per_image = encoder + 3 * projector
  return float(per_image * c.train.global_batch_size * c.data.max_images)


def train_flops_per_step(c: config_lib.Config) -> float:
  """Training FLOPs of one optimizer step of config c: model_flops_per_step, or with LoRA
  (lora.rank > 0) lora_flops_per_token's count for the frozen base and the adapters; plus
  the image path's (vision_flops_per_step) with model.vision, and the frozen models' forward
  passes that an objective runs each step (frozen_forward_flops_per_step)."""
  T, B = c.data.seq_len, c.train.global_batch_size
  extra = vision_flops_per_step(c) + frozen_forward_flops_per_step(c)
  if c.lora.rank:
    return lora_flops_per_token(c, T) * T * B + extra
  return model_flops_per_step(c.model, T, B) + extra


def frozen_forward_flops_per_step(c: config_lib.Config) -> float:
  """The forward passes of frozen models an objective runs on the step's rows (each a third
  of its model's 3x-forward step count): DPO's reference of the model's shape (with
  dpo.reference_logps=online and a loss that has one) and distillation's online teacher, of
  its own shape (distill.teacher set; the stored targets of distill.teacher='' need none),
  with its vision tower's forward over every image slot when it has one."""
  T, B = c.data.seq_len, c.train.global_batch_size
  p = c.dpo
  if (c.train.objective == 'dpo' and p.loss not in config_lib.DPO_REFERENCE_FREE
      and p.reference_logps == 'online'):
    return model_flops_per_step(c.model, T, B) / 3
  if c.train.objective == 'distill' and c.distill.teacher:
    teacher = distill.teacher_config(c)
    tower = sum(vision_forward_flops(teacher)) * B * c.data.max_images if teacher.vision else 0
    return model_flops_per_step(teacher, T, B) / 3 + tower
  return 0.0
