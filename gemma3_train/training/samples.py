"""train.sample_every: greedy continuations of train.sample_prompts during training."""

from __future__ import annotations

import logging
import time

from flax import nnx

from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import sampler as sampler_lib

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 32  # new tokens per train.sample_prompts continuation


class TrainSamples:
  """train.sample_every: greedy continuations of train.sample_prompts by the current params,
  written to the log, metrics.jsonl and TensorBoard. The Sampler is built and compiled on
  first use, then reused with each step's params. s is train_state.Setup, writer a
  metrics.MetricWriter."""

  def __init__(self, s, writer):
    self.s, self.writer = s, writer
    self.sampler: sampler_lib.Sampler | None = None

  def __call__(self, state: dict, step: int) -> None:
    c = self.s.config
    model = nnx.merge(self.s.graphdef, state['params'], *state['frozen'].values())
    params = None
    if self.sampler is None:
      self.tok = tokenizer_lib.Tokenizer(c.data.tokenizer_path)
      self.texts = [p.strip() for p in c.train.sample_prompts.split('|') if p.strip()]
      self.prompts = [sampler_lib.prompt_tokens(t, self.tok) for t in self.texts]
      if max(max(p) for p in self.prompts) >= c.model.vocab_size:
        log.warning('train.sample_prompts: the tokenizer gives ids beyond model.vocab_size=%d; '
                    'not sampling', c.model.vocab_size)
        self.prompts = []
      self.sampler = sampler_lib.Sampler(model, self.s.mesh, self.s.rules)
    else:
      params = nnx.split(model)[1]
    if not self.prompts:
      return
    start = time.perf_counter()
    outs = self.sampler.generate(self.prompts, SAMPLE_TOKENS, params=params)
    texts = [self.tok.decode([t for t in o if t not in sampler_lib.STOP_TOKENS]) for o in outs]
    log.info('Sampled %d prompts in %.1f s', len(outs), time.perf_counter() - start)
    self.writer.write_samples(step, list(zip(self.texts, texts)))
