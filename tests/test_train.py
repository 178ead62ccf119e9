"""The sharded train step: mesh equivalence, gradient accumulation, learning, multi-process."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train import train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(**sections):
  c = config_lib.from_config_dict(tiny.get_config())
  base = dict(model=dict(num_layers=7, vocab_size=512), data=dict(seq_len=32),
              train=dict(global_batch_size=8, z_loss=1e-4, loss_chunk_size=16),
              optim=dict(warmup_steps=0, schedule='constant', lr=1e-2))
  for k, v in sections.items():
    base[k] = {**base.get(k, {}), **v}
  return c.replace(**base)


def _batch(c, seed=0):
  """Random packed rows: two documents per row, one padded tail (weights 0)."""
  rng = np.random.default_rng(seed)
  B, L = c.train.global_batch_size, c.data.seq_len
  tokens = rng.integers(3, c.model.vocab_size, size=(B, L + 1)).astype(np.int32)
  cut = L // 2 + 3
  seg = np.where(np.arange(L) < cut, 1, 2).astype(np.int32)
  seg[-4:] = 0
  pos = np.where(np.arange(L) < cut, np.arange(L), np.arange(L) - cut).astype(np.int32)
  pos[-4:] = 0
  weights = (seg > 0).astype(np.float32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(pos, (B, L)).copy(),
          'segment_ids': np.broadcast_to(seg, (B, L)).copy(),
          'weights': np.broadcast_to(weights, (B, L)).copy()}


def _put(batch, s):
  return {k: jax.device_put(v, s.batch_sharding[k]) for k, v in batch.items()}


def _run(c, devices, batches):
  mesh = sharding.make_mesh(c, devices)
  s = train.setup(c, mesh)
  state, losses = s.state, []
  for b in batches:
    state, m = s.train_step(state, _put(b, s))
    losses.append(float(m['loss']))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state['params']))
  return losses, params


def _rel_err(a, b):
  """||a - b|| / ||b|| over whole pytrees."""
  num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = sum(float(np.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (num / max(den, 1e-30)) ** 0.5


def _assert_params_close(a, b, rtol):
  # Whole-tree relative error: Adam divides by sqrt(v), so a gradient entry of 1e-9 whose rounding
  # differs between two reduction orders moves by a visible fraction of lr; per-entry maxima
  # measure that amplified rounding, not the sharded step. The gradients themselves are compared
  # per tensor in test_sharded_gradients_match_one_device.
  assert _rel_err(a, b) <= rtol, _rel_err(a, b)


def _grads(c, devices, batch):
  mesh = sharding.make_mesh(c, devices)
  s = train.setup(c, mesh)
  def grads(params, b):
    return jax.grad(lambda p: train._loss_sums(p, s.graphdef, b, c)[0])(params)
  with sharding.use_mesh(mesh, s.rules):
    g = jax.jit(grads)(s.state['params'], _put(batch, s))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(g))


def test_sharded_gradients_match_one_device():
  c1 = _config(mesh=dict(fsdp=-1))
  c8 = _config(mesh=dict(fsdp=4, tensor=2))
  batch = _batch(c1, 0)
  g1 = _grads(c1, jax.devices()[:1], batch)
  g8 = _grads(c8, jax.devices(), batch)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g8), jax.tree.leaves(g1)):
    err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)


def test_params_and_moments_are_sharded():
  c = _config(mesh=dict(fsdp=4, tensor=2), model=dict(num_kv_heads=2))
  s = train.setup(c, sharding.make_mesh(c), abstract=True)
  emb = s.state_shardings['params']['embedder']['embedding'].get_value()
  assert emb.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
  specs = {str(leaf.spec) for leaf in jax.tree.leaves(s.state_shardings)}
  assert any('fsdp' in x for x in specs) and any('tensor' in x for x in specs)


def test_gradient_accumulation_equals_big_batch():
  big = _config(mesh=dict(fsdp=4, tensor=2))
  acc = _config(mesh=dict(fsdp=4, tensor=2), optim=dict(grad_accum_steps=4),
                train=dict(global_batch_size=32))
  big = big.replace(train=dict(global_batch_size=32))
  batches = [_batch(big, i) for i in range(2)]
  # Make the padding differ across rows so per-microbatch weights differ.
  for b in batches:
    b['weights'][::3, :10] = 0.0
  losses_big, params_big = _run(big, jax.devices(), batches)
  losses_acc, params_acc = _run(acc, jax.devices(), batches)
  np.testing.assert_allclose(losses_acc, losses_big, rtol=1e-5)
  _assert_params_close(params_acc, params_big, 1e-5)


def _free_port():
  import socket
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  worker = ROOT / 'tests' / 'multiprocess_worker.py'
  def env(devices):
    return dict(os.environ, JAX_PLATFORMS='cpu',
                XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), '2', str(port),
                             str(tmp_path / f'p{i}.json')], env=env(4), cwd=ROOT)
           for i in range(2)]
  single = subprocess.run([sys.executable, str(worker), '0', '1', '0', str(tmp_path / 's.json')],
                          env=env(8), cwd=ROOT, timeout=600)
  assert single.returncode == 0
  assert all(p.wait(timeout=600) == 0 for p in procs)
  one = json.loads((tmp_path / 's.json').read_text())
  two = [json.loads((tmp_path / f'p{i}.json').read_text()) for i in range(2)]
  assert one['devices'] == 8 and two[0]['devices'] == 8
  np.testing.assert_allclose(two[0]['losses'], one['losses'], rtol=1e-5)
  assert two[0]['losses'] == two[1]['losses']
