"""Hugging Face Gemma 3 checkpoints: safetensors tensors and config.json, read and written.

HF stores Linear weights [out, in]: q_proj [N*H, D], k_proj/v_proj [K*H, D], o_proj [D, N*H],
gate_proj/up_proj [F, D], down_proj [D, F]; norms [D] (q_norm/k_norm [H]) with the same
"scale without the +1" convention as the canonical layout (layout.py). The text decoder's tensors
sit under one of HF_PREFIXES, depending on the class that saved them. The full tensor and
config.json mapping: docs/gemma3.md section 5.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.convert import hf_tokenizer
from gemma3_train.convert import source
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source
from gemma3_train.convert.source import check
from gemma3_train.convert.source import preset_name
from gemma3_train.convert import vision_keys

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
  return check(tensors[name], name, shape)


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


def hf_top_to_canonical(tensors: Mapping[str, np.ndarray], prefix: str,
                        m: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Embedding (sliced to m.vocab_size rows) and final norm."""
  name = f'{prefix}embed_tokens.weight'
  embedding = np.asarray(tensors[name])
  if embedding.ndim != 2 or embedding.shape[1] != m.embed_dim or embedding.shape[0] < m.vocab_size:
    raise ConversionError(f'{name}: shape {embedding.shape}, expected ({m.vocab_size} or more, '
                          f'{m.embed_dim})')
  # Multimodal checkpoints append 64 rows (image soft token etc.) the text model never emits.
  return {'embedding': embedding[:m.vocab_size],
          'final_norm': _take(tensors, f'{prefix}norm.weight', (m.embed_dim,))}


def hf_to_canonical(tensors: Mapping[str, np.ndarray], m: config_lib.ModelConfig
                    ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """HF text-decoder tensors (any of the three layouts) -> (top, layers) canonical."""
  prefix = hf_prefix(tensors.keys())
  top = hf_top_to_canonical(tensors, prefix, m)
  layers = [hf_layer_to_canonical(tensors, prefix, i, m) for i in range(m.num_layers)]
  return top, layers


# Gemma3TextConfig defaults, used for fields a hub config.json leaves out (the 4b/12b/27b
# text_config lists only what differs from them). Never written on export.
_HF_TEXT_DEFAULTS = dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                         rms_norm_eps=1e-6, hidden_activation='gelu_pytorch_tanh')
_HF_FIELDS = dict(embed_dim='hidden_size', mlp_dim='intermediate_size',
                  num_layers='num_hidden_layers', num_heads='num_attention_heads',
                  num_kv_heads='num_key_value_heads', head_dim='head_dim',
                  query_pre_attn_scalar='query_pre_attn_scalar', sliding_window='sliding_window',
                  rms_norm_eps='rms_norm_eps')
def _rope_from_hf(text: Mapping[str, Any], where: str) -> dict[str, float]:
  """RoPE bases and global scale from v5 `rope_parameters` or the legacy flat fields."""
  def scale_of(params, field):
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind == 'default':
      return 1.0
    if kind == 'linear':
      return float(params['factor'])
    raise ConversionError(f'{where}: {field}.rope_type={kind!r}; Gemma 3 uses default | linear')

  rp = text.get('rope_parameters')
  if isinstance(rp, Mapping) and 'full_attention' in rp:
    full, local = rp['full_attention'] or {}, rp.get('sliding_attention') or {}
    out = dict(global_rope_base=float(full.get('rope_theta', text.get('rope_theta', 1e6))),
               local_rope_base=float(local.get('rope_theta',
                                               text.get('rope_local_base_freq', 1e4))),
               global_rope_scale=scale_of(full, 'rope_parameters.full_attention'))
    if scale_of(local, 'rope_parameters.sliding_attention') != 1.0:
      raise ConversionError(f'{where}: rope_parameters.sliding_attention is scaled; Gemma 3 '
                            'scales only the global layers')
    return out
  scaling = text.get('rope_scaling') or {}
  return dict(global_rope_base=float(text.get('rope_theta', 1e6)),
              local_rope_base=float(text.get('rope_local_base_freq', 1e4)),
              global_rope_scale=scale_of(scaling, 'rope_scaling'))


def hf_config_to_model(d: Mapping[str, Any], where: str = 'config.json',
                       vocab_size: int | None = None) -> config_lib.ModelConfig:
  """A HF Gemma 3 config (text, or multimodal with text_config) -> ModelConfig."""
  model_type = d.get('model_type')
  if model_type == 'gemma3':
    text = dict(d.get('text_config') or {})
    # The multimodal vocabulary appends the image soft token (and 63 more) after the text one.
    text_vocab = d.get('image_token_index', VOCAB)
  elif model_type == 'gemma3_text':
    text, text_vocab = dict(d), VOCAB
  else:
    raise ConversionError(f'{where}: model_type={model_type!r} is not Gemma 3 '
                          '(expected gemma3 or gemma3_text)')
  text = {**_HF_TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
  for k in ('hidden_size', 'intermediate_size', 'num_hidden_layers'):
    if k not in text:
      raise ConversionError(f'{where}: {k} missing from the Gemma 3 text config')
  act = text.get('hidden_activation') or text.get('hidden_act')
  if act not in ('gelu_pytorch_tanh', 'gelu_tanh'):
    raise ConversionError(f'{where}: hidden_activation={act!r}, expected gelu_pytorch_tanh')
  for k in ('final_logit_softcapping', 'attn_logit_softcapping'):
    if text.get(k) is not None:
      raise ConversionError(f'{where}: {k}={text[k]!r}; Gemma 3 has none (null)')
  if text.get('use_bidirectional_attention'):
    raise ConversionError(f'{where}: use_bidirectional_attention=true is not a Gemma 3 decoder')
  fields = {ours: text[theirs] for ours, theirs in _HF_FIELDS.items()}
  fields.update(_rope_from_hf(text, where))
  num_layers = fields['num_layers']
  ours = ['full_attention' if i % config_lib.GLOBAL_EVERY == config_lib.GLOBAL_EVERY - 1
          else 'sliding_attention' for i in range(num_layers)]
  if text.get('layer_types') is not None and list(text['layer_types']) != ours:
    raise ConversionError(f'{where}: layer_types differ from Gemma 3\'s 5 sliding : 1 full '
                          'pattern')
  if text.get('sliding_window_pattern', 6) != 6:
    raise ConversionError(f'{where}: sliding_window_pattern={text["sliding_window_pattern"]}, '
                          'expected 6')
  hf_vocab = int(text['vocab_size'])
  if vocab_size is None:
    vocab_size = min(hf_vocab, int(text_vocab)) if hf_vocab != VOCAB + 64 else VOCAB
  fields['vocab_size'] = vocab_size
  fields['query_pre_attn_scalar'] = float(fields['query_pre_attn_scalar'])
  if model_type == 'gemma3' and d.get('vision_config') is not None:
    # Gemma3ForConditionalGeneration: the SigLIP tower; its placeholder id is our vocab_size.
    if int(d.get('image_token_index', VOCAB)) != vocab_size:
      raise ConversionError(f'{where}: image_token_index={d.get("image_token_index")}, expected '
                            f'the text vocabulary size {vocab_size} (the first id past it)')
    fields.update(vision_keys.hf_vision_fields(d, where))
  cfg = config_lib.ModelConfig(preset=preset_name(fields), **fields)
  try:
    config_lib.validate(config_lib.Config(model=cfg))
  except config_lib.ConfigError as e:
    raise ConversionError(f'{where}: {e}') from None
  return cfg


def model_to_hf_config(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  """config.json of a Gemma3ForCausalLM (text-only) for this model."""
  rope = {'full_attention': {'rope_type': 'default', 'rope_theta': cfg.global_rope_base},
          'sliding_attention': {'rope_type': 'default', 'rope_theta': cfg.local_rope_base}}
  if cfg.global_rope_scale != 1.0:
    rope['full_attention'].update(rope_type='linear', factor=cfg.global_rope_scale)
  return {
      'architectures': ['Gemma3ForCausalLM'],
      'model_type': 'gemma3_text',
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.embed_dim,
      'intermediate_size': cfg.mlp_dim,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim,
      # transformers' strict config wants an int here; every Gemma 3 scalar is integral.
      'query_pre_attn_scalar': (int(cfg.query_pre_attn_scalar)
                                if float(cfg.query_pre_attn_scalar).is_integer()
                                else cfg.query_pre_attn_scalar),
      'sliding_window': cfg.sliding_window,
      'layer_types': ['full_attention' if cfg.is_global(i) else 'sliding_attention'
                      for i in range(cfg.num_layers)],
      'rope_parameters': rope,
      # The same RoPE in the pre-v5 flat fields, for older readers; v5 reads the same values.
      'rope_theta': cfg.global_rope_base,
      'rope_local_base_freq': cfg.local_rope_base,
      'rope_scaling': ({'rope_type': 'linear', 'factor': cfg.global_rope_scale}
                       if cfg.global_rope_scale != 1.0 else None),
      'sliding_window_pattern': config_lib.GLOBAL_EVERY,
      # 270m/1b were trained to 32k; the RoPE-scaled 4b+ to 128k (the model cards).
      'max_position_embeddings': 32768 if cfg.global_rope_scale == 1.0 else 131072,
      'rms_norm_eps': cfg.rms_norm_eps,
      'hidden_activation': 'gelu_pytorch_tanh',
      'final_logit_softcapping': None,
      'attn_logit_softcapping': None,
      'attention_bias': False,
      'attention_dropout': 0.0,
      'tie_word_embeddings': True,
      'bos_token_id': 2,
      'eos_token_id': 1,
      'pad_token_id': 0,
      'initializer_range': 0.02,
      'use_cache': True,
      'dtype': dtype,
      'torch_dtype': dtype,
  }


class _SafetensorsDir(Mapping):
  """The tensors of a HF directory as a lazy mapping: a tensor is read when indexed."""

  def __init__(self, path: epath.Path):
    index = path / 'model.safetensors.index.json'
    if index.exists():
      weight_map = json.loads(index.read_text())['weight_map']
      self._files = {name: path / f for name, f in weight_map.items()}
      for f in sorted(set(self._files.values())):
        if not f.exists():
          raise ConversionError(f'{f}: shard listed in {index.name} is missing')
    else:
      files = sorted(path.glob('*.safetensors'))
      if not files:
        raise ConversionError(f'{path}: no *.safetensors files')
      self._files = {}
      for f in files:
        with safetensors.safe_open(str(f), 'np') as h:
          self._files.update({name: f for name in h.keys()})

  def __getitem__(self, name: str) -> np.ndarray:
    f = self._files[name]
    try:
      # Opened per tensor: a handle kept open keeps every page read so far mapped (and counted).
      with safetensors.safe_open(str(f), 'np') as h:
        return h.get_tensor(name)
    except Exception as e:  # a truncated or inconsistent shard
      raise ConversionError(f'{f}: cannot read tensor {name} ({e})') from None

  def __contains__(self, name) -> bool:
    return name in self._files

  def __iter__(self):
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


class HfSource(Source):
  """A Hugging Face directory: config.json + model.safetensors (or shards and an index)."""

  def __init__(self, path, vocab_size: int | None = None):
    path = epath.Path(path)
    config_file = path / 'config.json'
    if not config_file.exists():
      raise ConversionError(f'{config_file}: missing (a Hugging Face directory needs it)')
    try:
      d = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
      raise ConversionError(f'{config_file}: not valid JSON ({e})') from None
    self.cfg = hf_config_to_model(d, str(config_file), vocab_size)
    self.tensors = _SafetensorsDir(path)
    self.prefix = hf_prefix(self.tensors.keys())

  def top(self):
    return hf_top_to_canonical(self.tensors, self.prefix, self.cfg)

  def layer(self, i):
    return hf_layer_to_canonical(self.tensors, self.prefix, i, self.cfg)

  def has_vision(self) -> bool:
    return vision_keys.hf_prefixes(self.tensors.keys()) is not None

  def vision(self):
    """(vision_top, vision_layers) from the tower and projector under any HF layout (the
    layers read when indexed), or None for a text-only run or checkpoint."""
    prefixes = vision_keys.hf_prefixes(self.tensors.keys())
    if not self.cfg.vision or prefixes is None:
      return None
    top = vision_keys.hf_top_to_canonical(self.tensors, prefixes, self.cfg)
    return top, vision_keys.LazyLayers(
        self.cfg.vision_depth,
        lambda j: vision_keys.hf_layer_to_canonical(self.tensors, prefixes, j, self.cfg))


# --- writing -------------------------------------------------------------------------------


def canonical_layer_to_hf(layer: Mapping[str, np.ndarray], prefix: str, i: int
                          ) -> dict[str, np.ndarray]:
  """The inverse of hf_layer_to_canonical: one layer's HF [out, in] tensors."""
  q, k, v = layer['q_einsum'], layer['k_einsum'], layer['v_einsum']
  o, gating = layer['attn_vec_einsum'], layer['gating_einsum']
  N, D, H = q.shape
  p = f'{prefix}layers.{i}.'
  out = {
      p + 'self_attn.q_proj.weight': q.transpose(0, 2, 1).reshape(N * H, D),
      p + 'self_attn.k_proj.weight': k.transpose(0, 2, 1).reshape(-1, D),
      p + 'self_attn.v_proj.weight': v.transpose(0, 2, 1).reshape(-1, D),
      p + 'self_attn.o_proj.weight': o.transpose(2, 0, 1).reshape(D, N * H),
      p + 'mlp.gate_proj.weight': gating[0],
      p + 'mlp.up_proj.weight': gating[1],
      p + 'mlp.down_proj.weight': layer['linear'].T,
  }
  out.update({f'{p}{theirs}.weight': layer[ours] for ours, theirs in _HF_NORMS.items()})
  return out


class _ShardWriter:
  """Collects tensors into safetensors shards of at most `shard_bytes` (one tensor may exceed)."""

  def __init__(self, path: epath.Path, shard_bytes: int):
    self.path, self.shard_bytes = path, shard_bytes
    self.pending: dict[str, np.ndarray] = {}
    self.files: list[tuple[epath.Path, list[str]]] = []
    self.total = 0

  def add(self, tensors: Mapping[str, np.ndarray]) -> None:
    for name, x in tensors.items():
      x = np.ascontiguousarray(x)
      size = sum(t.nbytes for t in self.pending.values())
      if self.pending and size + x.nbytes > self.shard_bytes:
        self._flush()
      self.pending[name] = x
      self.total += x.nbytes

  def _flush(self) -> None:
    f = self.path / f'.shard-{len(self.files):05d}.safetensors'
    safetensors.numpy.save_file(self.pending, str(f), metadata={'format': 'pt'})
    # save_file creates its file 0600; as open() would: 0666 less the umask (like the JSON).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f, 0o666 & ~umask)
    self.files.append((f, list(self.pending)))
    self.pending = {}

  def close(self) -> None:
    if self.pending:
      self._flush()
    n = len(self.files)
    if n == 1:
      self.files[0][0].rename(self.path / 'model.safetensors')
      return
    weight_map = {}
    for j, (f, names) in enumerate(self.files):
      final = f'model-{j + 1:05d}-of-{n:05d}.safetensors'
      f.rename(self.path / final)
      weight_map.update({name: final for name in names})
    (self.path / 'model.safetensors.index.json').write_text(json.dumps(
        {'metadata': {'total_size': self.total}, 'weight_map': weight_map}, indent=2))


def write(src: Source, dst_path, dtype: str = 'bfloat16', shard_size: int = 5 * 10**9,
          progress: bool = True, tokenizer_path: str = '') -> None:
  """src -> a Gemma3ForCausalLM HF directory (safetensors shards + index, config.json) with
  the tokenizer at tokenizer_path ('' = the bundled Gemma 3 one; files: hf_tokenizer.py); a
  model with vision (src.cfg.vision) -> a Gemma3ForConditionalGeneration directory in the hub's
  names (vision_keys.py), its embedding grown by 64 rows (vision_keys.hf_embedding).

  Streams: host memory holds one shard being filled and what `src` holds to give a layer.
  """
  if dtype not in ('float32', 'bfloat16'):
    raise ConversionError(f'dtype={dtype!r}: expected float32 | bfloat16')
  np_dtype = np.dtype(jnp.dtype(dtype))
  dst = epath.Path(dst_path)
  if dst.exists() and any(dst.iterdir()):
    raise ConversionError(f'{dst}: destination exists and is not empty')
  # Before anything is written: a bad tokenizer fails with dst untouched.
  tokenizer = hf_tokenizer.tokenizer_files(
      tokenizer_path, src.cfg.vocab_size,
      src.cfg.tokens_per_image if src.cfg.vision else None)  # + the processor's files
  vision = src.vision() if src.cfg.vision else None
  if src.cfg.vision and vision is None:
    raise ConversionError('model.vision is set but the checkpoint has no vision weights')
  dst.mkdir(parents=True, exist_ok=True)
  writer = _ShardWriter(dst, shard_size)
  cast = lambda d: {k: np.asarray(v).astype(np_dtype) for k, v in d.items()}
  top = src.top()
  prefix = HF_PREFIXES[1] if vision else HF_PREFIXES[0]
  embedding = cast({'': top['embedding']})['']  # padded after the cast: the mean of what HF reads
  writer.add({f'{prefix}embed_tokens.weight':
              vision_keys.hf_embedding(embedding) if vision else embedding})
  for i, layer in source.layers(src, f'writing {dst}' if progress else None):
    writer.add(cast(canonical_layer_to_hf(layer, prefix, i)))
  writer.add(cast({f'{prefix}norm.weight': top['final_norm']}))
  del top, embedding
  config = model_to_hf_config(src.cfg, dtype)
  if vision:
    vision_top, vision_layers = vision
    writer.add(cast(vision_keys.canonical_top_to_hf(vision_top)))
    for j, layer in enumerate(vision_layers):
      writer.add(cast(vision_keys.canonical_layer_to_hf(layer, j)))
    config = vision_keys.hf_mm_config(src.cfg, config, dtype)
  writer.close()
  for name, data in tokenizer.items():
    (dst / name).write_bytes(data)
  if vision:  # AutoImageProcessor's preprocessing, the same as ours
    (dst / 'preprocessor_config.json').write_text(
        json.dumps(vision_keys.hf_preprocessor_config(src.cfg), indent=2))
  (dst / 'config.json').write_text(json.dumps(config, indent=2))
