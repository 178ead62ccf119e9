"""What a new user trips on (issue 29): a data path without data.source, data.* fields the
source ignores, other trainers' field names, a bad JSON row's whole reason, one log format in
every command, a skipped vision tower said once."""

import json
import logging
import pathlib
import re
import subprocess
import sys

import pytest

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train.config import aliases
from gemma3_train.data import pipeline
from gemma3_train.data import prepared
from gemma3_train.data import select
from gemma3_train.training import init_from
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent  # the installed console scripts
ABSL_LINE = r'^[IWE]\d{4} [\d:.]+ +\d+ %s:\d+\] %s'  # absl's: level, date, time, thread, file


def _script(name, *args, cwd):
  return subprocess.run([str(BIN / name), *args], cwd=cwd, env=helpers.cli_env(devices=1),
                        capture_output=True, text=True, timeout=300)


def _corpus(path, bad_row=False):
  lines = [json.dumps({'text': f'Document {i} is about cats, dogs and the weather. ' * 3})
           for i in range(40)]
  if bad_row:
    lines.insert(2, '{"text": "an unterminated string}')
  path.write_text('\n'.join(lines) + '\n')
  return path


def _config(**data) -> config_lib.Config:
  c = config_lib.from_config_dict(tiny.get_config())
  return c.replace(data=data) if data else c


@pytest.fixture(autouse=True)
def _fresh_said(monkeypatch):
  monkeypatch.setattr(select, '_said', set())
  monkeypatch.setattr(init_from, '_SAID_SKIPPED', set())


# --- 1: data.train_path without data.source ------------------------------------------------


@pytest.mark.slow  # a CLI training run (fast lane budget)
def test_train_path_alone_trains_on_that_file_and_says_so(tmp_path):
  """Through gemma3-train: the jsonl is read (its bad row is warned of, with the decoder's
  whole message, in absl's format), not the bundled corpus; exit 0."""
  _corpus(tmp_path / 'corpus.jsonl', bad_row=True)
  r = _script('gemma3-train', f'--config={ROOT}/configs/tiny.py', f'--workdir={tmp_path}/run',
              '--config.data.train_path=corpus.jsonl', '--config.train.num_steps=1',
              '--config.train.eval_every=0', '--config.logging.tensorboard=False',
              cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(ABSL_LINE % ('select.py', re.escape(
      "data.source='jsonl', inferred from data.train_path='corpus.jsonl' (data.source was left "
      "at 'bundled')")), r.stderr, re.MULTILINE), r.stderr
  assert 'data: jsonl train batches' in r.stderr
  assert re.search(ABSL_LINE % ('sources.py', re.escape(
      'data: skipped: not valid JSON (Unterminated string starting at: line 1 column 10 '
      '(char 9)) at corpus.jsonl line 3')), r.stderr, re.MULTILINE), r.stderr
  assert (tmp_path / 'run' / 'checkpoints' / '1').is_dir()


def test_train_path_of_unknown_kind_is_one_line_before_the_workdir(tmp_path):
  (tmp_path / 'corpus.txt').write_text('hello\n')
  r = _script('gemma3-train', f'--config={ROOT}/configs/tiny.py', f'--workdir={tmp_path}/run',
              '--config.data.train_path=corpus.txt', cwd=tmp_path)
  assert r.returncode == 2, r.stderr
  errors = [l for l in r.stderr.splitlines() if 'error' in l]
  assert errors == ["gemma3-train: error: data.train_path='corpus.txt': cannot tell its kind; "
                    'expected .jsonl, .jsonl.gz, .parquet or .arrayrecord/.array_record files, '
                    'or a directory written by gemma3-data prepare, or set data.source (jsonl '
                    '| parquet | arrayrecord | prepared)'], r.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('path,source', [
    ('a.jsonl', 'jsonl'), ('a.jsonl.gz', 'jsonl'), ('gs://b/web/*.jsonl', 'jsonl'),
    ('a.parquet', 'parquet'), ('d/*.parquet', 'parquet'), ('x.arrayrecord', 'arrayrecord'),
    ('x.array_record', 'arrayrecord'), ('x.array_record-00000-of-00004', 'arrayrecord'),
    ('d/x.array_record*', 'arrayrecord'), ('a.jsonl,b.jsonl.gz', 'jsonl'),
    ('a.jsonl,b.parquet', None), ('a.txt', None), ('data', None),
])
def test_source_from_the_path(path, source, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert select.path_source(path) == source


def test_a_prepared_directory_is_recognized_by_its_manifest(tmp_path, caplog):
  (tmp_path / 'prep').mkdir()
  (tmp_path / 'plain').mkdir()
  (tmp_path / 'prep' / prepared.MANIFEST).write_text('{}')
  with caplog.at_level(logging.INFO, logger='gemma3_train.data'):
    c = select.resolve(_config(train_path=str(tmp_path / 'prep')))
    select.resolve(_config(train_path=str(tmp_path / 'prep')))  # said once
  assert c.data.source == 'prepared'
  assert [r.getMessage() for r in caplog.records] == [
      f"data.source='prepared', inferred from data.train_path='{tmp_path / 'prep'}' "
      "(data.source was left at 'bundled')"]
  with pytest.raises(config_lib.ConfigError, match=r"^data.train_path=.*plain': cannot tell"):
    select.resolve(_config(train_path=str(tmp_path / 'plain')))


def test_inferred_source_reads_the_file_through_the_pipeline(tmp_path):
  path = _corpus(tmp_path / 'c.jsonl')
  c = _config(train_path=str(path), seq_len=32, prefetch=0, shuffle=False)
  batch = next(iter(pipeline.make_dataset(c, num_epochs=1, batch_size=2)))
  bundled = next(iter(pipeline.make_dataset(_config(seq_len=32, prefetch=0, shuffle=False),
                                            num_epochs=1, batch_size=2)))
  assert (batch['inputs'] != bundled['inputs']).any()


def test_tfds_name_alone_means_tfds_and_both_is_an_error():
  assert select.resolve(_config(tfds_name='lm1b')).data.source == 'tfds'
  with pytest.raises(config_lib.ConfigError, match=r"^data.train_path='a.jsonl' and "
                     r"data.tfds_name='lm1b' are both set"):
    select.resolve(_config(train_path='a.jsonl', tfds_name='lm1b'))


@pytest.mark.parametrize('data,expected', [
    (dict(source='jsonl', train_path='a.parquet'),
     "data.train_path='a.parquet': a.parquet is a parquet file but data.source='jsonl'; set "
     "data.source='parquet'"),
    (dict(train_path='a.jsonl', eval_path='b.parquet'),
     "data.eval_path='b.parquet': b.parquet is a parquet file but data.source='jsonl'"),
    (dict(source='prepared', train_path='a.jsonl'),
     "a.jsonl is a jsonl file but data.source='prepared' (a directory written by gemma3-data "
     'prepare)'),
])
def test_a_file_of_another_kind_than_the_source_is_an_error(data, expected):
  with pytest.raises(config_lib.ConfigError) as e:
    select.resolve(_config(**data))
  assert expected in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('data,warned', [
    (dict(eval_path='e.jsonl'), "data.eval_path='e.jsonl' is ignored: data.source='bundled' "
     'evaluates on its own eval split'),
    (dict(source='synthetic', train_path='a.jsonl'), "data.train_path='a.jsonl' is ignored: "
     "data.source='synthetic' reads no files"),
    (dict(source='jsonl', train_path='a.jsonl', tfds_name='lm1b'),
     "data.tfds_name='lm1b' is ignored: data.source='jsonl' is not 'tfds'"),
    (dict(source='parquet', train_path='a.parquet', format='chat', text_field='body'),
     "data.text_field='body' is ignored: data.format='chat' reads data.messages_field"),
    (dict(train_path='a.jsonl', messages_field='turns'),
     "data.messages_field='turns' is ignored: data.format='text' reads data.text_field"),
    (dict(source='synthetic', tokenizer_path='t.model'),
     "data.tokenizer_path='t.model' is ignored: data.source='synthetic' makes token ids"),
    (dict(max_images=4), "data.max_images=4 is ignored: model.vision is False"),
    (dict(mixture_exhausted='stop'), "data.mixture_exhausted='stop' is ignored: data.mixture "
     'is not set'),
])
def test_a_field_the_source_ignores_is_one_warning(data, warned, caplog):
  with caplog.at_level(logging.INFO, logger='gemma3_train.data'):
    select.resolve(_config(**data))
    select.resolve(_config(**data))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [warned]


def test_defaults_and_used_fields_warn_of_nothing(caplog):
  with caplog.at_level(logging.INFO, logger='gemma3_train.data'):
    select.resolve(_config())
    select.resolve(_config(source='jsonl', train_path='a.jsonl', eval_path='b.jsonl.gz',
                           text_field='body'))
    select.resolve(_config(source='tfds', tfds_name='lm1b', tfds_eval_split='validation'))
  assert not caplog.records


# --- 4: other trainers' names -----------------------------------------------------------------


@pytest.mark.parametrize('override,meant', [
    ('optim.learning_rate', 'optim.lr'),
    ('train.learning_rate', 'optim.lr'),
    ('optim.lr_schedule', 'optim.schedule'),
    ('train.scheduler', 'optim.schedule'),
    ('train.batch_size', 'train.global_batch_size'),
    ('per_device_train_batch_size', 'train.global_batch_size'),
    ('train.max_steps', 'train.num_steps'),
    ('num_train_steps', 'train.num_steps'),
    ('train.steps', 'train.num_steps'),
    ('optim.warmup', 'optim.warmup_steps'),
    ('optim.num_warmup_steps', 'optim.warmup_steps'),
    ('optim.warmup_ratio', 'optim.warmup_steps'),
    ('train.weight_decay', 'optim.weight_decay'),
    ('data.max_seq_length', 'data.seq_len'),
    ('train.seq_length', 'data.seq_len'),
    ('model.max_length', 'data.seq_len'),
    ('data.block_size', 'data.seq_len'),
    ('optim.gradient_accumulation_steps', 'optim.grad_accum_steps'),
    ('train.max_grad_norm', 'optim.clip_norm'),
    ('seed', 'train.seed'),
    ('train.save_steps', 'checkpoint.every'),
    ('train.logging_steps', 'logging.log_every'),
    ('optim.eval_steps', 'train.eval_every'),
    ('optim.lrr', 'optim.lr'),  # a misspelling still gets the closest field
])
def test_unknown_field_hint_names_our_field(override, meant):
  r = subprocess.run([str(BIN / 'gemma3-train'), '--config=configs/tiny.py',
                      f'--config.{override}=1'], cwd=ROOT, capture_output=True, text=True,
                     env=helpers.cli_env(devices=1), timeout=60)
  assert r.returncode == 2
  assert r.stderr.startswith(f'gemma3-train: error: --config.{override}: unknown config field; '
                             f'did you mean --config.{meant}'), r.stderr
  assert len(r.stderr.splitlines()) == 1


def test_every_alias_names_a_field():
  fields = {d.name for d in config_lib.field_docs()}
  assert {target for target, _ in aliases.ALIASES.values()} <= fields


def test_a_config_file_field_gets_the_same_hint():
  d = tiny.get_config().to_dict()
  d['optim']['learning_rate'] = 1e-3
  with pytest.raises(config_lib.ConfigError, match=r'^optim\.learning_rate: unknown config '
                     r'field; did you mean optim\.lr\?$'):
    config_lib.from_dict(d)


# --- 5 and 8: gemma3-data's bad row, in the trainer's log format ------------------------------


def test_gemma3_data_logs_in_absl_format_with_the_whole_json_reason(tmp_path):
  _corpus(tmp_path / 'c.jsonl', bad_row=True)
  r = _script('gemma3-data', 'prepare', '--src=c.jsonl', '--dst=out', '--workers=1',
              cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert re.search(ABSL_LINE % ('sources.py', re.escape(
      'data: skipped: not valid JSON (Unterminated string starting at: line 1 column 10 '
      '(char 9)) at c.jsonl line 3')), r.stderr, re.MULTILINE), r.stderr
  assert 'WARNING:' not in r.stderr and 'before flag parsing' not in r.stderr, r.stderr


# --- 9: a text run from a vision checkpoint ---------------------------------------------------


class _VisionSource:
  def has_vision(self):
    return True


def test_skipped_vision_weights_are_said_once(caplog):
  m = _config().model
  with caplog.at_level(logging.INFO, logger='gemma3_train.training.init_from'):
    for _ in range(2):  # preflight's open_init_source, then load_init_params'
      init_from._check_vision(_VisionSource(), '/ckpt/4b', m)  # pylint: disable=protected-access
  said = [r.getMessage() for r in caplog.records]
  assert said == ['checkpoint.init_from=/ckpt/4b has vision weights; model.vision is False, so '
                  'they are skipped (text decoder only)']


@pytest.mark.slow
def test_text_run_from_a_vision_workdir_says_skipped_once(tmp_path):
  """Through gemma3-train (~20 s): a tiny vision run, then a text run initialized from it."""
  common = ['--config.train.num_steps=1', '--config.train.eval_every=0',
            '--config.logging.tensorboard=False']
  r = _script('gemma3-train', f'--config={ROOT}/configs/tiny_vision.py',
              f'--workdir={tmp_path}/vision', *common, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _script('gemma3-train', f'--config={ROOT}/configs/tiny_vision.py',
              f'--workdir={tmp_path}/text', '--config.model.vision=False',
              '--config.data.source=synthetic', '--config.data.max_images=2',
              f'--config.checkpoint.init_from={tmp_path}/vision', *common, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  said = [l for l in r.stderr.splitlines() if 'has vision weights' in l]
  assert len(said) == 1 and 'so they are skipped' in said[0], r.stderr


@pytest.mark.slow
def test_a_relative_workdir_is_the_current_directorys(tmp_path):
  """--workdir=run (relative) trains into CWD/run; orbax itself needs absolute paths."""
  r = _script('gemma3-train', f'--config={ROOT / "configs" / "tiny.py"}', '--workdir=run',
              '--config.data.source=synthetic', '--config.model.vocab_size=512',
              '--config.model.num_layers=1', '--config.data.seq_len=16',
              '--config.train.num_steps=1', '--config.train.eval_every=0',
              '--config.train.cache_dir=', cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / 'run' / 'checkpoints' / '1').is_dir()
