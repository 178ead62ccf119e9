"""The canonical checkpoint layout, and where each of its arrays lives in our NNX state.

Every conversion goes through one *canonical* form: the per-layer layout of Google's released
Flax checkpoints, as numpy arrays (N query heads, K kv heads, D embed, H head dim, F MLP, V vocab):

  top    = {'embedding': [V, D], 'final_norm': [D]}
  layers = [{'pre_attention_norm': [D], 'post_attention_norm': [D], 'pre_ffw_norm': [D],
             'post_ffw_norm': [D], 'q_einsum': [N, D, H], 'k_einsum': [K, D, H],
             'v_einsum': [K, D, H], 'attn_vec_einsum': [N, H, D], 'query_norm': [H],
             'key_norm': [H], 'gating_einsum': [2, F, D] ([0] = gate, gelu'd; [1] = up),
             'linear': [F, D]}, ...]   one dict per decoder layer

Norm scales are stored without the +1 (RMSNorm multiplies by 1 + scale) in every format we read
or write, and are copied as they are.

Our NNX state (model.Gemma3) holds layer i either at ('layers', i) (scan_layers=False) or, with
scan_layers, in the scanned blocks of six: ('blocks', 'layers', i % 6) with a leading stacked
axis indexed by i // 6, for the first num_layers // 6 * 6 layers, and at ('tail', j) for the rest.
The released formats and their names for each array: docs/gemma3.md section 5.

With model.vision the checkpoint also holds the SigLIP encoder and its projector, canonically
(the Kaggle/Flax arrays; W width, Nv heads of Hv, M MLP, P patch, G*G patches):

  vision_top    = {'patch_kernel': [P, P, 3, W], 'patch_bias': [W], 'pos_embedding': [G*G, W],
                   'encoder_norm_scale': [W], 'encoder_norm_bias': [W],
                   'mm_soft_embedding_norm': [W], 'mm_input_projection': [W, D]}
  vision_layers = [{'ln0_scale', 'ln0_bias', 'ln1_scale', 'ln1_bias': [W],
                    'query_kernel' / 'key_kernel' / 'value_kernel': [W, Nv, Hv],
                    'query_bias' / 'key_bias' / 'value_bias': [Nv, Hv],
                    'out_kernel': [Nv, Hv, W], 'out_bias': [W], 'fc1_kernel': [W, M],
                    'fc1_bias': [M], 'fc2_kernel': [M, W], 'fc2_bias': [W]}, ...]

held in our state (vision.py) under ('vision', 'encoder' | 'projector', ...), encoder layer j at
('vision', 'encoder', 'layers', j) or, with scan_layers, stacked along a leading depth axis at
('vision', 'encoder', 'blocks'). Vision arrays are float32 whatever model.param_dtype is.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.models import decoder as model_lib

NORMS = ('pre_attention_norm', 'post_attention_norm', 'pre_ffw_norm', 'post_ffw_norm')
ATTN = ('q_einsum', 'k_einsum', 'v_einsum', 'attn_vec_einsum')
LAYER_KEYS = NORMS + ATTN + ('query_norm', 'key_norm', 'gating_einsum', 'linear')
# Canonical top-level name -> its NNX state path.
TOP_PATHS = {'embedding': ('embedder', 'embedding'), 'final_norm': ('final_norm', 'scale')}
# NNX paths inside one DecoderLayer, in the order layer_to_leaves returns them.
LAYER_LEAVES = tuple((n, 'scale') for n in NORMS) + tuple(('attn', n) for n in ATTN) + (
    ('attn', 'query_norm', 'scale'), ('attn', 'key_norm', 'scale'), ('mlp', 'gate'),
    ('mlp', 'up'), ('mlp', 'linear'))


# Canonical vision_top name -> its NNX state path.
VISION_TOP_PATHS = {
    'patch_kernel': ('vision', 'encoder', 'patch_kernel'),
    'patch_bias': ('vision', 'encoder', 'patch_bias'),
    'pos_embedding': ('vision', 'encoder', 'pos_embedding'),
    'encoder_norm_scale': ('vision', 'encoder', 'final_norm', 'scale'),
    'encoder_norm_bias': ('vision', 'encoder', 'final_norm', 'bias'),
    'mm_soft_embedding_norm': ('vision', 'projector', 'soft_norm', 'scale'),
    'mm_input_projection': ('vision', 'projector', 'projection'),
}
# Canonical vision layer name -> its path inside one vision.EncoderLayer (ln0 is our ln1).
VISION_LAYER_PATHS = {
    'ln0_scale': ('ln1', 'scale'), 'ln0_bias': ('ln1', 'bias'),
    'ln1_scale': ('ln2', 'scale'), 'ln1_bias': ('ln2', 'bias'),
    **{f'{n}_{k}': ('attn', n if k == 'kernel' else f'{n}_bias')
       for n in ('query', 'key', 'value', 'out') for k in ('kernel', 'bias')},
    **{f'{n}_{k}': ('mlp', n if k == 'kernel' else f'{n}_bias')
       for n in ('fc1', 'fc2') for k in ('kernel', 'bias')},
}


def vision_layer_prefix(cfg: config_lib.ModelConfig, j: int) -> tuple[tuple, int | None]:
  """(state path prefix, index along the stacked depth axis or None) of encoder layer j."""
  if cfg.scan_layers:
    return ('vision', 'encoder', 'blocks'), j
  return ('vision', 'encoder', 'layers', j), None


def vision_canonical_to_state(cfg: config_lib.ModelConfig, vision_top: Mapping[str, np.ndarray],
                              vision_layers) -> dict[tuple, np.ndarray]:
  """Canonical vision (top, layers) -> {state path: float32 numpy array} (layers stacked along
  the depth axis under scan_layers)."""
  if len(vision_layers) != cfg.vision_depth:
    raise ValueError(f'vision_layers: {len(vision_layers)} encoder layers, expected '
                     f'model.vision_depth={cfg.vision_depth}')
  f32 = lambda x: np.asarray(x, np.float32)
  out = {path: f32(vision_top[name]) for name, path in VISION_TOP_PATHS.items()}
  stacked: dict[tuple, list] = {}
  for j, layer in enumerate(vision_layers):
    prefix, index = vision_layer_prefix(cfg, j)
    for name, sub in VISION_LAYER_PATHS.items():
      if index is None:
        out[prefix + sub] = f32(layer[name])
      else:
        stacked.setdefault(prefix + sub, []).append(f32(layer[name]))
  out.update({path: np.stack(xs) for path, xs in stacked.items()})
  return out


def vision_state_to_canonical(cfg: config_lib.ModelConfig, state
                              ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """Param state (or {path: array}) of a vision model -> canonical numpy (vision_top,
  vision_layers)."""
  flat = state if isinstance(state, Mapping) and not isinstance(state, nnx.State) else {
      path: var for path, var in nnx.to_flat_state(state)}
  get = lambda path: np.asarray(jax.device_get(
      flat[path][...] if isinstance(flat[path], nnx.Variable) else flat[path]))
  top = {name: get(path) for name, path in VISION_TOP_PATHS.items()}

  def layer(j: int) -> dict[str, np.ndarray]:
    prefix, index = vision_layer_prefix(cfg, j)
    return {name: get(prefix + sub) if index is None else get(prefix + sub)[index]
            for name, sub in VISION_LAYER_PATHS.items()}
  return top, [layer(j) for j in range(cfg.vision_depth)]


def layer_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """The canonical shape of each array of one decoder layer."""
  N, K, D, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim, cfg.mlp_dim
  shapes = {n: (D,) for n in NORMS}
  shapes.update(q_einsum=(N, D, H), k_einsum=(K, D, H), v_einsum=(K, D, H),
                attn_vec_einsum=(N, H, D), query_norm=(H,), key_norm=(H,),
                gating_einsum=(2, F, D), linear=(F, D))
  return shapes


def layer_to_leaves(layer: Mapping[str, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Canonical layer dict -> {path inside a DecoderLayer: array} (gating split in gate, up)."""
  out = {(n, 'scale'): layer[n] for n in NORMS}
  out.update({('attn', n): layer[n] for n in ATTN})
  out[('attn', 'query_norm', 'scale')] = layer['query_norm']
  out[('attn', 'key_norm', 'scale')] = layer['key_norm']
  out[('mlp', 'gate')] = layer['gating_einsum'][0]
  out[('mlp', 'up')] = layer['gating_einsum'][1]
  out[('mlp', 'linear')] = layer['linear']
  return out


def leaves_to_layer(get: Callable[[tuple], np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of layer_to_leaves; get(path) returns the array at a DecoderLayer path."""
  layer = {n: get((n, 'scale')) for n in NORMS}
  layer.update({n: get(('attn', n)) for n in ATTN})
  layer['query_norm'] = get(('attn', 'query_norm', 'scale'))
  layer['key_norm'] = get(('attn', 'key_norm', 'scale'))
  layer['gating_einsum'] = np.stack([get(('mlp', 'gate')), get(('mlp', 'up'))])
  layer['linear'] = get(('mlp', 'linear'))
  return layer


def num_blocks(cfg: config_lib.ModelConfig) -> int:
  """How many scanned blocks of six the state has (0 without scan_layers)."""
  return cfg.num_layers // config_lib.GLOBAL_EVERY if cfg.scan_layers else 0


def layer_prefix(cfg: config_lib.ModelConfig, i: int) -> tuple[tuple, int | None]:
  """(state path prefix, index along the stacked block axis or None) of decoder layer i."""
  six = config_lib.GLOBAL_EVERY
  if i < num_blocks(cfg) * six:
    return ('blocks', 'layers', i % six), i // six
  if cfg.scan_layers:
    return ('tail', i - num_blocks(cfg) * six), None
  return ('layers', i), None


def stacked_order(num_layers: int, period: int, num_stacked: int) -> list[int]:
  """Layers 0..num_layers-1 with the first num_stacked grouped by i % period.

  Layers that share a stacked leaf (i % period equal) come together, so that a reader holds one
  group's stacked leaves at a time and can drop them once the group is done.
  """
  stacked = [i for j in range(period) for i in range(j, num_stacked, period)]
  return stacked + list(range(num_stacked, num_layers))


def layer_state_leaves(cfg: config_lib.ModelConfig, i: int, layer: Mapping[str, np.ndarray]
                       ) -> list[tuple[tuple, int | None, np.ndarray]]:
  """(state path, stacked block index or None, array) of each array of canonical layer i."""
  prefix, block = layer_prefix(cfg, i)
  return [(prefix + sub, block, x) for sub, x in layer_to_leaves(layer).items()]


def canonical_to_state(cfg: config_lib.ModelConfig, top: Mapping[str, np.ndarray],
                       layers: list[Mapping[str, np.ndarray]], vision=None) -> nnx.State:
  """Canonical numpy (top, layers) -> Param state for nnx.update; values numpy, param dtype.

  With model.vision, `vision` = (vision_top, vision_layers) gives the encoder (kept float32).
  """
  if len(layers) != cfg.num_layers:
    raise ValueError(f'layers: {len(layers)} decoder layers, expected model.num_layers='
                     f'{cfg.num_layers}')
  if cfg.vision and vision is None:
    raise ValueError('model.vision is set but no vision weights were given')
  values = {path: top[name] for name, path in TOP_PATHS.items()}
  vision_values = vision_canonical_to_state(cfg, *vision) if cfg.vision else {}
  stacked: dict[tuple, list] = {}
  for i, layer in enumerate(layers):
    for path, block, x in layer_state_leaves(cfg, i, layer):
      if block is None:
        values[path] = x
      else:
        stacked.setdefault(path, []).append(x)
  values.update({path: np.stack(xs) for path, xs in stacked.items()})
  dtype = jnp.dtype(cfg.param_dtype)
  flat = []
  for path, var in nnx.to_flat_state(model_lib.abstract_state(cfg)):
    x = vision_values.pop(path) if path in vision_values else np.asarray(
        values.pop(path)).astype(dtype)
    if x.shape != var.shape:
      raise ValueError(f'{"/".join(map(str, path))}: shape {x.shape}, expected {var.shape}')
    flat.append((path, var.replace(x)))
  values.update(vision_values)
  if values:
    raise ValueError(f'{"/".join(map(str, next(iter(values))))}: no such model parameter')
  return nnx.from_flat_state(flat)


def state_to_canonical(cfg: config_lib.ModelConfig, state: nnx.State
                       ) -> tuple[dict, list[dict]]:
  """Param state (of our module structure) -> canonical numpy (top, layers)."""
  flat = {path: np.asarray(jax.device_get(var[...] if isinstance(var, nnx.Variable) else var))
          for path, var in nnx.to_flat_state(state)}
  top = {name: flat[path] for name, path in TOP_PATHS.items()}

  def layer(i: int) -> dict[str, np.ndarray]:
    prefix, block = layer_prefix(cfg, i)
    return leaves_to_layer(
        lambda p: flat[prefix + p] if block is None else flat[prefix + p][block])
  return top, [layer(i) for i in range(cfg.num_layers)]
