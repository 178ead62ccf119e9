"""Config loading, command-line overrides and every validation error (one line, exit code 2)."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from configs import base, tiny
from gemma3_train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZE_CONFIGS = ['tiny', '270m', '1b', '4b', '12b', '27b']


def _load(name):
  import importlib
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', SIZE_CONFIGS)
def test_shipped_configs_validate(name):
  c = config_lib.from_config_dict(_load(name))
  if name in config_lib.PRESETS:
    for k, v in config_lib.PRESETS[name].items():
      assert getattr(c.model, k) == v, k


def test_presets_match_gemma3_table():
  # shared/GEMMA3.md A.1, column by column.
  p = config_lib.PRESETS
  assert [p[s]['num_layers'] for s in p] == [18, 26, 34, 48, 62]
  assert [p[s]['embed_dim'] for s in p] == [640, 1152, 2560, 3840, 5376]
  assert [p[s]['mlp_dim'] for s in p] == [2048, 6912, 10240, 15360, 21504]
  assert [(p[s]['num_heads'], p[s]['num_kv_heads']) for s in p] == [
      (4, 1), (4, 1), (8, 4), (16, 8), (32, 16)]
  assert [p[s]['head_dim'] for s in p] == [256, 256, 256, 256, 128]
  assert p['27b']['query_pre_attn_scalar'] == 5376 / 32 == 168
  assert [p[s]['sliding_window'] for s in p] == [512, 512, 1024, 1024, 1024]
  assert [p[s]['global_rope_scale'] for s in p] == [1, 1, 8, 8, 8]


def test_every_base_field_is_documented_and_declared_once():
  source = (ROOT / 'configs' / 'base.py').read_text()
  docs = config_lib.field_docs(source)
  names = [n for n, _, _ in docs]
  assert len(names) == len(set(names))
  declared = {f'{s}.{k}' for s, d in base.get_config().items() for k in d}
  assert set(names) == declared
  dataclass_fields = {f'{s.name}.{f.name}' for s in dataclasses.fields(config_lib.Config)
                      for f in dataclasses.fields(s.default.__class__)}
  assert declared == dataclass_fields


def test_round_trip_json():
  c = config_lib.from_config_dict(tiny.get_config())
  import json
  assert config_lib.from_dict(json.loads(c.to_json())) == c


@pytest.mark.parametrize('section,key,value,expected', [
    ('model', 'num_kv_heads', 3, 'model.num_kv_heads=3: expected a divisor of model.num_heads=4'),
    ('model', 'sliding_window', 0, 'model.sliding_window=0: expected a window > 0'),
    ('model', 'remat_policy', 'fast', "model.remat_policy='fast': expected none | full"),
    ('optim', 'schedule', 'step', "optim.schedule='step': expected cosine"),
    ('data', 'seq_len', 1, 'data.seq_len=1'),
    ('model', 'num_layers', 'six', "model.num_layers='six': expected int, got str"),
])
def test_validation_errors_name_the_field(section, key, value, expected):
  d = tiny.get_config().to_dict()
  d[section][key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.from_dict(d)
  assert str(e.value).startswith(expected)
  assert '\n' not in str(e.value)


def test_unknown_key_rejected():
  d = tiny.get_config().to_dict()
  d['optim']['lrr'] = 1.0
  with pytest.raises(config_lib.ConfigError, match=r'^optim\.lrr: unknown config field'):
    config_lib.from_dict(d)


def test_mesh_shape_fill_and_errors():
  c = config_lib.from_config_dict(tiny.get_config())
  assert config_lib.mesh_shape(c, 8)['fsdp'] == 8
  c2 = c.replace(mesh=dict(fsdp=4, tensor=2))
  assert config_lib.mesh_shape(c2, 8) == dict(dcn_data=1, dcn_fsdp=1, dcn_tensor=1, data=1,
                                              fsdp=4, tensor=2)
  with pytest.raises(config_lib.ConfigError, match=r'^mesh.*=\(1, 2, 2\): expected a product equal to the device count'):
    config_lib.mesh_shape(c.replace(mesh=dict(fsdp=2, tensor=2)), 8)
  with pytest.raises(config_lib.ConfigError,
                     match=r'^train.global_batch_size=6: .*divisible by the data-parallel degree 4'):
    config_lib.mesh_shape(c.replace(mesh=dict(fsdp=4, tensor=2), train=dict(global_batch_size=6)), 8)
  with pytest.raises(config_lib.ConfigError, match=r'^mesh.dcn_\*'):
    config_lib.mesh_shape(c.replace(mesh=dict(dcn_data=2)), 8, num_slices=1)


# --- the command line ------------------------------------------------------------


def _cli(*args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'gemma3_train.main', *args], cwd=cwd or ROOT,
                        capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize('override,expected', [
    ('--config.optim.lr=abc', "--config.optim.lr=abc: could not convert string to float"),
    ('--config.optim.lrr=1', '--config.optim.lrr: unknown config field'),
    ('--config.model.num_kv_heads=3', 'model.num_kv_heads=3: expected a divisor'),
    ('--config.model.sliding_window=-1', 'model.sliding_window=-1: expected a window > 0'),
    ('--config.mesh.fsdp=3', 'mesh.(data, fsdp, tensor)=(1, 3, 1): expected a product equal to the device'),
    ('--config.train.global_batch_size=3', 'train.global_batch_size=3: expected a batch'),
])
def test_bad_override_is_one_line_and_exit_2(tmp_path, override, expected):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('precious')
  env_devices = ['--config.mesh.fsdp=-1'] if 'mesh' not in override else []
  r = _cli('--config=configs/tiny.py', f'--workdir={workdir}', *env_devices, override)
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert expected in lines[0], lines[0]
  assert sorted(p.name for p in workdir.iterdir()) == ['keep.txt']  # nothing written


def test_missing_config_file_exit_2():
  r = _cli('--config=configs/nope.py', '--workdir=/tmp/unused')
  assert r.returncode == 2
  assert 'configs/nope.py' in r.stderr


def test_helpfull_lists_every_field():
  r = _cli('--helpfull')
  assert r.returncode == 0
  for name, _, doc in config_lib.field_docs((ROOT / 'configs' / 'base.py').read_text()):
    assert f'--config.{name}=' in r.stdout, name
  assert 'peak learning rate' in r.stdout
