"""The first hour through the real CLI: a finished run's rerun, a resume with a new schedule."""

import json
import logging
import pathlib
import subprocess
import sys
import time

import pytest

from gemma3_train import config as config_lib
from gemma3_train import optimizer
from gemma3_train import train
from tests import test_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(workdir, steps, *extra, check=True):
  r = subprocess.run(test_checkpoint._cmd(workdir, steps, *extra), cwd=ROOT,
                     env=test_checkpoint._env(devices=1), capture_output=True, text=True,
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
    train._warn_if_schedule_changed(c, saved, 7)
    train._warn_if_schedule_changed(c, None, 7)  # a checkpoint without its config
    assert not caplog.records
    saved['optim']['schedule'] = 'constant'
    train._warn_if_schedule_changed(c, saved, 7)
  [record] = caplog.records
  lr_old = c.optim.lr * 7 / c.optim.warmup_steps  # still warming up: the same under both
  assert record.getMessage() == (
      f'Resuming at step 7 with a changed schedule: optim.schedule constant -> '
      f'{c.optim.schedule}; learning rate at step 7: {lr_old:.3g} -> {lr_old:.3g}')
