"""The Gemma 3 SentencePiece tokenizer (bundled copy, or any local / gs:// model file)."""

from __future__ import annotations

import importlib.resources

from etils import epath
import sentencepiece as spm

from gemma3_train import config as config_lib

# Special ids of the Gemma 3 SentencePiece model (tests/test_data.py checks them against it).
PAD, EOS, BOS = 0, 1, 2
START_OF_TURN, END_OF_TURN = 105, 106
START_OF_IMAGE, END_OF_IMAGE = 255999, 256000
IMAGE_MARKER = '<start_of_image>'  # where an image goes in a text or chat turn
BUNDLED = 'tokenizer_gemma3.model'


def _read_model(path: str) -> bytes:
  if not path:
    return (importlib.resources.files('gemma3_train') / 'assets' / BUNDLED).read_bytes()
  p = epath.Path(path)
  if not p.exists():
    raise config_lib.ConfigError(f'data.tokenizer_path={path!r}: file not found')
  return p.read_bytes()


class Tokenizer:
  """encode/decode without BOS/EOS; the pipeline adds those per document."""

  def __init__(self, path: str = ''):
    self.path = path
    self._proto = _read_model(path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except (RuntimeError, OSError) as e:
      raise config_lib.ConfigError(
          f'data.tokenizer_path={path!r}: not a SentencePiece model ({e})') from None

  # Workers of grain's mp_prefetch receive a pickled pipeline: ship the model bytes.
  def __getstate__(self):
    return {'path': self.path, 'proto': self._proto}

  def __setstate__(self, state):
    self.path, self._proto = state['path'], state['proto']
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._proto)

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model (what an export writes as tokenizer.model)."""
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])


def check_vocab(tokenizer: Tokenizer, c: config_lib.Config) -> None:
  """Start-up check: the tokenizer's pieces must match the embedding rows."""
  if tokenizer.vocab_size != c.model.vocab_size:
    raise config_lib.ConfigError(
        f'data.tokenizer_path={c.data.tokenizer_path or BUNDLED!r}: tokenizer has '
        f'{tokenizer.vocab_size} pieces but model.vocab_size={c.model.vocab_size}')


# --- images in text -----------------------------------------------------------

_PAS_BEFORE = 'Here is the original image '
_PAS_AFTER = ' and here are some crops to help you see better '
_IMAGE = object()  # an image's token run in a list of text pieces


def _image_text(num_crops: int) -> list:
  """What one IMAGE_MARKER becomes (Hugging Face's Gemma3Processor): "\n\n" + image + "\n\n",
  with pan-and-scan crops the original image, then each crop, in a sentence."""
  one = ['\n\n', _IMAGE, '\n\n']
  if not num_crops:
    return one
  parts = [_PAS_BEFORE, *one, _PAS_AFTER]
  for k in range(num_crops):
    parts += ([' '] if k else []) + one
  return parts


def encode_with_images(tok: Tokenizer, text: str, crops: list[int], tokens_per_image: int,
                       placeholder: int) -> list[int]:
  """Text whose k-th IMAGE_MARKER stands for an image with crops[k] pan-and-scan crops -> ids.

  Each image is <start_of_image>, tokens_per_image placeholders, <end_of_image>, with a blank
  line either side. The blank lines are text: like Hugging Face (which inserts the string and
  tokenizes, special tokens splitting it), they are encoded together with the text next to them.
  """
  segments = text.split(IMAGE_MARKER)
  if len(segments) - 1 != len(crops):
    raise ValueError(f'{len(segments) - 1} {IMAGE_MARKER} markers for {len(crops)} images')
  parts: list = [segments[0]]
  for n, segment in zip(crops, segments[1:]):
    parts += _image_text(n) + [segment]
  ids, run = [], []
  image = [START_OF_IMAGE] + [placeholder] * tokens_per_image + [END_OF_IMAGE]
  for part in parts + [_IMAGE]:  # a final image flushes the last text
    if part is _IMAGE:
      ids += tok.encode(''.join(run)) if run else []
      ids += image
      run = []
    else:
      run.append(part)
  return ids[:-len(image)]

