"""GGUF export against transformers' GGUF loader (which dequantizes with the gguf package):
weights, logits, tokenizer, chat template, and bad input.

The small model keeps head_dim = query_pre_attn_scalar = 256 and RoPE bases 1e6 / 1e4 without
scaling: what a gemma3 GGUF file implies and what transformers' reader assumes. Its vocabulary
(1024) is the bundled tokenizer's first 1024 pieces, as a GGUF file needs one row per token.
"""

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from sentencepiece import sentencepiece_model_pb2

from gemma3_train.cli import convert as convert_cli
from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train.convert import gguf as gguf_lib
from gemma3_train.convert import hf_tokenizer
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.models import decoder as model_lib
from gemma3_train.models import lora
from gemma3_train.models import quant

V = 1024
CFG = config_lib.ModelConfig(
    preset='test', vocab_size=V, embed_dim=64, mlp_dim=128, num_layers=7, num_heads=2,
    num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256.0, sliding_window=8,
    global_rope_scale=1.0, param_dtype='float32', dtype='float32', remat_policy='none',
    attention_impl='reference')
TOKENS = np.random.default_rng(1).integers(0, V, (2, 20)).astype(np.int32)
_forward = nnx.jit(lambda model, tokens: model(tokens))

# canonical leaf -> its input axes (lora.TARGETS); the embedding's rows are its tokens.
IN_AXES = {'q_einsum': (1,), 'k_einsum': (1,), 'v_einsum': (1,), 'attn_vec_einsum': (0, 1),
           'gating_einsum': (2,), 'linear': (0,), 'embedding': (1,)}


def random_canonical(cfg, seed=0):
  """(top, layers) of a random model: matrices ~ 1/sqrt(fan_in), norms spread around 0 (so
  that a norm missing its +1 convention shows)."""
  top, layers = layout.state_to_canonical(
      cfg, nnx.state(model_lib.Gemma3(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
  rng = np.random.default_rng(seed)
  noise = lambda x: (rng.standard_normal(x.shape) * 0.5).astype(np.float32)
  top['final_norm'] = noise(top['final_norm'])
  for layer in layers:
    layer.update({k: noise(v) for k, v in layer.items() if v.ndim == 1})
  return top, layers


def small_tokenizer(path, n=V):
  """The bundled SentencePiece model cut to its first n pieces (specials, turns, bytes)."""
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(tokenizer_lib.Tokenizer('').model_proto)
  del m.pieces[n:]
  path.write_bytes(m.SerializeToString())
  return str(path)


def ours_logits(cfg, top, layers, tokens=TOKENS):
  model = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, layout.canonical_to_state(cfg, top, layers))
  return np.asarray(_forward(model, tokens))


def as_read(x, kind, name):
  """What a `kind` GGUF tensor holds for a canonical float32 array (norms stay float32)."""
  if x.ndim == 1 or kind == 'f32':
    return x
  if kind == 'f16':
    return x.astype(np.float16).astype(np.float32)
  if kind == 'bf16':
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
  return np.asarray(quant.dequantized(x, IN_AXES[name], kind))


def rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """Our params checkpoint of the small model, and the cut tokenizer's path."""
  d = tmp_path_factory.mktemp('gguf')
  top, layers = random_canonical(CFG)
  ours.save_params(d / 'ours', CFG, top, enumerate(layers))
  return d, top, layers, small_tokenizer(d / 'tok.model')


def load_hf(path):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True)
  return model.eval(), info


@pytest.mark.parametrize('kind', ['f16', 'bf16', pytest.param('q8_0', marks=pytest.mark.slow),
                                  pytest.param('q4_0', marks=pytest.mark.slow)])
def test_transformers_loads_the_file_with_our_logits(small, tmp_path, kind):
  d, top, layers, tok = small
  out = tmp_path / f'm-{kind}.gguf'
  convert_cli.main(['export', '--format=gguf', f'--quant={kind}', f'--src={d / "ours"}',
                    f'--dst={out}', f'--tokenizer={tok}'])
  model, info = load_hf(out)
  assert type(model).__name__ == 'Gemma3ForCausalLM'
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert not info['mismatched_keys'], info
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(TOKENS).long()).logits.float().numpy()
  expected = ours_logits(CFG, {k: as_read(v, kind, k) for k, v in top.items()},
                         [{k: as_read(v, kind, k) for k, v in l.items()} for l in layers])
  print(kind, 'rel', rel(ref, expected))
  assert rel(ref, expected) < 1e-4
  # The rounding is visible: the file is not just float32 (q4_0 moves the logits the most).
  assert rel(ours_logits(CFG, top, layers), expected) > (1e-3 if kind == 'q4_0' else 1e-7)


def test_file_metadata_norms_and_block_bytes(small, tmp_path):
  """The gemma3 keys, norms stored with +1 in float32, and Q4_0 bytes equal to gguf's own
  (numpy) quantizer's."""
  d, top, layers, tok = small
  out = convert.export_gguf(d / 'ours', tmp_path, 'q4_0', tok, embedding='q8_0',
                            progress=False)[1]
  assert out.name == 'gemma3-test-q4_0.gguf'
  r = gguf.GGUFReader(str(out))
  field = lambda k: r.fields[k].contents()
  assert field('general.architecture') == 'gemma3'
  assert (field('gemma3.embedding_length'), field('gemma3.block_count'),
          field('gemma3.feed_forward_length'), field('gemma3.attention.head_count'),
          field('gemma3.attention.head_count_kv'), field('gemma3.attention.key_length'),
          field('gemma3.attention.sliding_window')) == (64, 7, 128, 2, 1, 256, 8)
  assert field('gemma3.rope.freq_base') == 1e6
  assert (field('tokenizer.ggml.bos_token_id'), field('tokenizer.ggml.eos_token_id'),
          field('tokenizer.ggml.eot_token_id'), field('tokenizer.ggml.padding_token_id')) == (
              2, 1, 106, 0)
  assert field('tokenizer.ggml.model') == 'llama'
  assert field('general.file_type') == int(gguf.LlamaFileType.MOSTLY_Q4_0)
  tensors = {t.name: t for t in r.tensors}
  assert 'output.weight' not in tensors and len(tensors) == 2 + 13 * CFG.num_layers
  assert tensors['token_embd.weight'].tensor_type == gguf.GGMLQuantizationType.Q8_0
  norm = tensors['blk.3.ffn_norm.weight']
  assert norm.tensor_type == gguf.GGMLQuantizationType.F32
  np.testing.assert_array_equal(np.asarray(norm.data), layers[3]['pre_ffw_norm'] + 1)
  gate = tensors['blk.2.ffn_gate.weight']
  assert gate.tensor_type == gguf.GGMLQuantizationType.Q4_0
  ref = gguf.quants.quantize(layers[2]['gating_einsum'][0], gguf.GGMLQuantizationType.Q4_0)
  np.testing.assert_array_equal(np.asarray(gate.data), ref)
  o = tensors['blk.0.attn_output.weight']  # [D, N H]: blocks across the two heads' rows
  np.testing.assert_array_equal(
      gguf.quants.dequantize(np.asarray(o.data), gguf.GGMLQuantizationType.Q4_0),
      as_read(layers[0]['attn_vec_einsum'], 'q4_0', 'attn_vec_einsum')
      .transpose(2, 0, 1).reshape(64, -1))


def test_chat_template_and_tokenizer_fields_are_in_the_file(small, tmp_path):
  d, _, _, tok = small
  out = tmp_path / 'm.gguf'
  convert.export_gguf(d / 'ours', out, 'f16', tok, progress=False)
  r = gguf.GGUFReader(str(out))
  expected = json.loads(hf_tokenizer.hf_tokenizer_files(
      tokenizer_lib.Tokenizer('').model_proto)['tokenizer_config.json'])['chat_template']
  assert r.fields['tokenizer.chat_template'].contents() == expected
  pieces = r.fields['tokenizer.ggml.tokens'].contents()
  assert len(pieces) == V and pieces[105:107] == ['<start_of_turn>', '<end_of_turn>']
  types = r.fields['tokenizer.ggml.token_type'].contents()
  assert types[:4] == [3, 3, 3, 2] and types[105] == 4 and types[300] == 6  # control, unk, bytes
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='m.gguf')
  msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
          {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'}]
  text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert text == ('<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model'
                  '\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n'
                  '<start_of_turn>model\n')


@pytest.mark.slow
def test_full_tokenizer_reads_back_with_our_ids(tmp_path):
  """The bundled 262k tokenizer through transformers' GGUF tokenizer conversion (~30 s)."""
  cfg = config_lib.ModelConfig(
      preset='test', vocab_size=262144, embed_dim=32, mlp_dim=64, num_layers=1, num_heads=1,
      num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=8,
      global_rope_scale=1.0, param_dtype='float32', dtype='float32')
  top, layers = random_canonical(cfg)
  ours.save_params(tmp_path / 'ours', cfg, top, enumerate(layers))
  convert.export_gguf(tmp_path / 'ours', tmp_path / 'm.gguf', 'q8_0', progress=False)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='m.gguf')
  text = ('Hello world!  Ünïcödé 日本語 <start_of_turn>user\ncode:\tx = 1\n\n   end'
          '<end_of_turn>\n🙂 naïve café 12345 <start_of_image>')
  assert hf_tok(text)['input_ids'] == [2] + tokenizer_lib.Tokenizer('').encode(text)


@pytest.mark.parametrize('argv, expected', [
    (['--format=gguf', '--quant=q3_k'], "argument --quant: invalid choice: 'q3_k'"),
    (['--format=hf', '--quant=q4_0'], '--quant / --embedding_quant apply to --format=gguf'),
])
def test_bad_flags_are_one_line_exit_2(small, tmp_path, monkeypatch, capsys, argv, expected):
  d = small[0]
  monkeypatch.setattr('sys.argv', ['gemma3-convert', 'export', f'--src={d / "ours"}',
                                   f'--dst={tmp_path / "x"}', *argv])
  with pytest.raises(SystemExit) as e:
    convert_cli.run()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert expected in err and err.strip().splitlines()[-1].count(expected) == 1, err
  assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('change, tokenizer, expected', [
    (dict(), '', 'tokenizer: 262144 pieces but model.vocab_size=1024'),
    (dict(query_pre_attn_scalar=128.0), None, 'model.query_pre_attn_scalar=128.0'),
    (dict(local_rope_base=20000.0), None, 'model.local_rope_base=20000'),
    (dict(embed_dim=48), None, '--quant=q4_0: model.embed_dim has rows of 48 values'),
])
def test_models_gguf_cannot_hold_are_refused(small, tmp_path, change, tokenizer, expected):
  import dataclasses  # pylint: disable=g-import-not-at-top
  d, top, layers, tok = small
  cfg = dataclasses.replace(CFG, **change)
  src = type('S', (), {'cfg': cfg})()
  with pytest.raises(convert.ConversionError) as e:
    gguf_lib.write(src, tmp_path / 'x.gguf', 'q4_0', tok if tokenizer is None else tokenizer,
                   progress=False)
  assert expected in str(e.value) and '\n' not in str(e.value)
  assert not (tmp_path / 'x.gguf').exists()
