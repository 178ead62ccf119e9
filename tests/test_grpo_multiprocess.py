"""GRPO over two jax processes (1 CPU device each, gloo) logs the losses, rewards and KL of one
process over the same two devices: every process samples every prompt on the shared mesh,
gathers the completions (sampler.to_host), scores them alike, and trains on the same batch."""

import json
import subprocess
import sys

import pytest

from tests import helpers
from tests import test_grpo

_KEYS = ('loss', 'grad_norm', 'reward', 'kl', 'completions/mean_length', 'entropy')
# updates_per_batch=2 and beta: the rollout's scoring forward and its kept (gathered) batch too.
_EXTRA = ('--config.mesh.fsdp=-1', '--config.rl.updates_per_batch=2', '--config.rl.beta=0.05',
          '--config.checkpoint.every=0')


def _cmd(workdir, data, *extra):
  return [sys.executable, '-m', 'gemma3_train.cli.train', *test_grpo.CLI_FLAGS, *_EXTRA,
          f'--config.data.train_path={data}', f'--workdir={workdir}',
          '--config.train.num_steps=4', *extra]


def _picked(workdir):
  rows = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: row[k] for k in _KEYS} for row in rows if 'loss' in row]


@pytest.mark.slow  # three trainer processes (~40 s of CPU on a quiet 2-core box)
def test_two_processes_train_as_one(tmp_path):
  data = test_grpo._prompts(tmp_path / 'prompts.jsonl')  # pylint: disable=protected-access
  port = helpers.free_port()
  procs = []
  for i in range(2):
    with open(tmp_path / f'p{i}.log', 'wb') as log:
      procs.append(subprocess.Popen(
          _cmd(tmp_path / 'two', data, f'--coordinator_address=localhost:{port}',
               '--num_processes=2', f'--process_id={i}'),
          cwd=helpers.ROOT, env=helpers.cli_env(1), stdout=log, stderr=subprocess.STDOUT))
  one = subprocess.run(_cmd(tmp_path / 'one', data), cwd=helpers.ROOT, env=helpers.cli_env(2),
                       capture_output=True, text=True, timeout=900)
  rcs = [p.wait(timeout=900) for p in procs]
  logs = [(tmp_path / f'p{i}.log').read_text() for i in range(2)]
  assert rcs == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  assert one.returncode == 0, one.stderr[-3000:]
  want = _picked(tmp_path / 'one')
  assert len(want) == 4 and want[-1]['kl'] > 0
  assert _picked(tmp_path / 'two') == want
