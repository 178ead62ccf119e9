"""What every checkpoint reader shares: the error type, the Source interface, the progress line."""

from __future__ import annotations

import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from gemma3_train import config as config_lib


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


class _Progress:
  """A one-line progress counter on stderr (rewritten in place on a terminal)."""

  def __init__(self, what: str, total: int):
    self.what, self.total, self.done, self._last = what, total, 0, 0.0
    self._tty = sys.stderr.isatty()

  def step(self) -> None:
    self.done += 1
    now = time.monotonic()
    if self.done >= self.total or now - self._last > (0.2 if self._tty else 10.0):
      self._last = now
      end = '\n' if self.done >= self.total or not self._tty else ''
      print(f'\r{self.what}: {self.done}/{self.total} layers', end=end, file=sys.stderr,
            flush=True)


def layers(src: Source, progress: str | None = None) -> Iterator[tuple[int, dict]]:
  """(i, canonical layer) of every layer in src.order(), with a progress line when `progress`
  names what is being done."""
  bar = _Progress(progress, src.cfg.num_layers) if progress else None
  for i in src.order():
    yield i, src.layer(i)
    if bar:
      bar.step()
