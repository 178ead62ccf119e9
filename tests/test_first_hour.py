"""The first hour through the real CLI: errors before the workdir is touched, bad data mid-run,
Ctrl-C, the persistent compilation cache, a finished run's rerun, a resume with a new schedule."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from gemma3_train import config as config_lib
from gemma3_train.training import optimizer
from gemma3_train.training import restore
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(workdir, steps, *extra, check=True):
  r = subprocess.run(helpers.train_cmd(workdir, steps, *extra), cwd=ROOT,
                     env=helpers.cli_env(devices=1), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0 or not check, r.stderr[-3000:]
  return r


def _listing(workdir: pathlib.Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in workdir.rglob('*')}


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing_in_seconds(tmp_path):
  tensorboard = '--config.logging.tensorboard=True'
  _run(tmp_path, 3, tensorboard)
  assert (tmp_path / 'checkpoints' / '3').is_dir()
  before, metrics = _listing(tmp_path), (tmp_path / 'metrics.jsonl').read_bytes()
  for steps in (3, 2):  # the same command, and a shorter run
    start = time.monotonic()
    r = _run(tmp_path, steps, tensorboard)
    elapsed = time.monotonic() - start
    assert elapsed < 10, elapsed
    assert (f'{tmp_path} is already at step 3 of train.num_steps={steps}; nothing to do'
            in r.stderr), r.stderr
    assert 'Compiled' not in r.stderr and 'Training steps' not in r.stderr
    assert _listing(tmp_path) == before  # no new TensorBoard file, checkpoint or row
    assert (tmp_path / 'metrics.jsonl').read_bytes() == metrics
  # A finished workdir still refuses a model of another shape (one line, exit 2, untouched).
  r = _run(tmp_path, 3, tensorboard, '--config.model.embed_dim=48', check=False)
  assert r.returncode == 2 and 'model.embed_dim=48: expected' in r.stderr, r.stderr
  assert _listing(tmp_path) == before


@pytest.mark.slow
def test_resume_with_a_new_schedule_says_so_in_one_line(tmp_path):
  _run(tmp_path, 4)  # SMALL: tiny.py's cosine and lr, warmup 5
  r = _run(tmp_path, 12, '--config.optim.lr=1e-3')
  lines = [l for l in r.stderr.splitlines() if 'changed schedule' in l]
  assert len(lines) == 1, r.stderr
  c = config_lib.from_config_dict(config_lib.load_config_dict('configs/tiny.py'))
  c = c.replace(optim=dict(warmup_steps=5))
  old = float(optimizer.make_schedule(c.optim, 4)(4))
  new = float(optimizer.make_schedule(c.replace(optim=dict(lr=1e-3)).optim, 12)(4))
  assert old != new
  assert (f'Resuming at step 4 with a changed schedule: train.num_steps 4 -> 12, optim.lr '
          f'{c.optim.lr} -> 0.001; learning rate at step 4: {old:.3g} -> {new:.3g}'
          in lines[0]), lines[0]
  steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps[-1] == 12
  rows = {json.loads(l)['step']: json.loads(l) for l in
          (tmp_path / 'metrics.jsonl').read_text().splitlines()}
  assert rows[5]['learning_rate'] == pytest.approx(new, rel=1e-6)  # step 5 ran at lr(4)


def test_schedule_warning_names_only_what_changed(caplog):
  c = config_lib.from_config_dict(config_lib.load_config_dict('configs/tiny.py'))
  saved = json.loads(c.to_json())
  with caplog.at_level(logging.WARNING, logger='gemma3_train'):
    restore.warn_if_schedule_changed(c, saved, 7)
    restore.warn_if_schedule_changed(c, None, 7)  # a checkpoint without its config
    assert not caplog.records
    saved['optim']['schedule'] = 'constant'
    restore.warn_if_schedule_changed(c, saved, 7)
  [record] = caplog.records
  lr_old = c.optim.lr * 7 / c.optim.warmup_steps  # still warming up: the same under both
  assert record.getMessage() == (
      f'Resuming at step 7 with a changed schedule: optim.schedule constant -> '
      f'{c.optim.schedule}; learning rate at step 7: {lr_old:.3g} -> {lr_old:.3g}')


# --- errors before the workdir is touched ------------------------------------------------


def _tiny(workdir, *extra):
  return [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
          f'--workdir={workdir}', *extra]


def _fails_untouched(tmp_path, *extra, match):
  workdir = tmp_path / 'run'
  r = subprocess.run(_tiny(workdir, *extra), cwd=ROOT, env=helpers.cli_env(devices=1),
                     capture_output=True, text=True, timeout=300)
  errors = [l for l in r.stderr.splitlines() if l.startswith('gemma3-train: error:')]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert match in errors[0], errors[0]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert not workdir.exists()  # not even created
  return errors[0]


def _write_chat(path, n, bad_row=None):
  rows = []
  for i in range(n):
    messages = [{'role': 'user', 'content': f'What is {i} plus one?'},
                {'role': 'model', 'content': f'It is {i + 1}.'}]
    if i == bad_row:
      messages[1]['role'] = 'user'  # two user turns in a row
    rows.append(json.dumps({'messages': messages}))
  path.write_text('\n'.join(rows) + '\n')
  return path


@pytest.mark.slow
def test_bad_eval_path_fails_before_the_workdir_is_touched(tmp_path):
  train_path = _write_chat(tmp_path / 'train.jsonl', 8)
  data = ['--config.data.source=jsonl', f'--config.data.train_path={train_path}',
          '--config.data.format=chat']
  _fails_untouched(tmp_path, *data, f'--config.data.eval_path={tmp_path}/evl.jsonl',
                   match=f'file not found: {tmp_path}/evl.jsonl')
  # No eval data at all for a jsonl source while evals are due.
  _fails_untouched(tmp_path, *data, match="data.eval_path='': expected a file or glob")


def test_bad_init_from_fails_before_the_workdir_is_touched(tmp_path):
  _fails_untouched(tmp_path, f'--config.checkpoint.init_from={tmp_path}/nothing',
                   match=f"checkpoint.init_from='{tmp_path}/nothing'")
  (tmp_path / 'hf').mkdir()  # a HF directory of another model shape
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({
      'architectures': ['Gemma3ForCausalLM'], 'model_type': 'gemma3_text',
      'vocab_size': 262144, 'hidden_size': 128, 'intermediate_size': 256,
      'num_hidden_layers': 8, 'num_attention_heads': 4, 'num_key_value_heads': 1,
      'head_dim': 16, 'sliding_window': 32, 'query_pre_attn_scalar': 16}))
  safetensors.numpy.save_file({'model.embed_tokens.weight': np.zeros(1, np.float32)},
                              tmp_path / 'hf' / 'model.safetensors')  # never read
  _fails_untouched(tmp_path, f'--config.checkpoint.init_from={tmp_path}/hf',
                   match='model.embed_dim=64: checkpoint.init_from=')


@pytest.mark.slow
def test_bad_chat_row_mid_run_is_one_line_and_keeps_the_checkpoint(tmp_path):
  path = _write_chat(tmp_path / 'chat.jsonl', 450, bad_row=350)  # past probe and read-ahead
  workdir = tmp_path / 'run'
  # One layer: the data error and the checkpoint kept do not depend on the model's depth.
  r = subprocess.run(_tiny(workdir, '--config.model.num_layers=1',
                           '--config.data.source=jsonl', f'--config.data.train_path={path}',
                           '--config.data.format=chat', '--config.data.shuffle=False',
                           '--config.data.seq_len=64', '--config.train.eval_every=0',
                           '--config.checkpoint.every=2', '--config.logging.tensorboard=False'),
                     cwd=ROOT, env=helpers.cli_env(devices=1), capture_output=True,
                     text=True, timeout=600)
  errors = [l for l in r.stderr.splitlines() if l.startswith('gemma3-train: error:')]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert f'{path} line 351: roles must alternate' in errors[0], errors[0]
  step = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert step >= 2
  assert f'the checkpoint at step {step} in {workdir}/checkpoints is intact' in errors[0]


# --- Ctrl-C ----------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_saves_exits_0_and_the_resume_is_bitwise(tmp_path):
  # A grain worker process too: Ctrl-C in a terminal signals the whole process group.
  cache = f'--config.train.cache_dir={tmp_path}/cache'
  flags = (cache, '--config.checkpoint.every=0', '--config.data.num_workers=1')
  straight, stopped = tmp_path / 'straight', tmp_path / 'stopped'
  _run(straight, 30, *flags)
  compiled = sorted((tmp_path / 'cache' / 'jax').iterdir())
  assert compiled and (tmp_path / 'cache' / 'cpu_peak.json').exists()

  proc = subprocess.Popen(helpers.train_cmd(stopped, 30, *flags), cwd=ROOT,
                          env=helpers.cli_env(devices=1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  helpers.wait_for_step(stopped / 'metrics.jsonl', 4, proc)
  os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  [step] = [int(p.name) for p in (stopped / 'checkpoints').iterdir() if p.name.isdigit()]
  assert 4 <= step < 30
  assert len([l for l in err.splitlines() if 'Ctrl-C' in l]) == 2, err  # asked, done
  assert f'Stopped by Ctrl-C: checkpoint at step {step} written' in err

  r = _run(stopped, 30, *flags)
  assert f'Resumed from {stopped}/checkpoints/{step}' in r.stderr
  # Neither the stopped run nor its resume compiled anything: all from the persistent cache.
  assert sorted((tmp_path / 'cache' / 'jax').iterdir()) == compiled
  a, b = helpers.logged_losses(straight), helpers.logged_losses(stopped)
  assert sorted(a) == sorted(b) == list(range(1, 31))
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise: float equality
  for x, y in zip(helpers.final_params(straight), helpers.final_params(stopped)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
  # Both interrupts land while the main thread compiles (an empty cache: a real compile of
  # several seconds), where no Python signal handler can run: the second must still end it.
  proc = subprocess.Popen(helpers.train_cmd(tmp_path, 100_000, '--config.checkpoint.every=0',
                                               f'--config.train.cache_dir={tmp_path}/cache'),
                          cwd=ROOT, env=helpers.cli_env(devices=1),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  err = []
  for line in proc.stderr:
    err.append(line)
    if 'Training steps' in line:  # the train step's compile starts now
      break
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)  # two presses, not one signal sent twice (pending signals coalesce)
  proc.send_signal(signal.SIGINT)
  start = time.monotonic()
  err = ''.join(err) + proc.communicate(timeout=60)[1]
  assert proc.returncode == 130, err[-3000:]
  assert time.monotonic() - start < 5, 'waited for the compile to finish'
  assert 'Compiled the train step' not in err
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  assert err.rstrip().splitlines()[-1] == ('gemma3-train: interrupted again: exiting now without '
                                           'saving; the last complete checkpoint is kept.')


@pytest.mark.slow
def test_a_data_position_the_pipeline_cannot_take_is_one_line_not_damage(tmp_path):
  _run(tmp_path, 2)
  r = _run(tmp_path, 4, '--config.data.packing=False', check=False)  # another pipeline
  data_dir = tmp_path / 'checkpoints' / '2' / 'data'
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.rstrip().splitlines()[-1].startswith(
      f'gemma3-train: error: {data_dir}: the data iterator position does not fit'), r.stderr
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2']  # not set aside
  data_dir.rename(tmp_path / 'moved')  # what the message offers: resume, the data restarted
  r = _run(tmp_path, 4, '--config.data.packing=False')
  assert 'Checkpoint 2 has no data iterator state; data restarts.' in r.stderr
