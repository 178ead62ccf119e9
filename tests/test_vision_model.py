"""The vision path (vision.py, the image blocks of attention.py, layout.py's vision part, the HF
import) against Hugging Face's Gemma3ForConditionalGeneration and its own mask functions.

Tiny random float32 configs: 28 x 28 images, patch 7, pool 2 -> 4 soft tokens per image; a
decoder of 8 layers (one scanned block of six and a tail of two) with sliding window 3, so an
image block is wider than the window and the local layers' composition is exercised.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Gemma3Config
from transformers import Gemma3ForConditionalGeneration
from transformers import Gemma3TextConfig
from transformers.models.gemma3 import modeling_gemma3

import gemma3_train
from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.models import attention
from gemma3_train.models import decoder as model_lib
from gemma3_train.models import vision

V = 256  # our vocabulary; the image placeholder id is V (HF image_token_index)
BOI, EOI, NL = 5, 6, 7  # stand-ins for <start_of_image>, <end_of_image>, "\n\n" in a tiny vocab
IMG = [NL, BOI] + [V] * 4 + [EOI, NL]

CFG = config_lib.ModelConfig(
    vocab_size=V, num_layers=8, embed_dim=64, mlp_dim=128, num_heads=4, num_kv_heads=2,
    head_dim=16, query_pre_attn_scalar=16.0, sliding_window=3, global_rope_scale=8.0,
    vision=True, vision_image_size=28, vision_patch_size=7, vision_width=32, vision_depth=2,
    vision_mlp_dim=64, vision_num_heads=4, vision_pool=2, dtype='float32',
    param_dtype='float32', attention_impl='reference')


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _tokens():
  """One row with two images and text around them, one with a single image (slot 2 unused)."""
  a = [2, 10, 11] + IMG + [12, 13, 14] + IMG + [15, 16]
  b = [2, 20] + IMG + [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]
  return np.array([a, b], np.int32)


def _images(seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, 2, 28, 28, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A random Gemma3ForConditionalGeneration saved by transformers, and the model itself."""
  torch.manual_seed(0)
  text = Gemma3TextConfig(
      vocab_size=V + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
      sliding_window=3, max_position_embeddings=512, rms_norm_eps=1e-6,
      rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 8.0,
                                          'rope_theta': 1e6},
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}})
  hf_cfg = Gemma3Config(
      text_config=text.to_dict(),
      vision_config=dict(model_type='siglip_vision_model', hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=7, layer_norm_eps=1e-6,
                         hidden_act='gelu_pytorch_tanh', vision_use_head=False),
      mm_tokens_per_image=4, image_token_index=V, boi_token_index=BOI, eoi_token_index=EOI)
  hf_cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
  hf_model = Gemma3ForConditionalGeneration(hf_cfg).eval()
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      # Random everything, LayerNorm scales around 1 (Gemma RMSNorm scales are 1 + w).
      base = 1.0 if ('layer_norm' in name or 'post_layernorm' in name) and 'weight' in name else 0
      p.copy_(base + 0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp('hf_vision')
  hf_model.save_pretrained(path)
  return path, hf_model


def _hf_logits(hf_model, tokens, images):
  pixels = torch.tensor(images.reshape(-1, 28, 28, 3).transpose(0, 3, 1, 2))
  # HF takes the images of the whole batch in order: keep the ones that have placeholders.
  counts = [(row == V).sum() // 4 for row in tokens]
  keep = [b * 2 + k for b in range(len(tokens)) for k in range(counts[b])]
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens.astype(np.int64)), pixel_values=pixels[keep],
                   token_type_ids=torch.tensor((tokens == V).astype(np.int64)))
  return out.logits.numpy()[..., :V]


def test_logits_match_hf_with_two_images(hf_dir):
  path, hf_model = hf_dir
  tokens, images = _tokens(), _images()
  want = _hf_logits(hf_model, tokens, images)
  model = gemma3_train.load(path, dtype='float32', attention_impl='reference')
  assert model.cfg.vision and model.cfg.tokens_per_image == 4
  got = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(images)))
  text = tokens != V
  err = _rel(got[text], want[text])
  print(f'max rel logit error on text positions {err:.2e}')
  assert err < 1e-5
  # The images matter: a different image changes the text logits after it.
  other = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(_images(1))))
  assert _rel(other[text], want[text]) > 1e-3


LAYOUTS = {  # (text decoder, vision tower, projector) prefixes
    'hub': ('language_model.model.', 'vision_tower.vision_model.', 'multi_modal_projector.'),
    'v4.52': ('model.language_model.', 'model.vision_tower.vision_model.',
              'model.multi_modal_projector.'),
}


@pytest.mark.parametrize('name', list(LAYOUTS))
def test_hf_import_layouts_agree(hf_dir, tmp_path, name):
  """The same weights under the other HF key layouts read to the same canonical arrays as what
  transformers wrote ('language_model.model.', 'vision_tower.', 'multi_modal_projector.')."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import hf  # pylint: disable=g-import-not-at-top
  path, _ = hf_dir
  tensors = safetensors.numpy.load_file(str(path / 'model.safetensors'))
  written = ('language_model.model.', 'vision_tower.', 'multi_modal_projector.')
  renamed = {}
  for tensor_name, x in tensors.items():
    old, new = next((o, n) for o, n in zip(written, LAYOUTS[name]) if tensor_name.startswith(o))
    renamed[new + tensor_name[len(old):]] = x
  assert len(renamed) == len(tensors)
  (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
  safetensors.numpy.save_file(renamed, str(tmp_path / 'model.safetensors'))
  a, b = hf.HfSource(path), hf.HfSource(tmp_path)
  assert a.cfg == b.cfg and a.cfg.vision and a.has_vision() and b.has_vision()
  (top_a, layers_a), (top_b, layers_b) = a.vision(), b.vision()
  for k in top_a:
    np.testing.assert_array_equal(top_a[k], top_b[k])
  assert len(layers_a) == len(layers_b) == 2
  for la, lb in zip(layers_a, layers_b):
    for k in la:
      np.testing.assert_array_equal(la[k], lb[k])
  for i in range(a.cfg.num_layers):
    for k, x in a.layer(i).items():
      np.testing.assert_array_equal(x, b.layer(i)[k])
  np.testing.assert_array_equal(a.top()['embedding'], b.top()['embedding'])
  assert a.top()['embedding'].shape == (V, 64)  # HF's 64 extra rows cut


@nnx.jit
def _forward(model, tokens, images):
  return model(tokens, images=images)


def _random_model(cfg, seed=0):
  return model_lib.Gemma3(cfg, rngs=nnx.Rngs(seed))


def _copy(src_model, cfg):
  """src_model's weights in a model of cfg (another layout), through the canonical form."""
  src_cfg = src_model.cfg
  state = nnx.state(src_model, nnx.Param)
  top, layers = layout.state_to_canonical(src_cfg, state)
  vis = layout.vision_state_to_canonical(src_cfg, state)
  dst = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  nnx.update(dst, jax.tree.map(jnp.asarray, layout.canonical_to_state(cfg, top, layers, vis)))
  return dst


@pytest.mark.slow  # ~25-35 s: compiles
def test_scanned_equals_unscanned_and_remat_policies():
  tokens, images = jnp.asarray(_tokens()), jnp.asarray(_images())
  scanned = _random_model(CFG)
  # Random norm scales and biases too (they start at 0 / 1).
  state = nnx.state(scanned, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(3), 200))
  nnx.update(scanned, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape),
                                   state))
  want = np.asarray(_forward(scanned, tokens, images))
  flat = _copy(scanned, dataclasses.replace(CFG, scan_layers=False))
  assert 'layers' in nnx.state(flat.vision.encoder, nnx.Param)
  np.testing.assert_allclose(np.asarray(_forward(flat, tokens, images)), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  soft_a = nnx.jit(vision.encode_images)(scanned.vision, images)
  soft_b = nnx.jit(vision.encode_images)(flat.vision, images)
  np.testing.assert_allclose(soft_a, soft_b, rtol=1e-5, atol=1e-6)
  # The round trip through the canonical form is exact.
  back = layout.vision_state_to_canonical(CFG, nnx.state(_copy(flat, CFG), nnx.Param))
  orig = layout.vision_state_to_canonical(CFG, state)
  for k in orig[0]:
    np.testing.assert_array_equal(back[0][k], orig[0][k])
  for la, lb in zip(orig[1], back[1]):
    for k in la:
      np.testing.assert_array_equal(la[k], lb[k])
  for policy in ('full', 'minimal'):
    m = _copy(scanned, dataclasses.replace(CFG, remat_policy=policy))
    np.testing.assert_allclose(np.asarray(_forward(m, tokens, images)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def _grads(cfg):
  model = _random_model(cfg)
  tokens, images = jnp.asarray(_tokens()), jnp.asarray(_images())
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    return jnp.mean(m(tokens, images=images)[:, -1] ** 2)
  return nnx.to_flat_state(jax.jit(jax.grad(loss))(params))


@pytest.mark.slow  # ~25-35 s: compiles
def test_grad_reaches_projector_not_frozen_tower():
  norms = {p: float(jnp.abs(g[...]).max()) for p, g in _grads(CFG)}
  assert norms[('vision', 'projector', 'projection')] > 0
  assert norms[('vision', 'projector', 'soft_norm', 'scale')] > 0
  tower = [v for p, v in norms.items() if p[:2] == ('vision', 'encoder')]
  assert tower and max(tower) == 0.0  # vision_trainable=False: stop_gradient
  trainable = {p: float(jnp.abs(g[...]).max())
               for p, g in _grads(dataclasses.replace(CFG, vision_trainable=True,
                                                      remat_policy='full'))}
  assert trainable[('vision', 'encoder', 'patch_kernel')] > 0
  assert trainable[('vision', 'encoder', 'blocks', 'attn', 'query')] > 0


# --- the mask against HF's own functions --------------------------------------------------


def _hf_masks(tokens, position_ids):
  """HF's {'full_attention', 'sliding_attention'} boolean [B, T, S] masks for these tokens."""
  text = Gemma3TextConfig(vocab_size=V + 64, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, sliding_window=3)
  text._attn_implementation = 'sdpa'  # pylint: disable=protected-access
  B, L = tokens.shape
  blocks = modeling_gemma3.get_block_sequence_ids_for_mask(
      torch.tensor((tokens == V).astype(np.int64)))
  masks = modeling_gemma3.create_masks_for_vision_model(
      text, torch.zeros(B, L, 8), None, None, torch.tensor(position_ids), blocks)
  return {k: m.numpy()[:, 0] for k, m in masks.items()}


def _ours(tokens, positions, segments, window):
  return np.asarray(attention.make_mask(jnp.asarray(positions), jnp.asarray(segments), window,
                                        attention.image_blocks(jnp.asarray(tokens), V)))


def test_image_blocks():
  tokens = np.array([[1, V, V, 2, V, 3, V, V, V], [V, V, 1, 1, 1, 1, 1, 1, V]])
  np.testing.assert_array_equal(attention.image_blocks(jnp.asarray(tokens), V),
                                [[0, 1, 1, 0, 2, 0, 3, 3, 3], [1, 1, 0, 0, 0, 0, 0, 0, 2]])


def test_mask_matches_hf_unpacked():
  tokens = _tokens()
  B, L = tokens.shape
  positions = np.broadcast_to(np.arange(L), (B, L)).copy()
  hf = _hf_masks(tokens, positions)
  ones = np.ones((B, L), np.int32)
  np.testing.assert_array_equal(_ours(tokens, positions, ones, None), hf['full_attention'])
  np.testing.assert_array_equal(_ours(tokens, positions, ones, 3), hf['sliding_attention'])
  # The local layers really differ from the global ones inside an image (block 4 > window 3).
  assert (hf['full_attention'] != hf['sliding_attention']).any()
  first = list(tokens[0]).index(V)
  assert hf['full_attention'][0, first, first + 3] and hf['sliding_attention'][0, first, first + 3]
  assert hf['full_attention'][0, first + 3, first]
  assert not hf['sliding_attention'][0, first + 3, first]


def test_mask_matches_hf_packed():
  """Two documents in one row, images at different offsets. HF's global mask for the packed
  row is ours; its local mask for a packed row looks image blocks up by in-document position
  rather than by index (transformers 5.x: the blockwise overlay sits inside the position
  remap), so there we compare with HF's mask of each document alone, which is what packing
  must preserve."""
  doc_a = [2, 10] + IMG + [11]
  doc_b = [2, 12, 13, 14, 15, 16] + IMG + [17, 18]
  tokens = np.array([doc_a + doc_b], np.int32)
  positions = np.array([list(range(len(doc_a))) + list(range(len(doc_b)))])
  segments = np.array([[1] * len(doc_a) + [2] * len(doc_b)])
  packed = _hf_masks(tokens, positions)
  np.testing.assert_array_equal(_ours(tokens, positions, segments, None),
                                packed['full_attention'])
  ours_local = _ours(tokens, positions, segments, 3)
  for s, doc in ((slice(0, len(doc_a)), doc_a), (slice(len(doc_a), None), doc_b)):
    alone = _hf_masks(np.array([doc]), np.arange(len(doc))[None])
    np.testing.assert_array_equal(ours_local[:, s, s], alone['sliding_attention'])
    np.testing.assert_array_equal(_ours(tokens, positions, segments, None)[:, s, s],
                                  alone['full_attention'])
  # Nothing crosses documents.
  n = len(doc_a)
  assert not ours_local[:, :n, n:].any() and not ours_local[:, n:, :n].any()


def test_kernels_compute_the_image_mask():
  """reference, dot_product (xla: the cudnn call's arguments) and splash's fallback agree."""
  tokens = _tokens()
  B, L = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  segments = jnp.ones((B, L), jnp.int32)
  blocks = attention.image_blocks(jnp.asarray(tokens), V)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, L, 4, 16))
  k = jax.random.normal(keys[1], (B, L, 2, 16))
  v = jax.random.normal(keys[2], (B, L, 2, 16))
  for window in (None, 3):
    want = attention.reference(q, k, v, attention.make_mask(positions, segments, window, blocks))
    got = attention.dot_product(q, k, v, segments, window, 'xla', positions, blocks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert attention.resolve('splash', jnp.bfloat16, images=True) == 'reference'
    fallback = attention.attend(q, k, v, positions, segments, window=window, impl='splash',
                                image_blocks_BL=blocks)
    np.testing.assert_allclose(fallback, want, rtol=1e-6, atol=1e-6)
    # Without the image blocks the text mask is unchanged (and differs here).
    text = attention.reference(q, k, v, attention.make_mask(positions, segments, window))
    assert not np.allclose(text, want)
