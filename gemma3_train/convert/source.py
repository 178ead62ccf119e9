"""What every checkpoint reader shares: the error type, the Source interface, layers() with
its progress line."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.infra import progress as progress_lib


class ConversionError(ValueError):
  """A one-line error naming the tensor or file at fault."""


def check(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """x as numpy, or a ConversionError naming `name` when its shape is not `shape`."""
  x = np.asarray(x)
  if tuple(x.shape) != tuple(shape):
    raise ConversionError(f'{name}: shape {tuple(x.shape)}, expected {tuple(shape)}')
  return x


def absolute(path) -> epath.Path:
  """path made absolute (orbax wants absolute paths), leaving gs:// and other URLs alone:
  epath's local fallback would turn 'gs://b/x' into '$PWD/gs:/b/x'."""
  path = epath.Path(path)
  return path if '://' in str(path) else path.absolute()


def preset_name(fields: Mapping[str, Any]) -> str:
  """The PRESETS entry whose shapes match (the vocabulary aside), else 'custom'."""
  for name, p in config_lib.PRESETS.items():
    if all(p[k] == fields[k] for k in config_lib.MODEL_SHAPE_FIELDS if k != 'vocab_size'):
      return name
  return 'custom'


class Source:
  """A checkpoint opened for reading: cfg, top(), layer(i); nothing is read until asked.

  top() and layer(i) return the canonical layout (layout.py) as numpy arrays.
  """
  cfg: config_lib.ModelConfig

  def top(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def layer(self, i: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def order(self) -> Sequence[int]:
    """The order to read layers in to hold the least: a source that stores layers stacked
    groups those sharing a leaf (layout.stacked_order)."""
    return range(self.cfg.num_layers)

  def vision(self) -> tuple[dict[str, np.ndarray], Sequence[dict[str, np.ndarray]]] | None:
    """(vision_top, vision_layers) in the canonical layout (layout.py), or None when the
    checkpoint has no vision tower or self.cfg.vision is False. vision_layers may read each
    layer only when indexed (vision_keys.LazyLayers): a reader holds one encoder layer at a
    time."""
    return None

  def has_vision(self) -> bool:
    """Whether the checkpoint holds vision weights, whatever self.cfg.vision says (a text-only
    run may open a multimodal checkpoint). Reads names, not arrays."""
    return False


def layers(src: Source, progress: str | None = None) -> Iterator[tuple[int, dict]]:
  """(i, canonical layer) of every layer in src.order(), with a progress line when `progress`
  names what is being done."""
  bar = progress_lib.Progress(progress, src.cfg.num_layers, 'layers') if progress else None
  for done, i in enumerate(src.order(), 1):
    yield i, src.layer(i)
    if bar:
      bar.update(done)
  if bar:
    bar.close()
