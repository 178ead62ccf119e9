"""Images for the vision model: decode, resize, pan-and-scan crops, and the model's input scale.

Preprocessing is Hugging Face's Gemma 3 image processor (the PIL one) with the released
checkpoints' settings: convert to RGB, resize to S x S with PIL's BILINEAR filter (which
antialiases when it shrinks), then x * (1/255) and (x - 0.5) / 0.5, so pixels land in [-1, 1].
The pipeline keeps images as uint8 S x S x 3 (4x smaller in batches and between grain worker
processes); `to_model_input` is the last step, run by the train step on device.

Pan-and-scan (data.pan_and_scan, Hugging Face's do_pan_and_scan with its defaults): an image
whose long side is at least 1.2x its short side is also cut into 2 to 4 equal crops along the
long side, as many as the aspect ratio rounds to but each at least 256 pixels wide; no crops when
a crop would be narrower than 256. Crops are taken from the original image, then each is resized
like a whole image. The text then reads "Here is the original image <image> and here are some
crops to help you see better <image> <image>" (tokenizer.encode_with_images).
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

from etils import epath
import numpy as np
from PIL import Image

from gemma3_train import config as config_lib

# Hugging Face's pan-and-scan defaults (Gemma3Processor).
PAS_MIN_CROP, PAS_MAX_CROPS, PAS_MIN_RATIO = 256, 4, 1.2


class ImageError(ValueError):
  """An image that cannot be read or decoded; the message names it."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What the data pipeline needs to know about images (from model.* and data.*)."""
  size: int  # S
  tokens_per_image: int  # soft tokens per image
  placeholder: int  # their id in the token stream (model.vocab_size)
  max_images: int  # image slots per row
  pan_and_scan: bool
  field: str  # text rows' list of images

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.size, self.size, 3)

  def empty(self, n: int = 0) -> np.ndarray:
    return np.zeros((n, *self.shape), np.uint8)


def spec(c: config_lib.Config) -> ImageSpec | None:
  """The image settings of a run, or None for a text-only model."""
  if not c.model.vision:
    return None
  return ImageSpec(size=c.model.vision_image_size, tokens_per_image=c.model.tokens_per_image,
                   placeholder=c.model.vocab_size, max_images=c.data.max_images,
                   pan_and_scan=c.data.pan_and_scan, field=c.data.images_field)


def open_image(ref: Any, base: epath.Path | None = None) -> Image.Image:
  """A path (local or gs://, relative to `base`), encoded bytes, a {'bytes'|'path'} dict (as
  Hugging Face datasets store images), a uint8 H x W x 3 array or a PIL image -> RGB image."""
  if isinstance(ref, Image.Image):
    return ref.convert('RGB')
  if isinstance(ref, np.ndarray):
    return Image.fromarray(np.asarray(ref, np.uint8)).convert('RGB')
  if isinstance(ref, dict):
    ref = ref.get('bytes') or ref.get('path')
  name = '<image bytes>'
  try:
    if isinstance(ref, str):
      name = ref
      p = epath.Path(ref)
      if base is not None and '://' not in ref and not p.is_absolute():
        p = base / ref
      name = str(p)
      ref = p.read_bytes()
    if not isinstance(ref, (bytes, bytearray)):
      raise ImageError(f'expected an image path or bytes, got {type(ref).__name__}')
    with Image.open(io.BytesIO(ref)) as im:
      return im.convert('RGB')
  except ImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # missing, unreadable, not an image
    raise ImageError(f'{name}: {type(e).__name__}: {str(e)[:120]}') from None


def resize(im: Image.Image, size: int) -> np.ndarray:
  """RGB image -> uint8 [S, S, 3], PIL BILINEAR (antialiased when shrinking)."""
  if im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(im, np.uint8)


def pan_and_scan(im: Image.Image, min_crop: int = PAS_MIN_CROP, max_crops: int = PAS_MAX_CROPS,
                 min_ratio: float = PAS_MIN_RATIO) -> list[Image.Image]:
  """The crops of a non-square image (module docstring), left to right or top to bottom."""
  w, h = im.size
  long, short = max(w, h), min(w, h)
  if long / short < min_ratio:
    return []
  n = min(int(math.floor(long / short + 0.5)), long // min_crop)
  n = min(max(2, n), max_crops)
  crop_long = int(math.ceil(long / n))
  if min(crop_long, short) < min_crop:
    return []
  if w >= h:
    return [im.crop((k * crop_long, 0, min(w, (k + 1) * crop_long), h)) for k in range(n)]
  return [im.crop((0, k * crop_long, w, min(h, (k + 1) * crop_long))) for k in range(n)]


def load(ref: Any, size: int, *, crops: bool = False, base: epath.Path | None = None
         ) -> np.ndarray:
  """One image -> uint8 [1 + crops, S, S, 3]: the whole image, then its pan-and-scan crops."""
  im = open_image(ref, base)
  parts = [im] + (pan_and_scan(im) if crops else [])
  return np.stack([resize(p, size) for p in parts])


# uint8 -> float32, element by element as Hugging Face computes it: it rescales as
# float32(float64(x) * (1/255)) (for every uint8 x the correctly rounded float32 x / 255; float32
# x * float32(1/255) differs for half of them), then (x - 0.5) / 0.5 in float32. A table lookup
# keeps those bits on device too, where XLA would turn the divisions into multiplications.
_TABLE = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


def from_batch(batch: dict):
  """The model's images input (float32 in [-1, 1]) from a batch's uint8 'images'; None for a
  text batch."""
  return to_model_input(batch['images']) if 'images' in batch else None


def to_model_input(images_u8):
  """uint8 pixels -> float32 in [-1, 1], bit-exact to Hugging Face's rescale and normalize
  (numpy in, numpy out; a jax array in, a jax array out, e.g. inside the jitted train step)."""
  if isinstance(images_u8, np.ndarray):
    return _TABLE[images_u8]
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.asarray(_TABLE)[images_u8.astype(jnp.int32)]
