"""Preference pairs through the data pipeline (data/preference.py): TRL's standard and
conversational rows, completion-only targets, whole pairs per row, truncation and skipped rows
counted, and an iterator that resumes exactly."""

import json

import numpy as np
import pytest

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import data
from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib
from tests import helpers

TOK = tokenizer_lib.Tokenizer()


def _config(path, **dpo):
  c = config_lib.from_config_dict(tiny.get_config())
  return c.replace(data=dict(train_path=str(path), seq_len=64, shuffle=False),
                   train=dict(objective='dpo', global_batch_size=2),
                   dpo=dpo)


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def _sequences(batch):
  """Each row's segments as (segment id, input tokens, targets, weights), in row order."""
  out = []
  for b in range(len(batch['inputs'])):
    seg = batch['segment_ids'][b]
    for s in range(1, seg.max() + 1):
      m = seg == s
      out.append((s, batch['inputs'][b][m], batch['targets'][b][m], batch['weights'][b][m]))
  return out


def test_standard_and_conversational_rows_target_only_the_completion(tmp_path):
  rows = [{'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'},
          {'prompt': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'},
                      {'role': 'user', 'content': 'Sky colour?'}],
           'chosen': [{'role': 'assistant', 'content': 'Blue'}],
           'rejected': [{'role': 'assistant', 'content': 'Green'}]}]
  c = _config(_write(tmp_path / 'pairs.jsonl', rows)).replace(data=dict(seq_len=128))
  batch = next(iter(data.make_dataset(c, num_epochs=1)))
  seqs = _sequences(batch)
  assert [s for s, *_ in seqs] == [1, 2, 3, 4]  # one row: chosen odd, rejected even
  # standard: [BOS] prompt completion [EOS]; the completion and EOS are the targets
  for (_, x, y, w), completion in zip(seqs[:2], (' blue.', ' green.')):
    prompt, comp = TOK.encode('The sky is'), TOK.encode(completion)
    np.testing.assert_array_equal(np.r_[x, y[-1]], [tokenizer_lib.BOS, *prompt, *comp,
                                                    tokenizer_lib.EOS])
    np.testing.assert_array_equal(y[w > 0], [*comp, tokenizer_lib.EOS])
  # conversational: the Gemma 3 template; the reply and its <end_of_turn> only (the prompt's
  # own model turn 'Hello' is context)
  for (_, x, y, w), reply in zip(seqs[2:], ('Blue', 'Green')):
    full, _ = data.format_chat(rows[1]['prompt'] + [{'role': 'assistant', 'content': reply}], TOK)
    np.testing.assert_array_equal(np.r_[x, y[-1]], full)
    np.testing.assert_array_equal(y[w > 0], [*TOK.encode(reply), tokenizer_lib.END_OF_TURN])


def test_bad_rows_are_skipped_and_counted_long_ones_truncated_as_trl(tmp_path):
  good = {'prompt': 'one two three four five six', 'chosen': ' yes', 'rejected': ' no'}
  rows = [good, {'prompt': 'p', 'chosen': ' a'},  # no rejected
          {'prompt': 'p', 'chosen': ' same', 'rejected': ' same'},
          {'prompt': 'p', 'chosen': '', 'rejected': ' b'},
          {'prompt': 'q', 'chosen': ' ' + 'word ' * 40, 'rejected': ' short'}]
  c = _config(_write(tmp_path / 'pairs.jsonl', rows), max_prompt_len=3, max_len=16)
  before = dict(sources.COUNTS)
  batches = list(data.make_dataset(c, num_epochs=1))
  seqs = [s for b in batches for s in _sequences(b)]
  counts = {k: v - before.get(k, 0) for k, v in sources.COUNTS.items()}
  assert counts["skipped: no field 'rejected'"] == 1
  assert counts['skipped: chosen equals rejected'] == 1
  assert counts["skipped: empty 'chosen'"] == 1
  assert counts['split: pair truncated to dpo.max_prompt_len / dpo.max_len'] == 2
  assert len(seqs) == 4  # two pairs
  _, x, y, w = seqs[0]
  # the prompt keeps its last 3 tokens after BOS (TRL's keep_end for prompts)
  np.testing.assert_array_equal(x[:4], [tokenizer_lib.BOS, *TOK.encode(good['prompt'])[-3:]])
  _, x, y, w = seqs[2]  # the long completion: the sequence keeps its first 16 tokens
  assert len(x) == 15 and w.sum() == 15 - 1 - len(TOK.encode('q')) + 1


def test_pair_iterator_resumes_exactly(tmp_path):
  rng = np.random.default_rng(0)
  words = 'apple river stone cloud music garden silver window'.split()
  rows = [{'prompt': ' '.join(rng.choice(words, rng.integers(1, 6))),
           'chosen': ' ' + ' '.join(rng.choice(words, rng.integers(1, 5))),
           'rejected': ' ' + ' '.join(rng.choice(words, rng.integers(1, 5)))} for _ in range(40)]
  rows = [r for r in rows if r['chosen'] != r['rejected']]
  c = _config(_write(tmp_path / 'pairs.jsonl', rows)).replace(data=dict(shuffle=True))
  helpers.assert_resumes(c, skip=3, n=4)


def test_precompute_and_packing_errors_name_the_field(tmp_path):
  c = _config(tmp_path / 'x.jsonl')
  with pytest.raises(config_lib.ConfigError, match=r'^data.packing=False: expected True'):
    config_lib.validate(c.replace(data=dict(packing=False)))
  with pytest.raises(config_lib.ConfigError, match=r'^dpo.max_len=40: expected in \[0, '):
    config_lib.validate(c.replace(dpo=dict(max_len=40)))
  with pytest.raises(config_lib.ConfigError, match=r"^dpo.loss='kto': expected sigmoid \| ipo"):
    config_lib.validate(c.replace(dpo=dict(loss='kto')))


def test_image_pairs_carry_the_prompts_images_for_both_sequences(tmp_path):
  """model.vision: a pair's piece holds the prompt's images once per sequence, in the order
  their blocks appear in the row, and the blocks are context, never targets."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import tiny_vision  # pylint: disable=g-import-not-at-top
  for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
    Image.fromarray(np.full((48, 48, 3), colour, np.uint8)).save(tmp_path / f'{k}.png')
  rows = [{'prompt': 'The colour is', 'images': ['0.png'], 'chosen': ' red', 'rejected': ' blue'},
          {'prompt': [{'role': 'user', 'content': [{'type': 'image', 'path': '1.png'},
                                                   {'type': 'text', 'text': 'Colour?'}]}],
           'chosen': [{'role': 'assistant', 'content': 'blue'}],
           'rejected': [{'role': 'assistant', 'content': 'red'}]}]
  c = config_lib.from_config_dict(tiny_vision.get_config())
  c = c.replace(data=dict(source='jsonl', train_path=str(_write(tmp_path / 'p.jsonl', rows)),
                          seq_len=64, shuffle=False, max_images=4),
                train=dict(objective='dpo', global_batch_size=1))
  batches = list(data.make_dataset(c, num_epochs=1))
  placeholder = c.model.vocab_size
  seen = 0
  for b in batches:
    n = int(b['image_counts'][0])
    assert n == 2  # one pair per row here: its image, once per sequence
    red = b['images'][0][:n, 0, 0, 0] == 255
    assert red[0] == red[1]  # both sequences see the same image
    seen += n
    soft = b['inputs'][0] == placeholder
    per_segment = [soft[b['segment_ids'][0] == s].sum() for s in (1, 2)]
    assert per_segment == [c.model.tokens_per_image] * 2
    assert not b['weights'][0][soft].any()
  assert seen == 4
