"""The train state and what builds it: abstract shapes, shardings, the jitted inits and steps.

A train state is a plain dict pytree:
  {'step': int32[], 'params': nnx.State of the trainable Params, 'opt_state': optax state of
   those, 'frozen': {name: nnx.State} (frozen.py: never differentiated, optimized or saved)}
  and, when the objective names frozen models (a reference, a teacher), 'frozen_models':
  {name: nnx.State}, held the same way.
Params keep their nnx.Variable wrappers so that the logical axis metadata travels with them
(and with the Adam moments optax builds from them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gemma3_train import config as config_lib
from gemma3_train.models import attention
from gemma3_train.models import context
from gemma3_train.models import decoder
from gemma3_train.models import layers
from gemma3_train import sharding
from gemma3_train.training import frozen as frozen_lib
from gemma3_train.training import objectives
from gemma3_train.training import optimizer as optimizer_lib
from gemma3_train.training import step as step_lib

State = dict[str, Any]


def new_state(c: config_lib.Config, tx: optax.GradientTransformation) -> State:
  """A random train state: the seed's model split into trainable params and frozen parts."""
  params, frozen = frozen_lib.split(c, decoder.build(c))
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'frozen': frozen}


def saved(state: State) -> State:
  """The part of a train state that checkpoints hold (frozen parts and models are rebuilt)."""
  return {k: v for k, v in state.items() if k not in ('frozen', 'frozen_models')}


@dataclasses.dataclass
class Setup:
  config: config_lib.Config
  mesh: Mesh
  rules: dict[str, tuple[str, ...]]
  objective: objectives.base.Objective
  graphdef: Any
  frozen_model_graphdef: dict  # name -> graphdef of each of objective.frozen_models()
  abstract_state: State  # ShapeDtypeStructs with shardings; nothing allocated
  state_shardings: State
  batch_sharding: dict[str, NamedSharding]
  schedule: optax.Schedule
  init_state: Callable[[], State]  # jitted random init, born sharded
  init_trainable: Callable[[], State]  # the same without the frozen parts
  init_frozen: Callable[[], dict]  # the frozen parts alone (the seed's)
  init_opt_state: Callable[[Any], Any]  # jitted tx.init: params -> sharded optimizer state
  train_step: Callable[[State, dict], tuple[State, dict]]  # jitted, state donated
  eval_step: Callable[[State, dict], dict]
  state: State | None = None


def abstract_batch(c: config_lib.Config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the objective reads, rows over the batch axes ([B, L] arrays' positions
  over the context axis)."""
  rules = sharding.parse_rules(c.mesh.rules)
  return {k: jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=sharding.batch_sharding(mesh, shape, rules))
          for k, (shape, dtype) in objectives.get(c).batch_shapes().items()}


def _init_program(fn: Callable[[], Any], out_shardings: Any, mesh: Mesh) -> Callable[[], Any]:
  return layers.init_program(fn, out_shardings, cpu=mesh.devices.flat[0].platform == 'cpu')


def _check_splash_blocks(c: config_lib.Config, mesh: Mesh, rules) -> None:
  """Where the step runs splash (attention.resolve: TPU, or named), its blocks must tile each
  attention call's sequence: data.seq_len, or under context parallelism one chunk of it.
  Checked here, before tracing, so that a bad pair is one line naming the fields."""
  m, L = c.model, c.data.seq_len
  if attention.resolve(m.attention_impl, m.dtype, images=m.vision) != 'splash':
    return
  with sharding.use_mesh(mesh, rules):
    shards = sharding.sequence_shards(L)
  chunks = 1 if shards == 1 else context.chunk_ids(shards, m.context_layout).size
  T = L // chunks
  if not attention.splash_fits(T, m.attention_block_size):
    what = f'data.seq_len={L}' + (f' in {chunks} context chunks of {T}' if chunks > 1 else '')
    raise config_lib.ConfigError(
        f'model.attention_block_size={m.attention_block_size}: splash attention needs a block '
        f'that divides {what} and is a multiple of {attention.SPLASH_ALIGN}')


def _check_cudnn(c: config_lib.Config, mesh: Mesh) -> None:
  """attention_impl=cudnn, named: cuDNN's flash attention takes 16-bit inputs on a GPU. Checked
  before tracing so that either is one line, not JAX's error from inside the step."""
  m = c.model
  if m.attention_impl != 'cudnn':
    return
  if jnp.dtype(m.dtype) not in attention.CUDNN_DTYPES:
    raise config_lib.ConfigError(
        f'model.attention_impl=cudnn: cuDNN attention needs model.dtype bfloat16 or float16, '
        f'got {m.dtype} (or use attention_impl=auto: the reference in float32)')
  platform = mesh.devices.flat[0].platform
  if platform != 'gpu':
    raise config_lib.ConfigError(
        f'model.attention_impl=cudnn: cuDNN attention needs a GPU; this run compiles for '
        f'{platform} (use auto: splash on TPU, the reference elsewhere)')


def setup(c: config_lib.Config, mesh: Mesh, *, abstract: bool = False) -> Setup:
  """Builds the jitted steps and (unless abstract) the initialized, sharded state."""
  rules = sharding.parse_rules(c.mesh.rules)
  _check_cudnn(c, mesh)
  _check_splash_blocks(c, mesh, rules)
  objective = objectives.get(c)
  tx, schedule = optimizer_lib.make_optimizer(c)
  make = functools.partial(new_state, c, tx)
  abstract_state = jax.eval_shape(make)
  frozen_models = objective.frozen_models()
  frozen_model_graphdef = {}
  if frozen_models:  # plain models (no LoRA) of their configs; loaded at each start (restore.py)
    plain = {}  # one eval_shape per distinct config
    abstract_state['frozen_models'] = {}
    for name in frozen_models:
      key = objective.frozen_model_config(name), objective.frozen_param_dtype()
      if key not in plain:
        plain[key] = frozen_lib.abstract_model(*key)
      frozen_model_graphdef[name] = nnx.graphdef(plain[key])
      abstract_state['frozen_models'][name] = nnx.state(plain[key], frozen_lib.MODEL_VARIABLES)
  state_shardings = sharding.state_shardings(abstract_state, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: decoder.build(c, nnx.Rngs(0))))
  batch_sharding = {k: a.sharding for k, a in abstract_batch(c, mesh).items()}
  replicated = NamedSharding(mesh, P())
  train_step = jax.jit(
      functools.partial(step_lib.train_step, graphdef=graphdef,
                        frozen_model_graphdef=frozen_model_graphdef, tx=tx, schedule=schedule,
                        objective=objective, c=c, mesh=mesh, rules=rules),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(
      functools.partial(step_lib.eval_step, graphdef=graphdef,
                        frozen_model_graphdef=frozen_model_graphdef, objective=objective,
                        mesh=mesh, rules=rules),
      in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)
  # jit drops what each init does not return: no random frozen part where one is loaded.
  own = {k: v for k, v in state_shardings.items() if k != 'frozen_models'}
  init_state = _init_program(make, own, mesh)
  init_trainable = _init_program(lambda: saved(make()), saved(state_shardings), mesh)
  init_frozen = _init_program(lambda: make()['frozen'], state_shardings['frozen'], mesh)
  init_opt_state = jax.jit(tx.init, out_shardings=state_shardings['opt_state'])
  s = Setup(config=c, mesh=mesh, rules=rules, objective=objective, graphdef=graphdef,
            frozen_model_graphdef=frozen_model_graphdef, abstract_state=abstract_state,
            state_shardings=state_shardings, batch_sharding=batch_sharding, schedule=schedule,
            init_state=init_state, init_trainable=init_trainable, init_frozen=init_frozen,
            init_opt_state=init_opt_state, train_step=train_step, eval_step=eval_step)
  if not abstract:
    s.state = init_state()
  return s
