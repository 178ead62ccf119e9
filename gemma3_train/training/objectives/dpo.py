"""Preference tuning on {prompt, chosen, rejected} pairs: train.objective='dpo', dpo.loss picks
the loss (docs/preference.md).

Rows hold whole pairs (data/preference.py): a row's k-th pair is segment 2k+1 (chosen) and 2k+2
(rejected), its completion tokens the weighted targets. A sequence's log-probability is the sum
of log p(target) over its completion tokens (lm_head.token_logprobs, chunked); per-segment sums
are a per-row segment_sum, so any number of pairs packs into a row.

The formulas and defaults are TRL's (trl 1.x: trainer/dpo_trainer.py for sigmoid, ipo and hinge;
experimental/cpo for simpo; experimental/orpo for orpo). With the sums pc, pr of the policy and
rc, rr of the reference, n_c, n_r the completion token counts and d = (pc - rc) - (pr - rr):
  sigmoid  -(1 - e) log s(b d) - e log s(-b d)     (e = dpo.label_smoothing: conservative DPO)
  ipo      ((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 b))^2
  hinge    max(0, 1 - b d)
  simpo    as sigmoid on pc / n_c - pr / n_r - gamma / b          (no reference)
  orpo     the chosen completions' mean token NLL - lambda log s(log odds(pc / n_c) -
           log odds(pr / n_r)), log odds(a) = a - log(1 - e^a)     (no reference)
The step divides the summed loss by the batch's pair count (sums['weight_sum']): TRL's mean.
The reference is the frozen copy of checkpoint.init_from (a full fine-tune: frozen_models()),
or, with LoRA, the same model with the adapters off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import data as data_lib
from gemma3_train import sharding
from gemma3_train.data import images as images_lib
from gemma3_train.models import lm_head
from gemma3_train.models import lora
from gemma3_train.training import precompute
from gemma3_train.training.objectives import base

REFERENCE = 'reference'
NO_REFERENCE = config_lib.DPO_REFERENCE_FREE
_SUMS = ('loss_sum', 'weight_sum', 'token_sum', 'chosen_reward_sum', 'rejected_reward_sum',
         'accuracy_sum', 'chosen_logps_sum', 'rejected_logps_sum')


def needs_reference(c) -> bool:
  """Whether each step runs a reference model (dpo.reference_logps=online, a loss with one)."""
  return c.dpo.loss not in NO_REFERENCE and c.dpo.reference_logps == 'online'


def _log1mexp(a):
  """log(1 - e^a) for a < 0, stable at both ends."""
  return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def _smoothed_sigmoid(z, e: float):
  return -(1.0 - e) * jax.nn.log_sigmoid(z) - e * jax.nn.log_sigmoid(-z)


def pair_sums(values_BL, segment_ids_BL) -> tuple[jax.Array, jax.Array]:
  """Per-pair sums of a [B, L] array: (chosen [B, P], rejected [B, P]), P = L // 2 + 1 slots
  (a row holds at most L // 2 pairs; unused slots are 0)."""
  L = segment_ids_BL.shape[1]
  P = L // 2 + 1
  per_segment = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=2 * P + 1))(
      values_BL, segment_ids_BL)
  return per_segment[:, 1::2], per_segment[:, 2::2]


def sequence_logps(model, batch: dict, chunk_size: int) -> jax.Array:
  """log p(target) * weight per position, float32 [B, L]: summed per segment, a completion's
  log-probability."""
  images = images_lib.from_batch(batch)
  x_BLD = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'], images=images)
  targets, weights = lm_head.mask_image_targets(batch['targets'], batch['weights'],
                                                model.cfg.vocab_size)
  logp_BL = lm_head.token_logprobs(x_BLD, model.embedder.table(), targets,
                                   chunk_size=chunk_size)
  return logp_BL * weights


def adapters_off(model: nnx.Module) -> nnx.Module:
  """A LoRA model with every adapter zeroed: its base, sharing the base's arrays."""
  graphdef, adapters, rest = nnx.split(model, lora.TRAINABLE, ...)
  zeros = jax.tree.map(jnp.zeros_like, adapters)
  return nnx.merge(graphdef, zeros, rest)


def pair_losses(c, pc, pr, rc, rr, n_c, n_r) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, chosen reward, rejected reward) per pair, float32 [...], of dpo.loss (module doc)."""
  p = c.dpo
  b, e = p.beta, p.label_smoothing
  n_c, n_r = jnp.maximum(n_c, 1.0), jnp.maximum(n_r, 1.0)
  if p.loss in ('sigmoid', 'hinge', 'ipo'):
    chosen, rejected = b * (pc - rc), b * (pr - rr)
    d = (pc - rc) - (pr - rr)
    if p.loss == 'sigmoid':
      loss = _smoothed_sigmoid(b * d, e)
    elif p.loss == 'hinge':
      loss = jax.nn.relu(1.0 - b * d)
    else:
      loss = ((pc - rc) / n_c - (pr - rr) / n_r - 1.0 / (2.0 * b)) ** 2
    return loss, chosen, rejected
  ac, ar = pc / n_c, pr / n_r  # length-normalized
  if p.loss == 'simpo':
    return _smoothed_sigmoid(b * (ac - ar - p.simpo_gamma / b), e), b * ac, b * ar
  log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))  # orpo (its NLL term: loss_sums)
  lam = p.orpo_lambda
  return -lam * jax.nn.log_sigmoid(log_odds), lam * ac, lam * ar


class Preference(base.Objective):
  name = 'dpo'

  def batch_shapes(self) -> base.Shapes:
    """The packed rows of pairs ([B, L], as ce's); with precomputed reference log-probs also
    'reference_logps' float32 [B, L] (a sequence's sum at its segment's first position)."""
    c = self.config
    B, L = c.train.global_batch_size, c.data.seq_len
    shapes = {k: ((B, L), dtype) for k, dtype in data_lib.BATCH_DTYPES.items()}
    if c.model.vision:
      S = c.model.vision_image_size
      image_shapes = {'images': (B, c.data.max_images, S, S, 3), 'image_counts': (B,)}
      shapes.update({k: (image_shapes[k], dtype)
                     for k, dtype in data_lib.IMAGE_BATCH_DTYPES.items()})
    if c.dpo.reference_logps == 'precompute' and c.dpo.loss not in NO_REFERENCE:
      shapes['reference_logps'] = ((B, L), jnp.float32)
    return shapes

  def frozen_models(self) -> dict[str, str]:
    c = self.config
    if c.lora.rank or not needs_reference(c):
      return {}  # LoRA: the base with the adapters off is the reference
    return {REFERENCE: c.checkpoint.init_from}  # '' = the seed's init (the policy's start)

  def frozen_param_dtype(self) -> str:
    return self.config.dpo.reference_dtype

  def _precomputes(self) -> bool:
    c = self.config
    return c.dpo.reference_logps == 'precompute' and c.dpo.loss not in NO_REFERENCE

  def resolve(self, c, workdir):
    if not self._precomputes() or c.dpo.reference_logps_dir:
      return c
    return c.replace(dpo=dict(reference_logps_dir=str(precompute.table_dir(c, workdir))))

  def prepare(self, s, workdir, initial_state):
    """dpo.reference_logps=precompute: the tables of the train (and eval) pairs."""
    if not self._precomputes():
      return
    c = s.config

    def score(state, batch):
      with sharding.use_mesh(s.mesh, s.rules):
        model = nnx.merge(s.graphdef, state['params'], *state['frozen'].values())
        if c.lora.rank:
          model = adapters_off(model)
        return pair_sums(sequence_logps(model, batch, c.train.loss_chunk_size),
                         batch['segment_ids'])
    splits = ('train', 'eval') if c.train.eval_every and c.train.eval_steps else ('train',)
    precompute.ensure(s, workdir, splits, initial_state=initial_state, score=jax.jit(score))

  def reference_logps(self, model, batch, frozen_models) -> jax.Array:
    """The reference's log p(target) * weight per position [B, L], not differentiated."""
    c = self.config
    if 'reference_logps' in batch:
      return batch['reference_logps']
    ref = adapters_off(model) if c.lora.rank else frozen_models[REFERENCE]
    return jax.lax.stop_gradient(sequence_logps(ref, batch, c.train.loss_chunk_size))

  def loss_sums(self, model, batch, frozen_models=None):
    c = self.config
    seg = batch['segment_ids']
    weights = batch['weights']
    logp_BL = sequence_logps(model, batch, c.train.loss_chunk_size)
    pc, pr = pair_sums(logp_BL, seg)
    n_c, n_r = pair_sums(weights, seg)
    if c.dpo.loss in NO_REFERENCE:
      rc = rr = jnp.zeros_like(pc)
    else:
      rc, rr = pair_sums(self.reference_logps(model, batch, frozen_models), seg)
    valid = (n_c > 0).astype(jnp.float32)
    loss, chosen, rejected = pair_losses(c, pc, pr, rc, rr, n_c, n_r)
    pairs = jnp.sum(valid)
    loss_sum = jnp.sum(valid * loss)
    if c.dpo.loss == 'orpo':  # + the chosen tokens' mean NLL, as a sum the step divides by pairs
      chosen_tokens = jnp.sum(valid * n_c)
      nll_mean = -jnp.sum(valid * pc) / jnp.maximum(chosen_tokens, 1.0)
      loss_sum = loss_sum + pairs * nll_mean
    sums = {'loss_sum': loss_sum, 'weight_sum': pairs,
            'token_sum': jnp.sum(weights),
            'chosen_reward_sum': jnp.sum(valid * chosen),
            'rejected_reward_sum': jnp.sum(valid * rejected),
            'accuracy_sum': jnp.sum(valid * (chosen > rejected)),
            'chosen_logps_sum': jnp.sum(valid * pc),
            'rejected_logps_sum': jnp.sum(valid * pr)}
    return loss_sum, sums

  def metrics(self, sums):
    """TRL's names: rewards/* and logps/* are means over the step's pairs."""
    return _means(sums, jnp.maximum(sums['weight_sum'], 1.0))

  def eval_summary(self, totals):
    return {**_means(totals, max(totals.get('weight_sum', 0.0), 1.0)),
            'tokens': totals.get('token_sum', 0.0)}


def _means(sums: dict, pairs) -> dict:
  """The logged values of summed parts (a step's arrays or an eval's host floats)."""
  chosen, rejected = sums['chosen_reward_sum'] / pairs, sums['rejected_reward_sum'] / pairs
  return {'loss': sums['loss_sum'] / pairs,
          'rewards/chosen': chosen, 'rewards/rejected': rejected,
          'rewards/margins': chosen - rejected,
          'rewards/accuracies': sums['accuracy_sum'] / pairs,
          'logps/chosen': sums['chosen_logps_sum'] / pairs,
          'logps/rejected': sums['rejected_logps_sum'] / pairs,
          'pairs': sums['weight_sum']}
