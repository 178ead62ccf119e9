"""Prompts with images, for the sampler and multiple choice: token layout and pixels.

An image in a prompt is <start_of_image>, tokens_per_image placeholders (id model.vocab_size)
and <end_of_image>, the layout training rows and Hugging Face's Gemma3Processor give (its
<image_soft_token> is id 262144 = vocab_size of the released models). Text prompts get it from
tokenizer.encode_with_images, with the blank line either side that the processor inserts; token
prompts may give a bare <start_of_image>, which expand() grows into the block (no blank lines:
ids cannot be re-tokenized). Image k of a prompt fills its k-th block.

Pixels are preprocessed as training's (data.images: RGB, bilinear resize to S x S, then
to_model_input's [-1, 1]), no pan-and-scan; a float array of shape [S, S, 3] is taken as already
preprocessed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gemma3_train import config as config_lib
from gemma3_train.data import images as images_lib
from gemma3_train.data import tokenizer as tokenizer_lib

BOI, EOI = tokenizer_lib.START_OF_IMAGE, tokenizer_lib.END_OF_IMAGE


class PromptError(ValueError):
  """A prompt the model cannot take (empty, too long, or its images do not fit it)."""


def expand(prompt: Sequence[int], cfg: config_lib.ModelConfig) -> tuple[list[int], int]:
  """(ids with each bare <start_of_image> grown into an image block, the number of blocks).

  A <start_of_image> already followed by its placeholders is kept as it is; placeholders
  anywhere else, or runs of the wrong length, are a PromptError (the model would merge them
  into the wrong image)."""
  ph, T = cfg.vocab_size, cfg.tokens_per_image
  block = [ph] * T + [EOI]
  out, n, i, ids = [], 0, 0, [int(t) for t in prompt]
  while i < len(ids):
    t = ids[i]
    i += 1
    if t == ph:
      raise PromptError(f'image placeholder {ph} at token {i - 1} not inside <start_of_image>, '
                        f'{T} placeholders, <end_of_image>')
    out.append(t)
    if t != BOI:
      continue
    n += 1
    if i < len(ids) and ids[i] == ph:  # already expanded: it must be exactly one block
      if ids[i:i + T + 1] != block:
        raise PromptError(f'image {n} at token {i - 1}: expected {T} placeholders then '
                          f'<end_of_image>')
      i += T + 1
    out += block
  return out, n


def encode(text: str, tok: tokenizer_lib.Tokenizer, cfg: config_lib.ModelConfig,
           num_images: int) -> list[int]:
  """BOS + text with num_images images where it says <start_of_image> (all at the start when
  it says none), laid out as Gemma3Processor does."""
  markers = text.count(tokenizer_lib.IMAGE_MARKER)
  if num_images and not markers:
    text = tokenizer_lib.IMAGE_MARKER * num_images + text
  elif markers != num_images:
    raise PromptError(f'{markers} {tokenizer_lib.IMAGE_MARKER} in the prompt for {num_images} '
                      'images')
  return [tokenizer_lib.BOS] + tokenizer_lib.encode_with_images(
      tok, text, [0] * num_images, cfg.tokens_per_image, cfg.vocab_size)


def chat_encoder(tok: tokenizer_lib.Tokenizer, cfg: config_lib.ModelConfig):
  """A turn's text -> ids with its <start_of_image> markers grown into image blocks (the
  `encode` of data.format_chat)."""
  def encode_turn(text: str) -> list[int]:
    n = text.count(tokenizer_lib.IMAGE_MARKER)
    return tokenizer_lib.encode_with_images(tok, text, [0] * n, cfg.tokens_per_image,
                                            cfg.vocab_size)
  return encode_turn


def pixels(ref: Any, cfg: config_lib.ModelConfig) -> np.ndarray:
  """One image (a path, bytes, PIL image, uint8 H x W x 3 array, or a float [S, S, 3] already
  in [-1, 1]) -> the model's float32 [S, S, 3]."""
  S = cfg.vision_image_size
  if isinstance(ref, np.ndarray) and ref.dtype.kind == 'f':
    if ref.shape != (S, S, 3):
      raise PromptError(f'a float image is taken as preprocessed and must be [{S}, {S}, 3], got '
                        f'{list(ref.shape)}')
    return ref.astype(np.float32)
  try:
    return images_lib.to_model_input(images_lib.load(ref, S)[0])
  except images_lib.ImageError as e:
    raise PromptError(str(e)) from None  # it names the image


def prepare(prompts: Sequence[Sequence[int]], images: Sequence[Sequence[Any]] | None,
            cfg: config_lib.ModelConfig) -> tuple[list[list[int]], np.ndarray | None]:
  """(prompts with their image blocks expanded, float32 images [B, N, S, S, 3] or None).

  images: one list per prompt (None: no images), as many as the prompt has image blocks;
  N is the most images of any prompt (rows with fewer get zeros, which no block reads)."""
  if not cfg.vision:
    if images is not None and any(len(x) for x in images):
      raise PromptError('images were given but the model has no vision tower (model.vision)')
    return [list(p) for p in prompts], None
  images = [[] for _ in prompts] if images is None else list(images)
  if len(images) != len(prompts):
    raise PromptError(f'{len(images)} image lists for {len(prompts)} prompts')
  out = []
  for b, (p, refs) in enumerate(zip(prompts, images)):
    try:
      ids, n = expand(p, cfg)
    except PromptError as e:
      raise PromptError(f'prompt {b}: {e}') from None
    if n != len(refs):
      raise PromptError(f'prompt {b} has {n} <start_of_image> but {len(refs)} images')
    out.append(ids)
  N = max(len(refs) for refs in images)
  if not N:
    return out, None
  S = cfg.vision_image_size
  batch = np.zeros((len(prompts), N, S, S, 3), np.float32)
  for b, refs in enumerate(images):
    for k, ref in enumerate(refs):
      batch[b, k] = pixels(ref, cfg)
  return out, batch
