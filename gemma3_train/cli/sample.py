"""gemma3-sample: continuations or a chat from any checkpoint gemma3_train.load reads.

  gemma3-sample --ckpt=DIR --prompt="The capital of France is" [--prompt=...]
  gemma3-sample --ckpt=DIR --chat            # multi-turn: one user message per stdin line
  gemma3-sample --ckpt=DIR --image=cat.png --prompt="<start_of_image>A photo of"

DIR is one of our training workdirs (its newest step) or checkpoints, a Hugging Face directory or
a Kaggle/Flax checkpoint. One prompt streams token by token; several are sampled as one batch
and printed in order. Sampling defaults are the released models' (temperature 1.0, top_k 64,
top_p 0.95); --temperature=0 is greedy. --config.model.dtype=bfloat16, --config.mesh.fsdp=4 and
the other model (non-shape) and mesh fields change how the model runs.

Images (a vision model): --image=PATH (repeatable) goes where the prompt says <start_of_image>,
image k at the k-th marker, or all at the start when the prompt has none; with --chat they open
the first user turn, and a line `/image PATH` adds an image to the next user message.
A bad command line, a missing checkpoint or a prompt longer than the model's context prints one
line `gemma3-sample: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from gemma3_train.cli import errors
from gemma3_train.cli import logs
from gemma3_train import config as config_lib

PROG = 'gemma3-sample'
UsageError = errors.UsageError  # a bad command line: one line, exit status 2


def _parse_value(name: str, text: str, current: Any) -> Any:
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise UsageError(f'--config.{name}={text}: expected true or false')
    return text.lower() in ('true', '1')
  for kind in (int, float):
    if isinstance(current, kind):
      try:
        return kind(text)
      except ValueError:
        raise UsageError(f'--config.{name}={text}: expected {kind.__name__}') from None
  return text


def split_overrides(argv: Sequence[str], sections: Sequence[str],
                    frozen: Sequence[str] = ()) -> tuple[list[str], dict[str, dict[str, Any]]]:
  """(other args, {section: {field: value}}) from --config.SECTION.FIELD=VALUE args.

  Only the given sections may be set, and not the `frozen` 'section.field' names."""
  rest, out = [], {}
  defaults = config_lib.Config()
  for arg in argv:
    if not arg.startswith('--config.'):
      rest.append(arg)
      continue
    name, eq, text = arg[len('--config.'):].partition('=')
    section, _, field = name.partition('.')
    if not eq:
      raise UsageError(f'--config.{name}: expected --config.{name}=VALUE')
    if section not in sections or not hasattr(getattr(defaults, section, None), field or '-'):
      raise UsageError(f'--config.{name}: not a field this command sets; expected '
                       f'--config.SECTION.FIELD with SECTION one of {", ".join(sections)}')
    if name in frozen:
      raise UsageError(f'--config.{name}: fixed by the checkpoint')
    current = getattr(getattr(defaults, section), field)
    out.setdefault(section, {})[field] = _parse_value(name, text, current)
  return rest, out


def _parser() -> argparse.ArgumentParser:
  p = errors.ArgParser(prog=PROG, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--ckpt', default='', help='checkpoint or workdir to load (required)')
  p.add_argument('--prompt', action='append', default=[], help='text to continue (repeatable)')
  p.add_argument('--chat', action='store_true', help='Gemma 3 chat template; conversation from '
                 'stdin, one user message per line (an empty line or EOF ends it)')
  p.add_argument('--system', default='', help='with --chat: a system instruction (Gemma 3 puts '
                 'it at the start of the first user turn)')
  p.add_argument('--max_new_tokens', type=int, default=256, help='new tokens per reply')
  p.add_argument('--temperature', type=float, default=1.0, help='0 = greedy')
  p.add_argument('--top_k', type=int, default=64, help='0 = off')
  p.add_argument('--top_p', type=float, default=0.95, help='1 = off')
  p.add_argument('--seed', type=int, default=0, help='sampling seed')
  p.add_argument('--tokenizer', default='', help="SentencePiece model ('' = bundled Gemma 3)")
  p.add_argument('--image', action='append', default=[], help='an image (path or gs://) for a '
                 'vision model, where the prompt says <start_of_image> (repeatable)')
  return p


def parse_args(argv: Sequence[str]):
  """(args, model overrides, mesh overrides); UsageError on a bad command line."""
  rest, overrides = split_overrides(argv, ('model', 'mesh'),
                                    tuple(f'model.{f}' for f in config_lib.MODEL_SHAPE_FIELDS))
  args, unknown = _parser().parse_known_args(rest)
  if unknown:  # named before a missing --ckpt: the likelier mistake is the typo
    raise UsageError(f'unrecognized arguments: {" ".join(unknown)}')
  if not args.ckpt:
    raise UsageError('--ckpt=PATH is required (a workdir, checkpoint, Hugging Face or Kaggle '
                     'directory)')
  if args.chat == bool(args.prompt):
    raise UsageError('give either --prompt=TEXT (repeatable) or --chat')
  if args.image and len(args.prompt) > 1:
    raise UsageError('--image goes with one --prompt (or --chat)')
  if args.max_new_tokens < 1:
    raise UsageError(f'--max_new_tokens={args.max_new_tokens}: expected >= 1')
  if args.temperature < 0:
    raise UsageError(f'--temperature={args.temperature}: expected >= 0')
  if args.top_k < 0:
    raise UsageError(f'--top_k={args.top_k}: expected >= 0 (0 = off)')
  if not 0 < args.top_p <= 1:
    raise UsageError(f'--top_p={args.top_p}: expected in (0, 1]')
  return args, overrides.get('model', {}), overrides.get('mesh', {})


def load_sampler(path: str, model_overrides: dict, mesh_overrides: dict):
  """A sample.Sampler over the checkpoint at path, on a mesh of all devices (as training)."""
  # Imported here: a bad command line answers before jax loads.
  import jax  # pylint: disable=g-import-not-at-top
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import sampler as sample  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  try:
    model = convert.load(path, **model_overrides)
  except (convert.ConversionError, OSError) as e:
    raise UsageError(f'--ckpt={path}: {errors.first_line(e)}') from None
  c = config_lib.Config(model=model.cfg, mesh=config_lib.MeshConfig(**mesh_overrides),
                        train=config_lib.TrainConfig(global_batch_size=jax.device_count()))
  config_lib.validate(c)
  mesh = sharding.make_mesh(c)
  return sample.Sampler(model, mesh, sharding.parse_rules(c.mesh.rules))


class _Stream:
  """Prints one row's text as its tokens arrive (decoding the whole reply each time, so that
  pieces that merge across tokens print correctly)."""

  def __init__(self, tok, out=None):
    self.tok, self.ids, self.shown = tok, [], ''
    self.out = sys.stdout if out is None else out

  def __call__(self, row: int, token: int) -> None:
    del row
    from gemma3_train.inference import sampler as sample  # pylint: disable=g-import-not-at-top
    if token in sample.STOP_TOKENS:
      return
    self.ids.append(token)
    text = self.tok.decode(self.ids)
    self.out.write(text[len(self.shown):])
    self.out.flush()
    self.shown = text


def _text(tok, ids) -> str:
  from gemma3_train.inference import sampler as sample  # pylint: disable=g-import-not-at-top
  return tok.decode([t for t in ids if t not in sample.STOP_TOKENS])


def _pixels(ref: str, cfg, flag: str = '--image'):
  """An image as the model reads it (float32 [S, S, 3]); UsageError when it cannot be read."""
  from gemma3_train.inference import image_prompts  # pylint: disable=g-import-not-at-top
  if not cfg.vision:
    raise UsageError(f'{flag}: the model has no vision tower')
  try:
    return image_prompts.pixels(ref, cfg)
  except image_prompts.PromptError as e:
    raise UsageError(f'{flag}: {e}') from None


def main(argv: Sequence[str], stdin=None, stdout=None) -> None:
  args, model_overrides, mesh_overrides = parse_args(argv)
  from gemma3_train.inference import image_prompts  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import sampler as sample  # pylint: disable=g-import-not-at-top
  from gemma3_train.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  stdin = sys.stdin if stdin is None else stdin
  stdout = sys.stdout if stdout is None else stdout
  tok = tokenizer_lib.Tokenizer(args.tokenizer)
  sampler = load_sampler(args.ckpt, model_overrides, mesh_overrides)
  if tok.vocab_size > sampler.cfg.vocab_size:
    raise UsageError(f'--tokenizer: {tok.vocab_size} pieces but the model has '
                     f'{sampler.cfg.vocab_size} embedding rows')
  sampling = sample.Sampling(args.temperature, args.top_k or None,
                             args.top_p if args.top_p < 1 else None)

  def check(prompts):
    try:
      sampler.check(prompts, 1)
    except sample.PromptError as e:
      raise UsageError(f'{e}') from None

  def run(prompts, stream, images=None):
    check(prompts)
    limit = sample.context_length(sampler.cfg) - max(len(p) for p in prompts)
    return sampler.generate(prompts, min(args.max_new_tokens, limit), sampling, args.seed,
                            on_token=stream, images=images)

  images = [_pixels(ref, sampler.cfg) for ref in args.image]
  if not args.chat:
    if images:
      try:
        prompts = [image_prompts.encode(args.prompt[0], tok, sampler.cfg, len(images))]
      except image_prompts.PromptError as e:
        raise UsageError(f'--image: {e}') from None
    else:
      prompts = [sample.prompt_tokens(p, tok) for p in args.prompt]
    check(prompts)  # before anything is printed
    if len(prompts) == 1:
      stdout.write(args.prompt[0])
      run(prompts, _Stream(tok, stdout), [images] if images else None)
      stdout.write('\n')
    else:
      for text, ids in zip(args.prompt, run(prompts, None)):
        stdout.write(f'{text}{_text(tok, ids)}\n---\n')
    stdout.flush()
    return
  messages = [{'role': 'system', 'content': args.system}] if args.system else []
  shown, pending = [], images  # the chat's images so far; those of the next user message
  while True:
    stdout.write('> ')
    stdout.flush()
    line = stdin.readline()
    if not line.strip():
      break
    text = line.strip()
    if text.startswith('/image '):
      try:
        pending.append(_pixels(text[len('/image '):].strip(), sampler.cfg, '/image'))
      except UsageError as e:  # a typo in a path should not end the conversation
        print(f'{PROG}: error: {e}', file=sys.stderr)
      continue
    markers = text.count(tokenizer_lib.IMAGE_MARKER)
    if pending and not markers:
      text = tokenizer_lib.IMAGE_MARKER * len(pending) + text
    elif markers != len(pending):
      print(f'{PROG}: error: {markers} {tokenizer_lib.IMAGE_MARKER} in the message for '
            f'{len(pending)} images', file=sys.stderr)
      continue
    messages.append({'role': 'user', 'content': text})
    shown, pending = shown + pending, []
    ids = run([sample.chat_prompt(messages, tok, sampler.cfg)], _Stream(tok, stdout),
              [shown] if shown else None)[0]
    stdout.write('\n')
    messages.append({'role': 'model', 'content': _text(tok, ids)})


def run() -> None:
  logs.setup()
  try:
    with errors.exit_on(PROG, UsageError, config_lib.ConfigError):
      main(sys.argv[1:])
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == '__main__':
  run()
