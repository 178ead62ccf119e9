"""The restore order of a run: (1) the newest complete checkpoint in the workdir, (2) params from
checkpoint.init_from (the optimizer state is built from them), (3) a random init born sharded.

A LoRA run restores its adapters, optimizer state and data iterator from the workdir and loads
the frozen base from checkpoint.init_from on every start (checkpoints never hold the base).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Iterator

import jax
import jax.numpy as jnp

from gemma3_train.training import checkpoint as checkpoint_lib
from gemma3_train import config as config_lib
from gemma3_train.training import init_from
from gemma3_train.models import lora as lora_lib
from gemma3_train.training import optimizer as optimizer_lib
from gemma3_train.convert import peft as peft_lib

if TYPE_CHECKING:
  from gemma3_train.training import loop as train_lib

log = logging.getLogger(__name__)


def restore_or_init(s: train_lib.Setup, ckpt: checkpoint_lib.Checkpointer,
                    train_iter: Iterator[dict] | None) -> tuple[train_lib.State, int]:
  """(state, first step) in the restore order above."""
  c = s.config
  if c.lora.rank:
    return _lora(s, ckpt, train_iter)
  restored = ckpt.restore_latest(s.abstract_state, train_iter)
  if restored is not None:
    step = restored[1]
    warn_if_schedule_changed(c, checkpoint_lib.saved_config(ckpt.directory / str(step)), step)
    return restored
  if c.checkpoint.init_from:
    log.info('Initializing params from %s', c.checkpoint.init_from)
    params = init_from.load_init_params(c.checkpoint.init_from, c, s.abstract_state)
    step = jax.device_put(jnp.zeros((), jnp.int32), s.state_shardings['step'])
    return {'step': step, 'params': params, 'opt_state': s.init_opt_state(params)}, 0
  return s.init_state(), 0


def _lora(s: train_lib.Setup, ckpt: checkpoint_lib.Checkpointer,
          train_iter: Iterator[dict] | None) -> tuple[train_lib.State, int]:
  """LoRA: adapters, optimizer state and data iterator from the workdir, else fresh adapters
  (B = 0) or lora.init_adapter's; the frozen base from checkpoint.init_from (else the seed's
  random init) on every start, as checkpoints never hold it."""
  c = s.config
  restored = ckpt.restore_latest({k: v for k, v in s.abstract_state.items() if k != 'base'},
                                 train_iter)
  loaded = None
  if c.checkpoint.init_from:
    log.info('Loading the frozen base from %s', c.checkpoint.init_from)
    loaded = init_from.load_init_params(
        c.checkpoint.init_from, c, {'params': lora_lib.load_abstract(c, s.abstract_state)})
    base = lora_lib.base_from_params(loaded, s.abstract_state['base'])
  else:
    base = s.init_base()
  if restored is not None:
    step = restored[1]
    warn_if_schedule_changed(c, checkpoint_lib.saved_config(ckpt.directory / str(step)), step)
    return {**restored[0], 'base': base}, step
  state = s.init_trainable()
  params = state['params']
  if loaded is not None:
    params = lora_lib.with_loaded_trainables(params, loaded)
  if c.lora.init_adapter:
    params = peft_lib.read_adapter(c.lora.init_adapter, c, params)
  if params is not state['params']:
    state = {**state, 'params': params, 'opt_state': s.init_opt_state(params)}
  return {**state, 'base': base}, 0


_SCHEDULE_FIELDS = ('train.num_steps', 'optim.lr', 'optim.schedule', 'optim.warmup_steps',
                    'optim.decay_fraction', 'optim.min_lr_ratio')


def warn_if_schedule_changed(c: config_lib.Config, saved: dict | None, step: int) -> None:
  """One WARNING line when the resumed run's learning-rate schedule differs from the saved one:
  make_schedule depends on the run length, so a new train.num_steps reshapes it too."""
  if not saved:
    return
  ours = {name: getattr(getattr(c, name.split('.')[0]), name.split('.')[1])
          for name in _SCHEDULE_FIELDS}
  theirs = {name: saved.get(name.split('.')[0], {}).get(name.split('.')[1], ours[name])
            for name in _SCHEDULE_FIELDS}
  changed = [f'{name} {theirs[name]} -> {ours[name]}' for name in _SCHEDULE_FIELDS
             if theirs[name] != ours[name]]
  if not changed:
    return
  old_optim = dataclasses.replace(c.optim, **{name.split('.')[1]: theirs[name]
                                              for name in _SCHEDULE_FIELDS
                                              if name.startswith('optim.')})
  lr_old = optimizer_lib.make_schedule(old_optim, theirs['train.num_steps'])(step)
  lr_new = optimizer_lib.make_schedule(c.optim, c.train.num_steps)(step)
  log.warning('Resuming at step %d with a changed schedule: %s; learning rate at step %d: '
              '%.3g -> %.3g', step, ', '.join(changed), step, float(lr_old), float(lr_new))
