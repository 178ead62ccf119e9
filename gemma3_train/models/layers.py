"""The layers and helpers the decoder and the vision tower share: parameters with logical axes,
Gemma's RMSNorm, and the named remat policies."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3_train import config as config_lib

# Names saved by each remat policy ('none' = no remat, 'full' = save nothing but block inputs).
REMAT_SAVED_NAMES = {
    'minimal': ('query_proj', 'key_proj', 'value_proj', 'attention_out', 'out_proj',
                'mlp_gate', 'mlp_up', 'mlp_out'),
    'save_decoder_layer_input': ('decoder_layer_input',),
    'save_qkv_proj': ('query_proj', 'key_proj', 'value_proj'),
}


def param(rngs: nnx.Rngs, shape, fan_in: int | None, dtype, names) -> nnx.Param:
  """A parameter: zeros when fan_in is None (norm scales), else normal(0, 1/fan_in)."""
  if fan_in is None:
    value = jnp.zeros(shape, dtype)
  else:
    value = (jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in ** -0.5).astype(dtype)
  return nnx.Param(value, logical_axes=names)


class RMSNorm(nnx.Module):
  """Gemma RMSNorm: x / rms(x) * (1 + scale), computed in float32 and cast back."""

  def __init__(self, dim: int, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), None, cfg.param_dtype, ('norm',))
    self.eps = cfg.rms_norm_eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x32 * (1.0 + scale)).astype(x.dtype)


def remat(fn, policy: str, prevent_cse: bool = False):
  """fn wrapped in jax.checkpoint for a named policy (config.REMAT_POLICIES). prevent_cse=False
  suits a scan body; a checkpoint nested in another needs True, or XLA may merge its replay
  with the outer one's and keep every layer's activations alive again."""
  if policy == 'none':
    return fn
  if policy == 'full':
    return jax.checkpoint(fn, prevent_cse=prevent_cse)
  if policy not in REMAT_SAVED_NAMES:
    raise ValueError(f'model.remat_policy={policy!r}: expected one of '
                     f'{" | ".join(config_lib.REMAT_POLICIES)}')
  saved = jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED_NAMES[policy])
  return jax.checkpoint(fn, policy=saved, prevent_cse=prevent_cse)


def stack_names(module: nnx.Module) -> None:
  """Prefixes every parameter's logical axes with 'layers' (the stacked scan axis)."""
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable):
      var.set_metadata('logical_axes', ('layers',) + tuple(var.get_metadata()['logical_axes']))


def init_program(fn: Callable[[], Any], out_shardings: Any = None, *,
                 cpu: bool) -> Callable[[], Any]:
  """jit(fn) for a random init, which runs once. On CPU it is compiled at LLVM -O0 (on its
  first call): threefry makes a long program that the default level compiles in 12.5 s for
  configs/tiny.py and -O0 in 6.9 s; the values differ from -O3's in the last bit at most. Every
  random init that must give the same values (the trainer's, the seed's frozen parts read back
  by convert/run_source.py) goes through here."""
  jitted = jax.jit(fn, out_shardings=out_shardings)
  if not cpu:
    return jitted
  compiled = []

  def init():
    if not compiled:
      compiled.append(jitted.lower().compile(
          compiler_options={'xla_backend_optimization_level': 0}))
    return compiled[0]()
  return init
