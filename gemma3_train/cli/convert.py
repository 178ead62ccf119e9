"""gemma3-convert: Hugging Face / Kaggle Gemma 3 weights <-> this project's checkpoints.

  gemma3-convert import --src=HF_OR_KAGGLE_DIR --dst=OUR_DIR
  gemma3-convert export --src=OUR_DIR --dst=HF_DIR [--dtype=bfloat16] [--tokenizer=MODEL]
  gemma3-convert export --format=gguf --quant=q4_0 --src=OUR_DIR --dst=FILE.gguf
  gemma3-convert export-lora --src=LORA_WORKDIR --dst=DIR [--merge] [--dtype=bfloat16]
  gemma3-convert info --src=DIR
"""

from __future__ import annotations

import argparse
import json
import sys

from gemma3_train.cli import errors
from gemma3_train.cli import logs
from gemma3_train import config as config_lib
from gemma3_train import convert

PROG = 'gemma3-convert'


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest='command', required=True, metavar='{import,export,export-lora,info}')
  imp = sub.add_parser('import', help='HF safetensors or Kaggle/Flax Orbax -> our checkpoint.')
  imp.add_argument('--src', required=True, help='A Hugging Face directory (config.json + '
                   '*.safetensors, sharded or not) or a Kaggle/Flax Orbax checkpoint directory.')
  imp.add_argument('--dst', required=True, help='New directory for our params-only checkpoint '
                   '(usable as --config.checkpoint.init_from and by gemma3_train.load).')
  imp.add_argument('--config', default=None, help='A configs/*.py file whose model section '
                   'describes the source; needed only for an Orbax checkpoint whose shapes match '
                   'no Gemma 3 size (HF directories carry their own config.json).')
  exp = sub.add_parser('export', help='Our checkpoint (or any readable one) -> a Hugging Face '
                       'Gemma3ForCausalLM directory (Gemma3ForConditionalGeneration for a model '
                       'with the image encoder).')
  exp.add_argument('--src', required=True, help='Our params-only checkpoint directory (a HF or '
                   'Kaggle directory also works).')
  exp.add_argument('--dst', required=True, help='New directory for config.json, the '
                   'safetensors shards (+ model.safetensors.index.json when sharded) and the '
                   'tokenizer (tokenizer.model, tokenizer_config.json with the chat template, '
                   'special_tokens_map.json, generation_config.json).')
  exp.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                   help='dtype of the written tensors (default: bfloat16, as released).')
  exp.add_argument('--format', default='hf', choices=('hf', 'kaggle', 'gguf'),
                   help='hf: a Hugging Face directory (default); kaggle: a Kaggle/Flax FLAT '
                   'Orbax checkpoint with the released names (no tokenizer; --tokenizer and '
                   '--shard_size do not apply; the host holds the whole model once); gguf: one '
                   'GGUF file for llama.cpp / Ollama with the tokenizer and chat template '
                   '(--dst a .gguf file, or a directory to hold gemma3-<preset>-<quant>.gguf; '
                   'docs/quantization.md).')
  exp.add_argument('--quant', default=None, choices=('f32', 'f16', 'bf16', 'q8_0', 'q4_0'),
                   help='--format=gguf: the linear weights\' GGUF type (default f16); a QAT '
                   'run\'s weights are written as its forward quantized them.')
  exp.add_argument('--embedding_quant', default=None,
                   choices=('f32', 'f16', 'bf16', 'q8_0', 'q4_0'),
                   help='--format=gguf: the embedding\'s GGUF type (default: --quant).')
  exp.add_argument('--tokenizer', default=None, help='The SentencePiece model to write as '
                   'tokenizer.model (local or gs://); default: the training run\'s '
                   'data.tokenizer_path for a training checkpoint, else the bundled Gemma 3 one.')
  exp.add_argument('--shard_size', default='5GB', help='Largest shard, e.g. 5GB, 500MB '
                   '(a single tensor larger than this gets a shard of its own).')
  lora = sub.add_parser('export-lora', help='A LoRA run -> a PEFT adapter directory, or with '
                        '--merge a full Hugging Face model with the adapters folded in.')
  lora.add_argument('--src', required=True, help='The LoRA run\'s workdir (its newest step) or '
                    'one of its WORKDIR/checkpoints/<step> directories.')
  lora.add_argument('--dst', required=True, help='New directory: adapter_config.json + '
                    'adapter_model.safetensors (peft.PeftModel.from_pretrained loads it onto the '
                    'base), or with --merge what `export` writes.')
  lora.add_argument('--merge', action='store_true', help='Write the base with the adapters '
                    'merged in (W + B A alpha/r) as a Gemma3ForCausalLM directory.')
  lora.add_argument('--with_base', action='store_true', help='Also write the base (what the '
                    'run started from) as a Hugging Face directory DST/base and point the '
                    'adapter\'s base_model_name_or_path at it. Without it, that is init_from when '
                    'init_from is a Hugging Face directory, else null (docs/lora.md).')
  lora.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                    help='--merge and --with_base: dtype of the written model tensors.')
  info = sub.add_parser('info', help='Print what a checkpoint is, as JSON: its kind (training, '
                       'lora, params, hf, kaggle, peft), a run\'s step and base (init_from), '
                       'the LoRA settings and the model config.')
  info.add_argument('--src', required=True, help='Any checkpoint directory gemma3-convert reads, '
                    'or a PEFT adapter directory.')
  return p


def _size(text: str) -> int:
  units = {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12, 'B': 1}
  for unit, scale in units.items():
    if text.upper().endswith(unit):
      try:
        return int(float(text[:-len(unit)]) * scale)
      except ValueError:
        break
  raise convert.ConversionError(f'--shard_size={text}: expected a size like 5GB or 500MB')


def _model_config(path: str) -> config_lib.ModelConfig:
  """The model section of a configs/*.py file."""
  try:
    return config_lib.load_config_file(path).model
  except config_lib.ConfigError as e:
    raise convert.ConversionError(f'--config: {e}') from None


def _hf_class(cfg: config_lib.ModelConfig) -> str:
  return 'Gemma3ForConditionalGeneration' if cfg.vision else 'Gemma3ForCausalLM'


def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv)
  if args.command == 'import':
    cfg = _model_config(args.config) if args.config else None
    cfg = convert.import_checkpoint(args.src, args.dst, cfg)
    print(f'{args.dst}: {cfg.preset} model, {cfg.num_layers} layers, vocab {cfg.vocab_size}')
  elif args.command == 'export' and args.format != 'gguf' and (args.quant or
                                                                 args.embedding_quant):
    raise convert.ConversionError(f'--quant / --embedding_quant apply to --format=gguf, not '
                                  f'--format={args.format} (no int8/int4 Hugging Face export: '
                                  'docs/quantization.md)')
  elif args.command == 'export' and args.format == 'gguf':
    cfg, path = convert.export_gguf(args.src, args.dst, args.quant or 'f16', args.tokenizer,
                                    args.embedding_quant)
    print(f'{path}: GGUF gemma3 ({cfg.preset}), {args.quant or "f16"}')
    if cfg.vision:
      print(f'{convert.gguf_mmproj.path_for(path)}: its vision tower (mmproj), for llama.cpp\'s '
            '--mmproj')
  elif args.command == 'export' and args.format == 'kaggle':
    cfg = convert.export_kaggle(args.src, args.dst, dtype=args.dtype)
    print(f'{args.dst}: Kaggle/Flax checkpoint ({cfg.preset}), {args.dtype}')
  elif args.command == 'export':
    cfg = convert.export_hf(args.src, args.dst, dtype=args.dtype,
                            shard_size=_size(args.shard_size), tokenizer_path=args.tokenizer)
    print(f'{args.dst}: {_hf_class(cfg)} ({cfg.preset}), {args.dtype}')
  elif args.command == 'export-lora':
    if convert.peft.lora_run_config(args.src) is None:
      raise convert.ConversionError(f'--src={args.src}: not a LoRA training workdir '
                                    '(one trained with lora.rank > 0)')
    if args.merge and args.with_base:
      raise convert.ConversionError('--with_base goes with the adapter export, not --merge '
                                    '(a merged export is a whole model already)')
    if args.merge:
      cfg = convert.export_hf(args.src, args.dst, dtype=args.dtype)
      print(f'{args.dst}: {_hf_class(cfg)} ({cfg.preset}) with the adapters merged, '
            f'{args.dtype}')
    else:
      c, base = convert.peft.export_adapter(args.src, args.dst, with_base=args.with_base,
                                            open_source=convert.open_source, dtype=args.dtype)
      print(f'{args.dst}: PEFT LoRA adapter, r={c.lora.rank}, targets {c.lora.targets}, '
            + (f'base_model_name_or_path {base}' if base else
               f'base_model_name_or_path null: the base ({c.checkpoint.init_from or "random init"}'
               ') is not a Hugging Face directory; --with_base exports it beside the adapter'))
  else:
    print(json.dumps(convert.info(args.src), indent=2))


def run() -> None:
  logs.setup()
  with errors.exit_on(PROG, convert.ConversionError, config_lib.ConfigError, OSError):
    main(sys.argv[1:])


if __name__ == '__main__':
  run()
