"""This project's checkpoints as conversion sources: params-only (written here) and training.

Params-only (gemma3-convert import): PATH/gemma3_config.json ({'format', 'version', 'model': the
ModelConfig fields}) and PATH/params, an Orbax tree in the canonical layout (layout.py):
{'embedding', 'final_norm', 'layer_0': {...}, ...}, and with model.vision also 'vision_top':
{...} and 'vision_layer_0': {...}, ... (the canonical vision_top and vision_layers).

Training (checkpoint.py): WORKDIR/checkpoints/<step>/ with the items 'state' (an Orbax tree:
'params' is the NNX Param state, each Variable's array under a trailing 'value' key, next to
the optimizer state), 'config' (the whole Config as JSON, file 'metadata') and 'data'.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1
from etils import epath
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.convert import orbax_tree
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source
from gemma3_train.convert.source import absolute
from gemma3_train.convert.source import check
from gemma3_train.convert import vision_keys
from gemma3_train.models import decoder as model_lib
from gemma3_train.models import vision

_ENCODER = vision.ENCODER_PATH  # a frozen encoder's params (training/frozen.py)
PARAMS_CONFIG = 'gemma3_config.json'  # marks one of our params-only checkpoints
_PARAMS_TREE = 'params'
# The folder inside PARAMS_TREE that orbax v1's partial save writes the PyTree to.
_PARAMS_ITEM = 'state'


def save_params(path, cfg: config_lib.ModelConfig, top: Mapping[str, np.ndarray],
                layers: Iterable[tuple[int, Mapping[str, np.ndarray]]],
                vision: tuple[Mapping[str, np.ndarray], Sequence[Mapping]] | None = None
                ) -> None:
  """Writes our params-only checkpoint from `top` and (i, layer) pairs, in any order, and
  with cfg.vision the (vision_top, vision_layers) of a Source's vision().

  `layers` may be a generator: each layer is written (an Orbax partial save) before the next
  is read, so host memory holds the embedding and one layer, never the whole model; so for the
  vision layers when vision_layers reads each when indexed.
  """
  if cfg.vision != (vision is not None):
    raise ConversionError(f'model.vision={cfg.vision} but vision weights were '
                          f'{"not " if vision is None else ""}given')
  path = absolute(path)
  if path.exists() and any(path.iterdir()):
    raise ConversionError(f'{path}: destination exists and is not empty')
  path.mkdir(parents=True, exist_ok=True)
  tree = path / _PARAMS_TREE
  ocp_v1.partial.save(tree, {'embedding': np.asarray(top['embedding']),
                             'final_norm': np.asarray(top['final_norm'])})
  n = 0
  for i, layer in layers:
    ocp_v1.partial.save(tree, {f'layer_{i}': {k: np.asarray(v) for k, v in layer.items()}})
    n += 1
  if n != cfg.num_layers:
    raise ConversionError(f'{path}: got {n} layers, expected model.num_layers={cfg.num_layers}')
  if vision is not None:
    vision_top, vision_layers = vision
    ocp_v1.partial.save(tree, {'vision_top': {k: np.asarray(v) for k, v in vision_top.items()}})
    for j, layer in enumerate(vision_layers):
      ocp_v1.partial.save(tree, {f'vision_layer_{j}': {k: np.asarray(v)
                                                       for k, v in layer.items()}})
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
  """One of our params-only checkpoints (save_params). Holds in memory one layer."""

  def __init__(self, path):
    self.path = absolute(path)
    self.cfg = _model_config_from_json(self.path / PARAMS_CONFIG)
    self._tree = self.path / _PARAMS_TREE / _PARAMS_ITEM
    self._meta = orbax_tree.leaves(self._tree)

  def _read(self, prefix: str) -> dict[str, np.ndarray]:
    keys = [k for k in self._meta if k[0] == prefix]
    if not keys:
      raise ConversionError(f'{self._tree}: {prefix} missing from the checkpoint')
    return {k[-1]: v for k, v in orbax_tree.read(self._tree, keys, self._meta).items()}

  def top(self):
    m = self.cfg
    return {'embedding': check(self._read('embedding')['embedding'], 'embedding',
                               (m.vocab_size, m.embed_dim)),
            'final_norm': check(self._read('final_norm')['final_norm'], 'final_norm',
                                (m.embed_dim,))}

  def layer(self, i):
    return self._read(f'layer_{i}')

  def has_vision(self):
    return any(k[0] == 'vision_top' for k in self._meta)

  def vision(self):
    m = self.cfg
    if not m.vision or not self.has_vision():
      return None
    top = self._read('vision_top')
    for name, shape in vision_keys.top_shapes(m).items():
      if name not in top:
        raise ConversionError(f'{self._tree}: vision_top/{name} missing from the checkpoint')
      check(top[name], f'vision_top/{name}', shape)
    return top, vision_keys.LazyLayers(m.vision_depth, lambda j: self._read(f'vision_layer_{j}'))


def complete_steps(directory) -> list[int]:
  """The steps under WORKDIR/checkpoints whose write completed, oldest first."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  # Orbax lists only finalized steps; it also parses a set-aside 'unreadable_5' as step 5.
  return sorted(int(p.name) for p in ocp.step.checkpoint_steps_paths(directory)
                if p.name.isdigit())


def train_step_dir(path) -> epath.Path:
  """WORKDIR -> its newest complete WORKDIR/checkpoints/<step>; a step directory as it is."""
  path = absolute(path)
  if not (path / 'checkpoints').is_dir():
    return path
  steps = complete_steps(path / 'checkpoints')
  if not steps:
    raise ConversionError(f'{path / "checkpoints"}: no complete checkpoint (expected '
                          'checkpoints/<step>/ written by training)')
  return path / 'checkpoints' / str(steps[-1])


class TrainSource(Source):
  """One of our training checkpoints: a workdir (its newest step) or WORKDIR/checkpoints/<step>.

  Reads only params of the 'state' item, one leaf at a time (Orbax partial restores to host
  numpy; the optimizer moments, twice their size, stay on disk), and the model config saved
  beside them. Holds in memory one layer's leaves; with scan_layers a leaf is stacked over the
  blocks of six ([num_layers // 6, ...]) and is kept until its last layer has been taken, and
  order() takes those layers in turn: at most num_layers // 6 layers' worth at once.
  """

  def __init__(self, path, frozen: Callable[[], Source] | None = None):
    """frozen: opens what the run started from (run_source.init_source), read for the weights
    the checkpoint does not hold: a frozen image encoder (training/frozen.py)."""
    self.path = train_step_dir(path)
    if not ocp.step.is_path_finalized(self.path):
      raise ConversionError(f'{self.path}: checkpoint write did not complete')
    config_file = self.path / 'config' / 'metadata'  # JsonCheckpointHandler's file name
    if not config_file.exists():
      raise ConversionError(f'{config_file}: missing (a training checkpoint saves its config)')
    self.cfg = _model_config_from_json(config_file)
    self._state_dir = self.path / 'state'
    self._meta = orbax_tree.leaves(self._state_dir)
    stored = {(k[1:-1] if k[-1] == 'value' else k[1:]): k for k in self._meta if k[0] == 'params'}
    if not stored:
      raise ConversionError(f'{self._state_dir}: no params in the train state')
    self._keys = {}  # nnx path -> stored key path
    self._frozen_encoder = None  # the run's source when the checkpoint holds no encoder
    for path_, var in nnx.to_flat_state(model_lib.abstract_state(self.cfg)):
      name = tuple(str(k) for k in path_)
      if name not in stored and name[:2] == _ENCODER and frozen is not None and (
          self.cfg.vision and not self.cfg.vision_trainable):
        continue  # a frozen encoder: from the run's source (vision below)
      if name not in stored:
        raise ConversionError(f'{self._state_dir}: params/{"/".join(name)} missing from the '
                              'checkpoint')
      shape = tuple(self._meta[stored[name]].shape)
      if shape != tuple(var.shape):
        raise ConversionError(f'{self._state_dir}: params/{"/".join(name)} has shape '
                              f'{shape}, expected {tuple(var.shape)}')
      self._keys[path_] = stored[name]
    self._cache: dict[tuple, np.ndarray] = {}
    if self.cfg.vision and not any(p[:2] == _ENCODER for p in self._keys):
      self._frozen_encoder = frozen()

  def _read(self, paths: list[tuple]) -> None:
    """Reads the leaves at these nnx paths into the cache (those not there yet)."""
    paths = [p for p in paths if p not in self._cache]
    values = orbax_tree.read(self._state_dir, [self._keys[p] for p in paths], self._meta)
    self._cache.update({p: values[self._keys[p]] for p in paths})

  def top(self):
    paths = list(layout.TOP_PATHS.values())
    self._read(paths)
    top = {name: self._cache[p] for name, p in layout.TOP_PATHS.items()}
    for p in paths:
      del self._cache[p]
    return top

  def order(self):
    six = config_lib.GLOBAL_EVERY
    return layout.stacked_order(self.cfg.num_layers, six, layout.num_blocks(self.cfg) * six)

  def layer(self, i):
    prefix, block = layout.layer_prefix(self.cfg, i)
    paths = [prefix + sub for sub in layout.LAYER_LEAVES]
    self._read(paths)
    leaf = lambda sub: self._cache[prefix + sub]
    layer = layout.leaves_to_layer(lambda sub: leaf(sub) if block is None else leaf(sub)[block])
    if block is None or block == layout.num_blocks(self.cfg) - 1:
      for p in paths:  # a stacked leaf is dropped once its last layer has been taken
        del self._cache[p]
    return layer

  def has_vision(self):
    return any(p[0] == 'vision' for p in self._keys)

  def vision(self):
    if not self.cfg.vision:
      return None
    if self._frozen_encoder is not None:  # the trained projector, the encoder as it started
      encoder_top, encoder_layers = self._frozen_encoder.vision()
      own = {n: p for n, p in layout.VISION_TOP_PATHS.items() if p[:2] != _ENCODER}
      self._read(list(own.values()))
      top = {n: encoder_top[n] for n, p in layout.VISION_TOP_PATHS.items() if p[:2] == _ENCODER}
      top.update({name: self._cache.pop(p) for name, p in own.items()})
      return top, encoder_layers
    paths = list(layout.VISION_TOP_PATHS.values())
    self._read(paths)
    top = {name: self._cache.pop(p) for name, p in layout.VISION_TOP_PATHS.items()}
    return top, vision_keys.LazyLayers(self.cfg.vision_depth, self._vision_layer)

  def _vision_layer(self, j: int) -> dict[str, np.ndarray]:
    """Encoder layer j; a scanned leaf [depth, ...] stays cached until its last layer is taken."""
    prefix, index = layout.vision_layer_prefix(self.cfg, j)
    paths = {name: prefix + sub for name, sub in layout.VISION_LAYER_PATHS.items()}
    self._read(list(paths.values()))
    layer = {name: self._cache[p] if index is None else self._cache[p][index]
             for name, p in paths.items()}
    if index is None or index == self.cfg.vision_depth - 1:
      for p in paths.values():
        del self._cache[p]
    return layer

