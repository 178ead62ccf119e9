"""Google's released Flax/Orbax Gemma 3 checkpoints (Kaggle, gemma-lib, Kauldron), read.

Four layouts hold the same arrays under different names:
  FLAT      {'transformer/layer_3/attn/q_einsum': {'w': ...}, ...} (the Kaggle releases)
  NESTED    {'layer_3': {'attn': {'q_einsum': {'w': ...}}}} (gemma-lib model.init(); the MLP
            leaves drop the 'w' level)
  KAULDRON  NESTED under 'params'
  STACKED   'stacked_layers/attention_type_{i % P}/...' with a leading axis indexed by i // P
The arrays are the canonical layout (layout.py) except that k and v are one kv_einsum
[2, K, D, H] and the QK norms are attn/_query_norm, attn/_key_norm (docs/gemma3.md section 5).
The 4b/12b/27b vision tower and projector (SigLiPFromPatches_0/..., embedder/mm_*): their names
are vision_keys.py's; vision() reads them. `write` saves any Source in the FLAT layout.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.convert import orbax_tree
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source
from gemma3_train.convert.source import absolute
from gemma3_train.convert.source import check
from gemma3_train.convert.source import layers as source_layers
from gemma3_train.convert.source import preset_name
from gemma3_train.convert import vision_keys

_LAYER = {  # canonical name -> (path under layer_i, index into the stacked kv leaf)
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


def _name(keys: tuple[str, ...]) -> str:
  """A leaf path in any of the FLAT / NESTED / KAULDRON layouts -> 'layer_3/attn/q_einsum'."""
  name = '/'.join(keys)
  for prefix in ('params/', 'transformer/'):
    name = name[len(prefix):] if name.startswith(prefix) else name
  # Einsum weights are {'w': ...} in the flat layout; NESTED drops the level for the MLP.
  return name[:-2] if name.endswith('/w') else name


class KaggleSource(Source):
  """A released Flax/Orbax checkpoint in any of the layouts above.

  With no `cfg`, the shapes give L, D, N, K, H, F and the PRESETS entry with those shapes gives
  the rest (query scalar, window, RoPE scale). Holds in memory the leaves of the layer being
  read; a STACKED leaf is kept until its last layer has been taken (order() takes them in turn).
  """

  def __init__(self, path, cfg: config_lib.ModelConfig | None = None):
    self.path = absolute(path)
    self._meta = orbax_tree.leaves(self.path)
    self._keys = {_name(keys): keys for keys in self._meta}  # normalized name -> stored keys
    self._stack = self._stacking()
    self._cache: dict[str, np.ndarray] = {}
    self._vision_root = vision_keys.kaggle_root(self._keys)
    self.cfg = cfg or self._infer_config()
    self._check_shapes()

  def _stacking(self) -> int:
    types = {re.match(r'.*stacked_layers/attention_type_(\d+)/', n) for n in self._keys}
    return len({int(t.group(1)) for t in types if t})

  def _shape(self, name: str) -> tuple[int, ...]:
    if name not in self._keys:
      raise ConversionError(f'{self.path}: tensor {name} missing from the checkpoint')
    return tuple(self._meta[self._keys[name]].shape)

  def _layer_leaf(self, i: int, sub: str) -> tuple[str, int | None]:
    """The leaf name holding layer i's `sub`, and its index along a stack axis (or None)."""
    if not self._stack:
      return f'layer_{i}/{sub}', None
    return f'stacked_layers/attention_type_{i % self._stack}/{sub}', i // self._stack

  def _num_layers(self) -> int:
    if not self._stack:
      return len({n.split('/')[0] for n in self._keys if re.match(r'layer_\d+/', n)})
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
    cfg = config_lib.ModelConfig.from_preset(name, vocab_size=V)
    if self._vision_root is None:
      return cfg
    shapes = {name: self._shape(leaf) for name, leaf in
              vision_keys.kaggle_top_names(self._vision_root).items()}
    shapes.update({name: self._shape(leaf)[self._vision_stacked():] for name, leaf in
                   self._vision_layer_names(0).items()})
    shapes['pos_embedding'] = shapes['pos_embedding'][-2:]
    # The pool window is no weight's shape: the released models' 4 (the config default).
    return dataclasses.replace(cfg, **vision_keys.fields_from_shapes(
        shapes, self._vision_depth(), cfg.vision_pool))

  def _check_shapes(self) -> None:
    m = self.cfg
    if self._num_layers() != m.num_layers:
      raise ConversionError(f'{self.path}: {self._num_layers()} layers, expected '
                            f'model.num_layers={m.num_layers}')
    V, D = self._shape('embedder/input_embedding')
    if D != m.embed_dim or V < m.vocab_size:
      raise ConversionError(f'{self.path}: embedder/input_embedding shape {(V, D)}, expected '
                            f'({m.vocab_size}, {m.embed_dim})')
    if m.vision and self._vision_root is not None:  # from the metadata, before any read
      if self._vision_depth() != m.vision_depth:
        raise ConversionError(f'{self.path}: {self._vision_depth()} vision encoder layers, '
                              f'expected model.vision_depth={m.vision_depth}')
      want = {**vision_keys.top_shapes(m), **vision_keys.layer_shapes(m)}
      names = {**vision_keys.kaggle_top_names(self._vision_root), **self._vision_layer_names(0)}
      for name, leaf in names.items():
        shape = self._shape(leaf)[self._vision_stacked() if name in vision_keys.LAYER else 0:]
        if name == 'pos_embedding' and len(shape) == 3 and shape[0] == 1:
          shape = shape[1:]
        if shape != want[name]:
          raise ConversionError(f'{self.path}: {leaf} has shape {shape}, expected {want[name]}')

  def _read(self, names: list[str]) -> dict[str, np.ndarray]:
    """Restores just these leaves, in their stored dtype."""
    values = orbax_tree.read(self.path, [self._keys[n] for n in names], self._meta)
    return {n: values[self._keys[n]] for n in names}

  def top(self):
    m = self.cfg
    x = self._read(['embedder/input_embedding', 'final_norm/scale'])
    return {'embedding': x['embedder/input_embedding'][:m.vocab_size],
            'final_norm': check(x['final_norm/scale'], 'final_norm/scale', (m.embed_dim,))}

  def order(self):
    return layout.stacked_order(self.cfg.num_layers, max(self._stack, 1),
                                self.cfg.num_layers if self._stack else 0)

  def layer(self, i):
    shapes = layout.layer_shapes(self.cfg)
    where = {ours: self._layer_leaf(i, sub) + (kv,) for ours, (sub, kv) in _LAYER.items()}
    wanted = sorted({leaf for leaf, _, _ in where.values()})
    for leaf in wanted:
      if leaf not in self._keys:
        raise ConversionError(f'{self.path}: tensor {leaf} missing from the checkpoint')
    self._cache.update(self._read([n for n in wanted if n not in self._cache]))
    layer = {}
    for ours, (leaf, s, kv) in where.items():
      x = self._cache[leaf] if s is None else self._cache[leaf][s]
      x = x if kv is None else x[kv]
      layer[ours] = check(x, f'{leaf}[{s}]' if s is not None else leaf, shapes[ours])
    if not self._stack or i // self._stack == self._shape(wanted[0])[0] - 1:
      for leaf in wanted:  # a stacked leaf is dropped once its last layer has been taken
        self._cache.pop(leaf, None)
    return layer

  # --- the vision tower (4b, 12b, 27b): vision_keys.py names its arrays ---

  def has_vision(self):
    return self._vision_root is not None

  def _vision_stacked(self) -> int:
    """1 when the encoder layers are one scanned 'encoderblock' (a leading depth axis), else 0."""
    return int(f'{self._vision_root}/Transformer/encoderblock/LayerNorm_0/scale' in self._keys)

  def _vision_layer_names(self, j: int) -> dict[str, str]:
    return vision_keys.kaggle_layer_names(self._vision_root, j, bool(self._vision_stacked()))

  def _vision_depth(self) -> int:
    if self._vision_stacked():
      return self._shape(self._vision_layer_names(0)['ln0_scale'])[0]
    return len({n for n in self._keys
                if re.match(re.escape(self._vision_root) + r'/Transformer/encoderblock_\d+/', n)
                and n.endswith('LayerNorm_0/scale')})

  def vision(self):
    m = self.cfg
    if self._vision_root is None or not m.vision:
      return None
    names = vision_keys.kaggle_top_names(self._vision_root)
    shapes = vision_keys.top_shapes(m)
    x = self._read(list(names.values()))
    pos = x[names['pos_embedding']]  # [1, G*G, W] as released
    x[names['pos_embedding']] = pos[0] if pos.ndim == 3 and pos.shape[0] == 1 else pos
    top = {name: check(x[leaf], leaf, shapes[name]) for name, leaf in names.items()}
    return top, vision_keys.LazyLayers(m.vision_depth, self._vision_layer)

  def _vision_layer(self, j: int) -> dict[str, np.ndarray]:
    names = self._vision_layer_names(j)
    shapes = vision_keys.layer_shapes(self.cfg)
    # A scanned encoder is read whole once per layer asked (Kaggle releases are unscanned).
    x = self._read(list(names.values()))
    s = self._vision_stacked()
    return {name: check(x[leaf][j] if s else x[leaf], f'{leaf}[{j}]' if s else leaf,
                        shapes[name]) for name, leaf in names.items()}


def flat_tree(src: Source, dtype=None) -> dict[str, dict[str, np.ndarray]]:
  """src's arrays in the FLAT layout, {'transformer/layer_3/attn/q_einsum': {'w': ...}, ...}
  (the inverse of _LAYER and of vision_keys' Kaggle names), cast to dtype when given."""
  cast = (lambda x: np.asarray(x)) if dtype is None else (lambda x: np.asarray(x).astype(dtype))
  top = src.top()
  tree = {'transformer/embedder': {'input_embedding': cast(top['embedding'])},
          'transformer/final_norm': {'scale': cast(top['final_norm'])}}
  for i, layer in source_layers(src):
    p = f'transformer/layer_{i}/'
    for name, (sub, index) in _LAYER.items():
      if index is not None:  # k and v: one stacked kv_einsum, below
        continue
      module, _, leaf = sub.rpartition('/')  # norms '.../scale'; einsums a {'w': ...} module
      tree[p + module if leaf == 'scale' else p + sub] = {
          leaf if leaf == 'scale' else 'w': cast(layer[name])}
    tree[p + 'attn/kv_einsum'] = {'w': cast(np.stack([layer['k_einsum'], layer['v_einsum']]))}
  vision = src.vision() if src.cfg.vision else None
  if vision is not None:
    for module, leaves in vision_keys.canonical_to_kaggle(*vision).items():
      tree[module] = {k: cast(v) for k, v in leaves.items()}
  return tree


def write(src: Source, dst_path, dtype: str | None = None) -> None:
  """src as a Kaggle/Flax FLAT Orbax checkpoint at dst_path (a new directory), which the gemma
  library's loaders and KaggleSource read. Orbax saves one PyTree, so the host holds the whole
  model once (unlike the layer-streamed Hugging Face export)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy; export only)
  tree = flat_tree(src, None if dtype is None else np.dtype(dtype))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(absolute(dst_path), tree)
  ckptr.wait_until_finished()
