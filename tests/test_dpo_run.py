"""gemma3-train with train.objective=dpo through the real CLI: the first step's loss is ln 2
(policy = reference), TRL's metric names reach metrics.jsonl and TensorBoard, a resumed run
equals an uninterrupted one bit for bit (online reference and precomputed tables), and the
precomputed reference gives the online run's losses."""

import json
import math
import subprocess
import sys

import pytest

from tests import helpers

FLAGS = ['--config=configs/tiny.py', '--config.model.num_layers=2', '--config.data.seq_len=64',
         '--config.train.global_batch_size=4', '--config.train.objective=dpo',
         '--config.train.eval_every=0', '--config.logging.log_every=1',
         '--config.checkpoint.every=2', '--config.optim.schedule=constant',
         '--config.optim.warmup_steps=0', '--config.optim.lr=1e-3']


def _pairs(path):
  words = 'apple river stone cloud music garden silver window forest candle'.split()
  with open(path, 'w') as f:
    for i in range(48):
      w, o = words[i % 10], words[(3 * i + 1) % 10]
      f.write(json.dumps({'prompt': f'Repeat the word: {w}.', 'chosen': f' {w}',
                          'rejected': f' {o}'}) + '\n')
  return path


def _train(workdir, steps, data, *extra):
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.train', *FLAGS,
                      f'--config.data.train_path={data}', f'--workdir={workdir}',
                      f'--config.train.num_steps={steps}', *extra],
                     cwd=helpers.ROOT, env=helpers.cli_env(1), capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _rows(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_dpo_runs_resume_exactly_online_and_precomputed(tmp_path):
  data = _pairs(tmp_path / 'pairs.jsonl')
  precompute = '--config.dpo.reference_logps=precompute'
  straight = tmp_path / 'online'
  _train(straight, 4, data, f'--config.data.eval_path={data}', '--config.train.eval_every=4',
         '--config.train.eval_steps=1')
  rows = [r for r in _rows(straight) if 'loss' in r]
  evals = [r for r in _rows(straight) if 'eval_loss' in r]
  assert evals and 'eval_rewards/margins' in evals[-1] and 'eval_logps/chosen' in evals[-1]
  assert abs(rows[0]['loss'] - math.log(2)) <= 1e-6  # policy = reference at step 1
  for name in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies',
               'logps/chosen', 'logps/rejected'):
    assert name in rows[-1], name
  events = b''.join(p.read_bytes() for p in straight.rglob('events.out.tfevents*'))
  assert b'rewards/margins' in events and b'logps/chosen' in events
  assert rows[-1]['loss'] < rows[0]['loss']

  resumed = tmp_path / 'online_resumed'
  _train(resumed, 2, data)
  assert 'Resumed from' in _train(resumed, 4, data).stderr
  assert helpers.logged_losses(resumed) == helpers.logged_losses(straight)  # bitwise

  pre = tmp_path / 'precomputed'
  r = _train(pre, 4, data, precompute)
  assert 'Reference log-probabilities of 48 train pairs' in r.stderr
  pre_losses, losses = helpers.logged_losses(pre), helpers.logged_losses(straight)
  for step, loss in losses.items():  # the table's sums come from other batches: float noise
    assert abs(pre_losses[step] - loss) <= 1e-5 * max(1.0, abs(loss)), step

  pre_resumed = tmp_path / 'precomputed_resumed'
  _train(pre_resumed, 2, data, precompute)
  r = _train(pre_resumed, 4, data, precompute)
  assert 'Reference log-probabilities (train) from' in r.stderr  # read back, not recomputed
  assert helpers.logged_losses(pre_resumed) == pre_losses  # bitwise
