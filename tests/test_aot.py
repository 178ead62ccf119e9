"""AOT compile against real TPU topologies with libtpu's compile-only devices (no TPU here).

Needs libtpu (the `test` extra installs it). Without it these tests skip locally, but fail in CI
(CI=true), where a skip would hide that the shipped configs were never proven to fit.
"""

import dataclasses
import importlib
import importlib.util
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

from gemma3_train import config as config_lib
from gemma3_train.infra import hardware
from gemma3_train.planning import aot
from gemma3_train.planning import estimate
from gemma3_train.planning import plan
from gemma3_train import sharding
from gemma3_train.training import flops

ROOT = pathlib.Path(__file__).resolve().parent.parent

if not aot.libtpu_available() and os.environ.get('CI'):
  raise RuntimeError('libtpu is not installed; CI must install the test extra (it pins libtpu)')
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason='libtpu not installed')


def _config(name: str, **sections) -> config_lib.Config:
  c = config_lib.from_config_dict(importlib.import_module(f'configs.{name}').get_config())
  for section, fields in sections.items():
    c = dataclasses.replace(c, **{section: dataclasses.replace(getattr(c, section), **fields)})
  return c


# --- topology names (the table and its parser are tested in test_hardware.py) ----------


def test_topology_is_the_tables_and_its_error_a_config_error():
  assert aot.parse_topology('v5p-128', 2) == hardware.parse_topology('v5p-128', 2)
  for name in ('v5p-7', ''):
    with pytest.raises(config_lib.ConfigError) as e:
      aot.parse_topology(name)
    message = str(e.value)
    assert message.startswith(f'--aot_topology={name}: unknown TPU slice') and '\n' not in message


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
  assert estimate._kernel_blocks(T, b, window) == _visited_blocks_brute(T, b, window)


def test_splash_flops_equal_model_attention_flops_at_block_one():
  # With 1x1 blocks the kernel visits exactly the allowed (q, k) pairs, so its forward FLOPs
  # are the model's attention FLOPs: 4 N H per pair (QK^T and PV), summed over layers.
  c = _config('tiny', model=dict(attention_block_size=1, remat_policy='none'),
              data=dict(seq_len=64), train=dict(global_batch_size=2))
  m = c.model
  pairs = sum(_visited_blocks_brute(64, 1, None if m.is_global(i) else m.sliding_window)
              for i in range(m.num_layers))
  forward = 4 * m.num_heads * m.head_dim * pairs * 2
  assert estimate.splash_flops_per_step(c) == pytest.approx(forward * 9 / 2)  # fwd 2 + dq 3 + dkv 4
  replay = dataclasses.replace(c, model=dataclasses.replace(m, remat_policy='full'))
  assert estimate.splash_flops_per_step(replay) == pytest.approx(forward * 11 / 2)
  minimal = dataclasses.replace(c, model=dataclasses.replace(m, remat_policy='minimal'))
  assert estimate.splash_flops_per_step(minimal) == pytest.approx(forward * 9 / 2)


@pytest.mark.parametrize('policy,replayed', [
    ('none', ()), ('minimal', ()), ('full', ('qkv', 'rest')),
    ('save_decoder_layer_input', ('qkv', 'rest')), ('save_qkv_proj', ('rest',))])
def test_executed_flops_from_the_shapes(policy, replayed):
  # XLA runs the model FLOPs less attention (the splash kernels run that), plus the forward
  # matmuls of each layer that the remat policy does not save and so replays in the backward.
  T, B = 64, 2
  c = _config('tiny', model=dict(remat_policy=policy), data=dict(seq_len=T),
              train=dict(global_batch_size=B))
  m = c.model
  d, n, k, h, f = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
  per_token = dict(qkv=2 * d * (n + 2 * k) * h, rest=2 * n * h * d + 3 * 2 * d * f)
  pairs = sum(_visited_blocks_brute(T, 1, None if m.is_global(i) else m.sliding_window)
              for i in range(m.num_layers))
  attention = 3 * 4 * n * h * pairs * B
  replay = m.num_layers * sum(per_token[p] for p in replayed) * T * B
  model_flops = flops.model_flops_per_step(m, T, B)
  xla, splash = estimate.executed_flops_per_step(c)
  assert xla == pytest.approx(model_flops - attention + replay, rel=1e-12)
  assert splash == (estimate.splash_flops_per_step(c) if m.attention_impl == 'splash' else 0)
  assert estimate.executed_flops_per_step(aot.tpu_run_config(c))[1] == estimate.splash_flops_per_step(c)


def test_parse_oom_messages():
  assert aot._parse_oom('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
                        'required for HLO temporaries (37.29G) exceeds available HBM (15.75G).'
                        ) == pytest.approx(37.29)
  assert aot._parse_oom('Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm.'
                        ) == pytest.approx(20.5)
  assert aot._parse_oom('something else') is None


# --- libtpu devices and the compile mechanism --------------------------------------


def test_without_libtpu_devices_is_a_one_line_error(monkeypatch, tmp_path):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real_find_spec(name, *a))
  monkeypatch.delenv('TPU_LIBRARY_PATH', raising=False)
  assert not aot.libtpu_available()
  with pytest.raises(config_lib.ConfigError, match=r'^--aot_topology=v5e-4: needs libtpu \('):
    aot.devices(aot.parse_topology('v5e-4'))
  library = tmp_path / 'libtpu.so'
  library.write_bytes(b'')
  monkeypatch.setenv('TPU_LIBRARY_PATH', str(library))  # jax loads this one first
  assert aot.libtpu_available()


@needs_libtpu
@pytest.mark.parametrize('name,slices,count,kind', [
    ('v5e-8', 1, 8, 'TPU v5 lite'), ('v5p-16', 1, 8, 'TPU v5'), ('v4-8', 1, 4, 'TPU v4'),
    ('v6e-4', 2, 8, 'TPU v6 lite'), ('v5e-1', 1, 1, 'TPU v5 lite')])
def test_topology_devices(name, slices, count, kind):
  devs = aot.devices(aot.parse_topology(name, slices))
  assert len(devs) == count and {d.device_kind for d in devs} == {kind}
  assert {getattr(d, 'slice_index', 0) for d in devs} == set(range(slices))
  assert jax.default_backend() == 'cpu'  # libtpu must not take over the test backend
  assert 'TPU_WORKER_HOSTNAMES' not in os.environ  # training/loop.py reads it to detect a TPU VM


@needs_libtpu
def test_devices_keep_cpu_the_default_backend_without_jax_platforms():
  # conftest sets JAX_PLATFORMS=cpu for every test; a user's shell usually does not, and then
  # aot.devices must still leave the host's default backend on CPU.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  code = ('import jax; from gemma3_train.planning import aot; '
          'd = aot.devices(aot.parse_topology("v5e-4")); '
          'print(len(d), d[0].platform, jax.default_backend())')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['4', 'tpu', 'cpu']


@needs_libtpu
def test_multi_slice_mesh_puts_dcn_axis_across_slices():
  c = _config('tiny', mesh=dict(dcn_data=2), train=dict(global_batch_size=16))
  topo = aot.parse_topology('v5e-4', aot.num_slices(c))
  mesh = sharding.make_mesh(c, aot.devices(topo))
  assert mesh.devices.size == 8 and dict(mesh.shape)['fsdp'] == 8 // dict(mesh.shape)['data']
  # Data parallelism over DCN: each slice holds one contiguous half of the 'data' axis.
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert dict(mesh.shape)['data'] == 2
  assert (slices[0] == 0).all() and (slices[1] == 1).all()


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


# --- the real train step ----------------------------------------------------------------


def _param_count(m: config_lib.ModelConfig) -> int:
  """Gemma 3 parameters from the shapes: tied embedding, 4 norms per layer, QK-norm scales, no
  biases."""
  d, n, k, h = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * m.mlp_dim + 4 * d + 2 * h
  return m.vocab_size * d + m.num_layers * per_layer + d


def _check_tiny_report(r: dict, c: config_lib.Config):
  """Checks a tiny-config report on v5e-4 against figures computed from the shapes alone."""
  assert (r['chips'], r['mesh']['fsdp'], r['attention']) == (4, 4, 'splash')
  assert r['fits'] and r['headroom'] > 0.9 and r['hbm_gib'] == 16.0
  # float32 params + two float32 Adam moments, split over 4 chips (norm scales replicated).
  state = 12 * _param_count(c.model) / 4 / 2**30
  assert r['state_gib'] == pytest.approx(state, rel=0.01)
  batch = 5 * 4 * c.train.global_batch_size * c.data.seq_len / 4 / 2**30
  # TPU layouts pad arrays to whole (8, 128) tiles, which for tiny's 16- and 64-wide tensors
  # is a lot: the compiler's argument bytes are at least the shards' bytes, at most twice.
  assert r['state_gib'] + batch <= r['argument_gib'] <= 2 * (r['state_gib'] + batch)
  assert r['total_gib'] == pytest.approx(r['argument_gib'] + r['output_gib'] - r['alias_gib'] +
                                         r['temp_gib'] + r['code_gib'])
  # The compiler sees every matmul but the splash kernels: at least the model's non-attention
  # FLOPs per chip, and not wildly more (the chunked loss recomputes its logits).
  model = flops.model_flops_per_step(c.model, c.data.seq_len, c.train.global_batch_size)
  attention = estimate.splash_flops_per_step(
      dataclasses.replace(c, model=dataclasses.replace(c.model, attention_block_size=1))) * 6 / 9
  assert (model - attention) / 4 <= r['compiler_flops'] <= 2 * model / 4
  assert r['splash_flops'] == pytest.approx(estimate.splash_flops_per_step(c) / 4)
  assert r['step_seconds'] == pytest.approx(r['xla_seconds'] + r['splash_seconds'])
  assert 0 < r['mfu'] < 1


@needs_libtpu
@pytest.mark.slow
def test_compiles_trimmed_tiny_for_v5e_4():
  # The TPU compiler is slow even for small programs (~1 min here for the shipped tiny config,
  # mostly its 262k vocabulary), so the default suite compiles tiny trimmed to one scanned block
  # of six layers (local and global splash kernels, chunked loss, AdamW) and 4096 vocabulary rows.
  c = _config('tiny', model=dict(num_layers=6, vocab_size=4096))
  r = aot.compile_report(c, aot.parse_topology('v5e-4'))
  _check_tiny_report(dataclasses.asdict(r), aot.tpu_run_config(c))
  assert jax.default_backend() == 'cpu'
  assert r.tpu_kernels > 0 and not r.error  # the splash TPU kernel, not its interpreter


@needs_libtpu
@pytest.mark.slow
def test_compiles_the_memory_layouts_for_v5e_4():
  """The layouts docs/memory.md measures, through the TPU compiler: a per-layer checkpoint, the
  inner scan over single layers (its two splash kernels as lax.cond branches) and the
  vocabulary-parallel loss, on the trimmed tiny of the test above."""
  c = _config('tiny', model=dict(num_layers=6, vocab_size=4096, remat_policy='full',
                                 remat_unit='layer', scan_unit='layer'),
              train=dict(loss_vocab_parallel=True))
  r = aot.compile_report(c, aot.parse_topology('v5e-4'))
  assert r.fits and not r.error and (r.remat_unit, r.scan_unit) == ('layer', 'layer')
  assert r.tpu_kernels > 0  # the splash TPU kernels, not their interpreter
  assert r.total_gib == pytest.approx(r.argument_gib + r.output_gib - r.alias_gib + r.temp_gib +
                                      r.code_gib)


@needs_libtpu
@pytest.mark.slow
def test_cli_compiles_tiny_for_v5e_4(tmp_path):
  report = tmp_path / 'aot.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
      [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
       '--aot_topology=v5e-4', f'--aot_report={report}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'fits' in out.stdout and 'v5e-4' in out.stdout
  _check_tiny_report(json.loads(report.read_text()), _config('tiny'))


def test_planner_refuses_27b_on_v5e_4():
  c = _config('27b')
  with pytest.raises(config_lib.ConfigError) as e:
    plan.main(c, 'v5e-4')
  message = str(e.value)
  assert message.startswith('--aot_topology=v5e-4: 27b cannot fit') and '\n' not in message
  assert 'v5e-' in message.split('try ')[-1]  # names a slice that could hold the state
  # 27b's float32 parameters and two Adam moments: about 12 bytes x 27.0e9 over 4 chips.
  need = float(message.split('need ')[1].split(' GiB')[0])
  assert need == pytest.approx(12 * _param_count(c.model) / 4 / 2**30, rel=0.01)


def test_planner_ranks_and_prunes(monkeypatch):
  # The search itself, with a stand-in compile: memory grows with batch and shrinks with remat.
  c = _config('tiny')
  topo = aot.parse_topology('v5e-4')
  calls = []
  saves = {'none': 0, 'full': 3, 'minimal': 1}

  def fake(trial, topo, device_list=None):
    calls.append((trial.mesh.tensor, trial.model.remat_policy, trial.train.global_batch_size))
    r = aot._base_report(trial, topo, dict(data=1, fsdp=trial.mesh.fsdp,
                                           tensor=trial.mesh.tensor))
    r.total_gib = trial.train.global_batch_size * (4 - saves[trial.model.remat_policy])
    r.fits = r.total_gib <= topo.chip.hbm_gib
    r.headroom = 1 - r.total_gib / r.hbm_gib
    r.tokens_per_sec = trial.train.global_batch_size * (1 + saves[trial.model.remat_policy] / 10)
    r.mfu = 0.5
    return r
  monkeypatch.setattr(aot, 'compile_report', fake)
  monkeypatch.setattr(aot, 'devices', lambda topo: [None] * topo.chips)
  space = plan.PlanSpace(remat_policies=('none', 'full', 'minimal'), rows_per_shard=(1, 2, 4),
                        tensor_degrees=(1, 2, 3), layouts=('block/block',), every=True)
  plans = plan.search_plans(c, topo, space)  # the full search (tests/test_plan.py: best first)
  # tensor=3 does not divide 4 chips; tensor=2 does not divide tiny's single kv head.
  assert {t for t, _, _ in calls} == {1}
  # GiB = batch x (4 - saves): none fits batch 4 only, full 4/8/16, minimal 4; after the first
  # batch that does not fit, larger ones are not compiled.
  assert sorted((p.remat_policy, p.global_batch) for p in plans) == [
      ('full', 4), ('full', 8), ('full', 16), ('minimal', 4), ('none', 4)]
  assert len(calls) == 7
  # Plans that leave 10% of HBM free first (full 16 and none 4 fill all 16 GiB), each group
  # by estimated tokens/s.
  assert [(p.remat_policy, p.global_batch) for p in plans] == [
      ('full', 8), ('full', 4), ('minimal', 4), ('full', 16), ('none', 4)]
  table = plan.format_plan(plans).splitlines()
  assert len(table) == 2 + len(plans)
  assert table[2].endswith(f'--config.model.remat_policy={plans[0].remat_policy} '
                           '--config.model.remat_unit=block --config.model.scan_unit=block '
                           f'--config.train.global_batch_size={plans[0].global_batch}')
  tight = plan.PlanSpace(remat_policies=('none',), rows_per_shard=(8, 16), tensor_degrees=(1,),
                         layouts=('block/block',))
  with pytest.raises(config_lib.ConfigError, match='no plan fits'):
    plan.search_plans(c, topo, tight)


def test_plan_space_flags():
  space = plan.parse_plan_space('full,minimal', '2,1', '1')
  assert space == plan.PlanSpace(remat_policies=('full', 'minimal'), rows_per_shard=(2, 1),
                                 tensor_degrees=(1,))
  assert plan.parse_plan_space() == plan.PlanSpace()
  assert plan.parse_plan_space(layouts='layer/block').layouts == ('layer/block',)
  for args, flag in ((('fulll',), '--aot_plan_remat'), (('', '0'), '--aot_plan_rows'),
                     (('', '', 'two'), '--aot_plan_tensor'),
                     (('', '', '', '', 'layer'), '--aot_plan_layouts'),
                     (('', '', '', '', 'block/row'), '--aot_plan_layouts')):
    with pytest.raises(config_lib.ConfigError) as e:
      plan.parse_plan_space(*args)
    assert str(e.value).startswith(flag) and '\n' not in str(e.value)


def test_cli_bad_plan_flag_is_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
       '--aot_topology=v5e-4', '--aot_plan', '--aot_plan_rows=1,x'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith(
      "gemma3-train: error: --aot_plan_rows='1,x': expected positive integers")


# --- shipped configs fit their slices ------------------------------------------------------
#
# A shipped config's compile takes 10 to 30 minutes on a 2-core machine, more than CI can spend
# on five of them. So the proofs are `tpu_proof` tests, deselected by default (pyproject addopts;
# run them with `pytest -m tpu_proof`), and each one's report is kept in docs/aot/ (written by
# `gemma3-train --aot_report`). CI checks, without compiling, that every shipped config is
# still the one its recorded proof compiled: any change to its shapes, sharding, remat, batch
# or sequence length fails here until the proof is rerun and its report replaced.

SHIPPED = [('27b', 'v5p-128'), ('12b', 'v5p-64'), ('4b', 'v6e-16'), ('1b', 'v5e-8'),
           ('270m', 'v5e-4')]
PROOFS = ROOT / 'docs' / 'aot'


def _check_shipped_report(r: dict, c: config_lib.Config, name: str):
  assert r['fits'] and r['headroom'] >= aot.HEADROOM, r
  assert r['tpu_kernels'] > 0 and not r['error'], r['error']  # the TPU kernel, not interpreted
  assert r['attention'] == 'splash' and 0 < r['mfu'] < 1
  assert r['model_flops_per_step'] == pytest.approx(flops.model_flops_per_step(
      c.model, c.data.seq_len, c.train.global_batch_size), rel=1e-12)
  if name == '27b':  # the target: sequence 8192, one row per chip
    assert (r['seq_len'], r['per_chip_batch']) == (8192, 1)
  if name == '4b':
    assert r['seq_len'] == 4096


@needs_libtpu
@pytest.mark.parametrize('name,topology', SHIPPED)
def test_shipped_config_is_the_one_its_proof_compiled(name, topology):
  r = json.loads((PROOFS / f'{name}_{topology}.json').read_text())
  c = _config(name)
  _check_shipped_report(r, c, name)
  topo = aot.parse_topology(topology)
  ac = aot.tpu_run_config(c)
  want = dict(config=name, topology=topology, chips=topo.total_chips,
              mesh=sharding.mesh_shape(c, topo.total_chips, topo.num_slices),
              remat_policy=c.model.remat_policy, seq_len=c.data.seq_len,
              global_batch=c.train.global_batch_size, param_dtype=c.model.param_dtype,
              dtype=c.model.dtype, hbm_gib=topo.chip.hbm_gib)
  # Reports older than the context axis lack it (degree 1).
  r['mesh'] = {**{k: 1 for k in want['mesh']}, **r['mesh']}
  assert {k: r[k] for k in want} == want
  layout = (c.model.remat_unit, c.model.scan_unit, c.train.loss_vocab_parallel)
  assert (r.get('remat_unit', 'block'), r.get('scan_unit', 'block'),  # older reports lack them
          r.get('loss_vocab_parallel', False)) == layout
  # The per-chip state from this config's shardings over the slice's devices (no compile).
  _, _, state = aot.train_step_builder(ac, sharding.make_mesh(ac, aot.devices(topo)))
  assert r['state_gib'] == pytest.approx(aot._state_bytes(state) / aot.GIB, rel=1e-9)
  # The step-time estimate is recomputed from the recorded compiler figures.
  xla, splash = estimate.executed_flops_per_step(ac)
  assert r['executed_flops'] == pytest.approx(xla / r['chips'], rel=1e-9)
  assert r['splash_flops'] == pytest.approx(splash / estimate._attention_shards(ac, r['mesh']),
                                            rel=1e-9)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.tpu_proof
@pytest.mark.parametrize('name,topology', SHIPPED)
def test_shipped_config_fits_with_headroom(name, topology):
  c = _config(name)
  r = aot.compile_report(c, aot.parse_topology(topology))
  print(aot.format_report(r))
  _check_shipped_report(dataclasses.asdict(r), c, name)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.tpu_proof
def test_planner_finds_a_plan_for_27b_on_v5p_128():
  # Each 27b compile takes about half an hour on 2 cores: the search space here is the
  # shipped plan and the one above it in batch.
  c = _config('27b')
  space = plan.PlanSpace(remat_policies=(c.model.remat_policy,), rows_per_shard=(1, 2),
                         tensor_degrees=(1,), layouts=('block/block',))
  plans = plan.search_plans(c, aot.parse_topology('v5p-128'), space)
  print(plan.format_plan(plans))
  assert plans and all(p.fits for p in plans)
  assert plans == sorted(plans, key=plan._rank)
