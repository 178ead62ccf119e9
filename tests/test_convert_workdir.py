"""Our training workdirs as a conversion source: load, export to HF, bad paths."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx

import gemma3_train
from configs import tiny
from gemma3_train.cli import convert as convert_cli
from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train import sharding
from gemma3_train.training import checkpoint
from gemma3_train.training import state as train_state

V = 512
# Longer than the tiny window (32), so the local layers' mask matters.
TOKENS = np.random.default_rng(0).integers(0, V, size=(2, 48)).astype(np.int32)

_forward = nnx.jit(lambda model, tokens: model(tokens))


def _logits(graphdef, params):
  """Reference: the saved params, brought to the host, in the training graph."""
  return np.asarray(_forward(nnx.merge(graphdef, jax.device_get(params)), TOKENS))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir with step 1 (fresh init) and step 2 (random params, norms included), plus an
  interrupted write and a set-aside step that must be ignored."""
  c = config_lib.from_config_dict(tiny.get_config()).replace(
      model=dict(vocab_size=V, num_layers=7), data=dict(source='synthetic', seq_len=32),
      train=dict(global_batch_size=8))
  s = train_state.setup(c, sharding.make_mesh(c))
  rng = np.random.default_rng(1)
  # Norm scales init to zero: random values make a skipped or swapped norm show.
  rand = lambda x: jax.device_put(
      (rng.standard_normal(x.shape) * 0.2).astype(x.dtype), x.sharding)
  state2 = {**s.state, 'params': jax.tree.map(rand, s.state['params'])}
  workdir = tmp_path_factory.mktemp('run')
  ckpt = checkpoint.Checkpointer(str(workdir), c)
  ckpt.save(1, s.state, None, force=True)
  ckpt.save(2, state2, None, force=True)
  ckpt.close()
  (workdir / 'checkpoints' / '9.orbax-checkpoint-tmp-123').mkdir()
  (workdir / 'checkpoints' / 'unreadable_8').mkdir()
  return workdir, c, s.graphdef, s.state['params'], state2['params']


def test_load_workdir_and_step_equal_training_logits_exactly(run, monkeypatch):
  workdir, c, graphdef, params1, params2 = run
  restored = []
  restore = ocp.PyTreeCheckpointer.restore
  def spy(self, *args, **kwargs):
    out = restore(self, *args, **kwargs)
    restored.append(sorted(out))
    return out
  monkeypatch.setattr(ocp.PyTreeCheckpointer, 'restore', spy)
  assert convert.checkpoint_kind(workdir) == 'train'
  src = convert.open_source(workdir)
  assert src.path == workdir / 'checkpoints' / '2'  # newest complete step
  assert src.cfg == c.model
  ours = np.asarray(_forward(gemma3_train.load(workdir), TOKENS))
  # One partial read per leaf group (streamed), each of params only: the optimizer moments
  # are never read.
  assert len(restored) > 1 and all(r == ['params'] for r in restored), restored
  assert ours.dtype == np.float32 and ours.shape == (2, 48, V)
  np.testing.assert_array_equal(ours, _logits(graphdef, params2))
  step1 = workdir / 'checkpoints' / '1'
  assert convert.checkpoint_kind(step1) == 'train'
  np.testing.assert_array_equal(np.asarray(_forward(gemma3_train.load(step1), TOKENS)),
                                _logits(graphdef, params1))
  cfg, top, layers = convert.load_canonical(workdir)
  assert cfg == c.model and len(layers) == 7 and top['embedding'].shape == (V, 64)


def test_cli_export_workdir_loads_in_transformers(run, tmp_path, capsys):
  workdir, _, graphdef, _, params2 = run
  hf_dir = tmp_path / 'hf'
  convert_cli.main(['export', f'--src={workdir}', f'--dst={hf_dir}', '--dtype=float32'])
  assert 'Gemma3ForCausalLM' in capsys.readouterr().out
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, output_loading_info=True, attn_implementation='eager')
  assert not any(info.values()), info
  with torch.no_grad():
    theirs = model.eval()(torch.from_numpy(TOKENS).long()).logits.float().numpy()
  ref = _logits(graphdef, params2)
  rel = float(np.max(np.abs(theirs - ref)) / np.max(np.abs(ref)))
  print('workdir export rel err', rel)
  assert rel < 1e-5


def test_bad_workdir_paths_are_one_line_errors(run, tmp_path, monkeypatch, capsys):
  workdir = run[0]
  empty = tmp_path / 'empty'
  (empty / 'checkpoints').mkdir(parents=True)
  cases = {empty: f'{empty / "checkpoints"}: no complete checkpoint',
           workdir / 'checkpoints' / '99': f'{workdir / "checkpoints" / "99"}: no such checkpoint '
                                           'step (steps here: [1, 2])',
           tmp_path: f'{tmp_path}: neither'}
  for path, message in cases.items():
    for read in (convert.load_canonical, gemma3_train.load):
      with pytest.raises(convert.ConversionError) as e:
        read(path)
      assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)
  monkeypatch.setattr('sys.argv', ['gemma3-convert', 'export', f'--src={empty}',
                                   f'--dst={tmp_path / "hf"}'])
  with pytest.raises(SystemExit) as e:
    convert_cli.run()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and str(empty / 'checkpoints') in err, err
