"""The sharded train step: mesh equivalence, gradient accumulation, learning, multi-process."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gemma3_train import sharding
from gemma3_train.training import checkpoint as checkpoint_lib
from gemma3_train.training import init_from
from gemma3_train.training import loop as train
from gemma3_train.training import restore
from gemma3_train.training import state as train_state
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _put(batch, s):
  return {k: jax.device_put(v, s.batch_sharding[k]) for k, v in batch.items()}


def _run(c, devices, batches):
  """(losses, grad norms, final params) of c's train step over the batches."""
  mesh = sharding.make_mesh(c, devices)
  s = train_state.setup(c, mesh)
  state, losses, norms = s.state, [], []
  for b in batches:
    state, m = s.train_step(state, _put(b, s))
    losses.append(float(m['loss']))
    norms.append(float(m['grad_norm']))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state['params']))
  return losses, norms, params


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
  s = train_state.setup(c, mesh)
  def grads(params, b):
    return jax.grad(lambda p: s.objective.loss_sums(
        nnx.merge(s.graphdef, p, *s.state['frozen'].values()), b)[0])(params)
  with sharding.use_mesh(mesh, s.rules):
    g = jax.jit(grads)(s.state['params'], _put(batch, s))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(g))


# 2 layers: the unscanned tail only (fast); 7: a scanned block of six and the tail (slow).
LAYERS = [2, pytest.param(7, marks=pytest.mark.slow)]


@pytest.mark.parametrize('num_layers', LAYERS)
def test_sharded_gradients_match_one_device(num_layers):
  c1 = helpers.small_config(mesh=dict(fsdp=-1), model=dict(num_layers=num_layers))
  c8 = helpers.small_config(mesh=dict(fsdp=4, tensor=2), model=dict(num_layers=num_layers))
  batch = helpers.packed_batch(c1, 0)
  g1 = _grads(c1, jax.devices()[:1], batch)
  g8 = _grads(c8, jax.devices(), batch)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(g8), jax.tree.leaves(g1)):
    err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
    assert err <= 1e-5, (jax.tree_util.keystr(path), err)


def _expected_specs(t, f, kv):
  """Each parameter's PartitionSpec, by its name: its logical axes (commented) mapped by hand
  with the default rules ('vocab', 'heads', 'kv_heads', 'mlp' -> tensor; 'embed' -> fsdp;
  'head_dim', 'norm' replicated). t, f, kv: the mesh axis that 'vocab' / 'heads' / 'mlp',
  'embed' and 'kv_heads' land on, or None where it has size 1 or does not divide the dimension.
  A scanned block's parameters have a leading 'layers' axis, replicated."""
  return {'embedding': (t, f),  # vocab, embed
          'q_einsum': (t, f, None),  # heads, embed, head_dim
          'k_einsum': (kv, f, None),  # kv_heads, embed, head_dim
          'v_einsum': (kv, f, None),  # kv_heads, embed, head_dim
          'attn_vec_einsum': (t, None, f),  # heads, head_dim, embed
          'gate': (t, f), 'up': (t, f), 'linear': (t, f),  # mlp, embed
          'scale': (None,)}  # norm


def _is_variable(x):
  return isinstance(x, nnx.Variable)


@pytest.mark.parametrize('mesh,kv_heads,axes', [
    (dict(fsdp=4, tensor=2), 2, ('tensor', 'fsdp', 'tensor')),
    (dict(fsdp=4, tensor=2), 1, ('tensor', 'fsdp', None)),  # 1 key/value head: not split
    (dict(fsdp=8, tensor=1), 2, (None, 'fsdp', None)),  # tensor of size 1: not used
])
def test_params_and_moments_are_sharded(mesh, kv_heads, axes):
  c = helpers.small_config(mesh=mesh, model=dict(num_kv_heads=kv_heads))
  s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
  want = _expected_specs(*axes)
  params = {}
  for path, var in jax.tree_util.tree_leaves_with_path(s.state_shardings['params'],
                                                       is_leaf=_is_variable):
    name = jax.tree_util.keystr(path)
    scanned = (None,) if name.startswith("['blocks']") else ()
    params[name] = tuple(var.get_value().spec)
    assert params[name] == scanned + want[path[-1].key], name
  # 7 layers of 13 parameters (six in the scanned block, one in the tail), the embedding and
  # the final norm.
  assert len(params) == 7 * 13 + 2
  # Adam's two moments of each parameter are placed as the parameter; the rest is replicated.
  moments = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(s.state_shardings['opt_state'],
                                                        is_leaf=_is_variable):
    name = jax.tree_util.keystr(path)
    if not _is_variable(leaf):
      assert tuple(leaf.spec) == (), name
      continue
    (param,) = [p for p in params if name.endswith(p)]
    assert tuple(leaf.get_value().spec) == params[param], name
    moments.append(param)
  assert sorted(moments) == sorted(2 * list(params))


def _accumulation_setup(num_layers):
  """The big-batch config (32 rows, fsdp 4 x tensor 2) and two batches of it."""
  big = helpers.small_config(mesh=dict(fsdp=4, tensor=2), model=dict(num_layers=num_layers),
                train=dict(global_batch_size=32))
  batches = [helpers.packed_batch(big, i) for i in range(2)]
  # Make the padding differ across rows so per-microbatch weights differ.
  for b in batches:
    b['weights'][::3, :10] = 0.0
  return big, batches


def _accumulation_runs(num_layers):
  """(big batch, 4 microbatches) runs of 2 steps on the same 32 rows."""
  big, batches = _accumulation_setup(num_layers)
  acc = big.replace(optim=dict(grad_accum_steps=4))
  return _run(big, jax.devices(), batches), _run(acc, jax.devices(), batches)


def test_gradient_accumulation_equals_big_batch_losses_and_grad_norms():
  """The fast lane's check on a 2-layer model: per-step loss and gradient norm."""
  (losses_big, norms_big, _), (losses_acc, norms_acc, _) = _accumulation_runs(2)
  np.testing.assert_allclose(losses_acc, losses_big, rtol=1e-5)
  np.testing.assert_allclose(norms_acc, norms_big, rtol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_equals_big_batch():
  (losses_big, norms_big, params_big), (losses_acc, norms_acc, params_acc) = (
      _accumulation_runs(7))
  np.testing.assert_allclose(losses_acc, losses_big, rtol=1e-5)
  np.testing.assert_allclose(norms_acc, norms_big, rtol=1e-5)
  # After Adam, parameters carry its amplified rounding (see _assert_params_close), whose size
  # depends on the machine's float reduction order: the same big-batch run on two equivalent
  # layouts (all 8 devices as fsdp, and one device) differs from it by up to 2.0e-5 on an
  # AVX-512 Xeon. Accumulation must agree with the big batch within 1e-5, or within that
  # spread of the big batch with itself when the machine's is larger.
  big, batches = _accumulation_setup(7)
  spread = max(_rel_err(_run(big.replace(mesh=dict(fsdp=8, tensor=1)), jax.devices(),
                             batches)[2], params_big),
               _rel_err(_run(big.replace(mesh=dict(fsdp=1, tensor=1)), jax.devices()[:1],
                             batches)[2], params_big))
  _assert_params_close(params_acc, params_big, max(1e-5, spread))


def test_init_from_builds_the_optimizer_state_from_the_loaded_params(tmp_path, monkeypatch):
  c = helpers.small_config(mesh=dict(fsdp=2, tensor=2), model=dict(num_layers=2),
              checkpoint=dict(init_from='/loaded'))
  s = train_state.setup(c, sharding.make_mesh(c, jax.devices()[:4]), abstract=True)
  other = train_state.setup(c.replace(train=dict(seed=7)), s.mesh).state['params']
  want = jax.tree.map(np.asarray, nnx.to_pure_dict(other))
  monkeypatch.setattr(init_from, 'load_init_params', lambda path, cfg, abstract: other)
  def no_random_init():
    raise AssertionError('random init ran')
  s.init_state = no_random_init
  state, start = restore.restore_or_init(s, checkpoint_lib.Checkpointer(str(tmp_path), c), None)
  assert start == 0 and int(state['step']) == 0
  got = jax.tree.map(np.asarray, nnx.to_pure_dict(state['params']))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # Fresh Adam moments shaped and sharded like the params they track.
  moments = [x for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0]
  assert moments and not any(np.asarray(m).any() for m in moments)
  for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(s.state_shardings)):
    assert x.sharding.is_equivalent_to(sh, x.ndim)


def _loop_config():
  return helpers.small_config(data=dict(source='synthetic'), model=dict(num_layers=2),
                 train=dict(num_steps=7, eval_every=4, eval_steps=1),
                 logging=dict(log_every=3, tensorboard=False, peak_tflops=1.0,
                              profile_steps='2,3'),
                 checkpoint=dict(every=5))


def test_loop_logs_evaluates_saves_and_profiles(tmp_path, capsys):
  train.train_and_evaluate(_loop_config(), str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  steps = [(r['step'], 'eval_loss' in r) for r in rows]
  # The first and the last step, every log_every-th, and an eval row at eval_every.
  assert steps == [(1, False), (3, False), (4, True), (6, False), (7, False)]
  train_rows = [r for r in rows if 'loss' in r]
  keys = {'step', 'loss', 'grad_norm', 'learning_rate', 'tokens_per_sec', 'tflops_per_device',
          'mfu'}
  assert all(keys <= set(r) for r in train_rows)
  # The first interval includes compilation: no throughput.
  assert train_rows[0]['tokens_per_sec'] is None and train_rows[0]['mfu'] is None
  assert all(r['tokens_per_sec'] > 0 and r['mfu'] > 0 for r in train_rows[1:])
  assert train_rows[-1]['loss'] < train_rows[0]['loss']
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['5', '7']
  assert helpers.traced_steps(tmp_path) == [[2, 3]]  # both profiled steps in one trace
  out = capsys.readouterr().out
  assert 'ETA' not in out.splitlines()[0] and 'ETA' in out.splitlines()[1]


@pytest.mark.slow
def test_resumed_loop_continues_after_the_checkpoint(tmp_path):
  c = _loop_config()
  train.train_and_evaluate(c, str(tmp_path))
  train.train_and_evaluate(c.replace(train=dict(num_steps=9)), str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], 'eval_loss' in r) for r in rows[5:]] == [(8, False), (8, True), (9, False)]
  assert rows[5]['tokens_per_sec'] is None  # resumed after 7; its first interval compiles


def _two_processes_and_one(tmp_path, *mode):
  """tests/multiprocess_worker.py's results: two processes of 4 CPU devices, one of 8."""
  worker = ROOT / 'tests' / 'multiprocess_worker.py'
  port = helpers.free_port()
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), '2', str(port),
                             str(tmp_path / f'p{i}.json'), *mode], env=helpers.cli_env(4),
                            cwd=ROOT)
           for i in range(2)]
  single = subprocess.run([sys.executable, str(worker), '0', '1', '0', str(tmp_path / 's.json'),
                           *mode], env=helpers.cli_env(8), cwd=ROOT, timeout=600)
  assert single.returncode == 0
  assert all(p.wait(timeout=600) == 0 for p in procs)
  one = json.loads((tmp_path / 's.json').read_text())
  two = [json.loads((tmp_path / f'p{i}.json').read_text()) for i in range(2)]
  assert one['devices'] == 8 and two[0]['devices'] == 8
  np.testing.assert_allclose(two[0]['losses'], one['losses'], rtol=1e-5)
  assert two[0]['losses'] == two[1]['losses']
  return one, two


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  _two_processes_and_one(tmp_path)


@pytest.mark.slow  # three jax processes: 57 s of CPU here (106 s wall on the loaded 2 cores)
def test_context_across_two_processes_matches_one(tmp_path):
  # mesh.context=8 spans both processes: one data group, both load every row (the one
  # process's rows) and hold the same iterator state, so each resumes from its own file alike.
  one, two = _two_processes_and_one(tmp_path, 'context')
  assert [t['group'] for t in two] == [[0, 1], [0, 1]] == [one['group']] * 2
  assert two[0]['data_state'] == two[1]['data_state'] == one['data_state']
