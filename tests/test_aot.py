"""AOT compile against real TPU topologies with libtpu's compile-only devices (no TPU here).

Needs libtpu (the `test` extra installs it). Without it these tests skip locally, but fail in CI
(CI=true), where a skip would hide that the shipped configs were never proven to fit.
"""

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma3_train import aot
from gemma3_train import config as config_lib
from gemma3_train import metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent

if not aot.libtpu_available() and os.environ.get('CI'):
  raise RuntimeError('libtpu is not installed; CI must install the test extra (it pins libtpu)')
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason='libtpu not installed')


def _config(name: str, **sections) -> config_lib.Config:
  c = config_lib.from_config_dict(importlib.import_module(f'configs.{name}').get_config())
  for section, fields in sections.items():
    c = dataclasses.replace(c, **{section: dataclasses.replace(getattr(c, section), **fields)})
  return c


# --- topology names (pure Python) ------------------------------------------------


@pytest.mark.parametrize('name,kind,chips', [
    ('v4-8', 'v4', 4), ('v5p-128', 'v5p', 64), ('v5p-8', 'v5p', 4), ('v5e-16', 'v5e', 16),
    ('v5e-1', 'v5e', 1), ('v6e-256', 'v6e', 256), ('V6E-8', 'v6e', 8)])
def test_parse_topology(name, kind, chips):
  topo = aot.parse_topology(name)
  assert (topo.kind, topo.chips, topo.num_slices) == (kind, chips, 1)
  assert topo.chip is metrics.CHIPS[kind]


@pytest.mark.parametrize('name', ['v5p-7', 'v5p-6', 'v5e-2', 'v7-8', 'v5litepod-16', 'tpu', ''])
def test_unknown_topology_is_one_line(name):
  with pytest.raises(config_lib.ConfigError) as e:
    aot.parse_topology(name)
  assert str(e.value).startswith(f'--aot_topology={name}:') and '\n' not in str(e.value)


def test_num_slices_from_dcn():
  c = _config('tiny', mesh=dict(dcn_data=2, dcn_fsdp=2))
  assert aot.num_slices(c) == 4


# --- splash FLOPs, against a brute-force count of the attention mask --------------------


def _visited_blocks_brute(T, b, window):
  q = np.arange(T)[:, None]
  k = np.arange(T)[None, :]
  allowed = k <= q
  if window is not None:
    allowed &= k > q - window
  return int(allowed.reshape(T // b, b, T // b, b).any(axis=(1, 3)).sum())


@pytest.mark.parametrize('T,b,window', [(1024, 128, None), (1024, 128, 300), (2048, 512, 1024),
                                        (512, 128, 512), (4096, 512, 512), (256, 256, 32)])
def test_kernel_blocks_match_the_mask(T, b, window):
  assert aot._kernel_blocks(T, b, window) == _visited_blocks_brute(T, b, window)


def test_splash_flops_equal_model_attention_flops_at_block_one():
  # With 1x1 blocks the kernel visits exactly the allowed (q, k) pairs, so its forward FLOPs
  # are the model's attention FLOPs: 4 N H per pair (QK^T and PV), summed over layers.
  c = _config('tiny', model=dict(attention_block_size=1, remat_policy='none'),
              data=dict(seq_len=64), train=dict(global_batch_size=2))
  m = c.model
  pairs = sum(_visited_blocks_brute(64, 1, None if m.is_global(i) else m.sliding_window)
              for i in range(m.num_layers))
  forward = 4 * m.num_heads * m.head_dim * pairs * 2
  assert aot.splash_flops_per_step(c) == pytest.approx(forward * 9 / 2)  # fwd 2 + dq 3 + dkv 4
  replay = dataclasses.replace(c, model=dataclasses.replace(m, remat_policy='full'))
  assert aot.splash_flops_per_step(replay) == pytest.approx(forward * 11 / 2)
  minimal = dataclasses.replace(c, model=dataclasses.replace(m, remat_policy='minimal'))
  assert aot.splash_flops_per_step(minimal) == pytest.approx(forward * 9 / 2)


def test_parse_oom_messages():
  assert aot._parse_oom('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
                        'required for HLO temporaries (37.29G) exceeds available HBM (15.75G).'
                        ) == pytest.approx(37.29)
  assert aot._parse_oom('Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm.'
                        ) == pytest.approx(20.5)
  assert aot._parse_oom('something else') is None


# --- libtpu devices and the compile mechanism --------------------------------------


@needs_libtpu
@pytest.mark.parametrize('name,slices,count,kind', [
    ('v5e-8', 1, 8, 'TPU v5 lite'), ('v5p-16', 1, 8, 'TPU v5'), ('v4-8', 1, 4, 'TPU v4'),
    ('v6e-4', 2, 8, 'TPU v6 lite'), ('v5e-1', 1, 1, 'TPU v5 lite')])
def test_topology_devices(name, slices, count, kind):
  devs = aot.devices(aot.parse_topology(name, slices))
  assert len(devs) == count and {d.device_kind for d in devs} == {kind}
  assert {getattr(d, 'slice_index', 0) for d in devs} == set(range(slices))
  assert jax.default_backend() == 'cpu'  # libtpu must not take over the test backend
  assert 'TPU_WORKER_HOSTNAMES' not in os.environ  # train.py reads it to detect a TPU VM


def _mlp_builder(B=64, D=512, F=2048):
  """A stand-in train step: a two-matrix MLP with FSDP-sharded f32 weights and an SGD update."""
  def build(c, mesh):
    del c
    fsdp = NamedSharding(mesh, P('fsdp', None))
    state = {'w1': jax.ShapeDtypeStruct((D, F), jnp.float32, sharding=fsdp),
             'w2': jax.ShapeDtypeStruct((F, D), jnp.float32, sharding=fsdp)}
    x = jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=NamedSharding(mesh, P('fsdp')))

    def step(state, x_BD):
      def loss(w):
        h_BF = jax.nn.gelu(x_BD @ w['w1'].astype(jnp.bfloat16))
        return jnp.mean((h_BF @ w['w2'].astype(jnp.bfloat16)).astype(jnp.float32) ** 2)
      g = jax.grad(loss)(state)
      return jax.tree.map(lambda w, d: w - 0.1 * d, state, g)
    return jax.jit(step, donate_argnums=0), (state, x), state
  return build


@needs_libtpu
def test_mechanism_with_a_stand_in_step():
  B, D, F = 64, 512, 2048
  c = _config('tiny', model=dict(attention_impl='reference'), train=dict(global_batch_size=B))
  topo = aot.parse_topology('v5e-4')
  r = aot.compile_report(c, topo, builder=_mlp_builder(B, D, F))
  n = 4
  weights = 2 * D * F * 4 / n
  assert r.state_gib * aot.GIB == weights
  assert r.argument_gib * aot.GIB == weights + B * D * 2 / n
  assert r.alias_gib * aot.GIB == weights  # donated state updated in place
  assert r.fits and 0.9 < r.headroom < 1
  # Five B x D x F matmuls per chip (2 forward; dW2, dH, dW1: x needs no gradient); XLA adds a
  # little elementwise work.
  assert 1.0 <= r.compiler_flops / (5 * 2 * B * D * F / n) < 1.1
  assert r.step_seconds > 0 and r.tokens_per_sec > 0
  assert jax.default_backend() == 'cpu'
