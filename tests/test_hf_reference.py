"""Our Gemma 3 against Hugging Face transformers' Gemma3ForCausalLM on small random models.

Weights go HF state_dict -> convert.hf_to_canonical -> layout.canonical_to_state; logits are
compared in float32 (max |ours - HF| / max |HF| <= 1e-5).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train.convert import layout
from gemma3_train.models import decoder as model_lib

VOCAB = 512
TOL = 1e-5

CASES = {
    # 8 layers = one scanned block of six + a two-layer tail; GQA 4:2; 4b-style linear RoPE
    # scaling on global layers; query_pre_attn_scalar != head_dim; 20 tokens > window 5.
    'gqa_ropescale_scanned': dict(num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16,
                                  query_pre_attn_scalar=24.0, global_rope_scale=8.0,
                                  sliding_window=5, scan_layers=True),
    'same_unscanned': dict(num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16,
                           query_pre_attn_scalar=24.0, global_rope_scale=8.0,
                           sliding_window=5, scan_layers=False),
    # 13 layers = two blocks + one tail layer; MQA (K=1), no RoPE scaling, scalar == head_dim.
    'mqa_norope_13layers': dict(num_layers=13, num_heads=4, num_kv_heads=1, head_dim=8,
                                query_pre_attn_scalar=8.0, global_rope_scale=1.0,
                                sliding_window=7, scan_layers=True),
}


def _configs(**kw):
  ours = config_lib.ModelConfig(
      preset='test', vocab_size=VOCAB, embed_dim=32, mlp_dim=48, local_rope_base=10_000.0,
      global_rope_base=1_000_000.0, rms_norm_eps=1e-6, param_dtype='float32', dtype='float32',
      remat_policy='none', attention_impl='reference', **kw)
  if ours.global_rope_scale == 1.0:
    full = {'rope_type': 'default', 'rope_theta': ours.global_rope_base}
  else:
    full = {'rope_type': 'linear', 'factor': ours.global_rope_scale,
            'rope_theta': ours.global_rope_base}
  hf = transformers.Gemma3TextConfig(
      vocab_size=VOCAB, hidden_size=ours.embed_dim, intermediate_size=ours.mlp_dim,
      num_hidden_layers=ours.num_layers, num_attention_heads=ours.num_heads,
      num_key_value_heads=ours.num_kv_heads, head_dim=ours.head_dim,
      hidden_activation='gelu_pytorch_tanh', max_position_embeddings=1024,
      initializer_range=0.02, rms_norm_eps=ours.rms_norm_eps, use_cache=False, pad_token_id=0,
      eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
      rope_parameters={'full_attention': full,
                       'sliding_attention': {'rope_type': 'default',
                                             'rope_theta': ours.local_rope_base}},
      attention_bias=False, attention_dropout=0.0,
      query_pre_attn_scalar=int(ours.query_pre_attn_scalar), sliding_window=ours.sliding_window,
      layer_types=['full_attention' if ours.is_global(i) else 'sliding_attention'
                   for i in range(ours.num_layers)],
      final_logit_softcapping=None, attn_logit_softcapping=None,
      use_bidirectional_attention=False, attn_implementation='eager')
  return ours, hf


def _hf_model(hf_cfg, seed=0):
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(hf_cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Norm scales get a large spread so (1 + scale) is far from 1; matrices ~ 1/sqrt(fan_in).
      std = 0.5 if p.ndim == 1 else 0.5 if 'embed' in name else 0.15
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return model


def _ours(cfg, hf_model):
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  top, layers = convert.hf_to_canonical(tensors, cfg)
  ours = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  nnx.update(ours, layout.canonical_to_state(cfg, top, layers))
  return ours


def _hf_logits(hf_model, tokens):
  with torch.no_grad():
    return hf_model(input_ids=torch.tensor(np.asarray(tokens))).logits.numpy()


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('name', list(CASES))
def test_logits_match_hf(name):
  cfg, hf_cfg = _configs(**CASES[name])
  # The installed transformers must read the config as we mean it (v5 rope_parameters form).
  assert hf_cfg.sliding_window == cfg.sliding_window
  assert [t == 'full_attention' for t in hf_cfg.layer_types] == [
      cfg.is_global(i) for i in range(cfg.num_layers)]
  assert hf_cfg.rope_parameters['full_attention']['rope_theta'] == cfg.global_rope_base
  assert hf_cfg.rope_parameters['sliding_attention']['rope_theta'] == cfg.local_rope_base
  hf_model = _hf_model(hf_cfg)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 20)).astype(np.int32)
  want = _hf_logits(hf_model, tokens)
  got = _ours(cfg, hf_model)(jnp.asarray(tokens))
  assert got.dtype == jnp.float32 and got.shape == want.shape
  err = _rel(got, want)
  print(f'{name}: max rel logit error {err:.2e}')
  assert err <= TOL


def test_packed_matches_separate_documents():
  cfg, hf_cfg = _configs(**CASES['gqa_ropescale_scanned'])
  hf_model = _hf_model(hf_cfg, seed=1)
  ours = _ours(cfg, hf_model)
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, VOCAB, n).astype(np.int32) for n in (7, 11)]
  L = 20
  tokens = np.zeros((1, L), np.int32)
  segments = np.zeros((1, L), np.int32)
  positions = np.zeros((1, L), np.int32)
  start = 0
  for s, doc in enumerate(docs, 1):
    tokens[0, start:start + len(doc)] = doc
    segments[0, start:start + len(doc)] = s
    positions[0, start:start + len(doc)] = np.arange(len(doc))
    start += len(doc)
  got = np.asarray(ours(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
  start = 0
  for doc in docs:
    want = _hf_logits(hf_model, doc[None])[0]
    err = _rel(got[0, start:start + len(doc)], want)
    print(f'packed doc of {len(doc)}: max rel logit error {err:.2e}')
    assert err <= TOL
    start += len(doc)


def test_canonical_round_trip():
  cfg, hf_cfg = _configs(**CASES['mqa_norope_13layers'])
  hf_model = _hf_model(hf_cfg, seed=2)
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  top, layers = convert.hf_to_canonical(tensors, cfg)
  for scan in (True, False):
    c = dataclasses.replace(cfg, scan_layers=scan)
    top2, layers2 = layout.state_to_canonical(c, layout.canonical_to_state(c, top, layers))
    for k in top:
      np.testing.assert_array_equal(top2[k], top[k])
    for a, b in zip(layers2, layers, strict=True):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
