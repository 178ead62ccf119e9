"""gs:// for real, against a local GCS emulator (tests/gcs_emulator.py): the workdir lease with
generation preconditions; workdir, data and tokenizer on gs://; SIGTERM, resume, the
corrupt-checkpoint fallback and `gemma3-convert export` there; and the emulator stopped during a
checkpoint write (retried with backoff and logged, not fatal)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from gemma3_train.data import sources
from gemma3_train.infra import lease
from tests import helpers
from tests.gcs_emulator import gcs  # pylint: disable=unused-import  # the fixture

ROOT = helpers.ROOT


def _steps(workdir: str) -> list[int]:
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(l)['step'] for l in path.read_text().splitlines() if l.strip()]


def _complete(workdir: str) -> list[int]:
  from gemma3_train.convert import ours  # pylint: disable=g-import-not-at-top
  return ours.complete_steps(epath.Path(workdir) / 'checkpoints')


def test_gcs_lease_uses_generation_preconditions(gcs):
  del gcs
  workdir = 'gs://run/lease'
  first = lease.Lease(workdir, timeout_s=30)
  first.acquire()
  try:
    with pytest.raises(lease.LeaseHeldError, match=r'host \S+, pid \d+, since '):
      lease.Lease(workdir, timeout_s=30).acquire()
    first.beat()  # a conditional replace of our own generation
    assert not first.lost
  finally:
    first.release()
  assert not epath.Path(workdir, 'LEASE').exists()
  then = time.time() - 3600
  dead = lease.Holder(host='gone-host', pid=7, started=then, heartbeat=then, run_id='dead')
  epath.Path(workdir, 'LEASE').write_bytes(dead.to_bytes())
  taker = lease.Lease(workdir, timeout_s=60)
  taker.acquire()
  try:
    # The dead holder's conditional heartbeat (its generation) can no longer win.
    assert lease.Holder.from_bytes(epath.Path(workdir, 'LEASE').read_bytes()).run_id == (
        taker.holder.run_id)
  finally:
    taker.release()


@pytest.fixture(scope='module')
def text_run(gcs):
  """The tiny config (one layer) trained 3 steps on the bundled text, every path on gs://."""
  del gcs
  epath.Path('gs://run/data/train.jsonl.gz').write_bytes(
      epath.Path(sources.bundled_path('train')).read_bytes())
  tok = ROOT / 'gemma3_train' / 'assets' / 'tokenizer_gemma3.model'
  epath.Path('gs://run/tok/tokenizer.model').write_bytes(tok.read_bytes())
  workdir = 'gs://run/text'
  r = subprocess.run(
      [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
       f'--workdir={workdir}', '--config.train.num_steps=3', '--config.train.eval_every=0',
       '--config.model.num_layers=1', '--config.data.source=jsonl',
       '--config.data.train_path=gs://run/data/train.jsonl.gz',
       '--config.data.tokenizer_path=gs://run/tok/tokenizer.model',
       '--config.logging.tensorboard=False', '--config.logging.log_every=1'],
      cwd=ROOT, env=helpers.cli_env(), capture_output=True, text=True, timeout=900)
  return workdir, r


@pytest.mark.slow
def test_gcs_workdir_data_and_tokenizer_train(text_run):
  workdir, r = text_run
  assert r.returncode == 0, r.stderr[-3000:]
  assert _steps(workdir) == [1, 2, 3] and _complete(workdir) == [3]
  assert not epath.Path(workdir, 'LEASE').exists()


def _logits_of_the_newest_checkpoint(workdir: str, tokens: np.ndarray) -> np.ndarray:
  """Our model's float32 logits with the params of the workdir's newest checkpoint, restored
  from there by training's Checkpointer with the config saved beside them."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import checkpoint  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import state as train_state  # pylint: disable=g-import-not-at-top
  step_dir = epath.Path(workdir, 'checkpoints', str(_complete(workdir)[-1]))
  c = config_lib.from_dict(checkpoint.saved_config(step_dir))
  assert c.model.dtype == c.model.param_dtype == 'float32'
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  assert not s.abstract_state['frozen']  # the trained model is its params alone
  ckpt = checkpoint.Checkpointer(workdir, c)
  try:
    state, _ = ckpt.restore_latest(train_state.saved(s.abstract_state), None)
  finally:
    ckpt.close()
  model = nnx.merge(s.graphdef, state['params'])
  return np.asarray(jax.jit(lambda t: model(t))(tokens))


@pytest.mark.slow
def test_gcs_export_from_a_gs_workdir(text_run, tmp_path):
  workdir, r = text_run
  assert r.returncode == 0, r.stderr[-3000:]
  hf = tmp_path / 'hf'
  r = subprocess.run(
      [sys.executable, '-m', 'gemma3_train.cli.convert', 'export', f'--src={workdir}',
       f'--dst={hf}', '--dtype=float32', '--tokenizer=gs://run/tok/tokenizer.model'],
      cwd=ROOT, env=helpers.cli_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
  tokens = np.array([[2, *np.random.default_rng(0).integers(3, 262144, 15)]], np.int32)
  got = helpers.hf_logits(model, tokens)
  # The reference: the same checkpoint read back from gs:// by the trainer's own restore and
  # run by our model (JAX), not by the converter nor by transformers.
  want = _logits_of_the_newest_checkpoint(workdir, tokens)
  assert got.shape == want.shape == (1, 16, 262144)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  tok = ROOT / 'gemma3_train' / 'assets' / 'tokenizer_gemma3.model'
  assert (hf / 'tokenizer.model').read_bytes() == tok.read_bytes()


@pytest.mark.slow
def test_gcs_sigterm_resume_and_corrupt_checkpoint_fallback(gcs):
  del gcs
  workdir = 'gs://run/small'
  proc = subprocess.Popen(helpers.train_cmd(workdir, 1000), cwd=ROOT, env=helpers.cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not any(s >= 12 for s in _steps(workdir)):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = _complete(workdir)
  stop = saved[-1]
  assert stop >= 12 and 10 in saved, saved
  # Damage the newest checkpoint's array data, as a half-copied bucket would.
  state = epath.Path(workdir, 'checkpoints', str(stop), 'state')
  files = [p for d in state.glob('ocdbt.process_*/d') for p in d.iterdir()]
  assert files
  for p in files:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 3])
  r = helpers.run_train(workdir, stop + 3)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'checkpoints/{stop} is unreadable' in r.stderr
  previous = max(s for s in saved if s < stop)
  assert re.search(rf'Resumed from \S+/checkpoints/{previous}\b', r.stderr)
  assert _steps(workdir)[-(stop + 3 - previous):] == list(range(previous + 1, stop + 4))
  assert epath.Path(workdir, 'checkpoints', f'unreadable_{stop}').exists()


def _wait_for(done, log_path, proc, timeout: float = 600, required: bool = True) -> None:
  """Until done(the run's log so far); the run must not end first. Past the timeout: a
  failure, or (required=False) the end of the wait."""
  deadline = time.time() + timeout
  while not done(log_path.read_text()):
    assert proc.poll() is None, log_path.read_text()[-3000:]
    if time.time() >= deadline:
      assert not required, log_path.read_text()[-3000:]
      return
    time.sleep(0.05)


def _same_final_loss_as_a_local_run(workdir: str, local: pathlib.Path, steps: int,
                                    flags: list[str]) -> pathlib.Path:
  """Trains the same run in the local dir `local` and checks both logged the same final loss."""
  helpers.train_ok(local, steps, *flags)
  a = json.loads(epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()[-1])
  b = json.loads((local / 'metrics.jsonl').read_text().splitlines()[-1])
  assert a['step'] == b['step'] == steps and a['loss'] == b['loss']
  return local


@pytest.mark.slow
def test_gcs_outage_during_a_save_is_retried_and_logged(gcs, tmp_path):
  """The emulator is stopped for 8 s while a checkpoint is being written, then started again:
  the requests are retried with backoff (gcsfs's and tensorstore's retries; Checkpointer's own
  retry takes over past them), a WARNING says so, and the run finishes with the same losses as
  one without the outage."""
  workdir = 'gs://run/outage'
  quiet = ['--config.checkpoint.every=2', '--config.logging.log_every=1000']
  log_path = tmp_path / 'run.log'
  with open(log_path, 'w') as err:
    proc = subprocess.Popen(helpers.train_cmd(workdir, 12, *quiet), cwd=ROOT, env=helpers.cli_env(),
                            stdout=subprocess.DEVNULL, stderr=err)
    _wait_for(lambda t: 'Checkpoint for step 4 being written' in t, log_path, proc)
    gcs.stop()
    time.sleep(8)
    gcs.start()
    proc.wait(timeout=900)
  text = log_path.read_text()
  assert proc.returncode == 0, text[-3000:]
  assert 'Storage request retried with backoff' in text, text[-3000:]
  assert 12 in _complete(workdir)
  _same_final_loss_as_a_local_run(workdir, tmp_path / 'local', 12, quiet)


@pytest.mark.slow
def test_gcs_outage_past_gcsfs_retries_is_retried_by_the_checkpointer(gcs, tmp_path):
  """Two outages, each past gcsfs's own retries (its 6 tries of a request, and a bucket check
  that fails falls back to a listing: twice that). The first, during the async write of step
  4, fails that write, so the Checkpointer's retry takes over at the next save; the second,
  right after its retry WARNING, fails the reopening of the CheckpointManager (a closed one
  must not be used). The retry reopens it and writes the next step's checkpoint, and the run
  ends with an uninterrupted run's final loss and params, bitwise. The run's storage clients
  back off a tenth as long (tests/gcsfs_fast_backoff: gcsfs out of retries after ~3.5 s, not
  ~35 s; google-cloud-storage's deadline 12 s, not 120 s; the same retry loops), or the outages
  alone would take 2 to 4 minutes."""
  workdir = 'gs://run/long_outage'
  # A logged step rewrites metrics.jsonl on gs:// (gcsfs's retries only): none in the outage.
  quiet = ['--config.checkpoint.every=2', '--config.logging.log_every=1000']
  log_path = tmp_path / 'run.log'
  env = helpers.cli_env()
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT / 'tests' / 'gcsfs_fast_backoff'), *filter(None, [env.get('PYTHONPATH')])])
  with open(log_path, 'w') as err:
    proc = subprocess.Popen(helpers.train_cmd(workdir, 12, *quiet), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
      _wait_for(lambda t: 'Checkpoint for step 4 being written' in t, log_path, proc)
      gcs.stop()
      # gcsfs gives up twice: the bucket check (swallowed, it then lists) and the request. The
      # request's failure is what the Checkpointer retries; in one run of three the second
      # request sat silent with storage down (orbax's metadata threads idle in their event
      # loops for 10 minutes), so storage comes back 120 s after the first at the latest.
      _wait_for(lambda t: t.count('out of retries') >= 1, log_path, proc)
      _wait_for(lambda t: t.count('out of retries') >= 2, log_path, proc, timeout=120,
                required=False)
      gcs.start()
      _wait_for(lambda t: 'Checkpoint write to' in t, log_path, proc)
      gcs.stop()
      _wait_for(lambda t: 'Could not reopen' in t, log_path, proc)
      gcs.start()
      proc.wait(timeout=600)
    finally:
      proc.kill()
      if gcs.proc is None:
        gcs.start()
  text = log_path.read_text()
  assert proc.returncode == 0, text[-3000:]
  assert re.search(r'Checkpoint write to gs://run/long_outage/checkpoints failed \(.*\); '
                   r'retry 1 of 6 in 1 s', text), text[-3000:]
  assert re.search(r'Checkpoint for step 6 written to \S+ after 1 retries', text), text[-3000:]
  assert 'Traceback' not in text and 'cannot schedule new futures' not in text, text[-3000:]
  assert 12 in _complete(workdir)
  local = _same_final_loss_as_a_local_run(workdir, tmp_path / 'local', 12, quiet)
  for x, y in zip(helpers.final_params(workdir, tmp_path / 'gcs.npz'), helpers.final_params(local),
                  strict=True):
    np.testing.assert_array_equal(x, y)
