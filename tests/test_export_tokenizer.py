"""The tokenizer of a HF export against sentencepiece and our chat formatter, via transformers."""

import importlib.resources
import json

import jinja2
import pytest
import sentencepiece as spm
import torch
import transformers

from gemma3_train.cli import convert as convert_cli
from gemma3_train.data import documents
from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib

VOCAB = 262144
BUNDLED = importlib.resources.files('gemma3_train') / 'assets' / tokenizer_lib.BUNDLED
TEXTS = [
    'Hello world',
    '  leading, trailing  and   repeated spaces  ',
    'tabs\tand\n\nnewlines\n\n\n end',
    'héllo wörld, 日本語のテキスト, Ελληνικά, emoji 🤗🚀, math ∑∫√',
    '<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n',
    'user-defined pieces <mask> and [multimodal] are parsed by both',
    '',
]
CHATS = [
    [{'role': 'user', 'content': 'What is 2+2?'}],
    [{'role': 'system', 'content': '  You are terse.  '},
     {'role': 'user', 'content': '  Hi!\n'},
     {'role': 'assistant', 'content': 'Hello. '},
     {'role': 'user', 'content': 'Translate "chat" to French: été 🤗'}],
    [{'role': 'user', 'content': 'line one\nline two\n\n'},
     {'role': 'model', 'content': '\tcode:\n    x = 1'},
     {'role': 'user', 'content': 'and?'}],
]


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
  """A tiny random Gemma 3 with the real vocabulary, exported by gemma3-convert."""
  cfg = transformers.Gemma3TextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
      sliding_window=8, max_position_embeddings=128)
  torch.manual_seed(0)
  src = tmp_path_factory.mktemp('src')
  transformers.Gemma3ForCausalLM(cfg).save_pretrained(src)
  dst = tmp_path_factory.mktemp('export') / 'hf'
  convert_cli.main(['export', f'--src={src}', f'--dst={dst}', '--dtype=float32'])
  return dst


@pytest.fixture(scope='module')
def hf_tok(export_dir):
  return transformers.AutoTokenizer.from_pretrained(export_dir)


@pytest.fixture(scope='module')
def sp():
  # The reference: sentencepiece on the bundled model, as gemma3_train.data.tokenizer uses it.
  return spm.SentencePieceProcessor(model_proto=BUNDLED.read_bytes())


def test_export_has_the_tokenizer_files(export_dir):
  names = {p.name for p in export_dir.iterdir()}
  assert {'tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json',
          'generation_config.json', 'config.json', 'model.safetensors'} <= names
  assert (export_dir / 'tokenizer.model').read_bytes() == BUNDLED.read_bytes()
  generation = json.loads((export_dir / 'generation_config.json').read_text())
  assert generation == {'bos_token_id': 2, 'pad_token_id': 0, 'eos_token_id': [1, 106]}
  config = json.loads((export_dir / 'tokenizer_config.json').read_text())
  assert config['add_bos_token'] is True and config['add_eos_token'] is False


def test_autotokenizer_ids_match_sentencepiece(hf_tok, sp):
  assert type(hf_tok).__name__ == 'GemmaTokenizer'
  assert len(hf_tok) == VOCAB and sp.vocab_size() == VOCAB
  assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.unk_token_id) == (
      tokenizer_lib.PAD, tokenizer_lib.EOS, tokenizer_lib.BOS, 3)
  assert hf_tok.convert_tokens_to_ids(['<start_of_turn>', '<end_of_turn>']) == [
      tokenizer_lib.START_OF_TURN, tokenizer_lib.END_OF_TURN]
  for text in TEXTS:
    want = [tokenizer_lib.BOS] + sp.EncodeAsIds(text)
    assert hf_tok(text)['input_ids'] == want, text
    assert hf_tok.encode(text, add_special_tokens=False) == want[1:], text
    assert hf_tok.decode(want[1:]) == sp.DecodeIds(want[1:]), text
  # The one difference, as in Google's own HF release: transformers reads the control pieces'
  # text (<bos> <eos> <pad>, and <unk>) as those tokens; SentencePiece (our training data) as text.
  text = 'x <eos> y <bos><pad><unk>'
  assert hf_tok.encode(text, add_special_tokens=False) == [
      sp.PieceToId('x'), 236743, 1, sp.PieceToId('▁y'), 236743, 2, 0, 3]
  assert 1 not in sp.EncodeAsIds(text) and 2 not in sp.EncodeAsIds(text)
  batch = hf_tok(TEXTS[:2], padding=True)['input_ids']  # left padding with <pad> (0)
  assert batch[0][0] == tokenizer_lib.PAD and batch[1][0] == tokenizer_lib.BOS


def test_chat_template_matches_our_formatter(hf_tok):
  ours = tokenizer_lib.Tokenizer('')
  prompt = [tokenizer_lib.START_OF_TURN] + ours.encode('model\n')
  for messages in CHATS:
    tokens, _ = documents.format_chat(messages, ours)
    assert tokens[-1] == tokenizer_lib.EOS  # format_chat closes the document; a prompt does not
    want = tokens[:-1].tolist() + prompt
    got = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                     return_dict=False)
    assert list(got) == want, messages
    closed = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(closed) == tokens[:-1].tolist(), messages
  # transformers' multimodal message form: content as a list of typed parts.
  parts = [{**m, 'content': [{'type': 'text', 'text': m['content']}]} for m in CHATS[1]]
  assert hf_tok.apply_chat_template(parts, tokenize=False) == hf_tok.apply_chat_template(
      CHATS[1], tokenize=False)
  # Image parts render as <start_of_image>, text parts trimmed, as our formatter does.
  with_image = [{'role': 'user', 'content': [{'type': 'text', 'text': ' Look: '},
                                             {'type': 'image', 'path': 'a.png'},
                                             {'type': 'text', 'text': 'what is it? '}]},
                {'role': 'assistant', 'content': 'A cat.'}]
  tokens, _ = documents.format_chat(with_image, ours)
  assert tokenizer_lib.START_OF_IMAGE in tokens.tolist()
  assert list(hf_tok.apply_chat_template(with_image, tokenize=True, return_dict=False)) == (
      tokens[:-1].tolist())


@pytest.mark.parametrize('messages', [
    [{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'}],
    [{'role': 'assistant', 'content': 'a'}],
    [{'role': 'user', 'content': 'a'}, {'role': 'tool', 'content': 'b'}],
])
def test_chat_template_rejects_what_our_formatter_rejects(hf_tok, messages):
  with pytest.raises(sources.DataError):
    documents.format_chat(messages, tokenizer_lib.Tokenizer(''))
  with pytest.raises(jinja2.TemplateError):
    hf_tok.apply_chat_template(messages, tokenize=False)


def test_bad_tokenizer_fails_before_writing(export_dir, tmp_path, monkeypatch, capsys):
  dst = tmp_path / 'hf'
  monkeypatch.setattr('sys.argv', ['gemma3-convert', 'export', f'--src={export_dir}',
                                   f'--dst={dst}', f'--tokenizer={tmp_path / "missing.model"}'])
  with pytest.raises(SystemExit) as e:
    convert_cli.run()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'missing.model' in err and 'not found' in err, err
  assert not dst.exists()


@pytest.mark.slow
def test_pipeline_generates_from_the_export_alone(export_dir):
  generate = transformers.pipeline('text-generation', model=str(export_dir), device='cpu')
  out = generate('The capital of France is', max_new_tokens=4, do_sample=False)
  text = out[0]['generated_text']
  assert text.startswith('The capital of France is') and len(text) > len('The capital of France is')
  chat = generate([{'role': 'user', 'content': 'Hi'}], max_new_tokens=3, do_sample=False)
  assert chat[0]['generated_text'][-1]['role'] == 'assistant'
