"""The Gemma 3 SentencePiece tokenizer (bundled copy, or any local / gs:// model file)."""

from __future__ import annotations

import importlib.resources

from etils import epath
import sentencepiece as spm

from gemma3_train import config as config_lib

# Special ids of the Gemma 3 SentencePiece model (tests/test_data.py checks them against it).
PAD, EOS, BOS = 0, 1, 2
START_OF_TURN, END_OF_TURN = 105, 106
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
