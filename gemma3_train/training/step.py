"""The jitted train and eval steps: one optimizer step over the global batch (accumulated over
microbatches by a scan), whatever the objective (objectives/) asks to differentiate."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gemma3_train import config as config_lib
from gemma3_train.models import lora
from gemma3_train import sharding

State = dict[str, Any]


def _frozen_models(state: State, frozen_model_graphdef) -> dict:
  """The objective's frozen models, built from the state (inputs, not differentiated)."""
  return {name: nnx.merge(frozen_model_graphdef[name], part)
          for name, part in state.get('frozen_models', {}).items()}


def _loss_sums(params, state: State, batch: dict, *, graphdef, frozen_model_graphdef,
               objective, dropout_key=None, dropout_rate: float = 0.0
               ) -> tuple[jax.Array, dict]:
  """The objective's summed loss and parts. The frozen parts and the objective's frozen models
  come from the state: inputs, not differentiated."""
  model = nnx.merge(graphdef, params, *state['frozen'].values())
  if dropout_key is not None:  # LoRA adapter dropout: training steps only
    lora.set_dropout(model, dropout_key, dropout_rate)
  return objective.loss_sums(model, batch, _frozen_models(state, frozen_model_graphdef))


def _with_step(objective, state: State, batch: dict) -> dict:
  """objective.reads_step: the batch with 'step' and 'row' ([B] int32), so that an objective's
  draws depend on (seed, step, row, column) only, not on microbatches, sharding or a resume."""
  if not objective.reads_step:
    return batch
  B = batch['inputs'].shape[0]
  return {**batch, 'step': jnp.full((B,), state['step'], jnp.int32),
          'row': jnp.arange(B, dtype=jnp.int32)}


def _dropout_key(c: config_lib.Config, step: jax.Array) -> jax.Array | None:
  """The LoRA adapter dropout key of a train step: a function of train.seed and the step, so
  that a resumed run draws the same masks (None without lora.dropout)."""
  if not (c.lora.rank and c.lora.dropout):
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(c.train.seed), 0xD50), step)


def train_step(state: State, batch: dict, *, graphdef, frozen_model_graphdef, tx, schedule,
               objective, c: config_lib.Config, mesh: Mesh, rules) -> tuple[State, dict]:
  """One optimizer step over the global batch, accumulated over microbatches by a scan."""
  with sharding.use_mesh(mesh, rules):
    params = state['params']
    batch = _with_step(objective, state, batch)
    grad_fn = jax.grad(functools.partial(_loss_sums, graphdef=graphdef,
                                         frozen_model_graphdef=frozen_model_graphdef,
                                         objective=objective, dropout_rate=c.lora.dropout),
                       has_aux=True)
    A = c.optim.grad_accum_steps
    key = _dropout_key(c, state['step'])  # None unless lora.dropout
    drop = lambda k: {} if k is None else {'dropout_key': k}
    if A == 1:
      grads, sums = grad_fn(params, state, batch, **drop(key))
    else:
      # Strided microbatches (row j*A + a goes to microbatch a) keep every device's rows local.
      def split(x):
        x = x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, 'act_batch', 'act_len')[:x.ndim])
      micro = jax.tree.map(split, batch)

      def body(carry, mb):
        mb, a = mb
        g, s = grad_fn(params, state, mb,
                       **drop(None if key is None else jax.random.fold_in(key, a)))
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      zero_sums = jax.eval_shape(lambda: grad_fn(params, state, jax.tree.map(
          lambda x: x[0], micro))[1])
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)
      (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (micro, jnp.arange(A)))
    weight = jnp.maximum(sums['weight_sum'], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_state = {**state, 'step': state['step'] + 1, 'opt_state': opt_state,
                 'params': optax.apply_updates(params, updates)}
    metrics = {**objective.metrics(sums),
               'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state['step']),
               'tokens': sums.get('token_sum', sums['weight_sum'])}
  return new_state, metrics


def eval_step(state: State, batch: dict, *, graphdef, frozen_model_graphdef, objective, mesh,
              rules) -> dict:
  """The objective's summed parts on one eval batch (no dropout)."""
  with sharding.use_mesh(mesh, rules):
    model = nnx.merge(graphdef, state['params'], *state['frozen'].values())
    return objective.eval_sums(model, _with_step(objective, state, batch),
                               _frozen_models(state, frozen_model_graphdef))
