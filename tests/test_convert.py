"""Checkpoint interop against transformers: HF import/export, Kaggle layouts, bad input."""

import copy
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

import gemma3_train
from gemma3_train.cli import convert as convert_cli
from gemma3_train import config as config_lib
from gemma3_train import convert
from tests import helpers
from tests.helpers import D, F, H, K, L, N, TOKENS, V, W  # the text model's shape

# One compile for every test: the tiny models share a config, so the cache hits.
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _ours(path, tokens=TOKENS):
  return np.asarray(_forward(gemma3_train.load(path), tokens))


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _tensors(path):
  out = {}
  for f in sorted(path.glob('*.safetensors')):
    out.update(safetensors.numpy.load_file(str(f)))
  return out


@pytest.fixture(scope='module')
def hf_text(tmp_path_factory):
  """A random Gemma3ForCausalLM, saved in small shards (so there is an index json)."""
  model = helpers.randomize_hf(
      transformers.Gemma3ForCausalLM(helpers.hf_text_config(attn_implementation='eager')), 1)
  path = tmp_path_factory.mktemp('hf_text')
  model.save_pretrained(path, max_shard_size='100KB')
  return path, model


@pytest.fixture(scope='module')
def hf_mm(tmp_path_factory):
  """A random Gemma3ForConditionalGeneration whose text vocabulary is padded by 64 rows."""
  vision = dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=helpers.hf_text_config(vocab=V + 64).to_dict(),
                                     vision_config=vision, mm_tokens_per_image=4,
                                     image_token_index=V, attn_implementation='eager')
  model = helpers.randomize_hf(transformers.Gemma3ForConditionalGeneration(config), 2)
  path = tmp_path_factory.mktemp('hf_mm')
  model.save_pretrained(path)
  return path, model


def test_hf_text_import_matches_transformers(hf_text):
  path, model = hf_text
  assert (path / 'model.safetensors.index.json').exists()
  cfg = convert.open_source(path).cfg
  assert (cfg.vocab_size, cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.mlp_dim, cfg.sliding_window) == (V, L, D, N, K, H, F, W)
  assert (cfg.global_rope_scale, cfg.global_rope_base, cfg.local_rope_base) == (8.0, 1e6, 1e4)
  ours, ref = _ours(path), helpers.hf_logits(model, TOKENS)
  assert ours.shape == (2, 24, V)
  print('text rel err', _rel(ours, ref))
  assert _rel(ours, ref) < 1e-5


def test_hf_multimodal_import_both_layouts(hf_mm, tmp_path):
  path, model = hf_mm
  assert any(k.startswith('language_model.model.') for k in _tensors(path))
  ref = helpers.hf_logits(model, TOKENS)
  assert ref.shape[-1] == V + 64
  ours = _ours(path)
  print('multimodal rel err', _rel(ours, ref[..., :V]))
  assert ours.shape == (2, 24, V) and _rel(ours, ref[..., :V]) < 1e-5
  # The transformers >= 4.52 in-memory names: model.language_model.*.
  renamed = {k.replace('language_model.model.', 'model.language_model.'): v
             for k, v in _tensors(path).items()}
  safetensors.numpy.save_file(renamed, str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text((path / 'config.json').read_text())
  _, top_a, layers_a = convert.load_canonical(path)
  _, top_b, layers_b = convert.load_canonical(tmp_path)
  for a, b in zip([top_a, *layers_a], [top_b, *layers_b]):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_legacy_flat_rope_fields_read_like_rope_parameters():
  legacy = dict(model_type='gemma3_text', hidden_size=D, intermediate_size=F,
                num_hidden_layers=L, num_attention_heads=N, num_key_value_heads=K, head_dim=H,
                query_pre_attn_scalar=H, sliding_window=W, vocab_size=V, rope_theta=1e6,
                rope_local_base_freq=1e4, rope_scaling={'rope_type': 'linear', 'factor': 8.0},
                sliding_window_pattern=6)
  new = helpers.hf_text_config().to_dict()
  assert convert.hf_config_to_model(legacy) == convert.hf_config_to_model(new)
  # A hub 4b config lists only what differs from Gemma3TextConfig's defaults.
  hub = {'model_type': 'gemma3', 'text_config': {
      'hidden_size': 2560, 'intermediate_size': 10240, 'model_type': 'gemma3_text',
      'num_hidden_layers': 34, 'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
      'sliding_window': 1024}}
  assert convert.hf_config_to_model(hub) == config_lib.ModelConfig.from_preset('4b')


def test_import_then_export_loads_in_transformers_without_warnings(hf_text, tmp_path, caplog):
  path, model = hf_text
  ours_dir, hf_dir = tmp_path / 'ours', tmp_path / 'hf'
  convert.import_checkpoint(path, ours_dir, progress=False)
  assert convert.checkpoint_kind(ours_dir) == 'params'
  ours = _ours(ours_dir)
  assert _rel(ours, helpers.hf_logits(model, TOKENS)) < 1e-5
  convert.export_hf(ours_dir, hf_dir, dtype='float32', shard_size=60_000, progress=False)
  assert (hf_dir / 'model.safetensors.index.json').exists()
  transformers.utils.logging.enable_propagation()
  with caplog.at_level(logging.WARNING, logger='transformers'):
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, output_loading_info=True, attn_implementation='eager')
  assert type(back).__name__ == 'Gemma3ForCausalLM'
  assert not any(info.values()), info
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not warnings, warnings
  exported = helpers.hf_logits(back.eval(), TOKENS)
  print('export rel err', _rel(exported, ours))
  assert _rel(exported, ours) < 1e-5


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_hf_ours_hf_round_trip_is_bit_exact(hf_text, tmp_path, dtype):
  path, model = hf_text
  src = path
  if dtype == 'bfloat16':
    src = tmp_path / 'bf16'
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(src)
  convert.import_checkpoint(src, tmp_path / 'ours', progress=False)
  convert.export_hf(tmp_path / 'ours', tmp_path / 'back', dtype=dtype, progress=False)
  a, b = _tensors(src), _tensors(tmp_path / 'back')
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


# --- Kaggle / Flax Orbax ------------------------------------------------------------


def _kaggle_flat(top, layers):
  """The released FLAT layout (the Kaggle checkpoints) built from canonical arrays."""
  tree = {'transformer/embedder': {'input_embedding': top['embedding']},
          'transformer/final_norm': {'scale': top['final_norm']}}
  for i, x in enumerate(layers):
    p = f'transformer/layer_{i}/'
    tree.update({
        p + 'pre_attention_norm': {'scale': x['pre_attention_norm']},
        p + 'post_attention_norm': {'scale': x['post_attention_norm']},
        p + 'pre_ffw_norm': {'scale': x['pre_ffw_norm']},
        p + 'post_ffw_norm': {'scale': x['post_ffw_norm']},
        p + 'attn/q_einsum': {'w': x['q_einsum']},
        p + 'attn/kv_einsum': {'w': np.stack([x['k_einsum'], x['v_einsum']])},
        p + 'attn/attn_vec_einsum': {'w': x['attn_vec_einsum']},
        p + 'attn/_query_norm': {'scale': x['query_norm']},
        p + 'attn/_key_norm': {'scale': x['key_norm']},
        p + 'mlp/gating_einsum': {'w': x['gating_einsum']},
        p + 'mlp/linear': {'w': x['linear']},
    })
  return tree


def _nested(flat):
  """gemma-lib model.init() tree: nested dicts, no 'transformer', MLP leaves without 'w'."""
  out = {}
  for key, leaves in flat.items():
    *path, last = key.split('/')[1:]
    node = out
    for k in path:
      node = node.setdefault(k, {})
    node[last] = leaves['w'] if path[-1:] == ['mlp'] else leaves
  return out


def _stacked(flat, pattern=6):
  """layer_i/... -> stacked_layers/attention_type_{i % 6}/... with a leading stack axis."""
  out, groups = {}, {}
  for key, leaves in flat.items():
    parts = key.split('/')
    if not parts[1].startswith('layer_'):
      out[key] = leaves
      continue
    i = int(parts[1][len('layer_'):])
    name = '/'.join(['transformer', 'stacked_layers', f'attention_type_{i % pattern}'] + parts[2:])
    for leaf, x in leaves.items():
      groups.setdefault((name, leaf), []).append((i, x))
  for (name, leaf), xs in groups.items():
    out.setdefault(name, {})[leaf] = np.stack([x for _, x in sorted(xs, key=lambda t: t[0])])
  return out


def _save_orbax(path, tree):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()


@pytest.mark.parametrize('layout', ['flat', 'nested', 'stacked', 'kauldron'])
def test_kaggle_layouts_import_like_hf(hf_text, tmp_path, layout):
  path, model = hf_text
  cfg, top, layers = convert.load_canonical(path)
  flat = _kaggle_flat(top, layers)
  tree = {'flat': flat, 'nested': _nested(flat), 'stacked': _stacked(flat),
          'kauldron': {'params': _nested(flat)}}[layout]
  _save_orbax(tmp_path / 'kaggle', tree)
  assert convert.checkpoint_kind(tmp_path / 'kaggle') == 'kaggle'
  cfg_k, top_k, layers_k = convert.load_canonical(tmp_path / 'kaggle', cfg)
  assert cfg_k == cfg
  for a, b in zip([top, *layers], [top_k, *layers_k]):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  if layout == 'flat':  # and end to end: Kaggle -> ours -> logits equal to transformers'
    convert.import_checkpoint(tmp_path / 'kaggle', tmp_path / 'ours', cfg, progress=False)
    assert _rel(_ours(tmp_path / 'ours'), helpers.hf_logits(model, TOKENS)) < 1e-5


def test_kaggle_config_inferred_from_shapes(hf_text, tmp_path, monkeypatch):
  cfg, top, layers = convert.load_canonical(hf_text[0])
  _save_orbax(tmp_path / 'kaggle', _kaggle_flat(top, layers))
  with pytest.raises(convert.ConversionError, match='match no Gemma 3 preset'):
    convert.open_source(tmp_path / 'kaggle')
  shapes = {k: getattr(cfg, k) for k in config_lib.PRESETS['1b']}
  monkeypatch.setitem(config_lib.PRESETS, 'tiny_test', shapes)
  inferred = convert.open_source(tmp_path / 'kaggle').cfg
  assert inferred == dataclasses.replace(cfg, preset='tiny_test')


# --- bad input ----------------------------------------------------------------------------


def test_missing_shard_names_the_file(hf_text, tmp_path):
  for f in hf_text[0].iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  shard = sorted(tmp_path.glob('model-*.safetensors'))[-1]
  shard.unlink()
  with pytest.raises(convert.ConversionError, match=f'{shard.name}: shard listed in '
                     'model.safetensors.index.json is missing'):
    convert.load_canonical(tmp_path)


def test_wrong_shaped_tensor_names_the_tensor(hf_text, tmp_path):
  tensors = _tensors(hf_text[0])
  name = 'model.layers.3.self_attn.k_proj.weight'
  tensors[name] = tensors[name][:H]
  safetensors.numpy.save_file(tensors, str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text((hf_text[0] / 'config.json').read_text())
  with pytest.raises(convert.ConversionError,
                     match=rf'{name}: shape \({H}, {D}\), expected \({K * H}, {D}\)'):
    convert.load_canonical(tmp_path)


def test_non_gemma_config_names_the_file(hf_text, tmp_path):
  config = json.loads((hf_text[0] / 'config.json').read_text())
  config['model_type'] = 'llama'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(convert.ConversionError) as e:
    convert.load_canonical(tmp_path)
  assert str(e.value) == (f"{tmp_path / 'config.json'}: model_type='llama' is not Gemma 3 "
                          '(expected gemma3 or gemma3_text)')


# --- gemma3-convert -----------------------------------------------------------------------


@pytest.mark.parametrize('command,flags', [
    ('import', ['--src', '--dst', '--config']),
    ('export', ['--src', '--dst', '--dtype', '--shard_size']),
    ('info', ['--src'])])
def test_cli_help_documents_every_flag(command, flags, capsys):
  with pytest.raises(SystemExit) as e:
    convert_cli.main([command, '--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for flag in flags:
    assert flag in out


def test_cli_import_kaggle_with_config_then_export(hf_text, tmp_path, capsys):
  cfg, top, layers = convert.load_canonical(hf_text[0])
  _save_orbax(tmp_path / 'kaggle', _kaggle_flat(top, layers))
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'tiny_test.py').write_text(
      'from gemma3_train import config as config_lib\n\n\ndef get_config():\n'
      '  c = config_lib.default_config_dict()\n'
      f'  c.model.update(vocab_size={V}, num_layers={L}, embed_dim={D}, mlp_dim={F}, '
      f'num_heads={N}, num_kv_heads={K}, head_dim={H}, query_pre_attn_scalar={H}.0, '
      f'sliding_window={W}, global_rope_scale=8.0)\n  return c\n')
  convert_cli.main(['import', f'--src={tmp_path / "kaggle"}', f'--dst={tmp_path / "ours"}',
                    f'--config={tmp_path / "configs" / "tiny_test.py"}'])
  convert_cli.main(['export', f'--src={tmp_path / "ours"}', f'--dst={tmp_path / "hf"}',
                    '--dtype=float32', '--shard_size=50KB'])
  a, b = _tensors(hf_text[0]), _tensors(tmp_path / 'hf')
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  convert_cli.main(['info', f'--src={tmp_path / "ours"}'])
  info = json.loads(capsys.readouterr().out.split('\n', 2)[-1])
  assert info['kind'] == 'params' and info['model']['embed_dim'] == D


def test_cli_errors_are_one_line_and_exit_2(hf_text, tmp_path, monkeypatch, capsys):
  config = json.loads((hf_text[0] / 'config.json').read_text())
  config['model_type'] = 'mistral'
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'config.json').write_text(json.dumps(config))
  for argv in (['import', f'--src={tmp_path / "src"}', f'--dst={tmp_path / "out"}'],
               ['export', f'--src={tmp_path / "nowhere"}', f'--dst={tmp_path / "out"}']):
    monkeypatch.setattr('sys.argv', ['gemma3-convert', *argv])
    with pytest.raises(SystemExit) as e:
      convert_cli.run()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('gemma3-convert: error: ') and err.count('\n') == 1, err
  assert "model_type='mistral' is not Gemma 3" in err or 'nowhere: not a directory' in err
