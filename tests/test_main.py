"""The gemma3-train command line: help, one-line errors with exit code 2, what reaches the log."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from gemma3_train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cli(*args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'gemma3_train.cli.train', *args], cwd=cwd or ROOT,
                        capture_output=True, text=True, env=env, timeout=300)


def _one_error_line(r) -> str:
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith('gemma3-train: error: '), lines[0]
  return lines[0]


@pytest.mark.parametrize('override,expected', [
    ('--config.optim.lr=abc', "--config.optim.lr=abc: could not convert string to float"),
    ('--config.optim.lrr=1', '--config.optim.lrr: unknown config field; did you mean '
                             '--config.optim.lr?'),
    ('--config.model.scan_layer', 'model.scan_layer: unknown config field; did you mean '
                                  '--config.model.scan_layers?'),
    ('--config.zzz.qqq=1', '--config.zzz.qqq: unknown config field'),
    ('--config.model.num_kv_heads=3', 'model.num_kv_heads=3: expected a divisor'),
    ('--config.model.sliding_window=-1', 'model.sliding_window=-1: expected a window > 0'),
    ('--config.mesh.fsdp=3', 'mesh.(data, fsdp, context, tensor)=(1, 3, 1, 1): expected a '
     'product equal to the device'),
    ('--config.train.global_batch_size=3', 'train.global_batch_size=3: expected a batch'),
])
def test_bad_override_is_one_line_and_exit_2(tmp_path, override, expected):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('precious')
  env_devices = ['--config.mesh.fsdp=-1'] if 'mesh' not in override else []
  r = _cli('--config=configs/tiny.py', f'--workdir={workdir}', *env_devices, override)
  assert expected in _one_error_line(r)
  assert sorted(p.name for p in workdir.iterdir()) == ['keep.txt']  # nothing written


@pytest.mark.parametrize('source,expected', [
    (None, 'no such config file'),
    ('x = (\n', 'cannot load the config file (SyntaxError'),
    ('x = 1\n', 'defines no get_config()'),
])
def test_bad_config_file_is_one_line_naming_it(tmp_path, source, expected):
  path = tmp_path / 'mine.py'
  if source is not None:
    path.write_text(source)
  line = _one_error_line(_cli(f'--config={path}', '--workdir=/tmp/unused'))
  assert line.startswith(f'gemma3-train: error: --config={path}: ') and expected in line, line


def test_missing_config_file_exit_2():
  r = _cli('--config=configs/nope.py', '--workdir=/tmp/unused')
  assert 'configs/nope.py' in _one_error_line(r)


def test_helpfull_lists_every_field_with_its_default_and_help():
  r = _cli('--helpfull')
  assert r.returncode == 0, r.stderr
  text = ' '.join(r.stdout.split())  # absl wraps long help lines at spaces
  for d in config_lib.field_docs():
    assert f'--config.{d.name}={d.default!r} # {d.help}' in text, d.name
  assert "--config.optim.lr=0.0003 # peak learning rate" in text
  assert '--config.mesh.fsdp=-1 #' in text and "--config.data.source='bundled' #" in text


@pytest.mark.parametrize('how', ['module', 'script'])
def test_help_shows_our_flags_and_the_common_fields(how):
  if how == 'module':
    r = _cli('--help')
  else:  # as the installed `gemma3-train` script runs it: cli/train.py is not the main module
    r = subprocess.run([sys.executable, '-c', 'from gemma3_train.cli import train; train.run()',
                        '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stderr
  assert 'Try --helpfull' in r.stdout
  for flag in ('--config', '--workdir', '--aot_topology', '--aot_plan', '--aot_plan_rows',
               '--coordinator_address', '--num_processes', '--process_id'):
    assert f'  {flag}: ' in r.stdout, flag
  assert 'Override any field with --config.SECTION.KEY=V.' in r.stdout
  assert "--config.optim.lr=0.0003  # peak learning rate" in r.stdout
  assert "--config.data.source='bundled'  #" in r.stdout
  assert '--config.optim.b2' not in r.stdout  # the rest is in --helpfull
  assert len(r.stdout.splitlines()) < 60


@pytest.mark.parametrize('flag', ['--aot_plan', '--aot_report=/tmp/r.json',
                                  '--aot_plan_rows=1,2', '--aot_plan_remat=full',
                                  '--aot_plan_tensor=2'])
def test_aot_flag_without_topology_names_it(flag):
  line = _one_error_line(_cli('--config=configs/tiny.py', flag))
  name = flag.split('=')[0]
  assert line == (f'gemma3-train: error: {name} needs --aot_topology, e.g. '
                  '--aot_topology=v5p-128'), line


# The entry point with main() replaced: what reaches stderr from our loggers and the libraries'.
_LOG_PROBE = """
import logging, sys
from absl import logging as absl_logging
from gemma3_train.cli import train as m

def probe(argv):
  logging.getLogger('gemma3_train.training.loop').info('ours at info')
  logging.getLogger('gemma3_train.data.pipeline').debug('ours at debug')
  absl_logging.info('orbax via absl at info')  # orbax and grain log through absl's logger
  absl_logging.warning('orbax via absl at warning')
  logging.getLogger('jax._src.dispatch').info('jax at info')

m.main = probe
sys.argv = ['gemma3-train'] + sys.argv[1:]
m.run()
"""


@pytest.mark.parametrize('flags,shown,hidden', [
    ([], ['ours at info', 'orbax via absl at warning'],
     ['ours at debug', 'orbax via absl at info', 'jax at info']),
    (['--verbosity=0'], ['ours at info', 'orbax via absl at info', 'jax at info'],
     ['ours at debug']),
    (['--logger_levels=gemma3_train:WARNING'], ['orbax via absl at warning'],
     ['ours at info', 'orbax via absl at info']),
])
def test_log_shows_our_info_and_library_warnings(flags, shown, hidden):
  r = subprocess.run([sys.executable, '-c', _LOG_PROBE, *flags], capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert r.returncode == 0, r.stderr
  for message in shown:
    # absl's format: level letter, date, time, thread, file:line] message.
    assert re.search(rf'^[IW]\d{{4}} [\d:.]+ +\d+ <string>:\d+\] {message}$', r.stderr,
                     re.MULTILINE), (message, r.stderr)
  for message in hidden:
    assert message not in r.stderr, (message, r.stderr)
