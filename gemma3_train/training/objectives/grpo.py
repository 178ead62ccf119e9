"""RL with verifiable rewards: train.objective='grpo', rl.loss picks the loss (docs/rl.md).

Each rollout (training/rollout.py) samples rl.group_size completions of rl.prompts_per_step
prompts with the live train state on the training mesh, scores them with the reward functions
(training/rewards.py) and lays them out one completion per row: prompt + completion tokens, the
completion tokens (the stop token included, nothing after it) the weighted targets, with each
row's group-relative advantage. rl.updates_per_batch optimizer steps then train on that batch.

The formulas and defaults are TRL's GRPOTrainer (trl 1.x, trainer/grpo_trainer.py:
_generate_and_score_completions for the advantages, _compute_loss for the loss). With log p the
policy's per-token log-probability of logits / rl.temperature, old the rollout's (the policy's
own, not differentiated, when rl.updates_per_batch = 1), ref the reference's, A the advantage:
  ratio  = exp(log p - old),  per-token loss = -min(ratio A, clip(ratio, 1 - e_low, 1 + e_high) A)
           + beta (exp(ref - log p) - (ref - log p) - 1)          (the k3 KL estimator)
  grpo     each completion's token mean, averaged over completions
  dapo     the token mean over the batch
  dr_grpo  the token sum / (completions x rl.max_completion_len)
The step divides the summed loss by sums['weight_sum']: completions (grpo, dr_grpo) or tokens
(dapo), over the whole batch, microbatches included. The reference (rl.beta > 0) is the frozen
copy of checkpoint.init_from, or with LoRA the model with the adapters off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3_train import data as data_lib
from gemma3_train import sharding
from gemma3_train.training import rewards as rewards_lib
from gemma3_train.training import rollout as rollout_lib
from gemma3_train.training.objectives import base
from gemma3_train.training.objectives import dpo

REFERENCE = dpo.REFERENCE
_LOGITS = ('act_batch', 'act_len', 'act_vocab')


def logps_and_entropy(x_BLD, table_VD, targets_BL, *, chunk_size: int):
  """(log p(target), the distribution's entropy) per position, float32 [B, L], chunk_size
  positions at a time under jax.checkpoint (no [B, L, V] logits kept); the entropy is not
  differentiated (a metric)."""
  B, L, D = x_BLD.shape
  C = min(chunk_size, L)
  n = -(-L // C)
  pad = n * C - L
  x_nBCD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
  t_nBC = jnp.pad(targets_BL, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(x_BCD, t_BC):
    logits_BCV = jnp.einsum('BCD,VD->BCV', x_BCD, table_VD.astype(x_BCD.dtype),
                            preferred_element_type=jnp.float32)
    logits_BCV = sharding.constrain(logits_BCV, _LOGITS)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    p_BCV = jax.lax.stop_gradient(jnp.exp(logits_BCV - lse_BC[..., None]))
    entropy_BC = jax.lax.stop_gradient(lse_BC - jnp.sum(p_BCV * logits_BCV, axis=-1))
    return target_BC - lse_BC, entropy_BC

  _, (logp_nBC, ent_nBC) = jax.lax.scan(lambda _, xs: (None, chunk(*xs)), None,
                                        (x_nBCD, t_nBC))
  back = lambda a: a.swapaxes(0, 1).reshape(B, n * C)[:, :L]
  return back(logp_nBC), back(ent_nBC)


def completion_window(weights_BL, width: int):
  """[B] int32 start of the `width` columns of each row that hold all its weighted
  (completion) positions: the first weighted column, moved left to fit in the row. A
  completion has at most rl.max_completion_len tokens, so that width covers it."""
  L = weights_BL.shape[1]
  first_B = jnp.argmax(weights_BL > 0, axis=1).astype(jnp.int32)
  return jnp.minimum(first_B, L - width)


def token_logps(model, batch: dict, *, temperature: float, chunk_size: int,
                window: int | None = None):
  """(log p(target), entropy) [B, L] of logits / temperature, as TRL scores completions.
  window (rl.max_completion_len): the head runs on each row's completion_window only, as TRL's
  logits_to_keep (the prompt and padding columns, often most of the row, cost no vocabulary
  matmul); the other columns are 0. None: every column."""
  x_BLD = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'])
  if temperature != 1.0:
    x_BLD = x_BLD / jnp.asarray(temperature, x_BLD.dtype)  # logits / T: the head is linear
  table_VD, targets_BL = model.embedder.table(), batch['targets']
  L = targets_BL.shape[1]
  if window is None or window >= L or sharding.sequence_shards(L) > 1:
    return logps_and_entropy(x_BLD, table_VD, targets_BL, chunk_size=chunk_size)
  start_B = completion_window(batch['weights'], window)
  cut = jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, window, axis=0))
  logp_BN, ent_BN = logps_and_entropy(cut(x_BLD, start_B), table_VD, cut(targets_BL, start_B),
                                      chunk_size=chunk_size)
  put = jax.vmap(lambda a, s: jax.lax.dynamic_update_slice_in_dim(
      jnp.zeros((L,), a.dtype), a, s, axis=0))
  return put(logp_BN, start_B), put(ent_BN, start_B)


def per_token_loss(r, logp_BL, old_BL, ref_BL, adv_B):
  """TRL's per-token loss (module doc) and its parts: (loss, kl, low / high clipped) [B, L]."""
  coef_1 = jnp.exp(logp_BL - old_BL)
  coef_2 = jnp.clip(coef_1, 1.0 - r.epsilon_low, 1.0 + r.epsilon_high)
  adv_B1 = adv_B[:, None]
  loss_BL = -jnp.minimum(coef_1 * adv_B1, coef_2 * adv_B1)
  kl_BL = jnp.zeros_like(loss_BL)
  if r.beta:
    d_BL = ref_BL - logp_BL
    kl_BL = jnp.exp(d_BL) - d_BL - 1.0
    loss_BL = loss_BL + r.beta * kl_BL
  low = (coef_1 < 1.0 - r.epsilon_low) & (adv_B1 < 0)
  high = (coef_1 > 1.0 + r.epsilon_high) & (adv_B1 > 0)
  return loss_BL, kl_BL, low.astype(jnp.float32), high.astype(jnp.float32)


class Grpo(base.Objective):
  name = 'grpo'
  makes_batches = True

  def __init__(self, c):
    super().__init__(c)
    self.reward_names = rollout_lib.metric_names(c)
    self._rollouts: rollout_lib.Rollouts | None = None  # built on the first make_batches

  def batch_shapes(self) -> base.Shapes:
    """[B, L] rows of prompt + completion (weights: the completion mask), plus per row
    'advantages' [B], 'rewards' [B, F] (each function's), 'truncated' and 'zero_std' [B]
    (metrics); 'old_logps' [B, L] with rl.updates_per_batch > 1, 'ref_logps' with rl.beta."""
    c = self.config
    B, L, F = c.train.global_batch_size, c.data.seq_len, len(self.reward_names)
    shapes = {k: ((B, L), dtype) for k, dtype in data_lib.BATCH_DTYPES.items()}
    shapes.update({'advantages': ((B,), jnp.float32), 'rewards': ((B, F), jnp.float32),
                   'truncated': ((B,), jnp.float32), 'zero_std': ((B,), jnp.float32)})
    if c.rl.updates_per_batch > 1:
      shapes['old_logps'] = ((B, L), jnp.float32)
    if c.rl.beta:
      shapes['ref_logps'] = ((B, L), jnp.float32)
    return shapes

  def frozen_models(self) -> dict[str, str]:
    c = self.config
    if c.lora.rank or not c.rl.beta:
      return {}  # none, or LoRA: the base with the adapters off
    return {REFERENCE: c.checkpoint.init_from}

  def frozen_param_dtype(self) -> str:
    return self.config.rl.reference_dtype

  def resolve(self, c, workdir):
    rewards_lib.Rewards(c)  # every reward loads, before the workdir is touched
    return c

  def train_iterator(self, c, *, process_index: int = 0, process_count: int = 1):
    from gemma3_train.data import prompts  # pylint: disable=g-import-not-at-top
    del process_index, process_count  # every process reads every prompt (prompts.py)
    return prompts.PromptIterator(c)

  def reference(self, model, frozen_models: dict):
    return dpo.adapters_off(model) if self.config.lora.rank else frozen_models[REFERENCE]

  def logps(self, model, batch):
    c = self.config
    return token_logps(model, batch, temperature=c.rl.temperature,
                       chunk_size=c.train.loss_chunk_size, window=c.rl.max_completion_len)

  def loss_sums(self, model, batch, frozen_models=None):
    r = self.config.rl
    mask_BL = batch['weights'].astype(jnp.float32)
    logp_BL, entropy_BL = self.logps(model, batch)
    old_BL = batch.get('old_logps', jax.lax.stop_gradient(logp_BL))
    loss_BL, kl_BL, low_BL, high_BL = per_token_loss(
        r, logp_BL, old_BL, batch.get('ref_logps'), batch['advantages'])
    tokens_B = jnp.sum(mask_BL, axis=-1)
    rows_B = (tokens_B > 0).astype(jnp.float32)
    masked = lambda a: jnp.sum(a * mask_BL)
    if r.loss == 'grpo':
      total = jnp.sum(jnp.sum(loss_BL * mask_BL, axis=-1) / jnp.maximum(tokens_B, 1.0))
      weight = jnp.sum(rows_B)
    elif r.loss == 'dr_grpo':
      total, weight = masked(loss_BL) / r.max_completion_len, jnp.sum(rows_B)
    else:  # dapo
      total, weight = masked(loss_BL), jnp.sum(mask_BL)
    rewards_BF = batch['rewards']
    reward_B = rewards_BF @ jnp.asarray(rollout_lib.weights(self.config), jnp.float32)
    sums = {'loss_sum': total, 'weight_sum': weight, 'token_sum': jnp.sum(mask_BL),
            'row_sum': jnp.sum(rows_B), 'kl_sum': masked(kl_BL),
            'entropy_sum': masked(entropy_BL), 'clip_low_sum': masked(low_BL),
            'clip_high_sum': masked(high_BL), 'clip_region_sum': masked(jnp.maximum(low_BL,
                                                                                    high_BL)),
            'reward_sum': jnp.sum(rows_B * reward_B),
            'reward_sq_sum': jnp.sum(rows_B * reward_B ** 2),
            'rewards_sum': jnp.sum(rows_B[:, None] * rewards_BF, axis=0),
            'rewards_sq_sum': jnp.sum(rows_B[:, None] * rewards_BF ** 2, axis=0),
            'truncated_sum': jnp.sum(rows_B * batch['truncated']),
            'zero_std_sum': jnp.sum(rows_B * batch['zero_std'])}
    return total, sums

  def metrics(self, sums):
    """TRL's names: reward, reward_std, rewards/NAME/mean|std, completions/*, kl, entropy,
    clip_ratio/*; means over the step's completions (or tokens)."""
    rows = jnp.maximum(sums['row_sum'], 1.0)
    tokens = jnp.maximum(sums['token_sum'], 1.0)

    def std(total, sq):  # unbiased, as torch.std
      return jnp.sqrt(jnp.maximum(sq - total ** 2 / rows, 0.0) / jnp.maximum(rows - 1.0, 1.0))
    out = {'loss': sums['loss_sum'] / jnp.maximum(sums['weight_sum'], 1.0),
           'reward': sums['reward_sum'] / rows,
           'reward_std': std(sums['reward_sum'], sums['reward_sq_sum']),
           'frac_reward_zero_std': sums['zero_std_sum'] / rows,
           'completions/mean_length': sums['token_sum'] / rows,
           'completions/clipped_ratio': sums['truncated_sum'] / rows,
           'entropy': sums['entropy_sum'] / tokens,
           'clip_ratio/low_mean': sums['clip_low_sum'] / tokens,
           'clip_ratio/high_mean': sums['clip_high_sum'] / tokens,
           'clip_ratio/region_mean': sums['clip_region_sum'] / tokens}
    if self.config.rl.beta:
      out['kl'] = sums['kl_sum'] / tokens
    for f, name in enumerate(self.reward_names):
      out[f'rewards/{name}/mean'] = sums['rewards_sum'][f] / rows
      out[f'rewards/{name}/std'] = std(sums['rewards_sum'][f], sums['rewards_sq_sum'][f])
    return out

  def eval_summary(self, totals):
    raise NotImplementedError('train.objective=grpo has no eval batches (train.eval_every=0)')

  def make_batches(self, s, state, step: int, prompt_iter):
    """The batch of train step `step`: a new rollout every rl.updates_per_batch steps (its
    prompts from prompt_iter, which also keeps the rollout between them: prompts.py)."""
    if self._rollouts is None:
      self._rollouts = rollout_lib.Rollouts(s, score_fn(s, self))
    return self._rollouts.batch(state, step, prompt_iter)

  def samples(self) -> list[tuple[str, str]]:
    return [] if self._rollouts is None else self._rollouts.samples


def score_fn(s, objective: Grpo):
  """jit((state, batch) -> {'old_logps' (rl.updates_per_batch > 1), 'ref_logps' (rl.beta)}),
  [B, L] float32 each: the rollout policy's and the reference's log-probabilities."""
  r = s.config.rl

  def score(state, batch):
    with sharding.use_mesh(s.mesh, s.rules):
      model = nnx.merge(s.graphdef, state['params'], *state['frozen'].values())
      out = {}
      if r.updates_per_batch > 1:
        out['old_logps'] = objective.logps(model, batch)[0]
      if r.beta:
        frozen = {name: nnx.merge(s.frozen_model_graphdef[name], part)
                  for name, part in state.get('frozen_models', {}).items()}
        out['ref_logps'] = objective.logps(objective.reference(model, frozen), batch)[0]
      return out
  return jax.jit(score)
