"""Checkpoint conversion: Hugging Face safetensors and Kaggle/Flax Orbax <-> our model.

Everything goes through one *canonical* form, the per-layer layout of the released Flax
checkpoints (shared/GEMMA3.md B.1), as numpy arrays:

  top    = {'embedding': [V, D], 'final_norm': [D]}
  layers = [{'pre_attention_norm': [D], 'post_attention_norm': [D], 'pre_ffw_norm': [D],
             'post_ffw_norm': [D], 'q_einsum': [N, D, H], 'k_einsum': [K, D, H],
             'v_einsum': [K, D, H], 'attn_vec_einsum': [N, H, D], 'query_norm': [H],
             'key_norm': [H], 'gating_einsum': [2, F, D] ([0] = gate, gelu'd; [1] = up),
             'linear': [F, D]}, ...]   one dict per decoder layer

model.py maps canonical <-> the NNX state (scanned blocks, tail); this module maps file formats
<-> canonical. Norm scales are stored without the +1 in every format and are copied as they are.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1
import safetensors
import safetensors.numpy
from etils import epath
from flax import nnx

from gemma3_train import config as config_lib

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


class ConversionError(ValueError):
  """A one-line error naming the tensor or file at fault."""


def hf_prefix(names: Iterable[str]) -> str:
  """Which of HF_PREFIXES a checkpoint's tensor names use."""
  names = list(names)
  for prefix in sorted(HF_PREFIXES, key=len, reverse=True):
    if f'{prefix}embed_tokens.weight' in names:
      return prefix
  raise ConversionError('no embed_tokens.weight under any of ' + ', '.join(HF_PREFIXES) +
                        ': not a Gemma 3 text checkpoint')


def _check(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
  x = np.asarray(x)
  if tuple(x.shape) != tuple(shape):
    raise ConversionError(f'{name}: shape {tuple(x.shape)}, expected {tuple(shape)}')
  return x


def _take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
  if name not in tensors:
    raise ConversionError(f'{name}: tensor missing from the checkpoint')
  return _check(tensors[name], name, shape)


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


# --- progress -----------------------------------------------------------------


class _Progress:
  """A one-line progress counter on stderr (rewritten in place on a terminal)."""

  def __init__(self, what: str, total: int):
    self.what, self.total, self.done, self._last = what, total, 0, 0.0
    self._tty = sys.stderr.isatty()

  def step(self, n: int = 1) -> None:
    self.done += n
    now = time.monotonic()
    if self.done >= self.total or now - self._last > (0.2 if self._tty else 10.0):
      self._last = now
      end = '\n' if self.done >= self.total or not self._tty else ''
      print(f'\r{self.what}: {self.done}/{self.total} layers', end=end, file=sys.stderr,
            flush=True)


# --- Hugging Face config.json ---------------------------------------------------

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
_SHAPE_FIELDS = ('num_layers', 'embed_dim', 'mlp_dim', 'num_heads', 'num_kv_heads', 'head_dim')


def preset_name(fields: Mapping[str, Any]) -> str:
  """The PRESETS entry whose shapes match, else 'custom'."""
  for name, p in config_lib.PRESETS.items():
    if all(p[k] == fields[k] for k in _SHAPE_FIELDS):
      return name
  return 'custom'


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
      # 270m/1b were trained to 32k; the RoPE-scaled 4b+ to 128k (GEMMA3.md A.1).
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


# --- sources: a checkpoint read layer by layer ------------------------------------


class Source:
  """A checkpoint opened for reading: cfg, top(), layer(i); nothing is read until asked."""
  cfg: config_lib.ModelConfig

  def top(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def layer(self, i: int) -> dict[str, np.ndarray]:
    raise NotImplementedError


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


# --- Kaggle / Flax Orbax ------------------------------------------------------------

_KAGGLE_LAYER = {  # canonical name -> (path under layer_i, index into a stacked kv leaf)
    'pre_attention_norm': ('pre_attention_norm/scale', None),
    'post_attention_norm': ('post_attention_norm/scale', None),
    'pre_ffw_norm': ('pre_ffw_norm/scale', None),
    'post_ffw_norm': ('post_ffw_norm/scale', None),
    'q_einsum': ('attn/q_einsum', None),
    'k_einsum': ('attn/kv_einsum', 0),
    'v_einsum': ('attn/kv_einsum', 1),
    'attn_vec_einsum': ('attn/attn_vec_einsum', None),
    'query_norm': ('attn/_query_norm/scale', None),
    'key_norm': ('attn/_key_norm/scale', None),
    'gating_einsum': ('mlp/gating_einsum', None),
    'linear': ('mlp/linear', None),
}


def _kaggle_name(keys: tuple[str, ...]) -> str:
  """A leaf path in any of the FLAT / NESTED / KAULDRON layouts -> 'layer_3/attn/q_einsum'."""
  name = '/'.join(keys)
  for prefix in ('params/', 'transformer/'):
    name = name[len(prefix):] if name.startswith(prefix) else name
  # Einsum weights are {'w': ...} in the flat layout; NESTED drops the level for the MLP.
  return name[:-2] if name.endswith('/w') else name


def _orbax_metadata_tree(path: epath.Path):
  """The tree of an Orbax PyTree checkpoint's metadata (shapes, dtypes), without reading arrays."""
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'{path}: not a readable Orbax checkpoint ({e})') from None
  tree = getattr(meta, 'item_metadata', meta)
  return getattr(tree, 'tree', tree)


class KaggleSource(Source):
  """A released Flax/Orbax checkpoint (FLAT, NESTED, STACKED or KAULDRON layout, GEMMA3.md B.1).

  With no `cfg`, the shapes give L, D, N, K, H, F and the PRESETS entry with those shapes gives
  the rest (query scalar, window, RoPE scale). A STACKED checkpoint is read one stacked leaf
  at a time and kept until its last layer has been taken.
  """

  def __init__(self, path, cfg: config_lib.ModelConfig | None = None):
    self.path = epath.Path(path).absolute()
    tree = _orbax_metadata_tree(self.path)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    self._leaves = {}  # normalized name -> (original key path, metadata)
    for key_path, leaf in leaves:
      keys = tuple(str(getattr(k, 'key', k)) for k in key_path)
      self._leaves[_kaggle_name(keys)] = (keys, leaf)
    self._stack = self._stacking()
    self._cache: dict[str, np.ndarray] = {}
    self.cfg = cfg or self._infer_config()
    self._check_shapes()

  def _stacking(self) -> int:
    types = {re.match(r'.*stacked_layers/attention_type_(\d+)/', n) for n in self._leaves}
    types = {int(t.group(1)) for t in types if t}
    return len(types)

  def _shape(self, name: str) -> tuple[int, ...]:
    if name not in self._leaves:
      raise ConversionError(f'{self.path}: tensor {name} missing from the checkpoint')
    return tuple(self._leaves[name][1].shape)

  def _layer_leaf(self, i: int, sub: str) -> tuple[str, int | None]:
    """The leaf name holding layer i's `sub`, and its index along a stack axis (or None)."""
    if not self._stack:
      return f'layer_{i}/{sub}', None
    return f'stacked_layers/attention_type_{i % self._stack}/{sub}', i // self._stack

  def _num_layers(self) -> int:
    if not self._stack:
      return len({n.split('/')[0] for n in self._leaves if re.match(r'layer_\d+/', n)})
    return sum(self._shape(self._layer_leaf(p, 'attn/q_einsum')[0])[0]
               for p in range(self._stack))

  def _infer_config(self) -> config_lib.ModelConfig:
    V, D = self._shape('embedder/input_embedding')
    q = self._shape(self._layer_leaf(0, 'attn/q_einsum')[0])[-3:]
    kv = self._shape(self._layer_leaf(0, 'attn/kv_einsum')[0])[-4:]
    gating = self._shape(self._layer_leaf(0, 'mlp/gating_einsum')[0])[-3:]
    fields = dict(num_layers=self._num_layers(), embed_dim=D, num_heads=q[0], head_dim=q[2],
                  num_kv_heads=kv[1], mlp_dim=gating[1])
    name = preset_name(fields)
    if name == 'custom':
      raise ConversionError(f'{self.path}: shapes {fields} match no Gemma 3 preset; pass the '
                            'model config (--config) to import it')
    return config_lib.ModelConfig.from_preset(name, vocab_size=V)

  def _check_shapes(self) -> None:
    m = self.cfg
    if self._num_layers() != m.num_layers:
      raise ConversionError(f'{self.path}: {self._num_layers()} layers, expected '
                            f'model.num_layers={m.num_layers}')
    V, D = self._shape('embedder/input_embedding')
    if D != m.embed_dim or V < m.vocab_size:
      raise ConversionError(f'{self.path}: embedder/input_embedding shape {(V, D)}, expected '
                            f'({m.vocab_size}, {m.embed_dim})')

  def _read(self, names: list[str]) -> dict[str, np.ndarray]:
    """Restores just these leaves (orbax partial restore), in their stored dtype."""
    if not names:
      return {}
    item: dict = {}
    for name in names:
      keys, leaf = self._leaves[name]
      node = item
      for k in keys[:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = np.zeros(leaf.shape, leaf.dtype)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = ocp.PyTreeCheckpointer().restore(
        self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    values = {}
    for name in names:
      node = out
      for k in self._leaves[name][0]:
        node = node[k]
      values[name] = np.asarray(node)
    return values

  def top(self):
    m = self.cfg
    x = self._read(['embedder/input_embedding', 'final_norm/scale'])
    return {'embedding': x['embedder/input_embedding'][:m.vocab_size],
            'final_norm': _check(x['final_norm/scale'], 'final_norm/scale', (m.embed_dim,))}

  def layer(self, i):
    m = self.cfg
    N, K, D, H, F = m.num_heads, m.num_kv_heads, m.embed_dim, m.head_dim, m.mlp_dim
    shapes = dict(q_einsum=(N, D, H), k_einsum=(K, D, H), v_einsum=(K, D, H),
                  attn_vec_einsum=(N, H, D), gating_einsum=(2, F, D), linear=(F, D),
                  query_norm=(H,), key_norm=(H,))
    where = {ours: self._layer_leaf(i, sub) + (kv,) for ours, (sub, kv) in _KAGGLE_LAYER.items()}
    wanted = sorted({leaf for leaf, _, _ in where.values()})
    for leaf in wanted:
      if leaf not in self._leaves:
        raise ConversionError(f'{self.path}: tensor {leaf} missing from the checkpoint')
    missing = [n for n in wanted if n not in self._cache]
    self._cache.update(self._read(missing))
    layer = {}
    for ours, (leaf, s, kv) in where.items():
      x = self._cache[leaf] if s is None else self._cache[leaf][s]
      x = x if kv is None else x[kv]
      layer[ours] = _check(x, f'{leaf}[{s}]' if s is not None else leaf, shapes.get(ours, (D,)))
    if not self._stack or i // self._stack == self._shape(wanted[0])[0] - 1:
      for leaf in wanted:  # a stacked leaf is dropped once its last layer has been taken
        self._cache.pop(leaf, None)
    return layer


# --- our params-only checkpoint -------------------------------------------------------

PARAMS_CONFIG = 'gemma3_config.json'  # marks one of our params-only checkpoints
_PARAMS_TREE = 'params'


def save_params(path, cfg: config_lib.ModelConfig, top: Mapping[str, np.ndarray],
                layers: Iterable[Mapping[str, np.ndarray]], *, progress: bool = False) -> None:
  """Writes our params-only checkpoint: PATH/gemma3_config.json + PATH/params (Orbax, canonical).

  `layers` may be a generator: each layer is written (an Orbax partial save) before the next
  is read, so host memory holds the embedding and one layer, never the whole model.
  """
  path = epath.Path(path).absolute()  # orbax wants absolute paths
  if path.exists() and any(path.iterdir()):
    raise ConversionError(f'{path}: destination exists and is not empty')
  path.mkdir(parents=True, exist_ok=True)
  tree = path / _PARAMS_TREE
  ocp_v1.partial.save(tree, {'embedding': np.asarray(top['embedding']),
                             'final_norm': np.asarray(top['final_norm'])})
  bar = _Progress(f'writing {path}', cfg.num_layers) if progress else None
  n = 0
  for i, layer in enumerate(layers):
    ocp_v1.partial.save(tree, {f'layer_{i}': {k: np.asarray(v) for k, v in layer.items()}})
    n += 1
    if bar:
      bar.step()
  if n != cfg.num_layers:
    raise ConversionError(f'{path}: got {n} layers, expected model.num_layers={cfg.num_layers}')
  ocp_v1.partial.finalize(tree)
  (path / PARAMS_CONFIG).write_text(json.dumps(
      {'format': 'gemma3-train params', 'version': 1, 'model': dataclasses.asdict(cfg)},
      indent=2, sort_keys=True))


def _model_config_from_json(file: epath.Path) -> config_lib.ModelConfig:
  try:
    d = json.loads(file.read_text())['model']
    return config_lib.from_dict({'model': d}).model
  except (json.JSONDecodeError, KeyError, config_lib.ConfigError) as e:
    raise ConversionError(f'{file}: not a gemma3-train model config ({e})') from None


class ParamsSource(Source):
  """One of our params-only checkpoints (save_params)."""

  def __init__(self, path):
    self.path = epath.Path(path).absolute()
    self.cfg = _model_config_from_json(self.path / PARAMS_CONFIG)
    self._tree = self.path / _PARAMS_TREE
    self._meta = ocp_v1.metadata(self._tree).metadata

  def _read(self, keys: list[str]) -> dict:
    missing = [k for k in keys if k not in self._meta]
    if missing:
      raise ConversionError(f'{self._tree}: {missing[0]} missing from the checkpoint')
    abstract = {k: (jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), v) if k in keys
                    else jax.tree.map(lambda _: ocp_v1.PLACEHOLDER, v))
                for k, v in self._meta.items()}
    return ocp_v1.load(self._tree, abstract)

  def top(self):
    x = self._read(['embedding', 'final_norm'])
    m = self.cfg
    return {'embedding': _check(x['embedding'], 'embedding', (m.vocab_size, m.embed_dim)),
            'final_norm': _check(x['final_norm'], 'final_norm', (m.embed_dim,))}

  def layer(self, i):
    return {k: np.asarray(v) for k, v in self._read([f'layer_{i}'])[f'layer_{i}'].items()}


# --- our training checkpoints (checkpoint.py) -------------------------------------------


def train_step_dir(path) -> epath.Path:
  """WORKDIR -> its newest complete WORKDIR/checkpoints/<step>; a step directory as it is."""
  path = epath.Path(path).absolute()
  if not (path / 'checkpoints').is_dir():
    return path
  # Orbax lists only finalized steps; it also parses a set-aside 'unreadable_5' as step 5.
  steps = [p for p in ocp.step.checkpoint_steps_paths(path / 'checkpoints') if p.name.isdigit()]
  if not steps:
    raise ConversionError(f'{path / "checkpoints"}: no complete checkpoint (expected '
                          'checkpoints/<step>/ written by training)')
  return max(steps, key=lambda p: int(p.name))


class TrainSource(Source):
  """One of our training checkpoints: a workdir (its newest step) or WORKDIR/checkpoints/<step>.

  Reads only the params of the 'state' item (an Orbax partial restore to host numpy; the
  optimizer moments, twice their size, stay on disk) and the model config saved beside them.
  The params are read whole on first use and kept; the canonical gate/up stacks copy the MLP.
  """

  def __init__(self, path):
    from gemma3_train import model as model_lib  # pylint: disable=g-import-not-at-top
    self.path = train_step_dir(path)
    if not ocp.step.is_path_finalized(self.path):
      raise ConversionError(f'{self.path}: checkpoint write did not complete')
    config_file = self.path / 'config' / 'metadata'  # JsonCheckpointHandler's file name
    if not config_file.exists():
      raise ConversionError(f'{config_file}: missing (a training checkpoint saves its config)')
    self.cfg = _model_config_from_json(config_file)
    self._state_dir = self.path / 'state'
    tree = _orbax_metadata_tree(self._state_dir)
    if not isinstance(tree, Mapping) or 'params' not in tree:
      raise ConversionError(f'{self._state_dir}: no params in the train state')
    # Stored keys are strings, with a trailing 'value' level per nnx.Variable.
    stored = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree['params'])[0]:
      keys = tuple(str(getattr(k, 'key', k)) for k in key_path)
      stored[keys[:-1] if keys[-1] == 'value' else keys] = (keys, leaf)
    self._leaves = []  # (nnx path, stored keys, abstract var, stored metadata)
    for path_, var in nnx.to_flat_state(model_lib.abstract_state(self.cfg)):
      name = tuple(str(k) for k in path_)
      if name not in stored:
        raise ConversionError(f'{self._state_dir}: params/{"/".join(name)} missing from the '
                              'checkpoint')
      keys, leaf = stored[name]
      if tuple(leaf.shape) != tuple(var.shape):
        raise ConversionError(f'{self._state_dir}: params/{"/".join(name)} has shape '
                              f'{tuple(leaf.shape)}, expected {tuple(var.shape)}')
      self._leaves.append((path_, keys, var, leaf))
    self._canonical = None

  def _load(self) -> tuple[dict, list[dict]]:
    from gemma3_train import model as model_lib  # pylint: disable=g-import-not-at-top
    if self._canonical is None:
      item: dict = {}
      for _, keys, _, leaf in self._leaves:
        node = item.setdefault('params', {})
        for k in keys[:-1]:
          node = node.setdefault(k, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      out = ocp.PyTreeCheckpointer().restore(self._state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
      flat = []
      for path_, keys, var, _ in self._leaves:
        node = out['params']
        for k in keys:
          node = node[k]
        flat.append((path_, var.replace(np.asarray(node))))
      self._canonical = model_lib.state_to_canonical(self.cfg, nnx.from_flat_state(flat))
    return self._canonical

  def top(self):
    return self._load()[0]

  def layer(self, i):
    return self._load()[1][i]


# --- reading any checkpoint ---------------------------------------------------------------


def checkpoint_kind(path) -> str:
  """'params' (ours), 'train' (our training workdir or one of its steps), 'hf' (config.json +
  safetensors) or 'kaggle' (an Orbax tree).

  A new kind needs a test here and a Source in open_source.
  """
  path = epath.Path(path)
  if not path.is_dir():
    if path.parent.name == 'checkpoints' and path.parent.is_dir():
      steps = sorted(int(p.name) for p in path.parent.iterdir() if p.name.isdigit())
      raise ConversionError(f'{path}: no such checkpoint step (steps here: {steps})')
    raise ConversionError(f'{path}: not a directory')
  if (path / PARAMS_CONFIG).exists():
    return 'params'
  if (path / 'checkpoints').is_dir() or ((path / 'state').is_dir() and
                                         (path / 'config').is_dir()):
    return 'train'
  if (path / 'config.json').exists():
    return 'hf'
  if (path / '_METADATA').exists() or (path / 'checkpoint').exists():
    return 'kaggle'
  raise ConversionError(f'{path}: neither a Hugging Face directory (config.json), a Kaggle/Flax '
                        f'Orbax checkpoint (_METADATA), one of ours ({PARAMS_CONFIG}) nor a '
                        'training workdir (checkpoints/)')


def open_source(path, cfg: config_lib.ModelConfig | None = None,
                vocab_size: int | None = None) -> Source:
  """Opens any supported checkpoint for layer-by-layer reading (see checkpoint_kind)."""
  kind = checkpoint_kind(path)
  if kind == 'params':
    return ParamsSource(path)
  if kind == 'train':
    return TrainSource(path)
  if kind == 'hf':
    return HfSource(path, vocab_size)
  return KaggleSource(path, cfg)


def load_canonical(path, cfg: config_lib.ModelConfig | None = None
                   ) -> tuple[config_lib.ModelConfig, dict, list[dict]]:
  """(ModelConfig, top, layers) of a HF directory, a Kaggle checkpoint or one of ours
  (params-only, or a training workdir / step)."""
  src = open_source(path, cfg)
  return src.cfg, src.top(), [src.layer(i) for i in range(src.cfg.num_layers)]


def import_checkpoint(src_path, dst_path, cfg: config_lib.ModelConfig | None = None,
                      progress: bool = True) -> config_lib.ModelConfig:
  """HF / Kaggle (or ours) -> our params-only checkpoint, one layer in memory at a time."""
  src = open_source(src_path, cfg)
  save_params(dst_path, src.cfg, src.top(),
              (src.layer(i) for i in range(src.cfg.num_layers)), progress=progress)
  return src.cfg


# --- Hugging Face export -------------------------------------------------------------------


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


def export_hf(src_path, dst_path, dtype: str = 'bfloat16', shard_size: int = 5 * 10**9,
              progress: bool = True) -> config_lib.ModelConfig:
  """Any checkpoint we read -> a Gemma3ForCausalLM HF directory (safetensors shards + index).

  Streams: host memory holds one shard being filled and one layer (a training checkpoint: all
  its params, see TrainSource).
  """
  if dtype not in ('float32', 'bfloat16'):
    raise ConversionError(f'dtype={dtype!r}: expected float32 | bfloat16')
  np_dtype = np.dtype(jnp.dtype(dtype))
  src = open_source(src_path)
  dst = epath.Path(dst_path)
  if dst.exists() and any(dst.iterdir()):
    raise ConversionError(f'{dst}: destination exists and is not empty')
  dst.mkdir(parents=True, exist_ok=True)
  writer = _ShardWriter(dst, shard_size)
  cast = lambda d: {k: np.asarray(v).astype(np_dtype) for k, v in d.items()}
  top = src.top()
  writer.add(cast({'model.embed_tokens.weight': top['embedding']}))
  bar = _Progress(f'writing {dst}', src.cfg.num_layers) if progress else None
  for i in range(src.cfg.num_layers):
    writer.add(cast(canonical_layer_to_hf(src.layer(i), 'model.', i)))
    if bar:
      bar.step()
  writer.add(cast({'model.norm.weight': top['final_norm']}))
  writer.close()
  (dst / 'config.json').write_text(json.dumps(model_to_hf_config(src.cfg, dtype), indent=2))
  return src.cfg


# --- gemma3_train.load --------------------------------------------------------------------


def load(path, **model_overrides):
  """A model.Gemma3 with the weights of a HF directory, a Kaggle checkpoint or one of ours
  (params-only, or a training workdir: its newest complete step).

  `model_overrides` change non-shape ModelConfig fields, e.g. dtype='bfloat16'.
  """
  from gemma3_train import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg, top, layers = load_canonical(path)
  cfg = dataclasses.replace(cfg, **model_overrides)
  model = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  state = model_lib.canonical_to_state(cfg, top, layers)
  nnx.update(model, jax.tree.map(jnp.asarray, state))
  return model
