"""GGUF export: one file that llama.cpp, Ollama and transformers' GGUF loader read.

llama.cpp's conventions for architecture `gemma3` (convert_hf_to_gguf.py and src/llama-model.cpp):
- tensors under gguf's standard names (token_embd, blk.N.attn_q, ..., output_norm), no
  output.weight (the head is tied); matrices as Hugging Face stores them, [out, in], i.e. GGUF
  ne = (in, out), so Q8_0 / Q4_0 blocks run along the input axis (models/quant.py);
- every norm weight stored with its +1 added (llama.cpp multiplies by the weight as is;
  transformers' reader subtracts the 1 again), 1-D tensors always float32;
- hyper-parameters gemma3.*: llama.cpp fixes what the file does not say: the local RoPE base
  10,000, the 5:1 sliding pattern, and queries scaled by head_dim^-1/2 (by (D / N)^-1/2 for the
  62-layer 27b), so a model that differs is refused;
- the SentencePiece vocabulary as tokenizer.ggml.model 'llama': pieces, scores and piece types
  (SentencePiece's enum is GGUF's), BOS/EOS/UNK/PAD, <end_of_turn> as the end-of-turn id, and
  the chat template hf_tokenizer.py writes.

A QAT run's linear weights (and embedding, with quant.embedding) are written as the numbers its
forward pass used: fake-quantized first (quant.dequantized), then encoded; with --quant equal to
the QAT mode's GGUF type (q4_0), encoding them again gives the same blocks.
"""

from __future__ import annotations

import json
import logging

import gguf
import jax
import numpy as np
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.convert import hf
from gemma3_train.convert import hf_tokenizer
from gemma3_train.convert import source
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.models import quant

log = logging.getLogger(__name__)

T = gguf.GGMLQuantizationType
QUANTS = {'f32': T.F32, 'f16': T.F16, 'bf16': T.BF16, 'q8_0': T.Q8_0, 'q4_0': T.Q4_0}
FILE_TYPES = {'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
              'bf16': gguf.LlamaFileType.MOSTLY_BF16, 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0,
              'q4_0': gguf.LlamaFileType.MOSTLY_Q4_0}
ARCH = 'gemma3'


# --- tensors ---------------------------------------------------------------------------------


_jit_blocks = jax.jit(quant.block_quantize, static_argnums=1)


def encode(w: np.ndarray, kind: str) -> tuple[np.ndarray, T]:
  """A [out, in] matrix (or a 1-D vector) -> (the array GGUFWriter.add_tensor takes, its type):
  f32/f16 as such, bf16 as its bytes, Q8_0/Q4_0 as ggml's blocks (d float16, then the values;
  Q4_0 packs value j in the low and j + 16 in the high nibble of byte j)."""
  w = np.asarray(w, np.float32)
  if kind == 'f32':
    return w, T.F32
  if kind == 'f16':
    return w.astype(np.float16), T.F16
  if kind == 'bf16':
    return np.asarray(jax.numpy.asarray(w).astype('bfloat16')).view(np.uint8), T.BF16
  q, d = (np.asarray(x) for x in _jit_blocks(w, kind))
  if kind == 'q8_0':
    values = q.view(np.uint8)
  else:
    nib = q.astype(np.uint8)
    values = nib[..., :quant.QK // 2] | (nib[..., quant.QK // 2:] << np.uint8(4))
  blocks = np.concatenate([d.view(np.uint8), values], axis=-1)  # [rows, n/32, 2 + bytes]
  return blocks.reshape(w.shape[:-1] + (-1,)), QUANTS[kind]


def add_encoded(w: gguf.GGUFWriter, name: str, x: np.ndarray, kind: str) -> None:
  """x encoded as `kind` (encode) and added to w under name; f32/f16 arrays carry their own
  type, the others are raw bytes of their GGUF type."""
  data, qtype = encode(x, kind)
  w.add_tensor(name, data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)


def finish(w: gguf.GGUFWriter) -> None:
  """Writes w's header, metadata and tensors to its file and closes it."""
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file(progress=False)
  w.close()


def _qat_values(w: np.ndarray, mode: str) -> np.ndarray:
  """A [out, in] matrix as a QAT forward with `mode` read it (float32), or w when mode is ''."""
  return np.asarray(quant.dequantized(w, (1,), mode)) if mode else w


def _norm(w) -> np.ndarray:
  return np.asarray(w, np.float32) + np.float32(1.0)  # llama.cpp: Gemma norms hold 1 + scale


# --- metadata --------------------------------------------------------------------------------


def check_model(cfg: config_lib.ModelConfig) -> None:
  """Refuses a model llama.cpp would compute differently (what gemma3 GGUF cannot say)."""
  expected_scalar = cfg.embed_dim / cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
  if float(cfg.query_pre_attn_scalar) != float(expected_scalar):
    raise ConversionError(f'model.query_pre_attn_scalar={cfg.query_pre_attn_scalar}: GGUF gemma3 '
                          f'implies {expected_scalar:g} (llama.cpp scales queries by head_dim, '
                          'or embed_dim / num_heads at 62 layers)')
  if cfg.local_rope_base != 10_000.0:
    raise ConversionError(f'model.local_rope_base={cfg.local_rope_base:g}: GGUF gemma3 implies '
                          '10000 (llama.cpp fixes the sliding layers\' RoPE base)')


def _tokenizer_metadata(w: gguf.GGUFWriter, model_proto: bytes, vocab_size: int) -> None:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(model_proto)
  if len(m.pieces) != vocab_size:
    raise ConversionError(f'tokenizer: {len(m.pieces)} pieces but model.vocab_size={vocab_size}; '
                          'a GGUF file needs one embedding row per token')
  w.add_tokenizer_model('llama')  # llama.cpp's name for a SentencePiece vocabulary
  w.add_tokenizer_pre('default')
  w.add_token_list([p.piece.encode() for p in m.pieces])
  w.add_token_scores([p.score for p in m.pieces])
  w.add_token_types([int(p.type) for p in m.pieces])  # NORMAL 1 ... BYTE 6 in both enums
  w.add_bos_token_id(tokenizer_lib.BOS)
  w.add_eos_token_id(tokenizer_lib.EOS)
  w.add_unk_token_id(next(i for i, p in enumerate(m.pieces) if p.type == p.UNKNOWN))
  w.add_pad_token_id(tokenizer_lib.PAD)
  w.add_eot_token_id(tokenizer_lib.END_OF_TURN)
  w.add_add_bos_token(True)
  w.add_add_eos_token(False)
  w.add_add_space_prefix(bool(m.normalizer_spec.add_dummy_prefix))
  w.add_chat_template(chat_template(m))


def chat_template(m) -> str:
  """The chat template hf_tokenizer.py writes for this tokenizer (a SentencePiece ModelProto).
  A tokenizer too small to hold <start_of_image> (id 255999; a small test vocabulary) gets the
  bundled tokenizer's, its turn pieces (ids 105, 106) checked to be Gemma 3's."""
  proto = m.SerializeToString()
  if len(m.pieces) <= tokenizer_lib.START_OF_IMAGE:
    turns = tuple(m.pieces[i].piece if i < len(m.pieces) else None
                  for i in (tokenizer_lib.START_OF_TURN, tokenizer_lib.END_OF_TURN))
    if turns != ('<start_of_turn>', '<end_of_turn>'):
      raise ConversionError(f'tokenizer: pieces {tokenizer_lib.START_OF_TURN}/'
                            f'{tokenizer_lib.END_OF_TURN} are {turns}, not Gemma 3\'s '
                            '<start_of_turn>/<end_of_turn>')
    proto = tokenizer_lib.Tokenizer('').model_proto
  config = json.loads(hf_tokenizer.hf_tokenizer_files(proto)['tokenizer_config.json'])
  return config['chat_template']


def _model_metadata(w: gguf.GGUFWriter, cfg: config_lib.ModelConfig, kind: str) -> None:
  w.add_name(f'gemma3-{cfg.preset}')
  w.add_context_length(32768 if cfg.global_rope_scale == 1.0 else 131072)  # as hf.py's config
  w.add_embedding_length(cfg.embed_dim)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.global_rope_base)
  w.add_sliding_window(cfg.sliding_window)
  if cfg.global_rope_scale != 1.0:  # the global layers' linear scaling (4b, 12b, 27b)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.global_rope_scale)
  w.add_file_type(FILE_TYPES[kind])
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- the file --------------------------------------------------------------------------------


def write(src: Source, dst_file, kind: str = 'f16', tokenizer_path: str = '',
          qat: str = '', qat_embedding: str = '', embedding: str | None = None,
          progress: bool = True) -> None:
  """src -> one GGUF file at dst_file: its matrices in `kind` (f32 | f16 | bf16 | q8_0 |
  q4_0), the embedding in `embedding` (default: kind), norms in float32. qat / qat_embedding:
  the run's quant.qat / quant.embedding, whose fake-quantized numbers are what is encoded."""
  embedding = embedding or kind
  for flag, value in (('--quant', kind), ('--embedding', embedding)):
    if value not in QUANTS:
      raise ConversionError(f'{flag}={value}: expected one of {" | ".join(QUANTS)}')
  cfg = src.cfg
  check_model(cfg)
  for name, size, k in (('embed_dim', cfg.embed_dim, kind), ('mlp_dim', cfg.mlp_dim, kind),
                        ('num_heads * head_dim', cfg.num_heads * cfg.head_dim, kind),
                        ('embed_dim', cfg.embed_dim, embedding)):
    why = quant.check_rows(k, f'model.{name}', size)
    if why:
      raise ConversionError(f'--quant={k}: {why}')
  dst = epath.Path(dst_file)
  if dst.exists():
    raise ConversionError(f'{dst}: destination exists')
  proto = tokenizer_lib.Tokenizer(tokenizer_path).model_proto  # ConfigError when unreadable
  dst.parent.mkdir(parents=True, exist_ok=True)
  w = gguf.GGUFWriter(str(dst), ARCH, use_temp_file=True)
  _model_metadata(w, cfg, kind)
  _tokenizer_metadata(w, proto, cfg.vocab_size)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_layers)

  def add(hf_name: str, x: np.ndarray, k: str) -> None:
    base = hf_name.removesuffix('.weight')
    gguf_name = names.get_name(base)
    if gguf_name is None:
      raise ConversionError(f'{hf_name}: no GGUF name for it in gguf {gguf.__name__}')
    add_encoded(w, f'{gguf_name}.weight', x, k)

  top = src.top()
  add('model.embed_tokens.weight', _qat_values(np.asarray(top['embedding'], np.float32),
                                               qat_embedding), embedding)
  for i, layer in source.layers(src, f'writing {dst}' if progress else None):
    for name, x in hf.canonical_layer_to_hf(layer, 'model.', i).items():
      if x.ndim == 1:
        add(name, _norm(x), 'f32')
      else:
        add(name, _qat_values(np.asarray(x, np.float32), qat), kind)
  add('model.norm.weight', _norm(top['final_norm']), 'f32')
  finish(w)
