"""What a training run started from: its saved Config, and the source of the weights it did not
train (a LoRA run's base, a frozen image encoder), which checkpoints never hold.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
from etils import epath
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source
from gemma3_train.models import decoder as model_lib
from gemma3_train.models import layers


def run_config(path) -> config_lib.Config | None:
  """The Config saved in a training workdir or step directory; None for anything else."""
  path = epath.Path(path)
  if not ((path / 'checkpoints').is_dir() or (path / 'state').is_dir()):
    return None
  try:
    step_dir = ours.train_step_dir(path)
  except ConversionError:
    return None
  config_file = step_dir / 'config' / 'metadata'
  if not config_file.exists():
    return None
  try:
    return config_lib.from_dict(json.loads(config_file.read_text()))
  except config_lib.ConfigError as e:
    raise ConversionError(f'{config_file}: {e}') from None


class _MemorySource(Source):
  """A canonical (top, layers) held in memory."""

  def __init__(self, cfg, top, layers, vision=None):
    self.cfg, self._top, self._layers, self._vision = cfg, top, layers, vision

  def top(self):
    return self._top

  def layer(self, i):
    return self._layers[i]

  def vision(self):
    return self._vision

  def has_vision(self):
    return self._vision is not None


# (path, ModelConfig) -> Source: convert.open_source, passed in (it opens LoRA runs with us).
OpenSource = Callable[[Any, config_lib.ModelConfig], Source]


def init_source(c: config_lib.Config, open_source: OpenSource) -> Source:
  """What a run started from, where its frozen parts come from (a LoRA base, a frozen image
  encoder): checkpoint.init_from, else the seed's random init."""
  if c.checkpoint.init_from:
    src = open_source(c.checkpoint.init_from, c.model)
    for k in config_lib.MODEL_SHAPE_FIELDS:
      if getattr(src.cfg, k) != getattr(c.model, k):
        raise ConversionError(f'model.{k}={getattr(c.model, k)}: the base '
                              f'{c.checkpoint.init_from} has {getattr(src.cfg, k)}')
    return src
  # Compiled as the trainer compiles its init, so that the values are the trainer's bitwise.
  init = layers.init_program(
      lambda: nnx.state(model_lib.Gemma3(c.model, rngs=nnx.Rngs(c.train.seed)), nnx.Param),
      cpu=jax.default_backend() == 'cpu')
  state = init()
  top, decoder_layers = layout.state_to_canonical(c.model, state)
  vision = layout.vision_state_to_canonical(c.model, state) if c.model.vision else None
  return _MemorySource(c.model, top, decoder_layers, vision)
