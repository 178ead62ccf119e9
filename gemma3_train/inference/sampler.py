"""KV-cache sampling: a jitted prefill over the prompts, then the decode steps inside one jitted
while loop (one call for the whole continuation, one call per token when streaming, or one per
STOP_CHUNK tokens when the host looks for stop strings between calls; the cache carries over),
so no host round trip, parameter flattening or logits transfer happens per token.

Prompts of different lengths are left-padded to one length P (rounded up to a multiple of
PROMPT_BUCKET, so that nearby lengths share a compiled step). Column c of a row holds the token
at position c - pad; padding columns are their own segment, so they are never attended to.
Token columns run 0 .. S-1 with S = P + max_new_tokens. The cache, its layout under context
parallelism and the two jitted programs are kv_cache.py's.

Images (model.vision; image_prompts.py lays them out): the prefill embeds each prompt's image
blocks and attends them both ways, as training does; every image token is in the prompt, so the
decode steps are unchanged.

Sampling: temperature 0 is greedy; otherwise logits / temperature, then top-k and top-p
(nucleus: the smallest set of most likely tokens whose probability reaches top_p), then a
draw (draws.py) with jax.random.fold_in(PRNGKey(seed), step). A row stops after EOS or
<end_of_turn>; generation ends when every row has stopped or max_new_tokens is reached.

Decode at small batch is bound by reading the weights once per token, mostly the tied
[vocab, embed] LM head (262k x 640 float32 = 671 MB at the gemma3_640 width); parameters are
therefore put on the device once (host arrays would be copied in again every call).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gemma3_train import config as config_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import draws
from gemma3_train.inference import image_prompts
from gemma3_train.inference import kv_cache
from gemma3_train.models import decoder
from gemma3_train import sharding

log = logging.getLogger(__name__)

STOP_TOKENS = (tokenizer_lib.EOS, tokenizer_lib.END_OF_TURN)
# Decode steps per loop call between the host's stop-string checks: a row overshoots its stop
# string by at most this many tokens; each check costs a host round trip and a detokenize.
STOP_CHUNK = 16
# The context length of the released models (HF max_position_embeddings, docs/gemma3.md
# section 1): 32k for the sizes without global RoPE scaling (270m, 1b), 128k with it (4b+).
CONTEXT_UNSCALED, CONTEXT_SCALED = 32_768, 131_072


PromptError = image_prompts.PromptError  # empty, too long, or with images that do not fit
# Defined beside what uses them (draws.py, kv_cache.py); named here for the sampler's callers.
Sampling, RECOMMENDED, sampling_knobs = draws.Sampling, draws.RECOMMENDED, draws.sampling_knobs
filter_logits, sample_logits = draws.filter_logits, draws.sample_logits
PROMPT_BUCKET, CACHE_NAMES = kv_cache.PROMPT_BUCKET, kv_cache.CACHE_NAMES
context_degree, prompt_bucket = kv_cache.context_degree, kv_cache.prompt_bucket
cache_sharding, prefill, decode_loop = kv_cache.cache_sharding, kv_cache.prefill, kv_cache.decode_loop


def context_length(cfg: config_lib.ModelConfig) -> int:
  """Tokens a model of this shape attends over: prompt plus generated tokens."""
  return CONTEXT_SCALED if cfg.global_rope_scale > 1.0 else CONTEXT_UNSCALED


def left_pad(prompts: Sequence[Sequence[int]], bucket: int = PROMPT_BUCKET
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P] int32 left-padded with PAD, pad counts [B]); P a multiple of bucket."""
  lengths = [len(p) for p in prompts]
  P = -(-max(lengths) // bucket) * bucket
  tokens = np.full((len(prompts), P), tokenizer_lib.PAD, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, P - len(p):] = p
  return tokens, np.asarray([P - n for n in lengths], np.int32)


def _row_stop_strings(stop_strings, B: int) -> list[tuple[str, ...]]:
  """Each row's non-empty stop strings from one list for all rows or one list per row."""
  if isinstance(stop_strings, str):
    stop_strings = [stop_strings]
  rows = list(stop_strings)
  if not rows or all(isinstance(x, str) for x in rows):
    rows = [rows] * B
  elif len(rows) != B:
    raise ValueError(f'stop_strings: {len(rows)} lists for {B} prompts')
  return [tuple(x for x in ([r] if isinstance(r, str) else r) if x) for r in rows]


def _row_end(row: list[int], seen: int, stop_tokens, strings: Sequence[str],
             detokenize: Callable[[list[int]], str] | None,
             on_token: Callable[[int], None] | None) -> int | None:
  """The row's length if it has stopped within row[seen:] (after its first stop token, or
  after the token whose text completes one of strings), else None; on_token(t) for each new
  token up to there."""
  end = None
  for j in range(seen, len(row)):
    if row[j] in stop_tokens:
      end = j + 1
      break
  text_end = end - 1 if end is not None else len(row)  # the stop token's text is not searched
  if strings and text_end > seen and any(x in detokenize(row[:text_end]) for x in strings):
    # The first prefix whose text holds a stop string (earlier prefixes were checked before).
    end = next(k for k in range(seen + 1, text_end + 1)
               if k == text_end or any(x in detokenize(row[:k]) for x in strings))
  if on_token is not None:
    for t in row[seen:end]:
      on_token(t)
  return end


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) array's full value on this host: over processes, every process
  gathers it (a collective: all of them must ask)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Sampler:
  """Jitted prefill/decode over a model's graph; params come with each call (so training can
  sample its current state) or from the model given at construction.

  mesh/rules: run sharded as training does (sharding.make_mesh / parse_rules); params are then
  placed by their logical axes, the cache by CACHE_NAMES (its columns over the context axis).
  """

  def __init__(self, model, mesh: Mesh | None = None,
               rules: dict[str, tuple[str, ...]] | None = None):
    self.graphdef, state = nnx.split(model)
    self.cfg = model.cfg
    self.mesh = mesh
    self.rules = rules if rules is not None else dict(sharding.DEFAULT_RULES)
    self.bucket = prompt_bucket(context_degree(mesh, self.rules), self.cfg.context_layout)
    self.state = self.place(state)
    self._steps: dict[int, tuple[Callable, Callable]] = {}

  def place(self, state):
    """state on the device(s): sharded over the mesh by its logical axes, else on the default
    device. Host (numpy) params would otherwise be copied in again at every step."""
    if self.mesh is None:
      return jax.device_put(state)
    return jax.device_put(state, sharding.state_shardings(state, self.mesh, self.rules))

  def _jitted(self, total: int):
    """(prefill, decode loop) for S = total columns; jit caches one compile per input shape
    (and per carry with / without logits)."""
    if total not in self._steps:
      common = dict(mesh=self.mesh, rules=self.rules)
      first = jax.jit(functools.partial(prefill, self.graphdef, total=total, **common))
      loop = jax.jit(functools.partial(decode_loop, self.graphdef, **common),
                     donate_argnums=(1,))  # the carry: cache and buffers updated in place
      self._steps[total] = (first, loop)
    return self._steps[total]

  def check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raises PromptError for an empty prompt or one the context cannot extend."""
    limit = context_length(self.cfg)
    for i, p in enumerate(prompts):
      if not len(p):  # pylint: disable=g-explicit-length-test
        raise PromptError(f'prompt {i} is empty (it needs at least BOS)')
      if len(p) + max_new_tokens > limit:
        raise PromptError(f'prompt {i} has {len(p)} tokens; with max_new_tokens='
                          f'{max_new_tokens} that exceeds the model context of {limit} tokens')

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0, *, params=None,
               on_token: Callable[[int, int], None] | None = None,
               return_logits: bool = False, stop_tokens: Sequence[int] = STOP_TOKENS,
               images: Sequence[Sequence] | None = None,
               stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
               detokenize: Callable[[list[int]], str] | None = None,
               stop_chunk: int = STOP_CHUNK):
    """New token ids per prompt (each ending with its first stop token, or with the token that
    completes its first stop string, if one came).

    params: a state to sample instead of the model's (e.g. training's current params);
    on_token(row, token) is called as each row's tokens arrive (streaming);
    return_logits: also return the logits [steps, B, V] that chose each token (tests);
    images: one list per prompt, image k filling its k-th <start_of_image> (image_prompts);
    stop_strings: texts that also end a row (one list for all rows, or one per prompt): the
    loop runs stop_chunk tokens per call, and between calls the host decodes each row's new
    tokens with detokenize (default: the bundled tokenizer's decode) and looks for them;
    generation ends once every row has stopped. The text to keep is the row's decoded text cut
    before its first stop string (as lm-eval cuts it); the tokens drawn do not depend on it.
    """
    prompts, pixels = image_prompts.prepare(prompts, images, self.cfg)
    self.check(prompts, max_new_tokens)
    if max_new_tokens <= 0:
      return ([[] for _ in prompts], np.zeros((0, len(prompts), self.cfg.vocab_size))
              ) if return_logits else [[] for _ in prompts]
    tokens_BP, pad_B = left_pad(prompts, self.bucket)
    B, P = tokens_BP.shape
    N = max_new_tokens
    prefill, decode = self._jitted(P + N)
    knobs = sampling_knobs(sampling)
    state = self.state if params is None else params
    key = jax.random.PRNGKey(seed)
    pad_B = jnp.asarray(pad_B)
    stops = jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1)
    cache, tokens_B, logits_BV = prefill(state, jnp.asarray(tokens_BP), pad_B, key, knobs,
                                         None if pixels is None else jnp.asarray(pixels))
    carry = {'cache': cache, 'tokens': tokens_B, 'step': jnp.int32(0),
             'done': jnp.any(tokens_B[:, None] == stops[None, :], axis=-1),
             'out': jnp.zeros((N, B), jnp.int32).at[0].set(tokens_B),
             'logits': jnp.zeros((N, B, logits_BV.shape[-1]), jnp.float32).at[0].set(
                 logits_BV.astype(jnp.float32)) if return_logits else None}
    args = (jnp.int32(P), pad_B, key, knobs, stops)
    strings_B = _row_stop_strings(stop_strings, B)
    if any(strings_B) and detokenize is None:
      detokenize = tokenizer_lib.Tokenizer().decode
    # Tokens per loop call: one when streaming, a chunk between stop-string checks, else all.
    chunk = 1 if on_token is not None else max(1, stop_chunk) if any(strings_B) else N
    ends: list[int | None] = [None] * B  # a row's length once it has stopped
    steps, seen = 1, 0  # tokens drawn per row; tokens the host has looked at
    while True:
      out_NB = to_host(carry['out'])[:steps]
      for b in (b for b in range(B) if ends[b] is None):
        ends[b] = _row_end(out_NB[:, b].tolist(), seen, stop_tokens, strings_B[b], detokenize,
                           None if on_token is None else functools.partial(on_token, b))
      seen = steps
      if steps == N or all(e is not None for e in ends):
        break
      carry = decode(state, carry, jnp.int32(min(steps - 1 + chunk, N - 1)), *args)
      steps = int(carry['step']) + 1
    out = [row[:end] for row, end in zip(out_NB.T.tolist(), ends)]
    if return_logits:
      return out, to_host(carry['logits'])[:steps]
    return out


def chat_prompt(messages: list[dict], tok: tokenizer_lib.Tokenizer,
                cfg: config_lib.ModelConfig | None = None) -> list[int]:
  """The Gemma 3 chat template with the generation prompt: the conversation as training formats
  it (data.format_chat: BOS, then <start_of_turn>{role}\\n{text}<end_of_turn>\\n per turn), less
  its closing EOS, then <start_of_turn>model\\n. cfg (a vision model's): each <start_of_image>
  in the text becomes an image block, as training lays it out."""
  from gemma3_train.data import documents  # pylint: disable=g-import-not-at-top  (grain)
  encode = image_prompts.chat_encoder(tok, cfg) if cfg is not None and cfg.vision else None
  tokens, _ = documents.format_chat(messages, tok, encode=encode)
  return [int(x) for x in tokens[:-1]] + [tokenizer_lib.START_OF_TURN] + tok.encode('model\n')


def prompt_tokens(text: str, tok: tokenizer_lib.Tokenizer) -> list[int]:
  """A plain-text prompt: BOS then its pieces (as training documents start)."""
  return [tokenizer_lib.BOS] + tok.encode(text)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, images: Sequence[Sequence] | None = None,
             stop_strings: Sequence[str] | Sequence[Sequence[str]] = (),
             detokenize: Callable[[list[int]], str] | None = None) -> list[list[int]]:
  """One-off sampling of a model (compiles for these shapes); Gemma3.generate below."""
  return Sampler(model).generate(prompts, max_new_tokens,
                                 Sampling(temperature, top_k, top_p), seed, images=images,
                                 stop_strings=stop_strings, detokenize=detokenize)


class Gemma3(decoder.Gemma3):
  """The decoder with generate(): the class gemma3_train.load returns (a model does not import
  inference; the sampler adds it here)."""

  def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               images=None, stop_strings=(), detokenize=None):
    """Token-id lists (any lengths) -> the new token ids per prompt, ending with the first EOS
    or <end_of_turn> when one is produced; temperature 0 is greedy. images: one list per
    prompt (paths, PIL images, uint8 arrays), image k where the prompt's k-th
    <start_of_image> is (image_prompts.encode lays text out as Hugging Face's processor).
    stop_strings: texts that also end a row, at the token that completes one (its text via
    detokenize, by default the bundled tokenizer's; Sampler.generate)."""
    return generate(self, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed, images=images, stop_strings=stop_strings,
                    detokenize=detokenize)
