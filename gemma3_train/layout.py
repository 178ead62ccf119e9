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
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import model as model_lib

NORMS = ('pre_attention_norm', 'post_attention_norm', 'pre_ffw_norm', 'post_ffw_norm')
ATTN = ('q_einsum', 'k_einsum', 'v_einsum', 'attn_vec_einsum')
LAYER_KEYS = NORMS + ATTN + ('query_norm', 'key_norm', 'gating_einsum', 'linear')
# Canonical top-level name -> its NNX state path.
TOP_PATHS = {'embedding': ('embedder', 'embedding'), 'final_norm': ('final_norm', 'scale')}
# NNX paths inside one DecoderLayer, in the order layer_to_leaves returns them.
LAYER_LEAVES = tuple((n, 'scale') for n in NORMS) + tuple(('attn', n) for n in ATTN) + (
    ('attn', 'query_norm', 'scale'), ('attn', 'key_norm', 'scale'), ('mlp', 'gate'),
    ('mlp', 'up'), ('mlp', 'linear'))


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
                       layers: list[Mapping[str, np.ndarray]]) -> nnx.State:
  """Canonical numpy (top, layers) -> Param state for nnx.update; values numpy, param dtype."""
  if len(layers) != cfg.num_layers:
    raise ValueError(f'layers: {len(layers)} decoder layers, expected model.num_layers='
                     f'{cfg.num_layers}')
  values = {path: top[name] for name, path in TOP_PATHS.items()}
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
    x = np.asarray(values.pop(path)).astype(dtype)
    if x.shape != var.shape:
      raise ValueError(f'{"/".join(map(str, path))}: shape {x.shape}, expected {var.shape}')
    flat.append((path, var.replace(x)))
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
