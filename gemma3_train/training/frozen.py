"""Frozen parts of the trained model, held one way.

What does not train is a frozen part: a LoRA run's base (every weight that is not an adapter,
'base'), or a vision model's image encoder with model.vision_trainable=False
('vision_encoder'). The models an objective names (objective.frozen_models(): a DPO or GRPO
reference, a distillation teacher) are held the same way under state['frozen_models'], loaded
from their checkpoints by restore.py. Every frozen part
  - lives in the train state under state['frozen'][name], an input of the train step: never
    differentiated, never in the optimizer state and never in a checkpoint;
  - is rebuilt from its source at each start: checkpoint.init_from (cast, or int8-quantized, to
    its storage dtype), else the seed's random init (the same values as the first start's);
  - is sharded by the same rules as everything else (its leaves keep their logical axes).
The trained model is nnx.merge(graphdef, params, *frozen parts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.models import decoder
from gemma3_train.models import lora
from gemma3_train.models import vision
from gemma3_train.training import init_from

State = nnx.State


def _in_vision_encoder(path, _) -> bool:
  return tuple(path[:2]) == vision.ENCODER_PATH


def split(c: config_lib.Config, model: nnx.Module) -> tuple[State, dict[str, State]]:
  """(trainable params, {name: frozen part}) of the model a config trains (decoder.build).

  LoRA: the LoraParams train, the rest is 'base' (the image tower included). A vision model
  whose tower does not train: its encoder is 'vision_encoder' (the projector still trains).
  """
  if c.lora.rank:
    return nnx.state(model, lora.TRAINABLE), {'base': nnx.state(model, lora.FROZEN)}
  return split_params(c, nnx.state(model, nnx.Param))


def split_params(c: config_lib.Config, params: State) -> tuple[State, dict[str, State]]:
  """split for a full model's Params (no LoRA)."""
  if c.model.vision and not c.model.vision_trainable:
    encoder, params = nnx.split_state(params, _in_vision_encoder, ...)
    return params, {'vision_encoder': encoder}
  return params, {}


def merged(params: State, frozen: dict[str, State]) -> State:
  """The whole model's state: the trainable params and every frozen part."""
  return nnx.merge_state(params, *frozen.values()) if frozen else params


def load_abstract(c: config_lib.Config, abstract_state: dict) -> State:
  """What checkpoint.init_from fills: the plain model's Params (trainable and frozen), in their
  storage dtypes before quantization (a LoRA base in lora.base_dtype; int8 projections load as
  bfloat16, then `from_loaded` quantizes them), placed like the leaves they become."""
  placed = dict(nnx.to_flat_state(abstract_state['params']))
  for part in abstract_state['frozen'].values():
    placed.update(nnx.to_flat_state(part))
  m = c.model
  if c.lora.rank:
    m = dataclasses.replace(m, param_dtype=jnp.dtype(lora.base_dtype(c.lora)).name)
  flat = []
  for path, var in nnx.to_flat_state(decoder.abstract_state(m)):
    a = placed[path].get_value()
    value = jax.ShapeDtypeStruct(a.shape, var.get_value().dtype, sharding=a.sharding)
    flat.append((path, var.replace(value)))
  return nnx.from_flat_state(flat)


def from_loaded(loaded: State, abstract_frozen: dict[str, State]) -> dict[str, State]:
  """Each frozen part from the loaded params, in its storage dtype and sharding."""
  return {name: lora.base_from_params(loaded, part) for name, part in abstract_frozen.items()}


def params_from_loaded(params: State, loaded: State) -> State:
  """params with the loaded value at every path the load has (all of them for a full model;
  the embedding of a LoRA run with lora.train_embedding), in params' dtypes and shardings.
  params may be abstract where every path is loaded."""
  values = {path: var.get_value() for path, var in nnx.to_flat_state(loaded)}
  flat = []
  for path, var in nnx.to_flat_state(params):
    if path in values:
      a, value = var.get_value(), values[path]
      if value.dtype != a.dtype or value.sharding != a.sharding:
        value = lora.cast(value, a.dtype, a.sharding)
      var = var.replace(value)
    flat.append((path, var))
  return nnx.from_flat_state(flat)


def all_loaded(params: State, loaded: State) -> bool:
  """Whether the load covers every trainable path (then no random init is needed)."""
  have = {path for path, _ in nnx.to_flat_state(loaded)}
  return all(path in have for path, _ in nnx.to_flat_state(params))


# --- an objective's frozen models (a reference, a teacher) ---------------------

# What a frozen model holds: its Params, and the scales of its int8 projections.
MODEL_VARIABLES = (nnx.Param, lora.QuantScale)


def abstract_model(m: config_lib.ModelConfig, dtype: str) -> nnx.Module:
  """The abstract plain model (no LoRA) of a frozen model of shape m, held in dtype: '' is
  m.param_dtype; int8 stores the projections as int8 with per-output-channel scales and the
  rest (embedding, norms) in bfloat16, as a QLoRA base does."""
  if dtype:
    m = dataclasses.replace(m, param_dtype='bfloat16' if dtype == 'int8' else dtype)

  def build():
    model = decoder.Gemma3(m, rngs=nnx.Rngs(0))
    return lora.quantize_projections(model) if dtype == 'int8' else model
  return nnx.eval_shape(build)


def _quantized(abstract: State) -> bool:
  return any(isinstance(var, lora.QuantScale) for _, var in nnx.to_flat_state(abstract))


def float_abstract(abstract: State) -> State:
  """What a checkpoint load fills for a frozen model: its Params, the int8 ones in bfloat16
  (quantized after the load by `stored`)."""
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    if isinstance(var, lora.QuantScale):
      continue
    a = var.get_value()
    if a.dtype == jnp.int8:
      var = var.replace(jax.ShapeDtypeStruct(a.shape, jnp.bfloat16,
                                             sharding=getattr(a, 'sharding', None)))
    flat.append((path, var))
  return nnx.from_flat_state(flat)


def stored(loaded: State, abstract: State) -> State:
  """A frozen model as `abstract` holds it, from its loaded float params (int8 projections
  quantized on their devices)."""
  return lora.base_from_params(loaded, abstract) if _quantized(abstract) else loaded


def load(path: str, c: config_lib.Config, abstract: State) -> State:
  """A frozen model of c.model's shapes from the checkpoint at path (any that convert reads),
  streamed a layer at a time into abstract's shardings and held as abstract holds it (stored).
  restore.py's frozen models and the offline teacher labeler load this way."""
  return stored(init_from.load_init_params(path, c, {'params': float_abstract(abstract)}),
                abstract)
