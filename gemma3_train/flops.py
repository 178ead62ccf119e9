"""The model FLOP count: matmul FLOPs the math of one training step needs.

"Model FLOPs" are fwd + bwd = 3 x the forward matmuls, never the remat recompute; MFU divides
them by wall time and the chip's peak (metrics), the AOT report by the compiler's estimate (aot).
"""

from __future__ import annotations

from gemma3_train import config as config_lib


# --- FLOPs -------------------------------------------------------------------


def _mean_keys(seq_len: int, window: int | None) -> float:
  """Mean over query positions p in [0, seq_len) of the keys attended: min(W, p + 1)."""
  if window is None or window >= seq_len:
    return (seq_len + 1) / 2
  # p < W: p + 1 keys (sum W(W+1)/2); the remaining seq_len - W queries see W keys each.
  return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def model_flops_per_token(m: config_lib.ModelConfig, seq_len: int) -> float:
  """Training matmul FLOPs per token (fwd + bwd = 3 x fwd), averaged over a row of seq_len.

  With D embed, F mlp, N/K q/kv heads, H head_dim, V vocab, and per layer c(p) keys seen by the
  query at position p (global: p + 1; local: min(W, p + 1)), a token's forward costs
    per layer: 2D(NH + 2KH) [q, k, v]  + 2NHD [out]  + 3 * 2DF [GeGLU gate, up, down]
               + 4NH * mean_p c(p)  [scores QK^T and probs @ V]
    once:      2DV  [tied LM head]
  and training is 3x that. The embedding gather, norms, RoPE and softmax are not counted.
  """
  d, n, k, h = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
  dense = 2 * d * (n * h + 2 * k * h) + 2 * n * h * d + 3 * 2 * d * m.mlp_dim
  local_keys = _mean_keys(seq_len, m.sliding_window)
  global_keys = _mean_keys(seq_len, None)
  attn = sum(4 * n * h * (global_keys if m.is_global(i) else local_keys)
             for i in range(m.num_layers))
  forward = m.num_layers * dense + attn + 2 * d * m.vocab_size
  return 3 * forward


def model_flops_per_step(m: config_lib.ModelConfig, seq_len: int, global_batch: int) -> float:
  """Training FLOPs of one optimizer step over global_batch rows of seq_len tokens."""
  return model_flops_per_token(m, seq_len) * seq_len * global_batch


