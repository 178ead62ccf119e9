"""The Gemma 3 tokenizer of an export, as the files transformers loads with AutoTokenizer.

Written beside config.json and the safetensors:
  tokenizer.model          the SentencePiece model itself: the run's (data.tokenizer_path) or
                           the bundled one
  tokenizer_config.json    GemmaTokenizer, its special tokens, BOS added and EOS not (as our data
                           pipeline does), and the Gemma 3 chat template
  special_tokens_map.json  the same special tokens, for older readers
  generation_config.json   BOS 2, PAD 0, and generation stops at EOS 1 or <end_of_turn> 106
  processor_config.json    a vision model's only: Gemma3Processor and its image_seq_length
  chat_template.jinja      a vision model's only: the chat template again, for the processor's
                           apply_chat_template (messages with image parts)

A vision model's tokenizer also names the image tokens Gemma3Processor reads: boi_token (id
255999), eoi_token (id 256000, whatever the SentencePiece model spells it: the bundled one says
<unused99> where Google's HF release says <end_of_image>) and image_token <image_soft_token>, which
is no SentencePiece piece, so transformers appends it after the pieces: id 262144, the
image_token_index of a model with the Gemma 3 vocabulary.

No tokenizer.json: transformers (v5) builds its fast BPE tokenizer from tokenizer.model when it
loads (about 5-10 s for the 262k pieces on a 2-core box), and the same ids result, but for one
difference that Google's own HF release shares: transformers reads the text of the control pieces
(<bos>, <eos>, <pad>, and <unk>) in a string as those tokens, where SentencePiece (our training
data) reads it as text. User-defined pieces (<start_of_turn>, <mask>, ...) both parse.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import sentencepiece as spm
from etils import epath

from gemma3_train.convert.source import ConversionError
from gemma3_train.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

# The Gemma 3 chat format, as gemma3_train.data.documents.format_chat builds it (tests check the
# two agree): BOS; per turn <start_of_turn>{user|model}\n{content, trimmed}<end_of_turn>\n, roles
# alternating from user, assistant spelled model; a leading system message's text and a blank
# line open the first user turn. A list content (transformers' multimodal messages) renders each
# text part trimmed and each image part as <start_of_image>, as Google's Gemma 3 template does.
# SOT/EOT/BOI are the pieces at ids 105/106/255999 of the model written.
_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] -%}
  {%- if system is not string -%}
    {%- set system = system | selectattr('type', 'equalto', 'text')
                            | map(attribute='text') | join -%}
  {%- endif -%}
  {%- set first_user_prefix = (system | trim) + '\\n\\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {%- if role not in ('user', 'model') -%}
    {{- raise_exception('Unknown role ' + message['role'] +
                        ': expected system (first), user, model or assistant') -}}
  {%- endif -%}
  {%- if (role == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Conversation roles must alternate user/model/user/model/...') -}}
  {%- endif -%}
  {%- set content = message['content'] -%}
  {%- if content is not string -%}
    {%- set parts = namespace(text='') -%}
    {%- for item in content -%}
      {%- if item['type'] == 'image' -%}
        {%- set parts.text = parts.text + '@BOI@' -%}
      {%- elif item['type'] == 'text' -%}
        {%- set parts.text = parts.text + (item['text'] | trim) -%}
      {%- endif -%}
    {%- endfor -%}
    {%- set content = parts.text -%}
  {%- endif -%}
  {{- '@SOT@' + role + '\\n' + (first_user_prefix if loop.first else '') +
      (content | trim) + '@EOT@\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '@SOT@model\\n' -}}
{%- endif -%}
"""

FILES = ('tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json',
         'generation_config.json')
IMAGE_TOKEN = '<image_soft_token>'  # Hugging Face's name of the image placeholder


def _special_tokens(sp: spm.SentencePieceProcessor) -> dict[str, str]:
  return {'bos_token': sp.IdToPiece(tokenizer_lib.BOS),
          'eos_token': sp.IdToPiece(tokenizer_lib.EOS),
          'pad_token': sp.IdToPiece(tokenizer_lib.PAD), 'unk_token': sp.IdToPiece(sp.unk_id())}


def _image_tokens(sp: spm.SentencePieceProcessor) -> dict[str, str]:
  return {'boi_token': sp.IdToPiece(tokenizer_lib.START_OF_IMAGE),
          'eoi_token': sp.IdToPiece(tokenizer_lib.END_OF_IMAGE), 'image_token': IMAGE_TOKEN}


def hf_tokenizer_files(model_proto: bytes, images: bool = False) -> dict[str, bytes]:
  """File name -> contents of the tokenizer files for this SentencePiece model; images: with
  the image tokens (module docstring)."""
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromSerializedProto(model_proto)
  except (RuntimeError, OSError) as e:
    raise ConversionError(f'tokenizer: not a SentencePiece model ({e})') from None
  sot, eot = sp.IdToPiece(tokenizer_lib.START_OF_TURN), sp.IdToPiece(tokenizer_lib.END_OF_TURN)
  if (sot, eot) != ('<start_of_turn>', '<end_of_turn>'):
    raise ConversionError(f'tokenizer: pieces {tokenizer_lib.START_OF_TURN}/'
                          f'{tokenizer_lib.END_OF_TURN} are {sot!r}/{eot!r}, not Gemma 3\'s '
                          '<start_of_turn>/<end_of_turn>')
  special = _special_tokens(sp)
  config: dict[str, Any] = {
      'tokenizer_class': 'GemmaTokenizer',
      **special,
      'add_bos_token': True,
      'add_eos_token': False,
      'padding_side': 'left',
      'model_max_length': 131072,
      'clean_up_tokenization_spaces': False,
      'spaces_between_special_tokens': False,
      'chat_template': _CHAT_TEMPLATE.replace('@SOT@', sot).replace('@EOT@', eot).replace(
          '@BOI@', sp.IdToPiece(tokenizer_lib.START_OF_IMAGE)),
  }
  if images:  # as attributes (tokenizer.boi_token_id, ...) that Gemma3Processor reads
    config.update(_image_tokens(sp), extra_special_tokens=_image_tokens(sp))
  generation = {'bos_token_id': tokenizer_lib.BOS, 'pad_token_id': tokenizer_lib.PAD,
                'eos_token_id': [tokenizer_lib.EOS, tokenizer_lib.END_OF_TURN]}
  as_json = lambda d: (json.dumps(d, indent=2, ensure_ascii=False) + '\n').encode()
  return {'tokenizer.model': model_proto, 'tokenizer_config.json': as_json(config),
          'special_tokens_map.json': as_json(special),
          'generation_config.json': as_json(generation)}


def training_tokenizer_path(config_file: epath.Path) -> str:
  """data.tokenizer_path of a training run's saved config ('' for the bundled model)."""
  try:
    return str(json.loads(config_file.read_text()).get('data', {}).get('tokenizer_path') or '')
  except (OSError, json.JSONDecodeError, AttributeError):
    return ''


def processor_config(tokens_per_image: int) -> bytes:
  """processor_config.json of a vision model: AutoProcessor builds Gemma3Processor from it, the
  tokenizer files and preprocessor_config.json."""
  return (json.dumps({'processor_class': 'Gemma3Processor', 'image_seq_length': tokens_per_image},
                     indent=2) + '\n').encode()


def tokenizer_files(tokenizer_path: str = '', vocab_size: int | None = None,
                    tokens_per_image: int | None = None) -> dict[str, bytes]:
  """FILES for the model at tokenizer_path ('' = the bundled Gemma 3 one), checked and built
  before anything is written; with tokens_per_image (a vision model) the image tokens too, and
  the processor's processor_config.json and chat_template.jinja."""
  tok = tokenizer_lib.Tokenizer(tokenizer_path)  # ConfigError when missing or not a model
  if vocab_size is not None and tok.vocab_size != vocab_size:
    # With vision, the processor's image token (appended after the pieces) is then not the
    # model's image_token_index.
    level = logging.WARNING if tokens_per_image else logging.INFO
    log.log(level, 'tokenizer %s has %d pieces but the model %d embedding rows',
            tokenizer_path or tokenizer_lib.BUNDLED, tok.vocab_size, vocab_size)
  files = hf_tokenizer_files(tok.model_proto, images=tokens_per_image is not None)
  if tokens_per_image is not None:
    files['processor_config.json'] = processor_config(tokens_per_image)
    files['chat_template.jinja'] = json.loads(files['tokenizer_config.json'])[
        'chat_template'].encode()
  return files
