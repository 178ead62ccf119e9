"""The sampler's prefill of one long prompt at context degree 1, 2, 4 and 8: per-device memory
from the compiler (memory_analysis), compiled on the 8-device CPU mesh, nothing run.

python benchmarks/context_prefill_memory.py [--prompt=8192] [--new=512]

A random 8-layer model (width 256, 4 heads of 64, 2 kv heads, window 512, float32, the
reference attention), one row: at degree 1 the row sits whole on every device (one row cannot
split over fsdp); at degree c its columns, activations and cache are split c ways.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.inference import sampler as sample
from gemma3_train.models import decoder
# pylint: enable=wrong-import-position

MODEL = dict(preset='test', vocab_size=512, embed_dim=256, mlp_dim=512, num_layers=8,
             num_heads=4, num_kv_heads=2, head_dim=64, query_pre_attn_scalar=64.0,
             sliding_window=512, param_dtype='float32', dtype='float32',
             attention_impl='reference')


def prefill_memory(cfg, degree: int, prompt: int, new: int):
  """(output, temporary) bytes per device of the compiled prefill at this context degree."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: decoder.Gemma3(cfg, rngs=nnx.Rngs(0))))
  c = config_lib.Config(model=cfg, mesh=config_lib.MeshConfig(context=degree, fsdp=-1))
  mesh, rules = sharding.make_mesh(c), dict(sharding.DEFAULT_RULES)
  placed = sharding.state_shardings(state, mesh, rules)
  state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state,
                       placed)
  whole = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                    sharding=NamedSharding(mesh, P()))
  knobs = jax.tree.map(lambda x: whole(x.shape, x.dtype),
                       sample.sampling_knobs(sample.Sampling()))
  step = jax.jit(lambda st, t, pad, key, kn: sample.prefill(
      graphdef, st, t, pad, key, kn, total=prompt + new, mesh=mesh, rules=rules))
  memory = step.lower(state, whole((1, prompt), jnp.int32), whole((1,), jnp.int32),
                      whole((2,), jnp.uint32), knobs).compile().memory_analysis()
  return memory.output_size_in_bytes, memory.temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--prompt', type=int, default=8192)
  parser.add_argument('--new', type=int, default=512)
  args = parser.parse_args()
  cfg = config_lib.ModelConfig(**MODEL)
  print(f'one prompt of {args.prompt} tokens (+ {args.new} new), per device:')
  for degree in (1, 2, 4, 8):
    out, temp = prefill_memory(cfg, degree, args.prompt, args.new)
    print(f'  context {degree}: outputs (the cache) {out / 2**20:7.1f} MiB, '
          f'temporaries {temp / 2**20:7.1f} MiB', flush=True)


if __name__ == '__main__':
  main()
