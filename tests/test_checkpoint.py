"""Stopping and resuming: SIGKILL mid-run, SIGTERM, a corrupt newest checkpoint, another mesh.

Each test drives the real CLI in subprocesses (a real kill, not a mocked exception) on a small
Gemma-3-shaped model with synthetic data, and reads the per-step losses from metrics.jsonl.
"""

import json
import pathlib
import re
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest

from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.training import checkpoint
from gemma3_train.training import state as train_state
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """trained(steps, dest): dest holds a copy of the small model's workdir after `steps` steps
  (checkpoints every 5), each trained once per module and worker (a CLI run is ~20 s)."""
  made = {}

  def copy(steps, dest):
    if steps not in made:
      made[steps] = tmp_path_factory.mktemp(f'trained_{steps}')
      helpers.train_ok(made[steps], steps)
    shutil.copytree(made[steps], dest, dirs_exist_ok=True)
    return dest
  return copy


# SIGKILL, then a rerun that resumes bitwise (every loss and the final params against an
# uninterrupted run): tests/test_faults.py, which kills at random moments of the async writes.


@pytest.mark.slow
def test_sigterm_saves_and_rerun_continues(tmp_path):
  proc = subprocess.Popen(helpers.train_cmd(tmp_path, 1000, '--config.checkpoint.every=0'),
                          cwd=ROOT, env=helpers.cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  helpers.wait_for_step(tmp_path / 'metrics.jsonl', 8, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 8 <= saved[0] < 1000
  r = helpers.train_ok(tmp_path, saved[0] + 3, '--config.checkpoint.every=0')
  assert f'checkpoints/{saved[0]}' in r.stderr
  steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps[-3:] == [saved[0] + 1, saved[0] + 2, saved[0] + 3]


def _corrupt(step_dir: pathlib.Path):
  """Truncates every data file of the state item, as a half-copied or damaged disk would."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.stat().st_size > 0]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, trained):
  trained(10, tmp_path)
  _corrupt(tmp_path / 'checkpoints' / '10')
  r = helpers.train_ok(tmp_path, 12)
  assert 'checkpoints/10 is unreadable' in r.stderr
  assert 'Resumed from' in r.stderr and 'checkpoints/5' in r.stderr
  steps = [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps[-7:] == list(range(6, 13))
  assert (tmp_path / 'checkpoints' / 'unreadable_10').is_dir()  # set aside, not deleted
  assert (tmp_path / 'checkpoints' / '12').is_dir()


@pytest.mark.slow
def test_resume_on_fewer_devices(tmp_path):
  straight, moved = tmp_path / 'straight', tmp_path / 'moved'
  flat = '--config.optim.schedule=constant'  # the run lengths differ; the lr must not
  helpers.train_ok(straight, 15, flat)
  helpers.train_ok(moved, 10, flat)
  helpers.train_ok(moved, 15, flat, devices=4)
  a, b = helpers.logged_losses(straight), helpers.logged_losses(moved)
  np.testing.assert_allclose([b[s] for s in range(11, 16)], [a[s] for s in range(11, 16)],
                             rtol=1e-5)


@pytest.mark.slow
def test_other_model_shape_refuses_to_resume(tmp_path, trained):
  trained(5, tmp_path)
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  r = helpers.run_train(tmp_path, 10, '--config.model.embed_dim=32')
  assert r.returncode == 2
  assert 'model.embed_dim=32: expected 64 to resume' in r.stderr
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before


@pytest.mark.slow
def test_init_from_our_workdir_takes_params_only(tmp_path, trained):
  first, tuned = trained(10, tmp_path / 'first'), tmp_path / 'tuned'
  r = helpers.train_ok(tuned, 2, f'--config.checkpoint.init_from={first}')
  assert 'Took params from step 10' in r.stderr
  a, b = helpers.logged_losses(first), helpers.logged_losses(tuned)
  # Same data order as `first` began with, but trained params: lower loss on the same batch.
  assert b[1] < a[1] - 0.05
  assert sorted(b) == [1, 2]  # a fresh run: step counter and optimizer start over


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, trained):
  trained(5, tmp_path)
  r = helpers.run_train(tmp_path, 10, '--config.optim.lr=1e30')
  assert r.returncode == 1
  assert 'is not finite; stopping' in r.stderr and 'checkpoints is intact' in r.stderr
  saved = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == ['5']


def test_other_shape_or_layout_is_a_config_error_in_process(tmp_path):
  """The two refusals above without the CLI: a saved step, then configs it cannot resume."""
  c = helpers.small_config(model=dict(num_layers=2))
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(tmp_path), c)
  ckpt.save(5, train_state.setup(c, mesh).state, None, force=True)
  ckpt.close()
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  for change, error in ((dict(optim=dict(clip_norm=0.0)), 'train state layout differs'),
                        (dict(model=dict(embed_dim=32)), 'model.embed_dim=32: expected 64')):
    other = c.replace(**change)
    with pytest.raises(config_lib.ConfigError, match=error):
      checkpoint.Checkpointer(str(tmp_path), other).restore_latest(
          train_state.setup(other, mesh, abstract=True).abstract_state, None)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before


@pytest.mark.slow
def test_changed_state_layout_is_a_config_error_and_touches_nothing(tmp_path, trained):
  trained(5, tmp_path)
  before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  r = helpers.run_train(tmp_path, 10, '--config.optim.clip_norm=0')
  assert r.returncode == 2
  assert 'train state layout differs from the checkpoint' in r.stderr.splitlines()[-1]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before


def _start_pair(workdir, steps, log_prefix, *extra):
  """Two CLI processes x 4 devices joined by jax.distributed on localhost. Their output goes
  to files: two pipes read one after the other would deadlock once the unread one fills."""
  port = helpers.free_port()
  procs = []
  for i in range(2):
    with open(f'{log_prefix}_{i}.log', 'wb') as log:
      procs.append(subprocess.Popen(
          helpers.train_cmd(workdir, steps, f'--coordinator_address=localhost:{port}',
                            '--num_processes=2', f'--process_id={i}', *extra),
          cwd=ROOT, env=helpers.cli_env(4), stdout=log, stderr=subprocess.STDOUT))
  return procs


def _finish_pair(procs, log_prefix, timeout=900):
  rcs = [p.wait(timeout=timeout) for p in procs]
  texts = [pathlib.Path(f'{log_prefix}_{i}.log').read_text() for i in range(2)]
  assert rcs == [0, 0], texts[0][-2000:] + texts[1][-2000:]
  return texts


@pytest.mark.slow
def test_two_processes_preempt_save_and_resume_together(tmp_path):
  run, straight = tmp_path / 'run', tmp_path / 'straight'
  # The runs differ in num_steps, so the lr schedule must not depend on it.
  flags = ('--config.checkpoint.every=0', '--config.optim.schedule=constant')
  # SIGTERM reaches one process only (process 1, not the chief); both must save the same step.
  procs = _start_pair(run, 1000, tmp_path / 'preempted', *flags)
  helpers.wait_for_step(run / 'metrics.jsonl', 6, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  _finish_pair(procs, tmp_path / 'preempted', timeout=300)
  saved = sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(saved) == 1 and 6 <= saved[0] < 1000
  stop = saved[0]
  data = run / 'checkpoints' / str(stop) / 'data'
  assert sorted(p.name for p in data.glob('process_*')) == ['process_0-of-2.json',
                                                            'process_1-of-2.json']

  texts = _finish_pair(_start_pair(run, stop + 3, tmp_path / 'resumed', *flags),
                       tmp_path / 'resumed')
  assert all(f'Resumed from {run}/checkpoints/{stop}' in t for t in texts)

  _finish_pair(_start_pair(straight, stop + 3, tmp_path / 'straight', *flags),
               tmp_path / 'straight')
  a, b = helpers.logged_losses(straight), helpers.logged_losses(run)
  assert sorted(a) == sorted(b) == list(range(1, stop + 4))
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise: float equality


def test_a_write_into_a_shut_down_orbax_executor_is_retried_with_a_fresh_manager(tmp_path, caplog):
  """A background write that submits to an orbax executor already shut down (a close of the
  manager racing its own async save) fails with 'cannot schedule new futures after shutdown':
  the Checkpointer retries it through a fresh manager instead of ending the run. The race is
  forced here: the manager's metadata store is closed just before the save's final metadata
  update, which then meets the real, shut-down executor."""
  c = helpers.small_config(model=dict(num_layers=1))
  ckpt = checkpoint.Checkpointer(str(tmp_path), c)
  first = ckpt.manager
  store = first._non_blocking_metadata_store  # pylint: disable=protected-access
  update = store.update

  def closed_first(*args, **kwargs):
    store.close()
    return update(*args, **kwargs)

  store.update = closed_first
  state = {'params': {'w': jax.numpy.arange(8.0)}}
  try:
    assert ckpt.save(2, state, None, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  assert ckpt.manager is not first  # the retry's, with live executors
  assert checkpoint.latest_step(str(tmp_path)) == 2
  assert re.search(r'Checkpoint write to \S+ failed \(RuntimeError: cannot schedule new futures '
                   r'after shutdown\); retry 1 of 6', caplog.text), caplog.text
