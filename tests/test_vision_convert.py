"""Vision weights in and out: HF Gemma3ForConditionalGeneration and Kaggle/Flax layouts, our
checkpoints, init_from. The reference is transformers' own model and its save_pretrained files."""

import dataclasses
import json
import logging

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch
import transformers

from flax import nnx

from configs import tiny
import gemma3_train
from gemma3_train.cli import convert as convert_cli
from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train.convert import layout
from gemma3_train.convert import orbax_tree
from gemma3_train.convert import vision_keys
from gemma3_train import sharding
from gemma3_train.training import checkpoint
from gemma3_train.training import frozen
from gemma3_train.training import init_from
from gemma3_train.training import state as train_state

V, D, L, N, K, H, F, W = 256, 32, 2, 2, 1, 16, 64, 8
VW, VM, VL, VN, S, P, T = 32, 48, 2, 4, 56, 14, 4  # 4x4 patches pooled 2x2 to 4 soft tokens


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      # Norm scales and biases too (they init to 0 or 1), so that a skipped leaf shows.
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 0.2))
  return model.eval()


def _tensors(path):
  out = {}
  for f in sorted(path.glob('*.safetensors')):
    out.update(safetensors.numpy.load_file(str(f)))
  return out


# The four HF layouts of a CondGen checkpoint: text, tower and projector prefixes.
LAYOUTS = {
    'hub': ('language_model.model.', 'vision_tower.vision_model.', 'multi_modal_projector.'),
    'v5_saved': ('language_model.model.', 'vision_tower.', 'multi_modal_projector.'),
    'v4_memory': ('model.language_model.', 'model.vision_tower.vision_model.',
                  'model.multi_modal_projector.'),
    'v5_memory': ('model.language_model.', 'model.vision_tower.', 'model.multi_modal_projector.'),
}


def _rename(tensors, src, dst):
  """Tensor names from layout src to layout dst (LAYOUTS keys)."""
  out = {}
  for k, x in tensors.items():
    for a, b in zip(LAYOUTS[src], LAYOUTS[dst]):
      if k.startswith(a):
        k = b + k[len(a):]
        break
    else:
      raise AssertionError(k)
    out[k] = x
  return out


@pytest.fixture(scope='module')
def hf_cond(tmp_path_factory):
  """A random tiny Gemma3ForConditionalGeneration as transformers saves it, its 64 extra
  embedding rows set to the mean row (what our export writes there)."""
  text = transformers.Gemma3TextConfig(
      vocab_size=V + 64, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
      num_attention_heads=N, num_key_value_heads=K, head_dim=H, query_pre_attn_scalar=H,
      sliding_window=W, max_position_embeddings=128)
  vision = dict(model_type='siglip_vision_model', hidden_size=VW, intermediate_size=VM,
                num_hidden_layers=VL, num_attention_heads=VN, image_size=S, patch_size=P,
                vision_use_head=False)
  config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                                     mm_tokens_per_image=T, image_token_index=V,
                                     attn_implementation='eager')
  model = _randomize(transformers.Gemma3ForConditionalGeneration(config), 3)
  with torch.no_grad():
    emb = model.get_input_embeddings().weight
    mean = emb[:V].double().mean(0).float()
    emb[V:] = mean
  path = tmp_path_factory.mktemp('hf_cond')
  model.save_pretrained(path)
  return path, model


def _in_layout(hf_cond, layout, dst):
  """The hf_cond checkpoint rewritten with `layout`'s names into dst."""
  path, _ = hf_cond
  dst.mkdir()
  safetensors.numpy.save_file(_rename(_tensors(path), 'v5_saved', layout),
                              str(dst / 'model.safetensors'))
  (dst / 'config.json').write_text((path / 'config.json').read_text())
  return dst


def test_saved_names_are_the_v5_layout(hf_cond):
  names = _tensors(hf_cond[0])
  assert 'vision_tower.embeddings.patch_embedding.weight' in names
  assert 'language_model.model.embed_tokens.weight' in names


def test_hf_config_gives_the_vision_fields(hf_cond):
  cfg = convert.open_source(hf_cond[0]).cfg
  assert cfg.vision and cfg.vocab_size == V
  assert (cfg.vision_image_size, cfg.vision_patch_size, cfg.vision_width, cfg.vision_depth,
          cfg.vision_mlp_dim, cfg.vision_num_heads, cfg.tokens_per_image) == (S, P, VW, VL, VM,
                                                                             VN, T)


@pytest.mark.parametrize('layout', ['v5_saved', 'v4_memory'])
def test_hf_import_export_is_bit_exact(hf_cond, tmp_path, layout):
  """HF CondGen (two layouts) -> ours -> export: every tensor of the hub layout, bit for bit."""
  src = hf_cond[0] if layout == 'v5_saved' else _in_layout(hf_cond, layout, tmp_path / 'src')
  convert.import_checkpoint(src, tmp_path / 'ours', progress=False)
  assert convert.open_source(tmp_path / 'ours').cfg.vision
  convert.export_hf(tmp_path / 'ours', tmp_path / 'back', dtype='float32', progress=False)
  expected = _rename(_tensors(hf_cond[0]), 'v5_saved', 'hub')
  got = _tensors(tmp_path / 'back')
  assert sorted(got) == sorted(expected)
  for k, x in expected.items():
    assert got[k].dtype == np.float32 and x.dtype == np.float32, k
    assert np.array_equal(got[k].view(np.uint32), x.view(np.uint32)), k


def test_export_loads_in_transformers_and_computes_the_same(hf_cond, tmp_path):
  path, model = hf_cond
  convert.export_hf(path, tmp_path / 'hf', dtype='float32', progress=False)
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['architectures'] == ['Gemma3ForConditionalGeneration']
  assert config['vision_config']['vision_use_head'] is False
  assert (config['image_token_index'], config['mm_tokens_per_image'],
          config['boi_token_index'], config['eoi_token_index']) == (V, T, 255999, 256000)
  assert config['text_config']['vocab_size'] == V + 64
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / 'hf')
  assert type(processor).__name__.startswith('Gemma3ImageProcessor')
  image = np.random.default_rng(1).integers(0, 256, (S + 9, S - 5, 3), np.uint8)
  pixels = processor(images=image, return_tensors='np')['pixel_values']
  assert pixels.shape == (1, 3, S, S) and -1 <= pixels.min() < pixels.max() <= 1
  back, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(
      tmp_path / 'hf', output_loading_info=True, attn_implementation='eager')
  assert not any(info.values()), info
  ref, got = model.state_dict(), back.state_dict()
  assert ref.keys() == got.keys()
  for k in ref:
    assert torch.equal(ref[k], got[k]), k
  # And the same logits on a row with an image (transformers' own forward, both sides).
  tokens = torch.tensor([[2, 5, 108, 3, *[V] * T, 4, 108, 7, 9]])  # image tokens = V
  pixels = torch.rand((1, 3, S, S), generator=torch.Generator().manual_seed(0)) * 2 - 1
  with torch.no_grad():
    a = model(input_ids=tokens, pixel_values=pixels).logits
    b = back.eval()(input_ids=tokens, pixel_values=pixels).logits
  assert torch.equal(a, b)


# --- Kaggle / Flax --------------------------------------------------------------------------


def _random_vision(cfg, seed):
  rng = np.random.default_rng(seed)
  r = lambda shape: rng.standard_normal(shape).astype(np.float32)
  top = {k: r(s) for k, s in vision_keys.top_shapes(cfg).items()}
  layers = [{k: r(s) for k, s in vision_keys.layer_shapes(cfg).items()}
            for _ in range(cfg.vision_depth)]
  return top, layers


def _kaggle_text(top, layers):
  """The text arrays in the released FLAT layout (canonical -> Kaggle names, by hand)."""
  tree = {'transformer/embedder': {'input_embedding': top['embedding']},
          'transformer/final_norm': {'scale': top['final_norm']}}
  for i, x in enumerate(layers):
    p = f'transformer/layer_{i}/'
    tree.update({p + n: {'scale': x[n]} for n in ('pre_attention_norm', 'post_attention_norm',
                                                  'pre_ffw_norm', 'post_ffw_norm')})
    tree.update({
        p + 'attn/q_einsum': {'w': x['q_einsum']},
        p + 'attn/kv_einsum': {'w': np.stack([x['k_einsum'], x['v_einsum']])},
        p + 'attn/attn_vec_einsum': {'w': x['attn_vec_einsum']},
        p + 'attn/_query_norm': {'scale': x['query_norm']},
        p + 'attn/_key_norm': {'scale': x['key_norm']},
        p + 'mlp/gating_einsum': {'w': x['gating_einsum']},
        p + 'mlp/linear': {'w': x['linear']}})
  return tree


def _kaggle_vision_by_hand(top, layers):
  """The vision arrays under the names Google's FLAT checkpoints use, written out by hand."""
  r = 'SigLiPFromPatches_0/siglip_encoder'
  tree = {r: {'pos_embedding': top['pos_embedding'][None]},
          f'{r}/embedding': {'kernel': top['patch_kernel'], 'bias': top['patch_bias']},
          f'{r}/Transformer/encoder_norm': {'scale': top['encoder_norm_scale'],
                                            'bias': top['encoder_norm_bias']},
          'transformer/embedder/mm_soft_embedding_norm': {'scale': top['mm_soft_embedding_norm']},
          'transformer/embedder/mm_input_projection': {'w': top['mm_input_projection']}}
  for j, x in enumerate(layers):
    b = f'{r}/Transformer/encoderblock_{j}/'
    tree[b + 'LayerNorm_0'] = {'scale': x['ln0_scale'], 'bias': x['ln0_bias']}
    tree[b + 'LayerNorm_1'] = {'scale': x['ln1_scale'], 'bias': x['ln1_bias']}
    for n in ('query', 'key', 'value', 'out'):
      tree[b + f'MultiHeadDotProductAttention_0/{n}'] = {'kernel': x[f'{n}_kernel'],
                                                         'bias': x[f'{n}_bias']}
    tree[b + 'MlpBlock_0/Dense_0'] = {'kernel': x['fc1_kernel'], 'bias': x['fc1_bias']}
    tree[b + 'MlpBlock_0/Dense_1'] = {'kernel': x['fc2_kernel'], 'bias': x['fc2_bias']}
  return tree


def _nested(flat):
  """The gemma library's init tree: nested dicts, SigLIP under vision_encoder, no 'transformer'."""
  out = {}
  for key, leaves in flat.items():
    parts = key.split('/')
    parts = parts[1:] if parts[0] == 'transformer' else ['vision_encoder'] + parts[1:]
    node = out
    for k in parts[:-1]:
      node = node.setdefault(k, {})
    if parts[-2:-1] == ['mlp']:
      node[parts[-1]] = leaves['w']
    else:  # a module with leaves and submodules (siglip_encoder: pos_embedding, embedding/...)
      node.setdefault(parts[-1], {}).update(leaves)
  return out


def _save_orbax(path, tree):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize('layout', ['flat', 'nested'])
def test_kaggle_vision_round_trip_is_bit_exact(hf_cond, tmp_path, monkeypatch, layout):
  cfg, top, layers = convert.load_canonical(hf_cond[0])
  vtop, vlayers = _random_vision(cfg, 0)
  by_hand = _kaggle_vision_by_hand(vtop, vlayers)
  # Our table's export direction writes exactly the released names and shapes.
  ours = vision_keys.canonical_to_kaggle(vtop, vlayers)
  assert ours.keys() == by_hand.keys()
  for k in ours:
    _equal(ours[k], by_hand[k])
  flat = {**_kaggle_text(top, layers), **by_hand}
  _save_orbax(tmp_path / 'kaggle', flat if layout == 'flat' else _nested(flat))
  src = convert.open_source(tmp_path / 'kaggle', cfg)
  assert src.has_vision()
  if layout == 'flat':  # with no config: the text preset from the shapes, vision fields too
    monkeypatch.setitem(config_lib.PRESETS, 'tiny_test',
                        {k: getattr(cfg, k) for k in config_lib.PRESETS['1b']})
    inferred = convert.open_source(tmp_path / 'kaggle').cfg
    assert inferred == dataclasses.replace(cfg, preset='tiny_test', vision_pool=4)
    # A vision run of other vision shapes: one line naming the leaf, before any array is read.
    c = _run_config(tmp_path / 'kaggle', **{**_VISION, 'vision_mlp_dim': 2 * VM})
    with pytest.raises(config_lib.ConfigError, match=r'^checkpoint.init_from=.*MlpBlock_0/'
                       r'Dense_0/kernel has shape \(32, 48\), expected \(32, 96\)$'):
      init_from.open_init_source(str(tmp_path / 'kaggle'), c)
  got_top, got_layers = src.vision()
  _equal(got_top, vtop)
  assert len(got_layers) == VL
  for a, b in zip(got_layers, vlayers):
    _equal(a, b)
  # Through our params-only checkpoint and back to the Kaggle names.
  convert.import_checkpoint(tmp_path / 'kaggle', tmp_path / 'ours', cfg, progress=False)
  again = convert.open_source(tmp_path / 'ours').vision()
  back = vision_keys.canonical_to_kaggle(*again)
  for k in by_hand:
    _equal(back[k], by_hand[k])


# --- init_from ------------------------------------------------------------------------------


_VISION = dict(vision=True, vision_image_size=S, vision_patch_size=P, vision_width=VW,
               vision_depth=VL, vision_mlp_dim=VM, vision_num_heads=VN, vision_pool=2)


def _run_config(init_from, **model):
  return config_lib.from_config_dict(tiny.get_config()).replace(
      model=dict(vocab_size=V, embed_dim=D, num_layers=L, num_heads=N, num_kv_heads=K,
                 head_dim=H, mlp_dim=F, sliding_window=W, query_pre_attn_scalar=float(H),
                 global_rope_scale=1.0, **model),
      mesh=dict(fsdp=4, tensor=2), checkpoint=dict(init_from=str(init_from)))


def test_text_run_from_a_multimodal_checkpoint_skips_vision(hf_cond, caplog):
  path, _ = hf_cond
  c = _run_config(path)
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  with caplog.at_level(logging.INFO, logger='gemma3_train.training.init_from'):
    params = init_from.load_init_params(str(path), c, s.abstract_state)
  skipped = [r for r in caplog.records if 'vision' in r.getMessage()]
  assert len(skipped) == 1 and skipped[0].levelno == logging.INFO, caplog.records
  assert 'skipped' in skipped[0].getMessage()
  got = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(params)}
  assert not any(k[0] == 'vision' for k in got)
  # The text weights are the originals, as transformers saved them.
  t = _tensors(path)
  p = 'language_model.model.'
  np.testing.assert_array_equal(got[('embedder', 'embedding')], t[p + 'embed_tokens.weight'][:V])
  np.testing.assert_array_equal(got[('final_norm', 'scale')], t[p + 'norm.weight'])
  q = t[p + 'layers.1.self_attn.q_proj.weight']  # [N*H, D] -> [N, D, H]
  at = lambda i, *leaf: got[layout.layer_prefix(c.model, i)[0] + leaf]  # L < 6: no blocks
  np.testing.assert_array_equal(at(1, 'attn', 'q_einsum'), q.reshape(N, H, D).transpose(0, 2, 1))
  np.testing.assert_array_equal(at(0, 'mlp', 'linear'), t[p + 'layers.0.mlp.down_proj.weight'].T)


def test_vision_run_from_a_text_checkpoint_is_a_one_line_error(hf_cond, tmp_path):
  text = transformers.Gemma3ForCausalLM(hf_cond[1].config.text_config)
  text.config.vocab_size = V
  text.resize_token_embeddings(V)
  text.save_pretrained(tmp_path)
  c = _run_config(tmp_path, **_VISION)
  with pytest.raises(config_lib.ConfigError) as e:
    init_from.open_init_source(str(tmp_path), c)
  msg = str(e.value)
  assert '\n' not in msg and f'checkpoint.init_from={tmp_path}' in msg
  assert msg.startswith('model.vision=True') and 'no vision weights' in msg


# --- gemma3_train.load and our checkpoints --------------------------------------------------


def _hf_logits(model, tokens, pixels):
  tokens = torch.from_numpy(tokens).long()
  with torch.no_grad():  # token_type_ids 1 at image tokens, as the HF processor gives them
    return model(input_ids=tokens, pixel_values=torch.from_numpy(pixels),
                 token_type_ids=(tokens == V).long()).logits.float().numpy()


# One compile for both loads (same config).
_forward = nnx.jit(lambda model, tokens, images: model(tokens, images=images))


def test_load_gives_a_vision_model_for_every_source(hf_cond, tmp_path):
  """HF dir, our params-only checkpoint and the Kaggle layout all load as the same vision
  model, whose logits on a row with an image are transformers'."""
  path, model = hf_cond
  tokens = np.array([[2, 5, 108, 3, *[V] * T, 3, 108, 7, 9, 11]], np.int32)
  pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, S, S)).astype(np.float32)
  ref = _hf_logits(model, tokens, pixels)[..., :V]
  images = pixels.transpose(0, 2, 3, 1)[:, None]  # [B, N, S, S, 3]
  convert.import_checkpoint(path, tmp_path / 'ours', progress=False)
  cfg, top, layers = convert.load_canonical(path)
  flat = {**_kaggle_text(top, layers),
          **vision_keys.canonical_to_kaggle(*convert.open_source(path).vision())}
  _save_orbax(tmp_path / 'kaggle', flat)
  for src in (path, tmp_path / 'ours'):
    m = gemma3_train.load(src)
    assert m.cfg.vision
    got = np.asarray(_forward(m, tokens, images))
    text = tokens[0] != V  # HF's logits at image positions are not compared (no loss there)
    rel = np.abs(got - ref)[:, text].max() / np.abs(ref[:, text]).max()
    assert rel < 1e-5, (src, rel)
  kaggle = convert.open_source(tmp_path / 'kaggle', cfg)
  a, b = convert.open_source(tmp_path / 'ours').vision(), kaggle.vision()
  _equal(a[0], b[0])
  for x, y in zip(a[1], b[1]):
    _equal(x, y)


def test_vision_run_from_hf_saves_a_workdir_that_exports_the_originals(hf_cond, tmp_path):
  """init_from a CondGen dir (scanned encoder: stacked leaves placed layer by layer), saved by
  training's Checkpointer, exported from the workdir: the original tensors, bit for bit. The
  encoder is frozen, so the checkpoint does not hold it: the export reads it from init_from."""
  path, _ = hf_cond
  c = _run_config(path, **_VISION, scan_layers=True)
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  loaded = init_from.load_init_params(str(path), c,
                                      {'params': frozen.load_abstract(c, s.abstract_state)})
  params, parts = frozen.split_params(c, loaded)
  assert set(parts) == {'vision_encoder'}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), c)
  ckpt.save(1, {'params': params, 'frozen': parts}, None, force=True)  # params are read
  ckpt.close()
  tree = (tmp_path / 'run' / 'checkpoints' / '1' / 'state' / '_METADATA').read_text()
  assert 'projector' in tree and 'encoder' not in tree
  assert convert.open_source(tmp_path / 'run').has_vision()
  convert.export_hf(tmp_path / 'run', tmp_path / 'hf', dtype='float32', progress=False)
  expected = _rename(_tensors(path), 'v5_saved', 'hub')
  got = _tensors(tmp_path / 'hf')
  assert sorted(got) == sorted(expected)
  for k, x in expected.items():
    assert np.array_equal(got[k].view(np.uint32), x.view(np.uint32)), k


def test_kaggle_export_round_trip_is_bit_exact(hf_cond, tmp_path):
  """HF CondGen -> our checkpoint -> `gemma3-convert export --format=kaggle` -> read back: every
  text and vision array equal, under the released FLAT names."""
  cfg = convert.import_checkpoint(hf_cond[0], tmp_path / 'ours', progress=False)
  convert_cli.main(['export', f'--src={tmp_path / "ours"}', f'--dst={tmp_path / "kaggle"}',
                    '--format=kaggle', '--dtype=float32'])
  back = convert.open_source(tmp_path / 'kaggle', cfg)
  assert isinstance(back, convert.KaggleSource) and back.has_vision()
  src = convert.open_source(tmp_path / 'ours')
  _equal(dict(src.top()), dict(back.top()))
  for i in range(cfg.num_layers):
    _equal(dict(src.layer(i)), dict(back.layer(i)))
  (vtop, vlayers), (btop, blayers) = src.vision(), back.vision()
  _equal(dict(vtop), dict(btop))
  for a, b in zip(vlayers, blayers):
    _equal(dict(a), dict(b))
  names = {'/'.join(keys) for keys in orbax_tree.leaves(convert.absolute(tmp_path / 'kaggle'))}
  assert 'transformer/layer_0/attn/kv_einsum/w' in names
  assert ('SigLiPFromPatches_0/siglip_encoder/Transformer/encoderblock_0/MlpBlock_0/Dense_0/'
          'kernel') in names
