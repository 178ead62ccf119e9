"""The restore order of a run: (1) the newest complete checkpoint in the workdir, (2) params from
checkpoint.init_from (the optimizer state is built from them), (3) a random init born sharded.

Frozen parts (frozen.py: a LoRA run's base, a frozen image encoder) are never in a checkpoint:
on every start they come from checkpoint.init_from, else from the seed's random init.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import peft as peft_lib
from gemma3_train.training import checkpoint as checkpoint_lib
from gemma3_train.training import frozen as frozen_lib
from gemma3_train.training import init_from
from gemma3_train.training import optimizer as optimizer_lib
from gemma3_train.training import state as state_lib

log = logging.getLogger(__name__)


def restore_or_init(s: state_lib.Setup, ckpt: checkpoint_lib.Checkpointer,
                    train_iter: Iterator[dict] | None) -> tuple[state_lib.State, int]:
  """(state, first step) in the restore order above, with the objective's frozen models."""
  state, step = _restore_or_init(s, ckpt, train_iter)
  frozen_models = s.objective.frozen_models()
  if frozen_models:
    state = {**state, 'frozen_models': {
        name: _load_frozen_model(s, name, path) for name, path in frozen_models.items()}}
  return state, step


def _load_frozen_model(s: state_lib.Setup, name: str, path: str) -> nnx.State:
  """An objective's frozen model from its checkpoint, into its shardings (init_from's reader:
  any checkpoint convert reads, of objective.frozen_model_config's shapes); path '' is the
  seed's random init, the trained model's start."""
  abstract = s.abstract_state['frozen_models'][name]
  if not path:
    log.info('The frozen %s model is the seed\'s random init', name)
    start = s.init_trainable()['params']
    start = frozen_lib.merged(start, s.init_frozen())
    return frozen_lib.stored(frozen_lib.params_from_loaded(
        frozen_lib.float_abstract(abstract), start), abstract)
  log.info('Loading the frozen %s model from %s', name, path)
  c = s.config
  m = s.objective.frozen_model_config(name)
  if m != c.model:  # another model's shapes (a larger teacher)
    c = dataclasses.replace(c, model=m)
  return frozen_lib.load(path, c, abstract)


def _restore_or_init(s: state_lib.Setup, ckpt: checkpoint_lib.Checkpointer,
                     train_iter: Iterator[dict] | None) -> tuple[state_lib.State, int]:
  c = s.config
  abstract_frozen = s.abstract_state['frozen']
  restored = ckpt.restore_latest(state_lib.saved(s.abstract_state), train_iter,
                                 legacy=_legacy_layout(s))
  loaded = None
  if c.checkpoint.init_from and (restored is None or abstract_frozen):
    log.info('Loading %s from %s', 'the frozen parts' if restored else 'params',
             c.checkpoint.init_from)
    loaded = init_from.load_init_params(c.checkpoint.init_from, c,
                                        {'params': frozen_lib.load_abstract(c, s.abstract_state)})
  frozen = frozen_lib.from_loaded(loaded, abstract_frozen) if loaded is not None else None
  if restored is not None:
    state, step = restored
    warn_if_schedule_changed(c, checkpoint_lib.saved_config(ckpt.directory / str(step)), step)
    if frozen is None:
      frozen = s.init_frozen() if abstract_frozen else {}
    return {**state, 'frozen': frozen}, step
  return _fresh_state(s, loaded, frozen), 0


def initial_state(s: state_lib.Setup) -> state_lib.State:
  """The state a run starts from when its workdir has no checkpoint (orders (2) and (3)), with
  no frozen models: what a precomputing objective scores before training."""
  c = s.config
  loaded = frozen = None
  if c.checkpoint.init_from:
    loaded = init_from.load_init_params(c.checkpoint.init_from, c,
                                        {'params': frozen_lib.load_abstract(c, s.abstract_state)})
    frozen = frozen_lib.from_loaded(loaded, s.abstract_state['frozen'])
  return _fresh_state(s, loaded, frozen)


def _fresh_state(s: state_lib.Setup, loaded, frozen) -> state_lib.State:
  """The step-0 state from the params loaded from init_from (None: the seed's init)."""
  c = s.config
  if loaded is None:
    state = s.init_state()
  elif frozen_lib.all_loaded(s.abstract_state['params'], loaded):  # a full model: no random init
    params = frozen_lib.params_from_loaded(s.abstract_state['params'], loaded)
    step = jax.device_put(jnp.zeros((), jnp.int32), s.state_shardings['step'])
    state = {'step': step, 'params': params, 'opt_state': s.init_opt_state(params),
             'frozen': frozen}
  else:  # LoRA: fresh adapters (B = 0), the loaded embedding with lora.train_embedding
    state = s.init_trainable()
    params = frozen_lib.params_from_loaded(state['params'], loaded)
    state = {**state, 'params': params, 'opt_state': s.init_opt_state(params), 'frozen': frozen}
  if c.lora.init_adapter:
    params = peft_lib.read_adapter(c.lora.init_adapter, c, state['params'])
    state = {**state, 'params': params, 'opt_state': s.init_opt_state(params)}
  return state


def _legacy_layout(s: state_lib.Setup) -> tuple[dict, object] | None:
  """Checkpoints written before frozen parts left the params (frozen image encoder runs) hold
  the encoder inside 'params': (their abstract, a function taking such a restored state to
  today's layout), or None when today's layout is the old one."""
  frozen = s.abstract_state['frozen']
  if 'vision_encoder' not in frozen:
    return None
  old = {**state_lib.saved(s.abstract_state),
         'params': nnx.merge_state(s.abstract_state['params'], frozen['vision_encoder'])}

  def convert(state):
    return {**state, 'params': frozen_lib.split_params(s.config, state['params'])[0]}
  return old, convert


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
