"""data.mixture: exact weights per window, deterministic resume, exhaustion, bad specs."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from gemma3_train.cli import data as data_cli
from gemma3_train import config as config_lib
from gemma3_train import data
from gemma3_train.data import mixture
from gemma3_train.data import prepared
from gemma3_train.data import tokenizer as tokenizer_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = {'a': 'apple', 'b': 'banana'}


def _write(path, word, n):
  path.write_text(''.join(json.dumps({'text': f'{word} ' * (1 + k % 5)}) + '\n'
                          for k in range(n)))
  return str(path)


def _config(tmp_path, spec_weights, seq_len=16, batch=4, **fields):
  """Sources a, b: jsonl of one repeated word each (a tiny file: many epochs); c: synthetic."""
  parts = []
  for name, w in spec_weights.items():
    if name == 'c':
      parts.append(f'c:{w} source=synthetic')
    else:
      path = _write(tmp_path / f'{name}.jsonl', WORDS[name], 7)
      parts.append(f'{name}:{w} source=jsonl train_path={path}')
  c = config_lib.from_config_dict(tiny.get_config())
  c = c.replace(data=dict(mixture='; '.join(parts), seq_len=seq_len, **fields),
                train=dict(global_batch_size=batch))
  c = c.replace(model=dict(vocab_size=262144))  # synthetic rows draw from the real vocabulary
  config_lib.validate(c)
  return c


def _row_source(tok, inputs_L, segment_ids_L) -> str:
  """Which source a row came from, read off its tokens alone (the independent check)."""
  ids = set(inputs_L[segment_ids_L > 0].tolist()) - {tokenizer_lib.BOS, tokenizer_lib.EOS}
  for name, word in WORDS.items():
    if ids <= set(tok.encode(f'{word} ' * 5)) | set(tok.encode(word)):
      return name
  return 'c'


def test_quotas_are_exact_and_sum_to_the_window():
  np.testing.assert_array_equal(mixture.quotas([0.7, 0.3], 800), [560, 240])
  np.testing.assert_array_equal(mixture.quotas([1, 1, 1], 400), [134, 133, 133])
  assert mixture.quotas([0.25, 0.0, 2.0], 37).sum() == 37


def test_proportions_over_1000_batches(tmp_path):
  weights = {'a': 0.5, 'b': 0.3, 'c': 0.2}
  # One padded row per batch keeps 1,000 batches cheap; the schedule sees rows either way.
  c = _config(tmp_path, weights, batch=1, packing=False, prefetch=0)
  tok = data.Tokenizer()
  it = data.make_train_iterator(c)
  counts = {k: 0 for k in weights}
  per_window = []
  for step in range(1000):
    b = next(it)
    assert set(b) == set(data.BATCH_DTYPES)  # the source index does not leave the pipeline
    for r in range(b['inputs'].shape[0]):
      counts[_row_source(tok, b['inputs'][r], b['segment_ids'][r])] += 1
    if (step + 1) % mixture.WINDOW_BATCHES == 0:
      per_window.append(dict(counts))
    if step == 998:
      at_999 = {f'tokens/{k}': float(n * 16) for k, n in counts.items()}
  rows = sum(counts.values())
  for k, w in weights.items():
    assert abs(counts[k] / rows - w) < 0.01, (k, counts)
  # Exact in every window of WINDOW_BATCHES batches (100 rows: 50/30/20).
  assert per_window[0] == {'a': 50, 'b': 30, 'c': 20}
  assert per_window[-1] == {'a': 500, 'b': 300, 'c': 200}
  # The logged per-source counts agree with the rows read off the batches.
  assert data.tokens_drawn(it) == {f'tokens/{k}': float(n * 16) for k, n in counts.items()}
  assert data.tokens_drawn(it, 999) == at_999  # the count as of an earlier step
  it.close()


def _same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_resumed_mixture_equals_uninterrupted(tmp_path):
  c = _config(tmp_path, {'a': 2, 'b': 1, 'c': 1})
  full = data.make_train_iterator(c)
  want = [next(full) for _ in range(25)]
  tokens_want = data.tokens_drawn(full)
  full.close()

  first = data.make_train_iterator(c)
  got = [next(first) for _ in range(11)]
  state = json.loads(json.dumps(first.get_state()))  # as the orbax handler stores it
  first.close()
  resumed = data.make_train_iterator(c)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(14)]
  _same(got, want)
  assert data.tokens_drawn(resumed) == tokens_want
  resumed.close()


def test_the_schedule_depends_on_seed_and_position_only():
  q = (3, 2)
  a = [mixture.source_of(0, q, p) for p in range(20)]
  assert a == [mixture.source_of(0, q, p) for p in range(20)]
  assert a != [mixture.source_of(1, q, p) for p in range(20)]
  for k in range(4):
    assert sorted(a[5 * k:5 * k + 5]) == [0, 0, 0, 1, 1]


def test_exhausted_source_stop_ends_the_data_repeat_goes_on(tmp_path):
  c = _config(tmp_path, {'a': 1, 'c': 1}, mixture_exhausted='stop', packing=False, prefetch=0)
  it = data.make_train_iterator(c)
  n = 0
  with pytest.raises(StopIteration):
    for n in range(30):  # 'a' holds 7 documents, one row each
      next(it)
  assert 1 <= n <= 4  # 4 rows a batch, half of them from 'a'
  it.close()
  it = data.make_train_iterator(c.replace(data=dict(mixture_exhausted='repeat')))
  for _ in range(30):
    next(it)
  drawn = data.tokens_drawn(it)
  assert drawn['tokens/a'] + drawn['tokens/c'] == 120 * 16
  assert drawn['tokens/a'] > 4 * 7 * 16  # 'a' (7 rows an epoch) went round several times
  it.close()


def test_mixture_mixes_prepared_with_raw(tmp_path):
  """Any source kind mixes, each with its own paths and format."""
  src = _write(tmp_path / 'p.jsonl', 'banana', 9)
  data_cli.main(['prepare', f'--src={src}', f'--dst={tmp_path / "prep"}', '--workers=1'])
  c = _config(tmp_path, {'a': 1})
  c = c.replace(data=dict(mixture=c.data.mixture +
                          f'; b:1 source=prepared train_path={tmp_path / "prep"}'))
  config_lib.validate(c)
  it = data.make_train_iterator(c)
  tok = data.Tokenizer()
  seen = set()
  for _ in range(5):
    b = next(it)
    seen |= {_row_source(tok, b['inputs'][r], b['segment_ids'][r]) for r in range(4)}
  assert seen == {'a', 'b'}
  it.close()


def test_a_mixture_of_prepared_sources_reads_ahead_and_resumes(tmp_path, monkeypatch):
  """All sources prepared: data.prefetch is their read-ahead of records (no batch thread); the
  batches are those of prefetch=0, and a resumed iterator goes on as the first one did."""
  monkeypatch.setattr(prepared, 'READ_CHUNK', 4)  # many chunks read ahead
  spec = []
  for name, word in WORDS.items():
    src = _write(tmp_path / f'{name}.jsonl', word, 9)
    data_cli.main(['prepare', f'--src={src}', f'--dst={tmp_path / name}', '--workers=1'])
    spec.append(f'{name}:1 source=prepared train_path={tmp_path / name}')
  c = _config(tmp_path, {'a': 1}).replace(data=dict(mixture='; '.join(spec)))
  config_lib.validate(c)
  def draw(config):
    it = data.make_train_iterator(config)
    out = [next(it) for _ in range(12)]
    it.close()
    return out

  for x, y in zip(draw(c), draw(c.replace(data=dict(prefetch=0))), strict=True):
    for k in y:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  helpers.assert_resumes(c, 4, 6)


@pytest.mark.parametrize('spec,expected', [
    ('a:-1 source=synthetic', 'weight -1 is negative'),
    ('a:0 source=synthetic; b:0 source=synthetic', 'all weights are 0'),
    ('a:1 source=jsonl', "data.mixture source 'a': data.train_path=''"),
    ('a:1 source=jsonl train_path=x; a:1 source=synthetic', "'a' is used twice"),
    ('a:1 sauce=jsonl', "'sauce=jsonl' is not key=value with a key in source"),
])
def test_bad_spec_is_a_config_error(spec, expected):
  c = config_lib.Config().replace(data=dict(mixture=spec))
  with pytest.raises(config_lib.ConfigError, match='data.mixture') as e:
    config_lib.validate(c)
  assert expected in str(e.value) and '\n' not in str(e.value)


def test_source_without_files_names_the_source(tmp_path):
  c = _config(tmp_path, {'a': 1})
  c = c.replace(data=dict(mixture=c.data.mixture +
                          f'; web:1 source=jsonl train_path={tmp_path}/none/*.jsonl'))
  with pytest.raises(config_lib.ConfigError, match=r"data.mixture source 'web': "
                     r"data.train_path=.*no file matches"):
    data.make_train_iterator(c)


@pytest.mark.parametrize('override,expected', [
    ('--config.data.mixture=a:-1 source=synthetic', 'weight -1 is negative'),
    ('--config.data.mixture=a:0 source=synthetic;b:0 source=synthetic', 'all weights are 0'),
    ('--config.data.mixture=a:1 source=jsonl train_path=/nonexistent/*.jsonl',
     "data.mixture source 'a': data.train_path='/nonexistent/*.jsonl': no file matches"),
])
def test_cli_bad_mixture_is_one_line_exit_2(tmp_path, override, expected):
  workdir = tmp_path / 'run'
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
                      f'--workdir={workdir}', '--config.mesh.fsdp=-1', override],
                     cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  # (training/loop.py logs the mesh at INFO before it builds the data: that line may come first.)
  lines = [l for l in r.stderr.splitlines() if 'error' in l]
  assert r.returncode == 2 and len(lines) == 1, r.stderr
  assert lines[0] == r.stderr.strip().splitlines()[-1], r.stderr
  assert lines[0].startswith('gemma3-train: error: ') and expected in lines[0], lines[0]
  assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.slow  # grain worker processes take 10-25 s to start here
def test_resume_with_worker_processes(tmp_path):
  c = _config(tmp_path, {'a': 2, 'c': 1}, num_workers=2)
  full = data.make_train_iterator(c)
  want = [next(full) for _ in range(8)]
  full.close()
  first = data.make_train_iterator(c)
  got = [next(first) for _ in range(3)]
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = data.make_train_iterator(c)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(5)]
  _same(got, want)
  assert sum(data.tokens_drawn(resumed).values()) == 8 * 4 * 16
  resumed.close()


@pytest.mark.slow  # compiles a tiny model (~10-20 s here)
def test_train_logs_per_source_tokens_and_resumes_them(tmp_path):
  from gemma3_train.training import loop as train  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(tiny.get_config()).replace(
      data=dict(mixture='a:3 source=synthetic; b:1 source=synthetic'),
      model=dict(num_layers=2), train=dict(num_steps=4, eval_every=0),
      logging=dict(log_every=2, tensorboard=False, peak_tflops=1.0),
      checkpoint=dict(every=2))
  train.train_and_evaluate(c, str(tmp_path))
  train.train_and_evaluate(c.replace(train=dict(num_steps=6)), str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  per_step = c.train.global_batch_size * c.data.seq_len
  logged = [(r['step'], r['tokens/a'] + r['tokens/b']) for r in rows if 'loss' in r]
  assert logged == [(s, s * per_step) for s, _ in logged] and logged[-1][0] == 6
  assert rows[-1]['tokens/a'] > rows[-1]['tokens/b'] > 0


@pytest.mark.slow  # compiles a tiny model
def test_training_stops_cleanly_when_a_source_runs_out(tmp_path, caplog):
  from gemma3_train.training import checkpoint  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import loop as train  # pylint: disable=g-import-not-at-top
  c = _config(tmp_path, {'a': 1, 'c': 1}, batch=8, mixture_exhausted='stop', packing=False,
              prefetch=0)  # 8 rows: one per simulated device
  c = c.replace(model=dict(num_layers=2), train=dict(num_steps=50, eval_every=0),
                logging=dict(log_every=1, tensorboard=False, peak_tflops=1.0),
                checkpoint=dict(every=0))
  with caplog.at_level(logging.WARNING, logger='gemma3_train'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  step = checkpoint.latest_step(str(tmp_path / 'run'))
  assert 1 <= step <= 3  # 'a' holds 7 one-row documents, half of each batch's 8 rows
  assert (f'The training data ran out at step {step} of train.num_steps=50 '
          '(data.mixture_exhausted=stop)') in caplog.text
