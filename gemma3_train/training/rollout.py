"""Rollouts for RL (train.objective=grpo, objectives/grpo.py): sample, score, lay out.

Each rollout reads rl.prompts_per_step prompt rows (data/prompts.py), samples rl.group_size
completions of each with the KV-cache sampler (inference/sampler.py) on the live train state's
params, on the training mesh (no copy of the weights, no other process), scores them with the
reward functions (rewards.py) and computes the group-relative advantages on the host (TRL's
sum-then-normalize: A = (r - group mean) / (group std + 1e-4), the std unbiased, by group,
over the batch, or not at all per rl.scale_rewards). Rows hold prompt + completion, the
completion tokens weighted (the stop token included; a completion stops at EOS or
<end_of_turn>, nothing after it is kept). The sampling key of a rollout is a function of
(train.seed, its step) alone, so a resumed run draws the same completions.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from gemma3_train import config as config_lib
from gemma3_train import data as data_lib
from gemma3_train.data import prompts as prompts_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import sampler as sampler_lib
from gemma3_train.training import rewards as rewards_lib

log = logging.getLogger(__name__)

SAMPLES_SHOWN = 4  # completions written per train.sample_every (one per prompt)


def metric_names(c: config_lib.Config) -> list[str]:
  """Each rl.rewards entry's name in the metrics: a built-in's, or the function's."""
  names = []
  for entry in (x.strip() for x in c.rl.rewards.split(',')):
    name = entry.rpartition(':')[2] or entry
    names.append(name if name not in names else f'{name}_{len(names)}')
  return names


def weights(c: config_lib.Config) -> np.ndarray:
  """rl.reward_weights as float32 [F] (all 1 when unset)."""
  r = c.rl
  n = len(r.rewards.split(','))
  return np.asarray([float(w) for w in r.reward_weights.split(',')] if r.reward_weights
                    else [1.0] * n, np.float32)


def rollout_seed(seed: int, step: int) -> int:
  """The sampler seed of the rollout at `step`: (train.seed, step) alone decide it."""
  return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, 0x6772706F]).generate_state(1)[0])


def scale_of(c: config_lib.Config) -> str:
  r = c.rl
  return r.scale_rewards or ('none' if r.loss == 'dr_grpo' else 'group')


def group_advantages(reward_B: np.ndarray, group_size: int, scale: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(advantages, whether the group's rewards have zero std) [B], float32, as TRL's
  _generate_and_score_completions: r - group mean, divided by std + 1e-4 (group or batch)."""
  r = np.asarray(reward_B, np.float32)
  grouped = r.reshape(-1, group_size)
  mean = np.repeat(grouped.mean(axis=1, dtype=np.float32), group_size)
  if group_size > 1:
    std = np.repeat(grouped.std(axis=1, ddof=1, dtype=np.float32), group_size)
  else:
    std = np.zeros_like(r)
  if scale == 'batch':
    std = np.full_like(r, r.std(ddof=1, dtype=np.float32) if r.size > 1 else 0.0)
  adv = r - mean
  if scale != 'none':
    adv = adv / (std + np.float32(1e-4))
  return adv.astype(np.float32), np.isclose(std, 0.0).astype(np.float32)


def layout(prompts: list[list[int]], completions: list[list[int]], seq_len: int
           ) -> dict[str, np.ndarray]:
  """One row per (prompt, completion): inputs = tokens[:-1], targets = tokens[1:], the
  completion's targets weighted, positions from 0, segment 1; zeros after."""
  B = len(prompts)
  out = {k: np.zeros((B, seq_len), dtype) for k, dtype in data_lib.BATCH_DTYPES.items()}
  for b, (p, comp) in enumerate(zip(prompts, completions)):
    seq = np.asarray(list(p) + list(comp), np.int32)
    n = len(seq) - 1
    out['inputs'][b, :n] = seq[:-1]
    out['targets'][b, :n] = seq[1:]
    out['weights'][b, len(p) - 1:n] = 1.0
    out['positions'][b, :n] = np.arange(n)
    out['segment_ids'][b, :n] = 1
  return out


class Rollouts:
  """The rollouts of one run: the sampler (built on first use, then fed each step's params),
  the tokenizer, the rewards, and `score` (objectives/grpo.py: score_fn) for the rollout's
  old and reference log-probabilities. s is the train state's Setup."""

  def __init__(self, s, score):
    c = s.config
    self.s, self.score = s, score
    self.tok = tokenizer_lib.Tokenizer(c.data.tokenizer_path)
    self.rewards = rewards_lib.Rewards(c)
    self.weights = weights(c)
    r = c.rl
    self.sampling = sampler_lib.Sampling(r.temperature, r.top_k or None,
                                         r.top_p if r.top_p < 1 else None)
    self.sampler: sampler_lib.Sampler | None = None
    self.samples: list[tuple[str, str]] = []

  def _generate(self, state, prompts: list[list[int]], seed: int) -> list[list[int]]:
    model = nnx.merge(self.s.graphdef, state['params'], *state['frozen'].values())
    if self.sampler is None:
      self.sampler = sampler_lib.Sampler(model, self.s.mesh, self.s.rules)
    params = nnx.split(model)[1]
    return self.sampler.generate(prompts, self.s.config.rl.max_completion_len, self.sampling,
                                 seed, params=params)

  def host_batch(self, state, step: int, rows: list[dict]) -> dict[str, np.ndarray]:
    """The rollout of `step` on `rows`: sampled, scored, laid out (host arrays, all rows)."""
    c = self.s.config
    r, L = c.rl, c.data.seq_len
    G, N = r.group_size, r.max_completion_len
    # The previous update runs asynchronously: wait for it, so that the logged time is the
    # rollout's own.
    jax.block_until_ready(state['params'])
    start = time.perf_counter()
    prompt_ids = []
    for row in rows:
      ids = prompts_lib.prompt_tokens(row[r.prompt_field], self.tok, row['_where'])
      if len(ids) > L - N:
        raise data_lib.DataError(
            f'{row["_where"]}: the prompt has {len(ids)} tokens; data.seq_len - '
            f'rl.max_completion_len = {L - N} fit')
      if max(ids) >= c.model.vocab_size:
        raise data_lib.DataError(f'{row["_where"]}: prompt token id {max(ids)} >= '
                                 f'model.vocab_size={c.model.vocab_size}')
      prompt_ids.append(ids)
    prompts = [p for p in prompt_ids for _ in range(G)]
    completions = self._generate(state, prompts, rollout_seed(c.train.seed, step))
    stops = set(sampler_lib.STOP_TOKENS)
    texts = [self.tok.decode([t for t in ids if t not in stops]) for ids in completions]
    chat = [isinstance(row[r.prompt_field], list) and bool(row[r.prompt_field])
            and isinstance(row[r.prompt_field][0], dict) for row in rows]
    shown = [[{'role': 'assistant', 'content': t}] if chat[i // G] else t
             for i, t in enumerate(texts)]
    keys = [k for k in rows[0] if k not in (r.prompt_field, '_where')]
    fields = {k: [row.get(k) for row in rows for _ in range(G)] for k in keys}
    per_fn = self.rewards([row[r.prompt_field] for row in rows for _ in range(G)], shown,
                          [list(x) for x in completions], fields)
    reward = per_fn @ self.weights
    adv, zero_std = group_advantages(reward, G, scale_of(c))
    batch = layout(prompts, completions, L)
    batch.update(advantages=adv, rewards=per_fn, zero_std=zero_std,
                 truncated=np.asarray([len(x) >= N and x[-1] not in stops
                                       for x in completions], np.float32))
    log.info('Rollout for step %d: %d completions in %.1f s, mean reward %.4g', step,
             len(completions), time.perf_counter() - start, float(reward.mean()))
    self.samples = [(self.tok.decode(prompt_ids[i][-64:]),
                     f'{texts[i * G]} [reward {reward[i * G]:.4g}]')
                    for i in range(min(SAMPLES_SHOWN, len(rows)))]
    return batch

  def to_device(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays (every row, the same on every process) -> global arrays, rows over the
    batch axes."""
    return {k: jax.make_array_from_callback(v.shape, self.s.batch_sharding[k],
                                            lambda idx, v=v: v[idx])
            for k, v in host.items()}

  def batch(self, state, step: int, prompt_iter: prompts_lib.PromptIterator) -> dict:
    """Train step `step`'s batch: the rollout of step - step % rl.updates_per_batch."""
    c = self.s.config
    mu = c.rl.updates_per_batch
    first = step - step % mu
    if prompt_iter.rollout is not None and prompt_iter.rollout_step == first:
      batch = self.to_device(prompt_iter.rollout)  # a later update, or a resume among them
    else:
      if step != first:
        raise RuntimeError(f'step {step}: the rollout of step {first} was not kept')
      host = self.host_batch(state, step, next(prompt_iter))
      batch = self.to_device(host)
      extra = self.score(state, batch)
      batch.update({k: jax.device_put(v, self.s.batch_sharding[k]) for k, v in extra.items()})
      if mu > 1:  # kept (and checkpointed) for the updates that reuse it
        host.update({k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                     for k, v in extra.items()})
        prompt_iter.rollout, prompt_iter.rollout_step = host, first
    if step - first == mu - 1:
      prompt_iter.rollout, prompt_iter.rollout_step = None, -1  # its last update
    return batch
