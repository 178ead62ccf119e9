"""data.source='shapes': generated captioned images, a task only an image reader can learn.

Row i of a split is a pure function of (data.seed, split, i): one filled shape (circle, square
or triangle) in one of 6 colours, centred in one cell of a 3 x 3 grid (with a small random
offset and size), on a plain light background of random tint, drawn with PIL at S x S. Its text
is "<start_of_image> A red circle at the top left." The caption's words after the image are
uniformly random given the text before them (3 shapes x 6 colours x 9 places: log(162) = 5.1
nats over the caption for a text-only model), and fully determined by the image. The train and
eval splits draw from disjoint seeds. No files: rows are drawn where the pipeline reads them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageDraw

from gemma3_train.data import tokenizer as tokenizer_lib

COLOURS = {'red': (220, 30, 30), 'green': (30, 160, 40), 'blue': (30, 60, 220),
           'yellow': (235, 200, 20), 'purple': (140, 40, 170), 'orange': (245, 130, 20)}
SHAPES = ('circle', 'square', 'triangle')
ROWS, COLS = ('top', 'middle', 'bottom'), ('left', 'center', 'right')
ROWS_PER_SPLIT = {'train': 1 << 20, 'eval': 1 << 10}


def place(row: int, col: int) -> str:
  """'at the top left', 'in the center', 'at the middle right', ..."""
  if (row, col) == (1, 1):
    return 'in the center'
  return f'at the {ROWS[row]} {COLS[col]}'


def draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
  """One image (uint8 [S, S, 3]) and its caption."""
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  row, col = (int(v) for v in rng.integers(3, size=2))
  cell = size / 3
  r = cell * rng.uniform(0.3, 0.45)  # half the shape's extent: it stays inside its cell
  cx = cell * (col + 0.5) + rng.uniform(-0.05, 0.05) * cell
  cy = cell * (row + 0.5) + rng.uniform(-0.05, 0.05) * cell
  background = tuple(int(v) for v in rng.integers(200, 256, size=3))
  im = Image.new('RGB', (size, size), background)
  pen = ImageDraw.Draw(im)
  box = (cx - r, cy - r, cx + r, cy + r)
  if shape == 'circle':
    pen.ellipse(box, fill=COLOURS[colour])
  elif shape == 'square':
    pen.rectangle(box, fill=COLOURS[colour])
  else:
    pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[colour])
  article = 'An' if colour[0] in 'aeiou' else 'A'
  caption = f'{article} {colour} {shape} {place(row, col)}.'
  return np.asarray(im, np.uint8), caption


class ShapesSource:
  """Rows {text_field: '<start_of_image> A ... .', images_field: [uint8 S x S x 3]}."""

  record = 'dict'

  def __init__(self, split: str, size: int, seed: int, text_field: str = 'text',
               images_field: str = 'images'):
    self.split, self.size, self.seed = split, size, seed
    self.text_field, self.images_field = text_field, images_field

  def __len__(self) -> int:
    return ROWS_PER_SPLIT['train' if self.split == 'train' else 'eval']

  def __getitem__(self, i: int) -> dict:
    split = 0 if self.split == 'train' else 1
    rng = np.random.default_rng([self.seed, split, i])
    pixels, caption = draw(rng, self.size)
    return {self.text_field: f'{tokenizer_lib.IMAGE_MARKER} {caption}',
            self.images_field: [pixels]}

  def where(self, i: int) -> str:
    return f'shapes[{self.split}] row {i + 1}'
