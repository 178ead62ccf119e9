"""Stop strings in the sampler (Sampler.generate(stop_strings=...)): rows end at the token whose
text completes a stop string, the tokens are those of a run without them, and the loop ends
early once every row has stopped. A toy detokenizer (one letter per id) makes the strings
predictable on a random model; tests/test_harness.py checks the real tokenizer against the
harness's hf model."""

import numpy as np
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import sampler as sample
from gemma3_train.models import decoder as model_lib

N = 40  # new tokens: more than two chunks of sample.STOP_CHUNK


def _letters(ids):
  return ''.join(chr(ord('a') + i % 26) for i in ids)


@pytest.fixture(scope='module')
def sampler():
  cfg = config_lib.ModelConfig(
      preset='test', vocab_size=512, embed_dim=32, mlp_dim=48, num_layers=2, num_heads=2,
      num_kv_heads=1, head_dim=16, sliding_window=4, param_dtype='float32', dtype='float32',
      attention_impl='reference')
  return sample.Sampler(model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))


def _prompts():
  rng = np.random.default_rng(0)
  return [[tokenizer_lib.BOS] + rng.integers(200, 512, n).tolist() for n in (3, 9, 20)]


def _cut(row, strings):
  """row up to the first token whose prefix's text holds one of strings (all of it if none);
  an empty string is no stop string (as in lm-eval)."""
  for k in range(1, len(row) + 1):
    if any(s and s in _letters(row[:k]) for s in strings):
      return row[:k]
  return row


# Sampled: a random model's greedy run repeats one token, so its strings would end at once.
@pytest.mark.parametrize('sampling', [sample.Sampling(1.0, top_k=20), sample.Sampling(0.8)])
def test_rows_stop_at_their_first_stop_string(sampler, sampling):
  """Each row is the free run's tokens up to the one that completes a stop string (strings
  taken from the free run, some past the first chunk); the draws are the free run's (a step's
  key does not depend on the chunks); the loop ends at the check after every row stopped."""
  prompts = _prompts()
  free = sampler.generate(prompts, N, sampling, seed=3, stop_tokens=())
  texts = [_letters(r) for r in free]
  shared = [texts[0][15:18], texts[1][5:7]]
  got = sampler.generate(prompts, N, sampling, seed=3, stop_tokens=(), stop_strings=shared,
                         detokenize=_letters)
  assert got == [_cut(r, shared) for r in free]
  assert len(got[0]) <= 18 and len(got[1]) <= 7
  # One list per row ('' is none); every row stops by token 22.
  per_row = [[texts[0][17:20]], [texts[1][5:7], ''], [texts[2][20:22]]]
  seen = [[] for _ in prompts]
  got, logits = sampler.generate(prompts, N, sampling, seed=3, stop_tokens=(),
                                 stop_strings=per_row, detokenize=_letters, return_logits=True,
                                 on_token=lambda b, t: seen[b].append(t))
  assert got == [_cut(r, s) for r, s in zip(free, per_row)] == seen  # streamed the same
  assert max(map(len, got)) <= 22
  got, logits = sampler.generate(prompts, N, sampling, seed=3, stop_tokens=(),
                                 stop_strings=per_row, detokenize=_letters, return_logits=True)
  assert got == seen
  chunks = -(-(max(map(len, got)) - 1) // sample.STOP_CHUNK)
  assert len(logits) == min(N, 1 + chunks * sample.STOP_CHUNK) < N


def test_stop_token_before_stop_string(sampler):
  """A stop token ends its row even when a stop string would come later, and the other way
  round; rows that stop early keep the others running."""
  prompts, hot = _prompts(), sample.Sampling(1.0, top_k=20)
  free = sampler.generate(prompts, N, hot, seed=3, stop_tokens=())
  token = free[0][10]
  strings = [_letters(free[1][12:14])]
  got = sampler.generate(prompts, N, hot, seed=3, stop_tokens=(token,), stop_strings=strings,
                         detokenize=_letters)
  ends = set()
  for f, g in zip(free, got):
    by_token = f[:f.index(token) + 1] if token in f else f
    by_string = _cut(f, strings)
    assert g == min(by_token, by_string, key=len)
    ends.add('token' if g == by_token else 'string')
  assert ends == {'token', 'string'}


def test_bad_stop_strings(sampler):
  with pytest.raises(ValueError, match='stop_strings: 2 lists for 3 prompts'):
    sampler.generate(_prompts(), 4, stop_strings=[['a'], ['b']], detokenize=_letters)
