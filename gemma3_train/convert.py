"""Checkpoint conversion: Hugging Face safetensors and Kaggle/Flax Orbax <-> our model.

Everything goes through one *canonical* form, the per-layer layout of the released Flax
checkpoints (shared/GEMMA3.md B.1), as numpy arrays:

  top    = {'embedding': [V, D], 'final_norm': [D]}
  layers = [{'pre_attention_norm': [D], 'post_attention_norm': [D], 'pre_ffw_norm': [D],
             'post_ffw_norm': [D], 'q_einsum': [N, D, H], 'k_einsum': [K, D, H],
             'v_einsum': [K, D, H], 'attn_vec_einsum': [N, H, D], 'query_norm': [H],
             'key_norm': [H], 'gating_einsum': [2, F, D] ([0] = gate, gelu'd; [1] = up),
             'linear': [F, D]}, ...]   one dict per decoder layer

model.py maps canonical <-> the NNX state (scanned blocks, tail); this module maps file formats
<-> canonical. Norm scales are stored without the +1 in every format and are copied as they are.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from gemma3_train import config as config_lib

VOCAB = 262144  # gemma-lib vocabulary; HF multimodal checkpoints pad to 262208

# HF prefixes of the text decoder, in the three layouts released checkpoints use.
HF_PREFIXES = ('model.', 'language_model.model.', 'model.language_model.')

_HF_NORMS = {
    'pre_attention_norm': 'input_layernorm',
    'post_attention_norm': 'post_attention_layernorm',
    'pre_ffw_norm': 'pre_feedforward_layernorm',
    'post_ffw_norm': 'post_feedforward_layernorm',
    'query_norm': 'self_attn.q_norm',
    'key_norm': 'self_attn.k_norm',
}


class ConversionError(ValueError):
  """A one-line error naming the tensor or file at fault."""


def hf_prefix(names: Iterable[str]) -> str:
  """Which of HF_PREFIXES a checkpoint's tensor names use."""
  names = list(names)
  for prefix in sorted(HF_PREFIXES, key=len, reverse=True):
    if f'{prefix}embed_tokens.weight' in names:
      return prefix
  raise ConversionError('no embed_tokens.weight under any of ' + ', '.join(HF_PREFIXES) +
                        ': not a Gemma 3 text checkpoint')


def _take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
  if name not in tensors:
    raise ConversionError(f'{name}: tensor missing from the checkpoint')
  x = np.asarray(tensors[name])
  if tuple(x.shape) != tuple(shape):
    raise ConversionError(f'{name}: shape {tuple(x.shape)}, expected {tuple(shape)}')
  return x


def hf_layer_to_canonical(tensors: Mapping[str, np.ndarray], prefix: str, i: int,
                          m: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """One decoder layer from HF [out, in] Linear weights to the canonical layout."""
  N, K, D, H, F = m.num_heads, m.num_kv_heads, m.embed_dim, m.head_dim, m.mlp_dim
  p = f'{prefix}layers.{i}.'
  q = _take(tensors, p + 'self_attn.q_proj.weight', (N * H, D))
  k = _take(tensors, p + 'self_attn.k_proj.weight', (K * H, D))
  v = _take(tensors, p + 'self_attn.v_proj.weight', (K * H, D))
  o = _take(tensors, p + 'self_attn.o_proj.weight', (D, N * H))
  gate = _take(tensors, p + 'mlp.gate_proj.weight', (F, D))
  up = _take(tensors, p + 'mlp.up_proj.weight', (F, D))
  down = _take(tensors, p + 'mlp.down_proj.weight', (D, F))
  layer = {
      'q_einsum': q.reshape(N, H, D).transpose(0, 2, 1),
      'k_einsum': k.reshape(K, H, D).transpose(0, 2, 1),
      'v_einsum': v.reshape(K, H, D).transpose(0, 2, 1),
      'attn_vec_einsum': o.reshape(D, N, H).transpose(1, 2, 0),
      'gating_einsum': np.stack([gate, up]),
      'linear': down.T,
  }
  for ours, theirs in _HF_NORMS.items():
    size = H if ours in ('query_norm', 'key_norm') else D
    layer[ours] = _take(tensors, f'{p}{theirs}.weight', (size,))
  return layer


def hf_to_canonical(tensors: Mapping[str, np.ndarray], m: config_lib.ModelConfig
                    ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """HF text-decoder tensors (any of the three layouts) -> (top, layers) canonical."""
  prefix = hf_prefix(tensors.keys())
  embedding = np.asarray(tensors[f'{prefix}embed_tokens.weight'])
  if embedding.shape[1] != m.embed_dim or embedding.shape[0] < m.vocab_size:
    raise ConversionError(f'{prefix}embed_tokens.weight: shape {embedding.shape}, expected '
                          f'({m.vocab_size} or more, {m.embed_dim})')
  # Multimodal checkpoints append 64 rows (image soft token etc.) the text model never emits.
  top = {'embedding': embedding[:m.vocab_size],
         'final_norm': _take(tensors, f'{prefix}norm.weight', (m.embed_dim,))}
  layers = [hf_layer_to_canonical(tensors, prefix, i, m) for i in range(m.num_layers)]
  return top, layers
