"""ConfigDict -> frozen dataclasses at the boundary, validation, Gemma 3 size presets.

Library code only sees the dataclasses below. `from_config_dict` rejects unknown keys, wrong
types and impossible combinations with a ConfigError whose message is one line naming the
field, its value and what was expected; main.py turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import ml_collections

GLOBAL_EVERY = 6  # layer i is global (full attention) when i % 6 == 5

REMAT_POLICIES = ('none', 'full', 'minimal', 'save_decoder_layer_input', 'save_qkv_proj')
ATTENTION_IMPLS = ('reference', 'cudnn', 'splash', 'auto')
DTYPES = ('float32', 'bfloat16', 'float16')
SOURCES = ('bundled', 'synthetic', 'jsonl', 'parquet', 'arrayrecord', 'tfds')
SCHEDULES = ('cosine', 'linear', 'constant', 'wsd')


class ConfigError(ValueError):
  """A one-line, user-facing configuration error."""


# Exact Gemma 3 shapes (shared/GEMMA3.md A.1). Configs apply these with `model.update(...)`.
PRESETS: dict[str, dict[str, Any]] = {
    '270m': dict(num_layers=18, embed_dim=640, mlp_dim=2048, num_heads=4, num_kv_heads=1,
                 head_dim=256, query_pre_attn_scalar=256.0, sliding_window=512,
                 global_rope_scale=1.0),
    '1b': dict(num_layers=26, embed_dim=1152, mlp_dim=6912, num_heads=4, num_kv_heads=1,
               head_dim=256, query_pre_attn_scalar=256.0, sliding_window=512,
               global_rope_scale=1.0),
    '4b': dict(num_layers=34, embed_dim=2560, mlp_dim=10240, num_heads=8, num_kv_heads=4,
               head_dim=256, query_pre_attn_scalar=256.0, sliding_window=1024,
               global_rope_scale=8.0),
    '12b': dict(num_layers=48, embed_dim=3840, mlp_dim=15360, num_heads=16, num_kv_heads=8,
                head_dim=256, query_pre_attn_scalar=256.0, sliding_window=1024,
                global_rope_scale=8.0),
    '27b': dict(num_layers=62, embed_dim=5376, mlp_dim=21504, num_heads=32, num_kv_heads=16,
                head_dim=128, query_pre_attn_scalar=168.0, sliding_window=1024,
                global_rope_scale=8.0),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  preset: str = '1b'
  vocab_size: int = 262144
  num_layers: int = 26
  embed_dim: int = 1152
  mlp_dim: int = 6912
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 256
  query_pre_attn_scalar: float = 256.0
  sliding_window: int = 512
  local_rope_base: float = 10_000.0
  global_rope_base: float = 1_000_000.0
  global_rope_scale: float = 1.0
  rms_norm_eps: float = 1e-6
  param_dtype: str = 'float32'
  dtype: str = 'float32'
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_impl: str = 'auto'
  attention_block_size: int = 512

  @classmethod
  def from_preset(cls, name: str, **overrides) -> 'ModelConfig':
    return cls(preset=name, **{**PRESETS[name], **overrides})

  def is_global(self, layer: int) -> bool:
    return layer % GLOBAL_EVERY == GLOBAL_EVERY - 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  rules: str = ''


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = 'bundled'
  train_path: str = ''
  eval_path: str = ''
  format: str = 'text'
  text_field: str = 'text'
  messages_field: str = 'messages'
  tfds_name: str = ''
  tfds_eval_split: str = 'test'
  tokenizer_path: str = ''
  seq_len: int = 1024
  packing: bool = True
  shuffle: bool = True
  seed: int = 0
  num_workers: int = 0
  prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 3e-4
  schedule: str = 'cosine'
  warmup_steps: int = 100
  decay_fraction: float = 0.2
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_norms: bool = False
  decay_embedding: bool = False
  clip_norm: float = 1.0
  grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  num_steps: int = 1000
  global_batch_size: int = 8
  eval_every: int = 200
  eval_steps: int = 10
  loss_chunk_size: int = 1024
  z_loss: float = 0.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 200
  keep: int = 3
  keep_period: int = 0
  async_save: bool = True
  init_from: str = ''


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  log_every: int = 10
  tensorboard: bool = True
  profile_steps: str = ''
  peak_tflops: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  logging: LoggingConfig = LoggingConfig()

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  def replace(self, **sections) -> 'Config':
    """Returns a copy with fields changed, e.g. replace(train=dict(num_steps=5))."""
    new = {k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()}
    return dataclasses.replace(self, **new)


# --- conversion --------------------------------------------------------------


def _check_type(name: str, value: Any, annotation: str) -> Any:
  """Returns value coerced to the annotated scalar type, or raises ConfigError."""
  expected = {'int': int, 'float': float, 'bool': bool, 'str': str}[annotation]
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if expected is int and isinstance(value, bool):
    raise ConfigError(f'{name}={value!r}: expected an int, got a bool')
  if not isinstance(value, expected):
    raise ConfigError(f'{name}={value!r}: expected {annotation}, got {type(value).__name__}')
  return value


def _section(name: str, cls: type, values: dict[str, Any]) -> Any:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f'{name}.{unknown[0]}: unknown config field; expected one of '
                      f'{", ".join(sorted(fields))}')
  kwargs = {k: _check_type(f'{name}.{k}', v, fields[k].type) for k, v in values.items()}
  return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
  """Builds a validated Config from a nested dict (ConfigDict.to_dict() or a saved JSON)."""
  sections = {f.name: f for f in dataclasses.fields(Config)}
  unknown = sorted(set(values) - set(sections))
  if unknown:
    raise ConfigError(f'{unknown[0]}: unknown config section; expected one of '
                      f'{", ".join(sections)}')
  kwargs = {}
  for name, f in sections.items():
    section_values = values.get(name, {})
    if not isinstance(section_values, dict):
      raise ConfigError(f'{name}={section_values!r}: expected a section (dict)')
    kwargs[name] = _section(name, f.default.__class__, section_values)
  config = Config(**kwargs)
  validate(config)
  return config


def from_config_dict(c: ml_collections.ConfigDict) -> Config:
  return from_dict(c.to_dict())


# --- validation --------------------------------------------------------------


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
  if not ok:
    raise ConfigError(f'{name}={value!r}: expected {expected}')


def validate(c: Config) -> None:
  """Checks what can be checked without devices. Raises ConfigError (one line)."""
  m = c.model
  for k in ('vocab_size', 'num_layers', 'embed_dim', 'mlp_dim', 'num_heads', 'num_kv_heads',
            'head_dim', 'attention_block_size'):
    _require(getattr(m, k) > 0, f'model.{k}', getattr(m, k), 'a positive integer')
  _require(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads', m.num_kv_heads,
           f'a divisor of model.num_heads={m.num_heads}')
  _require(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim, 'an even number (RoPE halves)')
  _require(m.sliding_window > 0, 'model.sliding_window', m.sliding_window, 'a window > 0')
  _require(m.query_pre_attn_scalar > 0, 'model.query_pre_attn_scalar',
           m.query_pre_attn_scalar, 'a positive number')
  _require(m.global_rope_scale >= 1.0, 'model.global_rope_scale', m.global_rope_scale, '>= 1')
  _require(m.rms_norm_eps > 0, 'model.rms_norm_eps', m.rms_norm_eps, 'a positive number')
  for k in ('param_dtype', 'dtype'):
    _require(getattr(m, k) in DTYPES, f'model.{k}', getattr(m, k), ' | '.join(DTYPES))
  _require(m.remat_policy in REMAT_POLICIES, 'model.remat_policy', m.remat_policy,
           ' | '.join(REMAT_POLICIES))
  _require(m.attention_impl in ATTENTION_IMPLS, 'model.attention_impl', m.attention_impl,
           ' | '.join(ATTENTION_IMPLS))

  for k in ('data', 'fsdp', 'tensor', 'dcn_data', 'dcn_fsdp', 'dcn_tensor'):
    v = getattr(c.mesh, k)
    _require(v == -1 or v >= 1, f'mesh.{k}', v, 'a degree >= 1 or -1 (fill)')
  ici = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  _require(ici.count(-1) <= 1, 'mesh', tuple(ici), 'at most one of data/fsdp/tensor = -1')
  _require(c.mesh.rules == '' or re.fullmatch(r'\w+=[\w+]*(,\w+=[\w+]*)*', c.mesh.rules),
           'mesh.rules', c.mesh.rules, "'logical=axis[+axis],...' e.g. 'mlp=tensor,embed=fsdp'")

  d = c.data
  _require(d.source in SOURCES, 'data.source', d.source, ' | '.join(SOURCES))
  _require(d.format in ('text', 'chat'), 'data.format', d.format, 'text | chat')
  _require(d.seq_len > 1, 'data.seq_len', d.seq_len, 'an integer > 1')
  _require(d.num_workers >= 0, 'data.num_workers', d.num_workers, '>= 0')
  _require(d.prefetch >= 0, 'data.prefetch', d.prefetch, '>= 0')
  if d.source in ('jsonl', 'parquet', 'arrayrecord'):
    _require(bool(d.train_path), 'data.train_path', d.train_path,
             f'a file or glob for data.source={d.source!r}')
  if d.source == 'tfds':
    _require(bool(d.tfds_name), 'data.tfds_name', d.tfds_name, 'a TFDS dataset name')

  o = c.optim
  _require(o.lr >= 0, 'optim.lr', o.lr, 'a learning rate >= 0')
  _require(o.schedule in SCHEDULES, 'optim.schedule', o.schedule, ' | '.join(SCHEDULES))
  _require(o.warmup_steps >= 0, 'optim.warmup_steps', o.warmup_steps, '>= 0')
  _require(0 <= o.decay_fraction <= 1, 'optim.decay_fraction', o.decay_fraction, 'in [0, 1]')
  _require(0 <= o.min_lr_ratio <= 1, 'optim.min_lr_ratio', o.min_lr_ratio, 'in [0, 1]')
  _require(0 <= o.b1 < 1, 'optim.b1', o.b1, 'in [0, 1)')
  _require(0 <= o.b2 < 1, 'optim.b2', o.b2, 'in [0, 1)')
  _require(o.eps > 0, 'optim.eps', o.eps, '> 0')
  _require(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, '>= 0')
  _require(o.clip_norm >= 0, 'optim.clip_norm', o.clip_norm, '>= 0 (0 = off)')
  _require(o.grad_accum_steps >= 1, 'optim.grad_accum_steps', o.grad_accum_steps, '>= 1')

  t = c.train
  _require(t.num_steps >= 1, 'train.num_steps', t.num_steps, '>= 1')
  _require(t.global_batch_size >= 1, 'train.global_batch_size', t.global_batch_size, '>= 1')
  _require(t.global_batch_size % o.grad_accum_steps == 0, 'train.global_batch_size',
           t.global_batch_size, f'a multiple of optim.grad_accum_steps={o.grad_accum_steps}')
  _require(t.eval_every >= 0, 'train.eval_every', t.eval_every, '>= 0')
  _require(t.eval_steps >= 0, 'train.eval_steps', t.eval_steps, '>= 0')
  _require(t.loss_chunk_size >= 1, 'train.loss_chunk_size', t.loss_chunk_size, '>= 1')
  _require(t.z_loss >= 0, 'train.z_loss', t.z_loss, '>= 0')

  k = c.checkpoint
  _require(k.every >= 0, 'checkpoint.every', k.every, '>= 0')
  _require(k.keep >= 1, 'checkpoint.keep', k.keep, '>= 1')
  _require(k.keep_period >= 0, 'checkpoint.keep_period', k.keep_period, '>= 0')

  g = c.logging
  _require(g.log_every >= 1, 'logging.log_every', g.log_every, '>= 1')
  _require(g.peak_tflops >= 0, 'logging.peak_tflops', g.peak_tflops, '>= 0')
  _require(re.fullmatch(r'(\d+(,\d+)*)?', g.profile_steps) is not None,
           'logging.profile_steps', g.profile_steps, "a comma list of steps, e.g. '5,6'")


def mesh_shape(c: Config, num_devices: int, num_slices: int = 1) -> dict[str, int]:
  """Resolves -1 degrees against the device count; checks the product and the batch.

  Returns {'dcn_data', 'dcn_fsdp', 'dcn_tensor', 'data', 'fsdp', 'tensor'} with ICI degrees
  per slice. Raises ConfigError when the mesh cannot cover exactly num_devices devices or the
  global batch does not divide over the data-parallel degree.
  """
  m = c.mesh
  dcn = [m.dcn_data, m.dcn_fsdp, m.dcn_tensor]
  _require(-1 not in dcn, 'mesh.dcn_*', tuple(dcn), 'explicit degrees (no -1) across slices')
  _require(math.prod(dcn) == num_slices, 'mesh.dcn_*', tuple(dcn),
           f'a product equal to the number of slices ({num_slices})')
  per_slice, rem = divmod(num_devices, num_slices)
  _require(rem == 0, 'mesh.dcn_*', tuple(dcn), f'slices dividing {num_devices} devices')
  ici = [m.data, m.fsdp, m.tensor]
  if -1 in ici:
    known = math.prod(v for v in ici if v != -1)
    fill, rem = divmod(per_slice, known)
    _require(rem == 0 and fill >= 1, 'mesh', tuple(ici),
             f'degrees whose product divides the {per_slice} devices per slice')
    ici = [fill if v == -1 else v for v in ici]
  _require(math.prod(ici) == per_slice, 'mesh.(data, fsdp, tensor)', tuple(ici),
           f'a product equal to the device count ({per_slice} per slice)')
  shape = dict(dcn_data=dcn[0], dcn_fsdp=dcn[1], dcn_tensor=dcn[2],
               data=ici[0], fsdp=ici[1], tensor=ici[2])
  batch_degree = shape['data'] * shape['fsdp'] * shape['dcn_data'] * shape['dcn_fsdp']
  micro = c.train.global_batch_size // c.optim.grad_accum_steps
  _require(micro % batch_degree == 0, 'train.global_batch_size', c.train.global_batch_size,
           f'a batch (per microbatch: {micro}) divisible by the data-parallel degree '
           f'{batch_degree} (data x fsdp x dcn)')
  return shape


# --- documentation -----------------------------------------------------------

_FIELD_LINE = re.compile(r"^\s*c\.(\w+)\.(\w+)\s*=\s*(.+?)\s*#\s*(.+)$")


def field_docs(base_source: str) -> list[tuple[str, str, str]]:
  """(dotted name, default, comment) for every field line of configs/base.py."""
  out = []
  for line in base_source.splitlines():
    match = _FIELD_LINE.match(line)
    if match:
      section, key, default, doc = match.groups()
      out.append((f'{section}.{key}', default, doc))
  return out
