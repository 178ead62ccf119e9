"""Our Gemma 3 against Hugging Face transformers' Gemma3ForCausalLM on small random models.

Weights go HF state_dict -> convert.hf_to_canonical -> layout.canonical_to_state; logits are
compared in float32 (max |ours - HF| / max |HF| <= 1e-5).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from gemma3_train import convert
from gemma3_train.convert import layout
from tests import helpers

TOL = 1e-5

# benchmarks/decode.py builds its models with these names from this module.
_configs = helpers.reference_configs
_hf_model = helpers.reference_hf_model
_ours = helpers.reference_ours


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('name', list(helpers.REFERENCE_CASES))
def test_logits_match_hf(name):
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES[name])
  # The installed transformers must read the config as we mean it (v5 rope_parameters form).
  assert hf_cfg.sliding_window == cfg.sliding_window
  assert [t == 'full_attention' for t in hf_cfg.layer_types] == [
      cfg.is_global(i) for i in range(cfg.num_layers)]
  assert hf_cfg.rope_parameters['full_attention']['rope_theta'] == cfg.global_rope_base
  assert hf_cfg.rope_parameters['sliding_attention']['rope_theta'] == cfg.local_rope_base
  hf_model = helpers.reference_hf_model(hf_cfg)
  tokens = np.random.default_rng(0).integers(0, helpers.REFERENCE_VOCAB, (2, 20)).astype(np.int32)
  want = helpers.hf_logits(hf_model, tokens)
  got = helpers.reference_ours(cfg, hf_model)(jnp.asarray(tokens))
  assert got.dtype == jnp.float32 and got.shape == want.shape
  err = _rel(got, want)
  print(f'{name}: max rel logit error {err:.2e}')
  assert err <= TOL


def test_packed_matches_separate_documents():
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES['gqa_ropescale_scanned'])
  hf_model = helpers.reference_hf_model(hf_cfg, seed=1)
  ours = helpers.reference_ours(cfg, hf_model)
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, helpers.REFERENCE_VOCAB, n).astype(np.int32) for n in (7, 11)]
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
    want = helpers.hf_logits(hf_model, doc[None])[0]
    err = _rel(got[0, start:start + len(doc)], want)
    print(f'packed doc of {len(doc)}: max rel logit error {err:.2e}')
    assert err <= TOL
    start += len(doc)


def test_canonical_round_trip():
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES['mqa_norope_13layers'])
  hf_model = helpers.reference_hf_model(hf_cfg, seed=2)
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
