"""Config declaration, config files and every validation error (one line, naming the field)."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import base, tiny
from gemma3_train import config as config_lib
from gemma3_train.models import decoder as model_lib
from gemma3_train import sharding

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZE_CONFIGS = ['tiny', '270m', '1b', '4b', '12b', '27b']
SHIPPED = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


@pytest.mark.parametrize('name', SIZE_CONFIGS)
def test_shipped_configs_validate(name):
  c = config_lib.load_config_file(str(ROOT / 'configs' / f'{name}.py'))
  if name in config_lib.PRESETS:
    assert c.model.preset == name
    for k, v in config_lib.PRESETS[name].items():
      assert getattr(c.model, k) == v, k


# The rows of docs/gemma3.md's size table (the start of their labels) that give each PRESETS
# field.
DOC_ROWS = {'layers L': 'num_layers', 'width D': 'embed_dim', 'MLP hidden F': 'mlp_dim',
            'query heads N': 'num_heads', 'key/value heads K': 'num_kv_heads',
            'head width H': 'head_dim', 'query_pre_attn_scalar': 'query_pre_attn_scalar',
            'sliding window W': 'sliding_window', 'global RoPE linear scale': 'global_rope_scale'}


def _documented_sizes() -> dict[str, dict[str, float]]:
  """docs/gemma3.md section 1 (the published checkpoints' facts), read from the page:
  {row label: {size: the number its cell starts with (M dropped)}}, sizes in column order."""
  section = (ROOT / 'docs' / 'gemma3.md').read_text().split('\n## 1. Sizes\n')[1]
  lines = [l for l in section.split('\n## ')[0].splitlines() if l.startswith('|')]
  header, *rows = [[cell.strip() for cell in l.strip('|').split('|')] for l in lines]
  return {row[0]: {size: float(re.match(r'[\d.]+', cell).group())
                   for size, cell in zip(header[1:], row[1:], strict=True)}
          for row in rows[1:]}  # rows[0] is the |---| line


def test_presets_match_the_documented_sizes():
  table = _documented_sizes()
  assert list(config_lib.PRESETS) == list(table['layers L'])
  assert all(set(p) == set(DOC_ROWS.values()) for p in config_lib.PRESETS.values())
  for prefix, field in DOC_ROWS.items():
    (label,) = [l for l in table if l.startswith(prefix)]
    for size, documented in table[label].items():
      assert config_lib.PRESETS[size][field] == documented, (size, field)
  # And the shapes give the documented parameter counts (in millions).
  for size in config_lib.PRESETS:
    non_embedding, embedding = model_lib.param_count(config_lib.ModelConfig.from_preset(size))
    assert round(non_embedding / 1e6, 1) == table['non-embedding parameters'][size], size
    assert round(embedding / 1e6, 1) == table['embedding parameters (262144 x D)'][size], size


# --- one declaration: dataclasses -> ConfigDict, help ---------------------------------------


def _dataclass_defaults():
  """{dotted name: (annotation, default, help)} read off the dataclasses themselves."""
  out = {}
  for s in dataclasses.fields(config_lib.Config):
    for f in dataclasses.fields(type(s.default)):
      out[f'{s.name}.{f.name}'] = (f.type, f.default, f.metadata.get('help', ''))
  return out


def test_config_dict_holds_every_dataclass_default():
  declared = _dataclass_defaults()
  cd = config_lib.default_config_dict()
  flat = {f'{s}.{k}': v for s, section in cd.items() for k, v in section.items()}
  assert set(flat) == set(declared)
  for name, (annotation, default, _) in declared.items():
    assert type(default).__name__ == annotation, name  # 1.0 for a float, not 1
    assert flat[name] == default and type(flat[name]) is type(default), name
  assert config_lib.from_config_dict(cd) == config_lib.Config()
  assert base.get_config() == cd  # configs/base.py is the defaults, nothing else


def test_every_field_and_section_has_help():
  docs = config_lib.field_docs()
  assert [d.name for d in docs] == list(_dataclass_defaults())
  for d in docs:
    assert d.help.strip() and '\n' not in d.help, d.name
    assert d.default == _dataclass_defaults()[d.name][1]
  assert [s for s, _ in config_lib.sections()] == [f.name for f in
                                                    dataclasses.fields(config_lib.Config)]
  assert all(h for _, h in config_lib.sections())
  by_name = {d.name: d for d in docs}
  assert by_name['optim.lr'].default == 3e-4 and by_name['optim.lr'].help == 'peak learning rate'


def test_model_defaults_are_the_1b_preset():
  assert config_lib.ModelConfig() == config_lib.ModelConfig.from_preset('1b')


def test_round_trip_json():
  c = config_lib.from_config_dict(tiny.get_config())
  assert config_lib.from_dict(json.loads(c.to_json())) == c


# --- config files -------------------------------------------------------------------------


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_configs_load_without_the_repository_on_sys_path(name, tmp_path):
  # A fresh interpreter started outside the repository: `configs` is not importable there, so
  # a shipped config must take everything from the installed package.
  code = (f'import sys; from gemma3_train import config as c\n'
          f'preset = c.load_config_file({str(ROOT / "configs" / f"{name}.py")!r}).model.preset\n'
          f'assert "configs" not in sys.modules\n'
          f'print(preset)')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                     env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == config_lib.load_config_file(
      str(ROOT / 'configs' / f'{name}.py')).model.preset


def test_load_config_file_with_an_argument(tmp_path):
  path = tmp_path / 'sized.py'
  path.write_text('from gemma3_train import config as config_lib\n\n\n'
                  'def get_config(size):\n  c = config_lib.default_config_dict()\n'
                  '  c.model.update(config_lib.PRESETS[size])\n  c.model.preset = size\n'
                  '  return c\n')
  c = config_lib.load_config_file(f'{path}:4b')
  assert c.model == config_lib.ModelConfig.from_preset('4b')


@pytest.mark.parametrize('source,expected', [
    (None, 'no such config file'),
    ('x = (\n', "cannot load the config file (SyntaxError: '(' was never closed"),
    ('x = 1\n', 'defines no get_config()'),
    ('def get_config():\n  return {}\n', 'get_config() returned dict, expected an ml_collections'),
    ('def get_config():\n  raise RuntimeError("bad\\nthing")\n',
     'cannot load the config file (RuntimeError: bad thing)'),
    ('import no_such_module_xyz\n', "(ModuleNotFoundError: No module named 'no_such_module_xyz')"),
    ('from configs import base\n', 'start from `config_lib.default_config_dict()`'),
])
def test_broken_config_file_is_one_line_naming_the_file(tmp_path, monkeypatch, source, expected):
  path = tmp_path / 'my_config.py'
  if source is not None:
    path.write_text(source)
  if source and 'configs' in source:  # an older config, run where `configs` is not importable
    monkeypatch.delitem(sys.modules, 'configs', raising=False)
    monkeypatch.setattr(sys, 'path', [p for p in sys.path
                                      if pathlib.Path(p or '.').resolve() != ROOT])
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config_file(str(path))
  message = str(e.value)
  assert message.startswith(f'{path}: ') and '\n' not in message, message
  assert expected in message, message


def test_config_file_errors_validate_too(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text('from gemma3_train import config as config_lib\n\n\ndef get_config():\n'
                  '  c = config_lib.default_config_dict()\n  c.optim.b1 = 1.5\n  return c\n')
  with pytest.raises(config_lib.ConfigError, match=r'^optim\.b1=1\.5: expected in \[0, 1\)$'):
    config_lib.load_config_file(str(path))
  assert isinstance(config_lib.load_config_dict(str(path)), ml_collections.ConfigDict)


# --- validation -----------------------------------------------------------------------------


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
  assert sharding.mesh_shape(c, 8)['fsdp'] == 8
  c2 = c.replace(mesh=dict(fsdp=4, tensor=2))
  assert sharding.mesh_shape(c2, 8) == dict(dcn_data=1, dcn_fsdp=1, dcn_context=1,
                                              dcn_tensor=1, data=1, fsdp=4, context=1, tensor=2)
  with pytest.raises(config_lib.ConfigError,
                     match=r'^mesh.*=\(1, 2, 1, 2\): expected a product equal to the device count'):
    sharding.mesh_shape(c.replace(mesh=dict(fsdp=2, tensor=2)), 8)
  with pytest.raises(config_lib.ConfigError,
                     match=(r'^train.global_batch_size=6: .*divisible by '
                            r'the data-parallel degree 4')):
    sharding.mesh_shape(
        c.replace(mesh=dict(fsdp=4, tensor=2), train=dict(global_batch_size=6)), 8)
  with pytest.raises(config_lib.ConfigError, match=r'^mesh.dcn_\*'):
    sharding.mesh_shape(c.replace(mesh=dict(dcn_data=2)), 8, num_slices=1)
