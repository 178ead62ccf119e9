"""checkpoint.init_from: a model's params from any checkpoint convert reads, streamed into the
abstract state's shardings.

The source (one of our training workdirs or its steps, our params-only checkpoint, a Hugging Face
directory, a Kaggle/Flax checkpoint) is read one decoder layer at a time in the canonical layout
(convert), mapped to this model's state paths (layout) and placed straight onto the devices, so
no host ever holds the whole model; a different mesh or model.scan_layers reshards on the way.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train.convert import layout

log = logging.getLogger(__name__)


def _place(abstract: Any, value: np.ndarray, name: str) -> jax.Array:
  """Puts one host array into its sharding (each device takes only its slice)."""
  if tuple(value.shape) != tuple(abstract.shape):
    raise config_lib.ConfigError(f'checkpoint.init_from: {name} has shape {value.shape}, '
                                 f'the model expects {abstract.shape}')
  value = np.asarray(value).astype(abstract.dtype)
  return jax.make_array_from_callback(abstract.shape, abstract.sharding, lambda idx: value[idx])


def _per_layer(abstract: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The abstract of one layer's slice of a scanned [blocks, ...] leaf, sharded the same way."""
  spec = tuple(abstract.sharding.spec)
  spec += (None,) * (len(abstract.shape) - len(spec))
  sharding = jax.sharding.NamedSharding(abstract.sharding.mesh,
                                        jax.sharding.PartitionSpec(*spec[1:]))
  return jax.ShapeDtypeStruct(abstract.shape[1:], abstract.dtype, sharding=sharding)


def _place_streamed(src: convert.Source, cfg: config_lib.ModelConfig,
                    abstract_params: Any) -> Any:
  """Reads src one decoder layer at a time and puts each leaf on its devices at once.

  Host memory holds the embedding, then what src holds to give a layer (one layer for HF and
  params-only checkpoints; a 27b layer is 1.7 GB in float32, the model 108 GB). A scanned
  leaf's per-layer pieces wait on the devices, already sharded, and are stacked there into the
  leaf's sharding as soon as its last layer has arrived.
  """
  abstract = {key: var.get_value() for key, var in nnx.to_flat_state(abstract_params)}
  placed: dict[tuple, jax.Array] = {}
  pieces: dict[tuple, dict[int, jax.Array]] = {}
  num_blocks = layout.num_blocks(cfg)

  def put(key: tuple, block: int | None, value: np.ndarray, count: int = num_blocks) -> None:
    name = '/'.join(map(str, key))
    if key not in abstract:
      raise config_lib.ConfigError(f'checkpoint.init_from: {name} is not a parameter of this '
                                   'model (model.scan_layers or a shape field differs?)')
    if block is None:
      placed[key] = _place(abstract[key], value, name)
      return
    pieces.setdefault(key, {})[block] = _place(_per_layer(abstract[key]), value,
                                               f'{name}[{block}]')
    if len(pieces[key]) == count:  # each leaf's pieces are freed once stacked
      stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=abstract[key].sharding)
      by_block = pieces.pop(key)
      placed[key] = stack(*(by_block[b] for b in range(count)))

  top = src.top()
  for name, key in layout.TOP_PATHS.items():
    put(key, None, top[name])
  del top
  for i, layer in convert.layers(src):
    for key, block, value in layout.layer_state_leaves(cfg, i, layer):
      put(key, block, value)
  if cfg.vision:  # open_init_source checked that src has vision weights; one layer at a time
    vision_top, vision_layers = src.vision()
    for name, key in layout.VISION_TOP_PATHS.items():
      put(key, None, vision_top[name])
    for j, layer in enumerate(vision_layers):
      prefix, index = layout.vision_layer_prefix(cfg, j)
      for name, sub in layout.VISION_LAYER_PATHS.items():
        put(prefix + sub, index, layer[name], cfg.vision_depth)
  missing = [k for k in abstract if k not in placed]
  if missing:
    raise config_lib.ConfigError(
        f'checkpoint.init_from: no value for {"/".join(map(str, missing[0]))}')
  flat = [(key, var.replace(placed[key])) for key, var in nnx.to_flat_state(abstract_params)]
  return nnx.from_flat_state(flat)


def open_init_source(path: str, c: config_lib.Config) -> convert.Source:
  """The init_from checkpoint opened for reading, after checking that it exists, is a kind
  convert reads and has this model's shapes (its config only; no weights are read). Raises
  ConfigError (one line). training/loop.py calls it before the workdir is touched."""
  try:
    src = convert.open_source(path, c.model)
  except convert.ConversionError as e:
    raise config_lib.ConfigError(f'checkpoint.init_from={path!r}: {e}') from e
  for k in config_lib.MODEL_SHAPE_FIELDS:
    if getattr(src.cfg, k) != getattr(c.model, k):
      raise config_lib.ConfigError(
          f'model.{k}={getattr(c.model, k)}: checkpoint.init_from={path} has '
          f'{getattr(src.cfg, k)}')
  _check_vision(src, path, c.model)
  return src


# The vision fields that fix the shape of a vision weight (vision_pool fixes none).
_VISION_SHAPE_FIELDS = ('vision_image_size', 'vision_patch_size', 'vision_width',
                        'vision_depth', 'vision_mlp_dim', 'vision_num_heads')


_SAID_SKIPPED: set[str] = set()  # the init_from paths whose skipped vision weights were logged


def _check_vision(src: convert.Source, path: str, m: config_lib.ModelConfig) -> None:
  """A text-only run from a multimodal checkpoint skips its vision weights (logged); a vision
  run needs them, of its shapes: random ones would leave a frozen tower that sees nothing."""
  if not m.vision:
    if src.has_vision() and path not in _SAID_SKIPPED:  # said once (preflight, then the load)
      _SAID_SKIPPED.add(path)
      log.info('checkpoint.init_from=%s has vision weights; model.vision is False, so they '
               'are skipped (text decoder only)', path)
    return
  if not src.has_vision():
    raise config_lib.ConfigError(
        f'model.vision=True: checkpoint.init_from={path} has no vision weights (a text-only '
        'checkpoint); start from a 4b, 12b or 27b one, or set model.vision=False')
  for k in _VISION_SHAPE_FIELDS:
    if getattr(src.cfg, k) != getattr(m, k):
      raise config_lib.ConfigError(f'model.{k}={getattr(m, k)}: checkpoint.init_from={path} '
                                   f'has {getattr(src.cfg, k)}')


def load_init_params(path: str, c: config_lib.Config, abstract_state: Any) -> Any:
  """Params only (order (2)), placed in abstract_state['params'] shardings, from any checkpoint
  convert reads: one of our training workdirs (its newest complete step) or steps, our
  params-only checkpoint (gemma3-convert import), a HF directory or a Kaggle checkpoint.

  Read one decoder layer at a time (_place_streamed), so no host holds the whole model; the
  optimizer moments of a training checkpoint are never read."""
  src = open_init_source(path, c)
  try:
    params = _place_streamed(src, c.model, abstract_state['params'])
  except convert.ConversionError as e:
    raise config_lib.ConfigError(f'checkpoint.init_from={path!r}: {e}') from e
  if isinstance(src, convert.TrainSource):
    log.info('Took params from step %s of %s', src.path.name, path)
  else:
    log.info('Took params from %s', path)
  return params
