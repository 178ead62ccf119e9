"""What a user reads at the end of a command (issue 29): gemma3-eval's default extent and its
progress line, the train run's summary line, `gemma3-convert info`, and export-lora's base."""

import io
import json
import os
import pathlib
import re
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma3_train.cli import convert as convert_cli
from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.infra import progress as progress_lib
from gemma3_train.models import decoder as model_lib
from gemma3_train.training import loop as train
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.executable).parent


def _script(name, *args):
  return subprocess.run([str(BIN / name), *args], cwd=ROOT, env=helpers.cli_env(devices=1),
                        capture_output=True, text=True, timeout=600)


# --- gemma3-eval ---------------------------------------------------------------------------


def test_progress_in_a_log_writes_the_last_count_once(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(progress_lib, 'clock', lambda: now[0])
  out = io.StringIO()
  with progress_lib.Progress('eval split', 3, 'batches', stream=out) as bar:
    for done in (1, 2, 3):
      now[0] += 10.0  # every update is due
      bar.update(done)
  assert out.getvalue().splitlines() == [
      'eval split: 1/3 batches (33%) | 0.1 batches/s | ETA 0m20s',
      'eval split: 2/3 batches (67%) | 0.1 batches/s | ETA 0m10s',
      'eval split: 3/3 batches (100%) | 0.1 batches/s | took 0m30s']


@pytest.fixture(scope='module')
def params_ckpt(tmp_path_factory):
  """Our params-only checkpoint of a 2-layer model of the Gemma 3 vocabulary."""
  cfg = config_lib.ModelConfig(preset='test', num_layers=2, embed_dim=16, mlp_dim=32,
                               num_heads=2, num_kv_heads=1, head_dim=8,
                               query_pre_attn_scalar=8.0, sliding_window=4)
  m = model_lib.Gemma3(cfg, rngs=nnx.Rngs(1))
  top, layers = layout.state_to_canonical(cfg, nnx.state(m, nnx.Param))
  path = tmp_path_factory.mktemp('eval') / 'ckpt'
  ours.save_params(path, cfg, top, enumerate(layers))
  return path


def test_eval_reads_train_eval_steps_by_default_with_an_eta(params_ckpt, tmp_path):
  r = _script('gemma3-eval', f'--ckpt={params_ckpt}', '--config=configs/tiny.py',
              '--config.train.eval_steps=3', '--config.data.seq_len=32')
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout)['batches'] == 3
  err = r.stderr.splitlines()
  assert ("gemma3-eval: 3 batches of 8 x 32 tokens from the eval split (the config's "
          'train.eval_steps; --max_batches=N for N, 0 for the whole split)') in err
  progress = [l for l in err if l.startswith('eval split: ')]
  assert re.fullmatch(r'eval split: 1/3 batches \(33%\) \| \S+ batches/s \| ETA \dm\d\ds',
                      progress[0]), progress
  assert re.fullmatch(r'eval split: 3/3 batches \(100%\) \| \S+ batches/s \| took \dm\d\ds',
                      progress[-1]), progress
  assert sum('3/3' in l for l in progress) == 1  # the last count once
  # --max_batches=0: the whole split (a 3-document file, one batch of 8 rows), no ETA.
  docs = tmp_path / 'docs.jsonl'
  docs.write_text(''.join(json.dumps({'text': f'Document {i}.'}) + '\n' for i in range(3)))
  r = _script('gemma3-eval', f'--ckpt={params_ckpt}', '--config=configs/tiny.py',
              '--max_batches=0', '--config.data.seq_len=32', '--config.data.source=jsonl',
              f'--config.data.train_path={docs}', f'--config.data.eval_path={docs}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout)['batches'] == 1
  assert 'gemma3-eval: the whole eval split, in batches of 8 x 32 tokens' in r.stderr
  progress = [l for l in r.stderr.splitlines() if l.startswith('eval split: ')]
  assert progress[-1].startswith('eval split: 1 batches | ') and 'ETA' not in r.stderr


# --- the train run's last line -------------------------------------------------------------


@pytest.mark.slow
def test_training_ends_with_one_summary_line(tmp_path):
  flags = [*helpers.SMALL_FLAGS, f'--workdir={tmp_path}', '--config.train.eval_every=2',
           '--config.train.eval_steps=1']
  r = _script('gemma3-train', *flags, '--config.train.num_steps=3')
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  loss = [x['loss'] for x in rows if 'loss' in x][-1]
  eval_loss = [x['eval_loss'] for x in rows if 'eval_loss' in x][-1]
  tokens = sum(x['tokens'] for x in rows if 'loss' in x)  # the weighted targets of each step
  last = r.stdout.splitlines()[-1]
  assert re.fullmatch(
      rf'Finished at step 3/3 \| loss {loss:.4f} \| eval_loss {eval_loss:.4f} \(step 2\) \| '
      rf'\dm\d\ds wall \| {tokens:,.0f} tokens \| checkpoint step 3 written to '
      rf'{re.escape(str(tmp_path / "checkpoints" / "3"))}', last), last
  assert (tmp_path / 'checkpoints' / '3' / 'state').is_dir()
  assert sum(l.startswith('Finished') for l in r.stdout.splitlines() + r.stderr.splitlines()) == 1
  # A resume names the steps its tokens count.
  r = _script('gemma3-train', *flags, '--config.train.num_steps=5')
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  tokens = sum(x['tokens'] for x in rows if 'loss' in x and x['step'] > 3)
  last = r.stdout.splitlines()[-1]
  assert last.startswith('Finished at step 5/5 | loss '), last
  assert f'| {tokens:,.0f} tokens (steps 3..5) |' in last, last
  assert last.endswith(f'checkpoint step 5 written to {tmp_path / "checkpoints" / "5"}')


# --- gemma3-convert info and export-lora ---------------------------------------------------


TOKENS = np.random.default_rng(0).integers(0, helpers.REFERENCE_VOCAB, (2, 12)).astype(np.int32)


def _lora_config(cfg, init_from):
  return config_lib.Config(model=cfg).replace(
      data=dict(source='synthetic', seq_len=32),
      train=dict(num_steps=2, global_batch_size=8, eval_every=0, loss_chunk_size=16),
      optim=dict(warmup_steps=0, schedule='constant', lr=2e-2),
      logging=dict(tensorboard=False, log_every=1), checkpoint=dict(every=0, init_from=init_from),
      lora=dict(rank=4, alpha=8.0, targets='q,v,down'))


@pytest.fixture(scope='module')
def lora_runs(tmp_path_factory):
  """A random HF base, our import of it, and a LoRA run of 2 steps on each."""
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES['gqa_ropescale_scanned'])
  root = tmp_path_factory.mktemp('lora')
  hf_model = helpers.reference_hf_model(hf_cfg, seed=3)
  hf_model.save_pretrained(root / 'hf_base')
  convert.import_checkpoint(root / 'hf_base', root / 'our_base', progress=False)
  runs = {}
  for name in ('hf_base', 'our_base'):
    train.train_and_evaluate(_lora_config(cfg, str(root / name)), str(root / f'run_{name}'))
    runs[name] = root / f'run_{name}'
  return root, runs


def _info(path, capsys):
  capsys.readouterr()
  convert_cli.main(['info', f'--src={path}'])
  return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_info_says_what_a_checkpoint_is(lora_runs, capsys):
  root, runs = lora_runs
  got = _info(runs['our_base'], capsys)
  assert got['kind'] == 'lora' and got['step'] == 2
  assert got['path'] == str(runs['our_base'] / 'checkpoints' / '2')
  assert got['base'] == str(root / 'our_base')
  assert got['lora']['rank'] == 4 and got['lora']['targets'] == 'q,v,down'
  assert got['model']['num_layers'] == 8 and got['model']['vision'] is False
  assert not any(k.startswith('vision_') for k in got['model'])
  params = _info(root / 'our_base', capsys)
  assert params['kind'] == 'params' and 'step' not in params and 'lora' not in params
  assert _info(root / 'hf_base', capsys)['kind'] == 'hf'


def _modes(path):
  return {p.name: stat.S_IMODE(p.stat().st_mode) for p in pathlib.Path(path).rglob('*')
          if p.is_file()}


@pytest.mark.slow
def test_exported_adapters_load_by_their_base_path_alone(lora_runs, tmp_path, capsys):
  import peft  # pylint: disable=g-import-not-at-top
  root, runs = lora_runs
  mask = os.umask(0)
  os.umask(mask)

  def peft_logits(adapter):
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    return helpers.hf_logits(model, TOKENS)

  # init_from a Hugging Face directory: the adapter names it.
  convert_cli.main(['export-lora', f'--src={runs["hf_base"]}', f'--dst={tmp_path / "a"}'])
  assert 'base_model_name_or_path ' + str(root / 'hf_base') in capsys.readouterr().out
  config = json.loads((tmp_path / 'a' / 'adapter_config.json').read_text())
  assert config['base_model_name_or_path'] == str(root / 'hf_base')
  want = np.asarray(convert.load(runs['hf_base'])(jnp.asarray(TOKENS)))
  np.testing.assert_allclose(peft_logits(tmp_path / 'a'), want, rtol=1e-4, atol=1e-4)
  # init_from our Orbax checkpoint: null without --with_base, DST/base with it.
  convert_cli.main(['export-lora', f'--src={runs["our_base"]}', f'--dst={tmp_path / "b"}'])
  assert 'base_model_name_or_path null' in capsys.readouterr().out
  assert json.loads((tmp_path / 'b' / 'adapter_config.json').read_text())[
      'base_model_name_or_path'] is None
  convert_cli.main(['export-lora', f'--src={runs["our_base"]}', f'--dst={tmp_path / "c"}',
                    '--with_base', '--dtype=float32'])
  config = json.loads((tmp_path / 'c' / 'adapter_config.json').read_text())
  assert config['base_model_name_or_path'] == str(tmp_path / 'c' / 'base')
  assert (tmp_path / 'c' / 'base' / 'model.safetensors').is_file()
  want = np.asarray(convert.load(runs['our_base'])(jnp.asarray(TOKENS)))
  np.testing.assert_allclose(peft_logits(tmp_path / 'c'), want, rtol=1e-4, atol=1e-4)
  # Every written file has the mode open() gives (0644 under umask 022), safetensors included.
  modes = _modes(tmp_path / 'c')
  assert {'model.safetensors', 'config.json', 'adapter_model.safetensors'} <= set(modes)
  assert set(modes.values()) == {0o666 & ~mask}, modes
  info = _info(tmp_path / 'c', capsys)
  assert info['kind'] == 'peft' and info['base'] == str(tmp_path / 'c' / 'base')
  assert info['lora']['r'] == 4
