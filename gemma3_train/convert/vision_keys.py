"""The vision tower's and projector's weights: names and transforms in every layout, one table.

The canonical form (layout.py; the Kaggle/Flax arrays, W = vision width, Nv heads of Hv, M MLP,
P patch, G*G patches, D = decoder width):
  vision_top    = {'patch_kernel' [P, P, 3, W], 'patch_bias' [W], 'pos_embedding' [G*G, W],
                   'encoder_norm_scale' [W], 'encoder_norm_bias' [W],
                   'mm_soft_embedding_norm' [W], 'mm_input_projection' [W, D]}
  vision_layers = [{'ln0_scale', 'ln0_bias', 'ln1_scale', 'ln1_bias' [W],
                    'query_kernel' [W, Nv, Hv], 'query_bias' [Nv, Hv], key_*, value_* alike,
                    'out_kernel' [Nv, Hv, W], 'out_bias' [W], 'fc1_kernel' [W, M], 'fc1_bias' [M],
                    'fc2_kernel' [M, W], 'fc2_bias' [W]}, ...]   one per encoder layer

Hugging Face (SiglipVisionModel + Gemma3MultiModalProjector; Linear weights [out, in], the patch
Conv2d weight [W, 3, P, P]) puts the tower under one of VISION_PREFIXES and the projector under
one of PROJECTOR_PREFIXES, depending on the class and transformers version that saved it:
  hub releases (legacy)     vision_tower.vision_model.   multi_modal_projector.
  transformers v5 saves     vision_tower.                multi_modal_projector.
  transformers >= 4.52      model.vision_tower.vision_model.  model.multi_modal_projector.
  transformers v5 in memory model.vision_tower.          model.multi_modal_projector.
We write the hub names. The Kaggle/Flax releases (FLAT) hold the tower under
'SigLiPFromPatches_0/siglip_encoder' (the gemma library's NESTED tree: 'vision_encoder/
siglip_encoder'), its position embedding as [1, G*G, W], and the projector in the text embedder
('transformer/embedder/mm_*'). docs/gemma3.md section 5 tabulates the same.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from gemma3_train import config as config_lib
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import check

VISION_PREFIXES = ('vision_tower.vision_model.', 'vision_tower.',
                   'model.vision_tower.vision_model.', 'model.vision_tower.')
PROJECTOR_PREFIXES = ('multi_modal_projector.', 'model.multi_modal_projector.')
# What export writes (the hub's own names, which every transformers version loads).
HF_VISION_PREFIX, HF_PROJECTOR_PREFIX = VISION_PREFIXES[0], PROJECTOR_PREFIXES[0]
# Where the Kaggle FLAT layout (and the gemma library's NESTED tree) keep the SigLIP encoder.
KAGGLE_ROOTS = ('SigLiPFromPatches_0/siglip_encoder', 'vision_encoder/siglip_encoder')
# Special token ids of the released multimodal models (their HF config.json fields).
BOI, EOI = 255999, 256000
# Rows HF's multimodal embedding has past the text vocabulary (the image soft token and 63 more).
HF_EXTRA_ROWS = 64

# canonical name -> (HF name, HF transform, Kaggle module path, Kaggle leaf). '{v}' is the tower
# prefix, '{p}' the projector prefix, '{r}' the Kaggle root. Transforms (canonical -> HF):
#   'same'  reshape to the HF shape (biases of the heads flatten [Nv, Hv] -> [Nv*Hv])
#   'T'     reshape to the reversed HF shape, then transpose ([in, ...] -> [out, in])
#   'conv'  [P, P, 3, W] -> [W, 3, P, P]
TOP = {
    'patch_kernel': ('{v}embeddings.patch_embedding.weight', 'conv', '{r}/embedding', 'kernel'),
    'patch_bias': ('{v}embeddings.patch_embedding.bias', 'same', '{r}/embedding', 'bias'),
    'pos_embedding': ('{v}embeddings.position_embedding.weight', 'same', '{r}', 'pos_embedding'),
    'encoder_norm_scale': ('{v}post_layernorm.weight', 'same', '{r}/Transformer/encoder_norm',
                           'scale'),
    'encoder_norm_bias': ('{v}post_layernorm.bias', 'same', '{r}/Transformer/encoder_norm',
                          'bias'),
    'mm_soft_embedding_norm': ('{p}mm_soft_emb_norm.weight', 'same',
                               'transformer/embedder/mm_soft_embedding_norm', 'scale'),
    'mm_input_projection': ('{p}mm_input_projection_weight', 'same',
                            'transformer/embedder/mm_input_projection', 'w'),
}
# One encoder layer: '{v}encoder.layers.{j}.' and '{r}/Transformer/encoderblock_{j}/' prefix these.
_ATTN, _MLP = 'MultiHeadDotProductAttention_0/', 'MlpBlock_0/'
LAYER = {
    'ln0_scale': ('layer_norm1.weight', 'same', 'LayerNorm_0', 'scale'),
    'ln0_bias': ('layer_norm1.bias', 'same', 'LayerNorm_0', 'bias'),
    'ln1_scale': ('layer_norm2.weight', 'same', 'LayerNorm_1', 'scale'),
    'ln1_bias': ('layer_norm2.bias', 'same', 'LayerNorm_1', 'bias'),
    'query_kernel': ('self_attn.q_proj.weight', 'T', _ATTN + 'query', 'kernel'),
    'query_bias': ('self_attn.q_proj.bias', 'same', _ATTN + 'query', 'bias'),
    'key_kernel': ('self_attn.k_proj.weight', 'T', _ATTN + 'key', 'kernel'),
    'key_bias': ('self_attn.k_proj.bias', 'same', _ATTN + 'key', 'bias'),
    'value_kernel': ('self_attn.v_proj.weight', 'T', _ATTN + 'value', 'kernel'),
    'value_bias': ('self_attn.v_proj.bias', 'same', _ATTN + 'value', 'bias'),
    'out_kernel': ('self_attn.out_proj.weight', 'T', _ATTN + 'out', 'kernel'),
    'out_bias': ('self_attn.out_proj.bias', 'same', _ATTN + 'out', 'bias'),
    'fc1_kernel': ('mlp.fc1.weight', 'T', _MLP + 'Dense_0', 'kernel'),
    'fc1_bias': ('mlp.fc1.bias', 'same', _MLP + 'Dense_0', 'bias'),
    'fc2_kernel': ('mlp.fc2.weight', 'T', _MLP + 'Dense_1', 'kernel'),
    'fc2_bias': ('mlp.fc2.bias', 'same', _MLP + 'Dense_1', 'bias'),
}


def top_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """The canonical shape of each vision_top array."""
  P, W, G = cfg.vision_patch_size, cfg.vision_width, cfg.vision_image_size // cfg.vision_patch_size
  return {'patch_kernel': (P, P, 3, W), 'patch_bias': (W,), 'pos_embedding': (G * G, W),
          'encoder_norm_scale': (W,), 'encoder_norm_bias': (W,),
          'mm_soft_embedding_norm': (W,), 'mm_input_projection': (W, cfg.embed_dim)}


def layer_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """The canonical shape of each array of one encoder layer."""
  W, M, Nv = cfg.vision_width, cfg.vision_mlp_dim, cfg.vision_num_heads
  Hv = W // Nv
  shapes = {f'ln{i}_{k}': (W,) for i in (0, 1) for k in ('scale', 'bias')}
  for k in ('query', 'key', 'value'):
    shapes.update({f'{k}_kernel': (W, Nv, Hv), f'{k}_bias': (Nv, Hv)})
  shapes.update(out_kernel=(Nv, Hv, W), out_bias=(W,), fc1_kernel=(W, M), fc1_bias=(M,),
                fc2_kernel=(M, W), fc2_bias=(W,))
  return shapes


def _hf_shapes(canonical: Mapping[str, tuple[int, ...]], table: Mapping[str, tuple]
               ) -> dict[str, tuple[int, ...]]:
  """The HF shape of each array: [out, in] Linear weights, the heads flattened."""
  out = {}
  for name, shape in canonical.items():
    op = table[name][1]
    if op == 'conv':  # [P, P, 3, W] -> [W, 3, P, P]
      out[name] = (shape[3], shape[2], shape[0], shape[1])
    elif name == 'out_kernel':  # [Nv, Hv, W] -> [W, Nv*Hv]
      out[name] = (shape[2], shape[0] * shape[1])
    elif op == 'T':  # [W, Nv, Hv] -> [Nv*Hv, W]; [in, out] -> [out, in]
      out[name] = (int(np.prod(shape[1:])), shape[0])
    elif name.endswith('_bias') and len(shape) == 2:  # [Nv, Hv] -> [Nv*Hv]
      out[name] = (shape[0] * shape[1],)
    else:
      out[name] = shape
  return out


def _to_hf(x: np.ndarray, op: str, hf_shape: tuple[int, ...]) -> np.ndarray:
  if op == 'conv':
    return x.transpose(3, 2, 0, 1)
  if op == 'T':
    return x.reshape(hf_shape[::-1]).T
  return x.reshape(hf_shape)


def _from_hf(x: np.ndarray, op: str, shape: tuple[int, ...]) -> np.ndarray:
  if op == 'conv':
    return x.transpose(2, 3, 1, 0)
  if op == 'T':
    return x.T.reshape(shape)
  return x.reshape(shape)


# --- Hugging Face ----------------------------------------------------------------------------


def hf_prefixes(names: Sequence[str]) -> tuple[str, str] | None:
  """(tower prefix, projector prefix) of a HF checkpoint's vision weights; None without any."""
  names = set(names)
  tower = [p for p in VISION_PREFIXES if f'{p}embeddings.patch_embedding.weight' in names]
  projector = [p for p in PROJECTOR_PREFIXES if f'{p}mm_input_projection_weight' in names]
  if not tower and not projector:
    return None
  if not tower or not projector:
    raise ConversionError('vision weights incomplete: ' + (
        f'no embeddings.patch_embedding.weight under any of {", ".join(VISION_PREFIXES)}'
        if not tower else
        f'no mm_input_projection_weight under any of {", ".join(PROJECTOR_PREFIXES)}'))
  return tower[0], projector[0]


def _take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
  if name not in tensors:
    raise ConversionError(f'{name}: tensor missing from the checkpoint')
  return check(tensors[name], name, shape)


def hf_top_to_canonical(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, str],
                        cfg: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """vision_top from HF tensors (any of the layouts; `prefixes` from hf_prefixes)."""
  shapes = top_shapes(cfg)
  hf_shapes = _hf_shapes(shapes, TOP)
  v, p = prefixes
  return {name: _from_hf(_take(tensors, hf.format(v=v, p=p), hf_shapes[name]), op, shapes[name])
          for name, (hf, op, _, _) in TOP.items()}


def hf_layer_to_canonical(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, str], j: int,
                          cfg: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Encoder layer j from HF tensors."""
  shapes = layer_shapes(cfg)
  hf_shapes = _hf_shapes(shapes, LAYER)
  p = f'{prefixes[0]}encoder.layers.{j}.'
  return {name: _from_hf(_take(tensors, p + hf, hf_shapes[name]), op, shapes[name])
          for name, (hf, op, _, _) in LAYER.items()}


def canonical_top_to_hf(top: Mapping[str, np.ndarray],
                        prefixes: tuple[str, str] = (HF_VISION_PREFIX, HF_PROJECTOR_PREFIX)
                        ) -> dict[str, np.ndarray]:
  """The inverse of hf_top_to_canonical (the hub names unless `prefixes` says otherwise)."""
  shapes = {name: np.shape(x) for name, x in top.items()}
  hf_shapes = _hf_shapes(shapes, TOP)
  v, p = prefixes
  return {hf.format(v=v, p=p): _to_hf(np.asarray(top[name]), op, hf_shapes[name])
          for name, (hf, op, _, _) in TOP.items()}


def canonical_layer_to_hf(layer: Mapping[str, np.ndarray], j: int,
                          prefix: str = HF_VISION_PREFIX) -> dict[str, np.ndarray]:
  """The inverse of hf_layer_to_canonical."""
  shapes = {name: np.shape(x) for name, x in layer.items()}
  hf_shapes = _hf_shapes(shapes, LAYER)
  p = f'{prefix}encoder.layers.{j}.'
  return {p + hf: _to_hf(np.asarray(layer[name]), op, hf_shapes[name])
          for name, (hf, op, _, _) in LAYER.items()}


def hf_vision_fields(d: Mapping[str, Any], where: str = 'config.json') -> dict[str, Any]:
  """The ModelConfig vision fields of a HF Gemma3Config dict (its vision_config and
  mm_tokens_per_image)."""
  v = d.get('vision_config') or {}
  if v.get('model_type', 'siglip_vision_model') != 'siglip_vision_model':
    raise ConversionError(f'{where}: vision_config.model_type={v["model_type"]!r}, expected '
                          'siglip_vision_model')
  S, P = int(v.get('image_size', 224)), int(v.get('patch_size', 16))
  tokens = int(d.get('mm_tokens_per_image', 256))
  side = int(round(tokens ** 0.5))
  if side * side != tokens or (S // P) % side:
    raise ConversionError(f'{where}: mm_tokens_per_image={tokens} is not a square that divides '
                          f'the {S // P} x {S // P} patch grid')
  return dict(vision=True, vision_image_size=S, vision_patch_size=P,
              vision_width=int(v.get('hidden_size', 768)),
              vision_depth=int(v.get('num_hidden_layers', 12)),
              vision_mlp_dim=int(v.get('intermediate_size', 3072)),
              vision_num_heads=int(v.get('num_attention_heads', 12)),
              vision_pool=(S // P) // side)


def hf_mm_config(cfg: config_lib.ModelConfig, text_config: Mapping[str, Any], dtype: str
                 ) -> dict[str, Any]:
  """config.json of a Gemma3ForConditionalGeneration: `text_config` (a Gemma3ForCausalLM
  config.json of this model) with its vocabulary grown by HF_EXTRA_ROWS, and the vision tower's
  config (SigLIP, no pooling head)."""
  text = {k: v for k, v in text_config.items() if k not in ('architectures', 'dtype',
                                                              'torch_dtype')}
  text['vocab_size'] = cfg.vocab_size + HF_EXTRA_ROWS
  return {
      'architectures': ['Gemma3ForConditionalGeneration'],
      'model_type': 'gemma3',
      'text_config': text,
      'vision_config': {
          'model_type': 'siglip_vision_model',
          'hidden_size': cfg.vision_width,
          'intermediate_size': cfg.vision_mlp_dim,
          'num_hidden_layers': cfg.vision_depth,
          'num_attention_heads': cfg.vision_num_heads,
          'num_channels': 3,
          'patch_size': cfg.vision_patch_size,
          'image_size': cfg.vision_image_size,
          'hidden_act': 'gelu_pytorch_tanh',
          'layer_norm_eps': 1e-6,
          'attention_dropout': 0.0,
          'vision_use_head': False,
      },
      'boi_token_index': BOI,
      'eoi_token_index': EOI,
      # The image soft token is the first id past the text vocabulary (262144 when released).
      'image_token_index': cfg.vocab_size,
      'mm_tokens_per_image': cfg.tokens_per_image,
      'initializer_range': 0.02,
      'tie_word_embeddings': True,
      'dtype': dtype,
      'torch_dtype': dtype,
  }


def hf_preprocessor_config(cfg: config_lib.ModelConfig) -> dict[str, Any]:
  """preprocessor_config.json: Gemma3ImageProcessor as our data pipeline preprocesses (RGB,
  bilinear resize to S x S, x / 255, then (x - 0.5) / 0.5; no pan and scan)."""
  return {'image_processor_type': 'Gemma3ImageProcessor', 'do_convert_rgb': True,
          'do_resize': True, 'size': {'height': cfg.vision_image_size,
                                      'width': cfg.vision_image_size},
          'resample': 2, 'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
          'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.5, 0.5, 0.5], 'do_pan_and_scan': False}


def hf_embedding(embedding: np.ndarray) -> np.ndarray:
  """The text embedding [V, D] grown to HF's multimodal [V + HF_EXTRA_ROWS, D].

  The extra rows (the image soft token, whose embedding is replaced by the image before use,
  and 63 unused ids) are set to the mean of the text rows (computed in float64): deterministic,
  and the centre of the N(mean, 1e-5 cov) that Google's HF converter samples them from.
  """
  # A float64 accumulator, not a float64 copy (a 27b embedding would take 11 GB).
  mean = np.mean(embedding, axis=0, dtype=np.float64).astype(embedding.dtype)
  return np.concatenate([embedding, np.broadcast_to(mean, (HF_EXTRA_ROWS, mean.shape[0]))])


# --- Kaggle / Flax -------------------------------------------------------------------------


def kaggle_root(names: Sequence[str]) -> str | None:
  """Which of KAGGLE_ROOTS holds the encoder, given normalized leaf names ('.../kernel');
  None when the checkpoint has no vision tower."""
  names = set(names)
  for root in KAGGLE_ROOTS:
    if f'{root}/embedding/kernel' in names:
      return root
  return None


def _kaggle_name(module: str, leaf: str) -> str:
  """The normalized name the Kaggle reader gives a leaf: no 'transformer/', no einsum 'w'."""
  name = module[len('transformer/'):] if module.startswith('transformer/') else module
  return name if leaf == 'w' else f'{name}/{leaf}'


def kaggle_top_names(root: str) -> dict[str, str]:
  """canonical vision_top name -> normalized Kaggle leaf name."""
  return {name: _kaggle_name(module.format(r=root), leaf)
          for name, (_, _, module, leaf) in TOP.items()}


def kaggle_layer_names(root: str, j: int, stacked: bool = False) -> dict[str, str]:
  """canonical layer name -> normalized Kaggle leaf name of encoder layer j (`stacked`: the
  scanned 'encoderblock' form, whose leaves have a leading depth axis)."""
  block = 'encoderblock' if stacked else f'encoderblock_{j}'
  return {name: _kaggle_name(f'{root}/Transformer/{block}/{module}', leaf)
          for name, (_, _, module, leaf) in LAYER.items()}


def canonical_to_kaggle(top: Mapping[str, np.ndarray], layers: Sequence[Mapping[str, np.ndarray]],
                        root: str = KAGGLE_ROOTS[0]) -> dict[str, dict[str, np.ndarray]]:
  """The vision arrays as the Kaggle FLAT layout stores them: {module path: {leaf: array}}
  (the position embedding with its leading batch axis [1, G*G, W])."""
  tree: dict[str, dict[str, np.ndarray]] = {}
  for name, (_, _, module, leaf) in TOP.items():
    x = np.asarray(top[name])
    tree.setdefault(module.format(r=root), {})[leaf] = x[None] if name == 'pos_embedding' else x
  for j, layer in enumerate(layers):
    for name, (_, _, module, leaf) in LAYER.items():
      tree.setdefault(f'{root}/Transformer/encoderblock_{j}/{module}', {})[leaf] = np.asarray(
          layer[name])
  return tree


def fields_from_shapes(shapes: Mapping[str, tuple[int, ...]], depth: int,
                       pool: int) -> dict[str, Any]:
  """ModelConfig vision fields from the shapes of the canonical vision_top and layer 0
  (pool cannot be read off the weights; Kaggle releases use 4)."""
  P, _, _, W = shapes['patch_kernel']
  G = int(round(shapes['pos_embedding'][0] ** 0.5))
  return dict(vision=True, vision_image_size=G * P, vision_patch_size=P, vision_width=W,
              vision_depth=depth, vision_mlp_dim=shapes['fc1_kernel'][1],
              vision_num_heads=shapes['query_kernel'][1], vision_pool=pool)


class LazyLayers(Sequence):
  """The encoder layers of a checkpoint, each read when indexed: a Source's vision() returns
  one so that a reader (export, init placement) holds a single layer at a time."""

  def __init__(self, n: int, get: Callable[[int], dict[str, np.ndarray]]):
    self._n, self._get = n, get

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, j):
    if isinstance(j, slice):
      return [self[k] for k in range(*j.indices(self._n))]
    if not -self._n <= j < self._n:
      raise IndexError(j)
    return self._get(j % self._n)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return (self._get(j) for j in range(self._n))
