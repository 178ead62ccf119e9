"""cli/errors.py (one line, exit 2) and infra/progress.py (the progress line), fast: no jax."""

import io

import pytest

from gemma3_train.cli import errors
from gemma3_train import config as config_lib
from gemma3_train.infra import progress as progress_lib


def test_exit_on_prints_the_first_line_and_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    with errors.exit_on('gemma3-x', config_lib.ConfigError):
      raise config_lib.ConfigError('data.seq_len=0: expected > 0\nsecond line')
  assert e.value.code == 2
  assert capsys.readouterr().err == 'gemma3-x: error: data.seq_len=0: expected > 0\n'


def test_exit_on_names_the_type_of_an_empty_error_and_lets_others_through(capsys):
  with pytest.raises(SystemExit) as e:
    with errors.exit_on('gemma3-x', OSError):
      raise FileNotFoundError()
  assert e.value.code == 2
  assert capsys.readouterr().err == 'gemma3-x: error: FileNotFoundError\n'
  with pytest.raises(KeyError):  # not a kind it was given
    with errors.exit_on('gemma3-x', OSError):
      raise KeyError('k')
  with pytest.raises(SystemExit):  # default: UsageError
    with errors.exit_on('gemma3-x'):
      raise errors.UsageError('--bogus')
  assert capsys.readouterr().err == 'gemma3-x: error: --bogus\n'


def test_fail_and_the_parsers(capsys):
  with pytest.raises(SystemExit) as e:
    errors.fail('gemma3-x', 'disk full', code=1)
  assert e.value.code == 1 and capsys.readouterr().err == 'gemma3-x: error: disk full\n'
  parser = errors.ArgParser(prog='gemma3-x')
  parser.add_argument('--n', type=int)
  with pytest.raises(SystemExit) as e:
    parser.parse_args(['--n=two'])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1, err
  assert err.startswith("gemma3-x: error: argument --n: invalid int value: 'two'"), err
  raising = errors.RaisingArgParser(prog='gemma3-x')
  with pytest.raises(errors.UsageError, match='unrecognized arguments: --bogus'):
    raising.parse_args(['--bogus'])


@pytest.fixture
def clock(monkeypatch):
  """A fake progress_lib.clock; advance it with clock.now += seconds."""
  class Clock:
    now = 1000.0

    def __call__(self):
      return self.now
  fake = Clock()
  monkeypatch.setattr(progress_lib, 'clock', fake)
  return fake


def test_duration():
  assert progress_lib.duration(0) == '0m00s'
  assert progress_lib.duration(249.4) == '4m09s'
  assert progress_lib.duration(3900) == '1h05m'


def test_progress_off_a_terminal_writes_a_line_every_few_seconds_then_a_final_one(clock,
                                                                                    capsys):
  bar = progress_lib.Progress('eval eval', 100, 'batches')
  assert not bar.tty and bar.every == progress_lib.EVERY
  for done in range(1, 101):
    clock.now += 0.5  # 2 batches/s
    bar.update(done)
  bar.close()
  lines = capsys.readouterr().err.splitlines()
  # The first update at once, then one per EVERY (5 s = 10 updates), then the final line.
  assert len(lines) == 1 + 99 // 10 + 1, lines
  assert lines[0] == 'eval eval: 1/100 batches (1%) | 2 batches/s | ETA 0m50s'
  assert lines[1] == 'eval eval: 11/100 batches (11%) | 2 batches/s | ETA 0m44s'  # 44.5
  assert lines[-1] == 'eval eval: 100/100 batches (100%) | 2 batches/s | took 0m50s'
  bar.close()  # once
  assert capsys.readouterr().err == ''


def test_progress_resumed_rate_counts_this_run_and_shows_the_note(clock):
  out = io.StringIO()
  with progress_lib.Progress('prepare', 8, 'shards', done=3, stream=out) as bar:
    clock.now += 4.0
    bar.update(5, '50/80 rows, 1,250 tokens/s')
  lines = out.getvalue().splitlines()
  assert lines == ['prepare: 5/8 shards (62%) | 0.5 shards/s | 50/80 rows, 1,250 tokens/s | '
                   'ETA 0m06s',
                   'prepare: 5/8 shards (62%) | 0.5 shards/s | 50/80 rows, 1,250 tokens/s | '
                   'took 0m04s']


def test_progress_without_a_total_has_no_eta(clock):
  out = io.StringIO()
  bar = progress_lib.Progress('eval train', None, 'batches', stream=out)
  clock.now += 2.0
  bar.update(3000)
  assert out.getvalue() == 'eval train: 3000 batches | 1,500 batches/s\n'


def test_progress_on_a_terminal_redraws_in_place(clock):
  class Tty(io.StringIO):
    def isatty(self):
      return True
  out = Tty()
  bar = progress_lib.Progress('writing /tmp/x', 10, 'layers', stream=out)
  assert bar.tty and bar.every == progress_lib.TTY_EVERY
  for done in range(1, 11):
    clock.now += 0.125 if done < 10 else 0.5
    bar.update(done, 'a long note' if done < 9 else '')
  bar.close()
  text = out.getvalue()
  assert text.startswith('\r') and text.endswith('\n') and text.count('\n') == 1, text
  draws = text[1:-1].split('\r')
  # The first update at once, then every TTY_EVERY (0.2 s: every 2nd update), the final line.
  assert [d.split(' ')[2] for d in draws] == [
      '1/10', '3/10', '5/10', '7/10', '9/10', '10/10', '10/10'], draws
  assert draws[0] == ('writing /tmp/x: 1/10 layers (10%) | 8 layers/s | a long note | '
                      'ETA 0m01s')
  # Shorter than the line before (no note): padded with spaces over what that one left.
  assert draws[4].startswith('writing /tmp/x: 9/10 layers (90%) | 8 layers/s | ETA 0m00s ')
  assert len(draws[4]) == len(draws[3]) and draws[4].endswith(' ')
  assert draws[-1].startswith('writing /tmp/x: 10/10 layers (100%) | 6.15 layers/s | '
                              'took 0m02s')
