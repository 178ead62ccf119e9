"""LoRA / QLoRA: adapters on a frozen base, checkpoints of adapters only, PEFT export and import.

The reference is Hugging Face transformers + peft: a random HF Gemma3ForCausalLM (saved and used
as checkpoint.init_from) with our exported adapter loaded by peft.PeftModel.from_pretrained.
"""

import dataclasses
import json
import math
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from flax import nnx

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train.convert import layout
from gemma3_train.convert import peft as peft_lib
from gemma3_train.models import decoder as model_lib
from gemma3_train.models import lora
from gemma3_train import sharding
from gemma3_train.training import flops
from gemma3_train.training import loop as train
from gemma3_train.training import state as train_state
from tests import helpers

TOKENS = np.random.default_rng(0).integers(0, helpers.REFERENCE_VOCAB, (2, 20)).astype(np.int32)


def _config(model: config_lib.ModelConfig, **sections) -> config_lib.Config:
  c = config_lib.Config(model=model)
  base = dict(data=dict(source='synthetic', seq_len=32),
              train=dict(num_steps=3, global_batch_size=8, eval_every=0, loss_chunk_size=16),
              optim=dict(warmup_steps=0, schedule='constant', lr=2e-2),
              logging=dict(tensorboard=False, log_every=1), checkpoint=dict(every=0),
              lora=dict(rank=4, alpha=8.0))
  for k, v in sections.items():
    base[k] = {**base.get(k, {}), **v}
  return c.replace(**base)


def _tiny(num_layers=2, **lora_fields):
  c = config_lib.from_config_dict(tiny.get_config())
  return _config(dataclasses.replace(c.model, vocab_size=512, num_layers=num_layers,
                                     remat_policy='none'), lora=lora_fields)


@pytest.mark.parametrize('scan', [True, False])
def test_zero_b_gives_the_base_logits_exactly(scan):
  c = _tiny(num_layers=7)
  c = c.replace(model=dict(scan_layers=scan))
  base = model_lib.Gemma3(c.model, rngs=nnx.Rngs(c.train.seed))
  adapted = model_lib.build(c)
  n = len(jax.tree.leaves(nnx.state(adapted, lora.TRAINABLE)))
  assert n == 2 * 7 * 7  # A and B of seven targets per layer (scanned: stacked over blocks)
  np.testing.assert_array_equal(np.asarray(adapted(TOKENS)), np.asarray(base(TOKENS)))


def _two_steps(s, c):
  """(init state's host copy, state after two steps) of setup s from its fresh random init."""
  state = s.init_state()
  before = jax.tree.map(np.asarray, {'params': nnx.to_pure_dict(state['params']),
                                     'base': nnx.to_pure_dict(state['frozen']['base'])})
  batch = {k: jax.device_put(v, s.batch_sharding[k]) for k, v in _batch(c).items()}
  for _ in range(2):
    state, m = s.train_step(state, batch)
  assert np.isfinite(float(m['loss']))
  return before, state


@pytest.fixture(scope='module')
def tiny_steps():
  """Two steps (two microbatches each) of a 7-layer tiny LoRA run: without dropout, and twice
  with lora.dropout=0.3. {name: (config, setup, state before, state after)}. One device: the
  sharded LoRA step, dropout included, is test_lora_sigkill_then_rerun_resumes_exactly's (and
  a 4-device mesh costs these two compiles ~40% more)."""
  c = _tiny(num_layers=7).replace(optim=dict(grad_accum_steps=2))
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  runs = {}
  for name, cd in (('plain', c), ('dropout', c.replace(lora=dict(dropout=0.3)))):
    s = train_state.setup(cd, mesh, abstract=True)
    runs[name] = (cd, s, *_two_steps(s, cd))
  runs['dropout_again'] = (runs['dropout'][0], runs['dropout'][1],
                           *_two_steps(runs['dropout'][1], runs['dropout'][0]))
  return runs


@pytest.mark.slow
def test_only_adapters_train_and_the_optimizer_holds_only_them(tiny_steps):
  _, _, before, state = tiny_steps['plain']
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, nnx.to_pure_dict(state['frozen']['base'])), before['base'])
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(state['params']))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(after),
                          jax.tree.leaves(before['params'])):
    assert not np.array_equal(x, y), jax.tree_util.keystr(path)  # every A and B moved
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(after))
  moments = sorted(x.shape for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0)
  assert moments == sorted(adapter_shapes * 2)  # Adam's mu and nu of the adapters, nothing else


@pytest.mark.slow
def test_dropout_changes_training_reproducibly_and_not_eval(tiny_steps):
  c0, s0, before0, plain = tiny_steps['plain']
  c1, s1, before1, drop = tiny_steps['dropout']
  _, _, _, again = tiny_steps['dropout_again']
  jax.tree.map(np.testing.assert_array_equal, before0, before1)  # the same start
  params = lambda st: jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(st['params'])))
  # Dropout changes the steps (every B moved differently) and is a function of seed and step.
  assert all(not np.array_equal(x, y) for x, y in zip(params(plain), params(drop)))
  jax.tree.map(np.testing.assert_array_equal, params(drop), params(again))
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, nnx.to_pure_dict(drop['frozen']['base'])), before1['base'])
  # Without dropout the step draws no random bits at all (the program is the plain one).
  args = (s0.abstract_state, train_state.abstract_batch(c0, s0.mesh))
  assert 'threefry' not in s0.train_step.lower(*args).as_text()
  assert 'threefry' in s1.train_step.lower(*args).as_text()  # (the check sees random bits)
  # Eval never drops: the same state evaluates bitwise equally with and without lora.dropout.
  batch = {k: jax.device_put(v, s0.batch_sharding[k]) for k, v in _batch(c0).items()}
  e0, e1 = s0.eval_step(drop, batch), s1.eval_step(drop, batch)
  for k in e0:
    np.testing.assert_array_equal(np.asarray(e0[k]), np.asarray(e1[k]))


def test_dropout_masks_are_inverted_dropout_per_adapter():
  """Hand check with A = B = I (scale 1): the adapter term is exactly dropout(x), PEFT's
  nn.Dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p)."""
  D, p = 32, 0.25
  eye = jnp.eye(D)

  class Two(nnx.Module):
    def __init__(self):
      self.one = lora.Adapter(eye, eye, ('embed', 'lora_rank'), ('lora_rank', 'embed'), 1.0)
      self.two = lora.Adapter(eye, eye, ('embed', 'lora_rank'), ('lora_rank', 'embed'), 1.0)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64, D)), jnp.float32) + 3.0
  m = Two()
  np.testing.assert_allclose(m.one('BLD,DE->BLE', x, jnp.float32), x, rtol=1e-6)  # no key: none
  lora.set_dropout(m, jax.random.key(7), p)
  y1, y2 = (np.asarray(a('BLD,DE->BLE', x, jnp.float32)) for a in (m.one, m.two))
  for y in (y1, y2):
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - p), rtol=1e-6)
    frac = 1 - kept.mean()  # 8192 draws: 4 sigma is ~0.02
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / kept.size), frac
  assert not np.array_equal(y1 != 0, y2 != 0)  # each adapter its own mask
  lora.set_dropout(m, jax.random.key(7), p)
  np.testing.assert_array_equal(np.asarray(m.one('BLD,DE->BLE', x, jnp.float32)), y1)


def _batch(c):
  rng = np.random.default_rng(1)
  B, L = c.train.global_batch_size, c.data.seq_len
  tokens = rng.integers(3, c.model.vocab_size, size=(B, L + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
          'segment_ids': np.ones((B, L), np.int32), 'weights': np.ones((B, L), np.float32)}


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope='module')
def hf_base(tmp_path_factory):
  """(our ModelConfig, HF model, its saved directory) of a random 8-layer Gemma 3."""
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES['gqa_ropescale_scanned'])
  hf_model = helpers.reference_hf_model(hf_cfg, seed=3)
  path = tmp_path_factory.mktemp('hf_base')
  hf_model.save_pretrained(path)
  return cfg, hf_model, path


@pytest.fixture(scope='module')
def lora_run(hf_base, tmp_path_factory):
  """A LoRA run of 3 steps on the HF base (targets all seven projections)."""
  cfg, _, path = hf_base
  workdir = tmp_path_factory.mktemp('lora_run')
  c = _config(cfg, checkpoint=dict(init_from=str(path)))
  train.train_and_evaluate(c, str(workdir))
  return c, workdir


def _peft_logits(hf_model, adapter_dir):
  model = peft.PeftModel.from_pretrained(hf_model, str(adapter_dir)).eval()
  try:
    return helpers.hf_logits(model, TOKENS)
  finally:
    model.unload()  # the base module back as it was, for the other tests


@pytest.mark.slow
def test_trained_adapter_matches_peft_and_merged_export(hf_base, lora_run, tmp_path):
  _, hf_model, _ = hf_base
  c, workdir = lora_run
  ours = convert.load(workdir)
  got = np.asarray(ours(jnp.asarray(TOKENS)))
  base = helpers.hf_logits(hf_model, TOKENS)
  assert _rel(got, base) > 1e-3  # the adapters learned something
  adapter = tmp_path / 'adapter'
  peft_lib.export_adapter(workdir, adapter)
  assert json.loads((adapter / 'adapter_config.json').read_text())['r'] == 4
  want = _peft_logits(hf_model, adapter)
  err = _rel(got, want)
  print(f'ours vs transformers+peft: max rel logit error {err:.2e}')
  assert err <= 1e-5
  merged = tmp_path / 'merged'
  convert.export_hf(workdir, merged, dtype='float32', progress=False)
  merged_model = transformers.Gemma3ForCausalLM.from_pretrained(merged).eval()
  err = _rel(helpers.hf_logits(merged_model, TOKENS), want)
  print(f'merged export vs adapter export: max rel logit error {err:.2e}')
  assert err <= 1e-5


@pytest.mark.slow
def test_peft_adapter_imports_to_continue_training(hf_base, lora_run, tmp_path):
  cfg, hf_model, path = hf_base
  c, workdir = lora_run
  adapter = tmp_path / 'adapter'
  peft_lib.export_adapter(workdir, adapter)
  _, trained = peft_lib.read_trainables(workdir)
  c2 = c.replace(lora=dict(init_adapter=str(adapter)))
  s = train_state.setup(c2, sharding.make_mesh(c2, jax.devices()[:2]), abstract=True)
  params = peft_lib.read_adapter(adapter, c2, s.init_trainable()['params'])
  for p, var in nnx.to_flat_state(params):
    np.testing.assert_array_equal(np.asarray(var.get_value()), trained[peft_lib._key(p)])
  # An adapter of another base shape: one line naming it.
  other = c2.replace(model=dict(embed_dim=48))
  s = train_state.setup(other, sharding.make_mesh(other, jax.devices()[:2]), abstract=True)
  with pytest.raises(config_lib.ConfigError, match='another base shape') as e:
    peft_lib.read_adapter(adapter, other, s.init_trainable()['params'])
  assert '\n' not in str(e.value)


def test_int8_base_stays_close_to_float32(hf_base):
  cfg, hf_model, _ = hf_base
  c = _config(cfg)
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  top, layers = convert.hf_to_canonical(tensors, cfg)
  plain = layout.canonical_to_state(cfg, top, layers)
  errs = {}
  ref = None
  for dtype in ('float32', 'bfloat16', 'int8'):
    cd = c.replace(lora=dict(base_dtype=dtype))
    model = nnx.eval_shape(lambda: model_lib.build(cd, nnx.Rngs(0)))
    base = lora.base_from_params(plain, nnx.state(model, lora.FROZEN))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         nnx.state(model, lora.TRAINABLE))
    nnx.update(model, base, zeros)
    logits = np.asarray(model(jnp.asarray(TOKENS)))
    if ref is None:
      ref = logits
      np.testing.assert_allclose(ref, helpers.hf_logits(hf_model, TOKENS), rtol=0, atol=1e-4 *
                                 np.abs(ref).max())
    errs[dtype] = _rel(logits, ref)
  print('max rel logit error vs the float32 base:', errs)
  int8 = [v for v in jax.tree.leaves(nnx.state(model, nnx.Param)) if v.dtype == jnp.int8]
  assert len(int8) == 7 * 8  # seven projections per layer
  assert errs['int8'] <= 0.05  # stated tolerance: 5% of the largest logit (docs/lora.md)


@pytest.mark.parametrize('overrides, expected', [
    (['--config.lora.rank=4', '--config.lora.targets=q,bogus'], "unknown: 'bogus'"),
    (['--config.lora.alpha=32'], 'lora.rank=0: expected > 0 when lora.alpha is set'),
    (['--config.lora.rank=20'], "lora.rank=20: expected <= 16, the smaller dimension of "
     "target 'k'"),
])
def test_bad_lora_config_is_one_line_exit_2(tmp_path, overrides, expected):
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
                      f'--workdir={tmp_path / "w"}', *overrides], cwd=helpers.ROOT,
                     env=helpers.cli_env(1), capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('gemma3-train: error: '), r.stderr
  assert expected in lines[0]
  assert not (tmp_path / 'w').exists()


def test_export_lora_of_a_non_lora_dir_is_one_line_exit_2(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.convert', 'export-lora',
                      f'--src={tmp_path}', f'--dst={tmp_path / "out"}'],
                     cwd=helpers.ROOT, env=helpers.cli_env(1), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert 'not a LoRA training workdir' in r.stderr and not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_lora_sigkill_then_rerun_resumes_exactly(tmp_path):
  # With adapter dropout: its masks are a function of the seed and step, so resume is exact.
  extra = ['--config.lora.rank=4', '--config.lora.targets=q,v,down',
           '--config.lora.base_dtype=int8', '--config.lora.dropout=0.1']
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  helpers.train_ok(straight, 20, *extra)
  proc = subprocess.Popen(helpers.train_cmd(killed, 20, *extra), cwd=helpers.ROOT,
                          env=helpers.cli_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Step 12 is past the save at 10, which waited for the save at 5 to finish.
  helpers.wait_for_step(killed / 'metrics.jsonl', 12, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(helpers.logged_losses(killed)) < 20
  r = helpers.train_ok(killed, 20, *extra)
  assert 'Resumed from' in r.stderr
  a, b = helpers.logged_losses(straight), helpers.logged_losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise: float equality
  _, x = peft_lib.read_trainables(straight)
  _, y = peft_lib.read_trainables(killed)
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])


def test_lora_flops_match_a_hand_count():
  """flops.train_flops_per_step of a LoRA run against every matmul listed by hand: the frozen
  base (and head) forward + activation gradient (2x), attention 3x, adapters 3x."""
  m = config_lib.ModelConfig(preset='t', vocab_size=97, num_layers=7, embed_dim=24, mlp_dim=40,
                             num_heads=4, num_kv_heads=2, head_dim=6, sliding_window=5)
  T, B, r = 9, 3, 2
  d, f, q, kv = 24, 40, 4 * 6, 2 * 6
  base = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # (in, out) per layer
  adapted = {'q': (d, q), 'v': (d, kv), 'down': (f, d)}
  attn = 0
  for layer in range(7):  # scores and probs @ V over each query's visible keys
    for p in range(T):
      keys = p + 1 if layer % 6 == 5 else min(5, p + 1)
      attn += 2 * (2 * 4 * 6 * keys)
  per_row = (2 * 7 * sum(2 * T * i * o for i, o in base) + 3 * attn
             + 3 * 7 * sum(2 * T * r * (i + o) for i, o in adapted.values()))
  c = config_lib.Config(model=m).replace(
      data=dict(seq_len=T), train=dict(global_batch_size=B),
      lora=dict(rank=r, targets='q,v,down'))
  head = 2 * T * d * 97
  assert flops.train_flops_per_step(c) == pytest.approx(B * (per_row + 2 * head), rel=1e-12)
  c = c.replace(lora=dict(train_embedding=True))
  assert flops.train_flops_per_step(c) == pytest.approx(B * (per_row + 3 * head), rel=1e-12)
  full = c.replace(lora=dict(rank=0, targets=config_lib.LoraConfig().targets,
                             train_embedding=False))
  assert flops.train_flops_per_step(full) == flops.model_flops_per_step(m, T, B)


def test_lora_27b_config_is_the_one_its_aot_proof_compiled():
  """docs/aot/lora_27b_v5e-16.json (a 25-minute compile, rerun by hand) still describes
  configs/lora_27b.py, and fits a v5e-16 with the shipped configs' headroom."""
  from configs import lora_27b  # pylint: disable=g-import-not-at-top
  from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(lora_27b.get_config())
  r = json.loads((helpers.ROOT / 'docs' / 'aot' / 'lora_27b_v5e-16.json').read_text())
  assert r['fits'] and r['headroom'] >= aot.HEADROOM and not r['error'] and r['tpu_kernels'] > 0
  want = dict(config='27b', topology='v5e-16', chips=16, hbm_gib=16.0,
              mesh=sharding.mesh_shape(c, 16), remat_policy=c.model.remat_policy,
              seq_len=c.data.seq_len, global_batch=c.train.global_batch_size,
              param_dtype=c.model.param_dtype, dtype=c.model.dtype)
  r['mesh'] = {**{k: 1 for k in want['mesh']}, **r['mesh']}  # reports before the context axis
  assert {k: r[k] for k in want} == want
  # The state it compiled: int8 projections, bfloat16 rest, rank-16 adapters and their Adam.
  assert (c.lora.rank, c.lora.base_dtype, c.lora.target_list()) == (
      16, 'int8', config_lib.LoraConfig().target_list())
  full = json.loads((helpers.ROOT / 'docs' / 'aot' / '27b_full_v5e-16.json').read_text())
  assert not full['fits'] and full['state_gib'] > full['hbm_gib']
  assert (full['seq_len'], full['global_batch']) == (r['seq_len'], r['global_batch'])
