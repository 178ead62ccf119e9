"""LoRA runs as Hugging Face PEFT adapters: export, import, merge, and the adapted model.

A LoRA run's workdir (lora.rank > 0) holds in WORKDIR/checkpoints/<step>/state only the trainable
params (lora.py: the adapters, and the embedding with lora.train_embedding), the optimizer state
and the step; its saved config names the frozen base (checkpoint.init_from, or none: the seed's
random init) and the lora section.

PEFT's format (what peft.PeftModel.save_pretrained writes for a transformers Gemma3ForCausalLM):
`adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
target_modules by module name) and `adapter_model.safetensors` with, per decoder layer i and
adapted Linear, `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] (HF's [out, in] Linear layout; the update is B A * lora_alpha / r).
Our A [in..., r] and B [r, out...] flatten their axes in the same order as HF's q_proj
[N*H, D] and o_proj [D, N*H] do (head-major), so lora_A = A.reshape(-1, r).T and
lora_B = B.reshape(r, -1).T.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import hf
from gemma3_train.convert import hf_tokenizer
from gemma3_train.convert import layout
from gemma3_train.convert import orbax_tree
from gemma3_train.convert import ours
from gemma3_train.convert import run_source
from gemma3_train.convert import source
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source
from gemma3_train.models import decoder as model_lib
from gemma3_train.models import lora

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
# Our target -> the HF Gemma 3 decoder layer's module.
HF_MODULES = {'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
              'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
              'down': 'mlp.down_proj'}
# Where PEFT puts a Gemma3ForCausalLM's decoder layers (and a Gemma3ForConditionalGeneration's).
PEFT_PREFIXES = ('base_model.model.model.layers.',
                 'base_model.model.model.language_model.layers.')


def _module(target: str) -> str:
  return 'attn' if target in ('q', 'k', 'v', 'o') else 'mlp'


def adapter_path(cfg: config_lib.ModelConfig, i: int, target: str, part: str
                 ) -> tuple[tuple, int | None]:
  """(state path, stacked block index or None) of layer i's adapter matrix part 'a' | 'b'."""
  prefix, block = layout.layer_prefix(cfg, i)
  return prefix + (_module(target), f'{target}_lora', part), block


def _key(path: tuple) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


# --- a LoRA workdir ------------------------------------------------------------


def lora_run_config(path) -> config_lib.Config | None:
  """The Config of a LoRA run's workdir or step directory; None for anything else."""
  c = run_source.run_config(path)
  return c if c is not None and c.lora.rank else None


def read_trainables(path) -> tuple[config_lib.Config, dict[tuple[str, ...], np.ndarray]]:
  """(config, {state path as strings: array}) of a LoRA run's newest (or given) step."""
  c = lora_run_config(path)
  if c is None:
    raise ConversionError(f'{path}: not a LoRA training workdir (lora.rank > 0)')
  state_dir = ours.train_step_dir(path) / 'state'
  meta = orbax_tree.leaves(state_dir)
  stored = {(k[1:-1] if k[-1] == 'value' else k[1:]): k for k in meta if k[0] == 'params'}
  abstract = nnx.eval_shape(lambda: model_lib.build(c, nnx.Rngs(0)))
  out = {}
  values = orbax_tree.read(state_dir, list(stored.values()), meta)
  for p, var in nnx.to_flat_state(nnx.state(abstract, lora.TRAINABLE)):
    k = _key(p)
    if k not in stored or tuple(values[stored[k]].shape) != tuple(var.shape):
      raise ConversionError(f'{state_dir}: params/{"/".join(k)} missing or not shaped '
                            f'{tuple(var.shape)}')
    out[k] = values[stored[k]]
  return c, out


def _delta(a: np.ndarray, b: np.ndarray, weight: str) -> np.ndarray:
  """A [in..., r] B [r, out...] -> the weight's update in its own axis order."""
  in_axes = lora.TARGETS[lora.WEIGHT_TARGET[weight]][1]
  d = np.tensordot(a.astype(np.float32), b.astype(np.float32), axes=([-1], [0]))
  n_in, ndim = len(in_axes), d.ndim
  out_axes = [j for j in range(ndim) if j not in in_axes]
  perm = [in_axes.index(j) if j in in_axes else n_in + out_axes.index(j) for j in range(ndim)]
  return np.transpose(d, perm)


class MergedSource(Source):
  """A LoRA run read as a plain checkpoint: its base with the adapters folded in (W + B A * s),
  in float32, and its trained embedding with lora.train_embedding."""

  def __init__(self, path, open_source: run_source.OpenSource):
    self.run, self.trainables = read_trainables(path)
    self.path = ours.train_step_dir(path)
    self.base = run_source.init_source(self.run, open_source)
    self.cfg = self.base.cfg

  def order(self):
    return self.base.order()

  # A LoRA run keeps the whole image path (tower and projector) in its frozen base.
  def vision(self):
    return self.base.vision()

  def has_vision(self):
    return self.base.has_vision()

  def top(self):
    top = dict(self.base.top())
    emb = self.trainables.get(_key(layout.TOP_PATHS['embedding']))
    if emb is not None:
      top['embedding'] = emb
    return top

  def layer(self, i):
    leaves = {k: np.asarray(v, np.float32)
              for k, v in layout.layer_to_leaves(self.base.layer(i)).items()}
    s = lora.scaling(self.run.lora)
    for target in self.run.lora.target_list():
      a, b = (_take(self.trainables, self.run.model, i, target, part) for part in 'ab')
      weight = lora.TARGETS[target][0]
      leaves[(_module(target), weight)] = leaves[(_module(target), weight)] + s * _delta(
          a, b, weight)
    return layout.leaves_to_layer(lambda sub: leaves[sub])


def _take(trainables, cfg, i, target, part) -> np.ndarray:
  path, block = adapter_path(cfg, i, target, part)
  x = trainables[_key(path)]
  return x if block is None else x[block]


def open_lora_source(path, open_source: run_source.OpenSource) -> MergedSource | None:
  """A MergedSource when path is a LoRA run's workdir or step, else None."""
  return MergedSource(path, open_source) if lora_run_config(path) is not None else None


def load_adapted(path, open_source: run_source.OpenSource, model_cls=None,
                 **model_overrides) -> nnx.Module:
  """The adapted model of a LoRA workdir: its base (in lora.base_dtype) plus its adapters,
  computing what training computed."""
  c, trainables = read_trainables(path)
  c = c.replace(model=model_overrides)
  model_cls = model_cls or model_lib.Gemma3
  model = nnx.eval_shape(lambda: lora.adapt(model_cls(c.model, rngs=nnx.Rngs(0)), c))
  src = run_source.init_source(c, open_source)
  by_index = dict(source.layers(src))
  plain = layout.canonical_to_state(c.model, src.top(),
                                    [by_index[i] for i in range(c.model.num_layers)])
  base = lora.base_from_params(plain, nnx.state(model, lora.FROZEN))
  flat = [(p, var.replace(jnp.asarray(trainables[_key(p)])))
          for p, var in nnx.to_flat_state(nnx.state(model, lora.TRAINABLE))]
  nnx.update(model, base, nnx.from_flat_state(flat))
  return model


# --- PEFT export ---------------------------------------------------------------


def hf_base(c: config_lib.Config) -> str | None:
  """The absolute path of the run's base when checkpoint.init_from is a Hugging Face directory
  (config.json + safetensors) on local disk, the one base_model_name_or_path PEFT can load;
  else None (one of our checkpoints, Kaggle, a random init, a URL)."""
  if not c.checkpoint.init_from or '://' in c.checkpoint.init_from:
    return None
  path = source.absolute(c.checkpoint.init_from)
  hf_dir = ((path / 'config.json').exists() and not (path / ours.PARAMS_CONFIG).exists()
            and any(path.glob('*.safetensors')))
  return str(path) if hf_dir else None


def adapter_config(c: config_lib.Config, base: str | None = None) -> dict[str, Any]:
  """adapter_config.json for PEFT (fields PEFT leaves out take its defaults); `base` is
  base_model_name_or_path, a Hugging Face directory (None: none that PEFT could load)."""
  return {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
          'base_model_name_or_path': base,
          'r': c.lora.rank, 'lora_alpha': c.lora.alpha, 'lora_dropout': c.lora.dropout,
          'target_modules': sorted(HF_MODULES[t].split('.')[-1] for t in c.lora.target_list()),
          'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False,
          'init_lora_weights': True, 'modules_to_save': None, 'inference_mode': True}


def adapter_tensors(c: config_lib.Config, trainables) -> dict[str, np.ndarray]:
  """PEFT's adapter_model.safetensors tensors of a LoRA run (float32)."""
  r = c.lora.rank
  out = {}
  for i in range(c.model.num_layers):
    for target in c.lora.target_list():
      a, b = (_take(trainables, c.model, i, target, part) for part in 'ab')
      name = f'{PEFT_PREFIXES[0]}{i}.{HF_MODULES[target]}'
      out[f'{name}.lora_A.weight'] = np.ascontiguousarray(a.reshape(-1, r).T, np.float32)
      out[f'{name}.lora_B.weight'] = np.ascontiguousarray(b.reshape(r, -1).T, np.float32)
  return out


BASE_DIR = 'base'  # export_adapter(with_base=True) writes the base here, beside the adapter


def export_adapter(src_path, dst_path, *, with_base: bool = False,
                   open_source: run_source.OpenSource | None = None, dtype: str = 'bfloat16',
                   progress: bool = True) -> tuple[config_lib.Config, str | None]:
  """A LoRA workdir -> a PEFT adapter directory that peft.PeftModel.from_pretrained loads;
  (the run's config, the adapter's base_model_name_or_path).

  base_model_name_or_path is checkpoint.init_from (absolute) when that is a Hugging Face
  directory. with_base (needs open_source, convert.open_source) also writes the base (what the
  run started from: init_from of any kind, or the seed's random init) as a Hugging Face
  directory DST/base, in `dtype` with the run's tokenizer, and points the adapter at it; so
  AutoPeftModelForCausalLM.from_pretrained(DST) loads base and adapter alone."""
  c, trainables = read_trainables(src_path)
  if c.lora.train_embedding:
    raise ConversionError(f'{src_path}: lora.train_embedding=True trains the whole embedding, '
                          'which a LoRA adapter does not hold; export it with --merge')
  dst = source.absolute(dst_path)
  if dst.exists() and any(dst.iterdir()):
    raise ConversionError(f'{dst}: destination exists and is not empty')
  tensors = adapter_tensors(c, trainables)
  base = hf_base(c)
  dst.mkdir(parents=True, exist_ok=True)
  if with_base:
    if open_source is None:
      raise ValueError('with_base needs open_source (convert.open_source)')
    tokenizer = hf_tokenizer.training_tokenizer_path(
        ours.train_step_dir(src_path) / 'config' / 'metadata')
    hf.write(run_source.init_source(c, open_source), dst / BASE_DIR, dtype,
             progress=progress, tokenizer_path=tokenizer)
    base = str(dst / BASE_DIR)
  (dst / ADAPTER_WEIGHTS).write_bytes(safetensors.numpy.save(tensors, metadata={'format': 'pt'}))
  (dst / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(c, base), indent=2))
  return c, base


def adapter_info(path) -> dict[str, Any]:
  """gemma3-convert info of a PEFT adapter directory: its LoRA settings and base."""
  path = epath.Path(path)
  try:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
  except (OSError, ValueError) as e:
    raise ConversionError(f'{path / ADAPTER_CONFIG}: {type(e).__name__}: {e}') from None
  return {'kind': 'peft', 'what': f'a PEFT {config.get("peft_type")} adapter directory',
          'base': config.get('base_model_name_or_path'),
          'lora': {k: config.get(k) for k in ('r', 'lora_alpha', 'lora_dropout',
                                             'target_modules')}}


# --- PEFT import ---------------------------------------------------------------


def _error(path, message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f'lora.init_adapter={str(path)!r}: {message}')


def read_adapter(path, c: config_lib.Config, params: nnx.State) -> nnx.State:
  """`params` (a LoRA train state's trainables) with A and B from a PEFT adapter directory,
  placed in the shardings of the arrays they replace. Raises ConfigError (one line) when the
  adapter is not a LoRA adapter of this model's shapes, rank, alpha and targets."""
  path = epath.Path(path)
  try:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    tensors = safetensors.numpy.load((path / ADAPTER_WEIGHTS).read_bytes())
  except (OSError, ValueError) as e:
    raise _error(path, f'not a PEFT adapter directory ({ADAPTER_CONFIG} + '
                       f'{ADAPTER_WEIGHTS}): {type(e).__name__}') from None
  if config.get('peft_type') != 'LORA' or config.get('use_dora') or config.get('use_rslora'):
    raise _error(path, 'expected a plain LoRA adapter (peft_type LORA, no DoRA, no rsLoRA)')
  r = c.lora
  if config.get('r') != r.rank:
    raise _error(path, f'the adapter has r={config.get("r")}, lora.rank={r.rank}')
  if float(config.get('lora_alpha', 8)) != r.alpha:
    raise _error(path, f'the adapter has lora_alpha={config.get("lora_alpha")}, '
                       f'lora.alpha={r.alpha}')
  theirs = config.get('target_modules') or []
  theirs = sorted([theirs] if isinstance(theirs, str) else theirs)
  want = sorted(HF_MODULES[t].split('.')[-1] for t in r.target_list())
  if theirs != want:
    raise _error(path, f'the adapter targets {theirs}, lora.targets={r.targets!r} is {want}')
  prefix = next((p for p in PEFT_PREFIXES if any(k.startswith(p) for k in tensors)), None)
  if prefix is None:
    raise _error(path, f'no tensors under {" or ".join(PEFT_PREFIXES)}')
  values: dict[tuple, Any] = {}
  for i in range(c.model.num_layers):
    for target in r.target_list():
      for part, hf_part in (('a', 'lora_A'), ('b', 'lora_B')):
        name = f'{prefix}{i}.{HF_MODULES[target]}.{hf_part}.weight'
        if name not in tensors:
          raise _error(path, f'{name}: missing (an adapter of another base depth?)')
        p, block = adapter_path(c.model, i, target, part)
        values.setdefault(p, {})[block] = (name, tensors[name])
  flat = []
  for p, var in nnx.to_flat_state(params):
    if p not in values:
      flat.append((p, var))
      continue
    a = var.get_value()
    by_block = values[p]
    one = a.shape[1:] if None not in by_block else a.shape
    pieces = []
    for block in sorted(by_block, key=lambda b: -1 if b is None else b):
      name, x = by_block[block]
      x = x.T  # [r, in] -> [in, r];  [out, r] -> [r, out]
      want_size = int(np.prod(one))
      if x.size != want_size or (x.shape[0] != one[0] if p[-1] == 'b' else
                                 x.shape[-1] != one[-1]):
        raise _error(path, f'{name}: shape {tuple(x.shape[::-1])} does not fit this model '
                           f'(an adapter of another base shape)')
      pieces.append(x.reshape(one))
    x = pieces[0] if None in by_block else np.stack(pieces)
    flat.append((p, var.replace(jax.device_put(x.astype(a.dtype), a.sharding))))
  return nnx.from_flat_state(flat)
