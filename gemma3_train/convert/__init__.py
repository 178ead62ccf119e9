"""Checkpoint conversion: Hugging Face safetensors, Kaggle/Flax Orbax and our own checkpoints.

Every reader is a Source (source.py) giving the canonical layout (layout.py) one layer at a
time: hf.py, kaggle.py, ours.py (params-only and training checkpoints). Writers: ours.save_params
(our params-only checkpoint), hf.write (a Gemma3ForCausalLM directory, or with vision a
Gemma3ForConditionalGeneration one, with the tokenizer files of hf_tokenizer.py) and gguf.write
(one GGUF file for llama.cpp / Ollama). The vision
tower's names in every layout: vision_keys.py. cli.py is gemma3-convert.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import gguf
from gemma3_train.convert import gguf_mmproj
from gemma3_train.convert import hf
from gemma3_train.convert.hf import HfSource
from gemma3_train.convert.hf import hf_config_to_model
from gemma3_train.convert.hf import hf_to_canonical
from gemma3_train.convert.hf import model_to_hf_config
from gemma3_train.convert import hf_tokenizer
from gemma3_train.convert import kaggle
from gemma3_train.convert.kaggle import KaggleSource
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.convert.ours import PARAMS_CONFIG
from gemma3_train.convert.ours import ParamsSource
from gemma3_train.convert.ours import TrainSource
from gemma3_train.convert import peft
from gemma3_train.convert import run_source
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source
from gemma3_train.convert.source import absolute
from gemma3_train.convert.source import layers
from gemma3_train.models import decoder as model_lib


def checkpoint_kind(path) -> str:
  """'params' (ours), 'train' (our training workdir or one of its steps), 'hf' (config.json +
  safetensors) or 'kaggle' (an Orbax tree).

  A new kind needs a test here and a Source in open_source.
  """
  path = epath.Path(path)
  if not path.is_dir():
    if path.parent.name == 'checkpoints' and path.parent.is_dir():
      raise ConversionError(f'{path}: no such checkpoint step (steps here: '
                            f'{ours.complete_steps(path.parent)})')
    raise ConversionError(f'{path}: not a directory')
  if (path / PARAMS_CONFIG).exists():
    return 'params'
  if (path / 'checkpoints').is_dir() or ((path / 'state').is_dir() and
                                         (path / 'config').is_dir()):
    return 'train'
  if (path / 'config.json').exists():
    return 'hf'
  if (path / '_METADATA').exists() or (path / 'checkpoint').exists():
    return 'kaggle'
  raise ConversionError(f'{path}: neither a Hugging Face directory (config.json), a Kaggle/Flax '
                        f'Orbax checkpoint (_METADATA), one of ours ({PARAMS_CONFIG}) nor a '
                        'training workdir (checkpoints/)')


def open_source(path, cfg: config_lib.ModelConfig | None = None,
                vocab_size: int | None = None) -> Source:
  """Opens any supported checkpoint for layer-by-layer reading (see checkpoint_kind).

  `cfg` describes a Kaggle checkpoint whose shapes match no preset; `vocab_size` keeps that
  many rows of a HF embedding. Our checkpoints and HF directories carry their own config.
  """
  kind = checkpoint_kind(path)
  if kind == 'params':
    return ParamsSource(path)
  if kind == 'train':
    # A LoRA run: its base with the adapters folded in.
    merged = peft.open_lora_source(path, open_source)
    if merged is not None:
      return merged
    return TrainSource(path, lambda: run_source.init_source(run_source.run_config(path),
                                                            open_source))
  if kind == 'hf':
    return HfSource(path, vocab_size)
  return KaggleSource(path, cfg)


def load_canonical(path, cfg: config_lib.ModelConfig | None = None
                   ) -> tuple[config_lib.ModelConfig, dict, list[dict]]:
  """(ModelConfig, top, layers) of any checkpoint open_source reads, all in memory."""
  src = open_source(path, cfg)
  by_index = dict(layers(src))
  return src.cfg, src.top(), [by_index[i] for i in range(src.cfg.num_layers)]


def import_checkpoint(src_path, dst_path, cfg: config_lib.ModelConfig | None = None,
                      progress: bool = True) -> config_lib.ModelConfig:
  """HF / Kaggle (or ours) -> our params-only checkpoint, streamed (see each Source)."""
  src = open_source(src_path, cfg)
  dst = absolute(dst_path)
  ours.save_params(dst, src.cfg, src.top(), layers(src, f'writing {dst}' if progress else None),
                   src.vision() if src.cfg.vision else None)
  return src.cfg


def export_hf(src_path, dst_path, dtype: str = 'bfloat16', shard_size: int = 5 * 10**9,
              progress: bool = True, tokenizer_path: str | None = None
              ) -> config_lib.ModelConfig:
  """Any checkpoint we read -> a Gemma3ForCausalLM HF directory (safetensors shards + index)
  with its tokenizer files, so that transformers' AutoTokenizer and pipeline load it alone.

  `tokenizer_path` None: the run's tokenizer, i.e. a training checkpoint's data.tokenizer_path,
  else the bundled Gemma 3 model ('' names the bundled one explicitly).
  """
  src = open_source(src_path)
  if tokenizer_path is None:
    tokenizer_path = (hf_tokenizer.training_tokenizer_path(src.path / 'config' / 'metadata')
                      if isinstance(src, (TrainSource, peft.MergedSource)) else '')
  hf.write(src, dst_path, dtype, shard_size, progress, tokenizer_path)
  return src.cfg


def export_gguf(src_path, dst_path, quant: str = 'f16', tokenizer_path: str | None = None,
                embedding: str | None = None, progress: bool = True) -> tuple[
                    config_lib.ModelConfig, epath.Path]:
  """Any checkpoint we read -> one GGUF file (gguf.py): dst_path itself when it ends in .gguf,
  else DST/gemma3-<preset>-<quant>.gguf; a vision model's tower goes beside it in
  mmproj-<that name> (gguf_mmproj.py). A training run's quant.qat / quant.embedding pick the
  fake-quantized numbers its forward used. Returns (model config, the file written)."""
  src = open_source(src_path)
  run = run_source.run_config(src_path) if checkpoint_kind(src_path) == 'train' else None
  if tokenizer_path is None:
    tokenizer_path = (hf_tokenizer.training_tokenizer_path(src.path / 'config' / 'metadata')
                      if isinstance(src, (TrainSource, peft.MergedSource)) else '')
  dst = absolute(dst_path)
  if dst.suffix != '.gguf':
    dst = dst / f'gemma3-{src.cfg.preset}-{quant}.gguf'
  if src.cfg.vision and gguf_mmproj.path_for(dst).exists():
    raise ConversionError(f'{gguf_mmproj.path_for(dst)}: destination exists')
  gguf.write(src, dst, quant, tokenizer_path, qat=run.quant.qat if run else '',
             qat_embedding=run.quant.embedding if run else '', embedding=embedding,
             progress=progress)
  if src.cfg.vision:  # the tower goes beside it: llama.cpp reads it with --mmproj
    gguf_mmproj.write(src, gguf_mmproj.path_for(dst), quant)
  return src.cfg, dst


def export_kaggle(src_path, dst_path, dtype: str | None = None) -> config_lib.ModelConfig:
  """Any checkpoint we read -> a Kaggle/Flax FLAT Orbax checkpoint (the released Gemma 3 names,
  vision tower included), in the source's dtypes unless dtype is given."""
  src = open_source(src_path)
  dst = absolute(dst_path)
  if dst.exists() and any(dst.iterdir()):
    raise ConversionError(f'{dst}: destination exists and is not empty')
  kaggle.write(src, dst, dtype)
  return src.cfg


_KINDS = {'params': 'our params-only checkpoint', 'hf': 'a Hugging Face directory',
          'kaggle': 'a Kaggle/Flax Orbax checkpoint'}


def _model_fields(cfg: config_lib.ModelConfig) -> dict:
  """The model config, its vision_* fields only for a model with the image encoder."""
  fields = dataclasses.asdict(cfg)
  return {k: v for k, v in fields.items() if cfg.vision or not k.startswith('vision_')}


def info(path) -> dict:
  """What a checkpoint is (gemma3-convert info): its kind ('training', 'lora': a LoRA run's
  adapters, 'params', 'hf', 'kaggle', or 'peft': an exported adapter) and a sentence saying so;
  for a run, its step and where it started from (`base`: checkpoint.init_from, else the seed's
  random init) and, for LoRA, the lora section; the model config. Reads configs, no weights
  (a Kaggle checkpoint's shapes excepted)."""
  if (epath.Path(path) / peft.ADAPTER_CONFIG).exists():
    return peft.adapter_info(path)
  kind = checkpoint_kind(path)
  c = run_source.run_config(path) if kind == 'train' else None
  if c is None:
    cfg = open_source(path).cfg
    out = {'kind': 'training' if kind == 'train' else kind,
           'what': _KINDS.get(kind, 'a training checkpoint')}
  else:
    cfg = c.model
    out = {'kind': 'lora' if c.lora.rank else 'training',
           'what': ('a LoRA run: the adapters, trained on a frozen base' if c.lora.rank else
                    'a training checkpoint: params and optimizer state')}
  if kind == 'train':
    step_dir = ours.train_step_dir(path)
    out.update(path=str(step_dir), step=int(step_dir.name) if step_dir.name.isdigit() else None)
  if c is not None:
    out['base'] = c.checkpoint.init_from or f'random init (train.seed={c.train.seed})'
    if c.lora.rank:
      out['lora'] = {k: v for k, v in dataclasses.asdict(c.lora).items()
                     if k != 'init_adapter' or v}
  out['model'] = _model_fields(cfg)
  return out


def load(path, model_cls: type[model_lib.Gemma3] = model_lib.Gemma3,
         **model_overrides) -> model_lib.Gemma3:
  """A model_cls (a models.decoder.Gemma3) with the weights of a HF directory, a Kaggle
  checkpoint or one of ours (params-only, or a training workdir: its newest complete step; a
  LoRA run's workdir gives its base with its adapters, the adapted model as trained). A
  checkpoint with vision weights (HF Gemma3ForConditionalGeneration, Kaggle 4b/12b/27b, ours)
  gives a model.vision model: model(tokens, images=images). gemma3_train.load passes the
  inference class, which adds generate().

  `model_overrides` change non-shape ModelConfig fields, e.g. dtype='bfloat16'. The attention
  kernel is the machine's choice, not the checkpoint's: attention_impl is 'auto' unless
  overridden (a run trained with cudnn or splash named is sampled on any backend).
  """
  model_overrides = {'attention_impl': 'auto', **model_overrides}
  if peft.lora_run_config(path) is not None:  # a LoRA run: base + adapters, as trained
    return peft.load_adapted(path, open_source, model_cls, **model_overrides)
  src = open_source(path)
  by_index = dict(layers(src))
  cfg = dataclasses.replace(src.cfg, **model_overrides)
  top, canonical = src.top(), [by_index.pop(i) for i in range(cfg.num_layers)]
  # A checkpoint with vision weights gives a model that takes images too.
  vision = src.vision() if cfg.vision else None
  model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, jax.tree.map(jnp.asarray,
                                 layout.canonical_to_state(cfg, top, canonical, vision)))
  return model


__all__ = ['ConversionError', 'HfSource', 'KaggleSource', 'PARAMS_CONFIG', 'ParamsSource',
           'Source', 'TrainSource', 'checkpoint_kind', 'export_gguf', 'export_hf',
           'hf_config_to_model', 'hf_to_canonical', 'import_checkpoint', 'info', 'layers', 'load', 'load_canonical',
           'model_to_hf_config', 'open_source']
