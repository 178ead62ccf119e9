"""optax chain: learning-rate schedules, global-norm clipping, AdamW with a decay mask; which
parameters train (a frozen image encoder gets no gradient and no optimizer state)."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from gemma3_train import config as config_lib


def make_schedule(o: config_lib.OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr, then cosine | linear | constant | wsd down to lr * min_lr_ratio."""
  warmup = min(o.warmup_steps, num_steps)
  rest = max(num_steps - warmup, 1)
  end = o.lr * o.min_lr_ratio
  if o.schedule == 'cosine':
    after = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr_ratio)
  elif o.schedule == 'linear':
    after = optax.linear_schedule(o.lr, end, rest)
  elif o.schedule == 'constant':
    after = optax.constant_schedule(o.lr)
  elif o.schedule == 'wsd':  # warmup-stable-decay: flat, then a linear decay at the end
    decay = max(int(round(rest * o.decay_fraction)), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, end, decay)],
        [rest - decay])
  else:
    raise config_lib.ConfigError(f'optim.schedule={o.schedule!r}: expected one of '
                                 f'{config_lib.SCHEDULES}')
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def decay_mask(o: config_lib.OptimConfig):
  """Returns params -> same-structured bools: True where weight decay applies.

  Matrices decay; norm scales and the embedding table decay only when asked (the embedding is
  also the tied LM head, and decaying it is a modelling choice, not a default).
  """
  def mask(params):
    def one(v):
      if not _is_variable(v):  # a bare array (no names): a matrix unless it is a vector
        return getattr(v, 'ndim', 0) > 1
      names = v.get_metadata().get('logical_axes') or ()
      if 'norm' in names:
        keep = o.decay_norms
      elif 'vocab' in names:
        keep = o.decay_embedding
      else:
        keep = True
      return v.replace(keep)
    return jax.tree.map(one, params, is_leaf=_is_variable)
  return mask


def make_optimizer(c: config_lib.Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  o = c.optim
  schedule = make_schedule(o, c.train.num_steps)
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask(o)))
  return optax.chain(*parts), schedule
