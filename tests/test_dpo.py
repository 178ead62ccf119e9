"""Preference tuning (train.objective=dpo): every dpo.loss against TRL on the same random Gemma 3.

The reference side is transformers' Gemma3ForCausalLM on the pairs as TRL lays them out (each
sequence on its own row, right-padded, a completion mask), its per-sequence log-probabilities
summed over the completion tokens, then TRL's losses: the trainers' own loss functions where
TRL has them standalone (CPOTrainer.cpo_loss for simpo and the smoothed sigmoid,
ORPOTrainer.odds_ratio_loss for orpo), and DPOTrainer's sigmoid, ipo and hinge lines written out
in torch. Ours runs on the same pairs packed several to a row (data/preference.py). Losses and
gradients (every parameter; with LoRA, every adapter through PEFT) agree to float32 precision.
"""

import copy
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.convert import peft as peft_lib
from gemma3_train.data import packing
from gemma3_train.data import preference
from gemma3_train.models import decoder
from gemma3_train.models import lora
from gemma3_train.training.objectives import dpo
from tests import helpers

os.environ.setdefault('TRL_EXPERIMENTAL_SILENCE', '1')  # trl.experimental's import warning

SEQ_LEN = 64


def _pairs(seed=0, n=6):
  """n pairs of random token ids: (prompt, chosen, rejected), BOS first in the prompt."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    prompt = [2, *rng.integers(3, helpers.REFERENCE_VOCAB, rng.integers(2, 8))]
    chosen, rejected = (list(rng.integers(3, helpers.REFERENCE_VOCAB, rng.integers(2, 10)))
                        for _ in range(2))
    out.append((prompt, chosen, rejected))
  return out


def _packed_batch(pairs):
  """The pairs as our pipeline packs them (pair_piece, then first-fit rows), [4, SEQ_LEN]."""
  return jax.tree.map(jnp.asarray, _packed_batch_rows(pairs, SEQ_LEN, 4))


def _trl_logps(model, pairs):
  """TRL's layout: rows [chosen..., rejected...], right-padded; per-sequence summed
  log-probabilities of the completion tokens and the completion token counts."""
  import torch  # pylint: disable=g-import-not-at-top
  seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
  masks = ([[0] * len(p) + [1] * len(c) for p, c, _ in pairs]
           + [[0] * len(p) + [1] * len(r) for p, _, r in pairs])
  T = max(map(len, seqs))
  ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
  attention = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
  completion = torch.tensor([m + [0] * (T - len(m)) for m in masks]).float()
  logits = model(input_ids=ids, attention_mask=attention).logits
  per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, ids[:, 1:, None])[..., 0]
  logps = (per_token * completion[:, 1:]).sum(1)
  counts = completion[:, 1:].sum(1)
  return logps.chunk(2), counts.chunk(2), (per_token, completion[:, 1:])


def _trl_loss(loss: str, policy, reference, p: config_lib.DpoConfig):
  """TRL's mean loss over the pairs (docs/preference.md cites each)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from trl.experimental.cpo import CPOTrainer  # pylint: disable=g-import-not-at-top
  from trl.experimental.orpo import ORPOTrainer  # pylint: disable=g-import-not-at-top
  (pc, pr), (n_c, n_r), (per_token, completion) = policy
  cpu = types.SimpleNamespace(device='cpu')
  if loss in ('simpo', 'orpo'):
    ac, ar = pc / n_c, pr / n_r  # CPO/ORPO's average_log_prob=True
    if loss == 'simpo':
      trainer = types.SimpleNamespace(alpha=0.0, beta=p.beta, simpo_gamma=p.simpo_gamma,
                                      label_smoothing=p.label_smoothing, loss_type='simpo',
                                      accelerator=cpu)
      return CPOTrainer.cpo_loss(trainer, ac, ar)[0].mean()
    trainer = types.SimpleNamespace(beta=p.orpo_lambda, accelerator=cpu)
    losses = ORPOTrainer.odds_ratio_loss(trainer, ac, ar)[0]
    n = len(pc)  # the chosen rows come first
    nll = -(per_token[:n] * completion[:n]).sum() / completion[:n].sum()
    return nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
  (rc, rr), _, _ = reference
  chosen, rejected = pc - rc, pr - rr
  b = p.beta
  if loss == 'sigmoid':
    if p.label_smoothing:  # conservative DPO: CPO's smoothed sigmoid on the log-ratios
      trainer = types.SimpleNamespace(alpha=0.0, beta=b, label_smoothing=p.label_smoothing,
                                      loss_type='sigmoid', accelerator=cpu)
      return CPOTrainer.cpo_loss(trainer, chosen, rejected)[0].mean()
    return (-F.logsigmoid(b * (chosen - rejected))).mean()
  if loss == 'hinge':
    return torch.relu(1 - b * (chosen - rejected)).mean()
  return ((chosen / n_c - rejected / n_r - 1 / (2 * b)) ** 2).mean()  # ipo


@pytest.fixture(scope='module')
def models():
  """(our ModelConfig, HF policy, HF reference): two random models of one shape."""
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES['gqa_ropescale_scanned'])
  return cfg, helpers.reference_hf_model(hf_cfg, seed=0), helpers.reference_hf_model(hf_cfg,
                                                                                       seed=1)


def _config(cfg, loss, **dpo_fields):
  c = config_lib.Config(model=cfg)
  return c.replace(data=dict(seq_len=SEQ_LEN), train=dict(objective='dpo', loss_chunk_size=24),
                   dpo=dict(loss=loss, **dpo_fields))


_slow = pytest.mark.slow


@pytest.mark.parametrize('loss,smoothing', [
    ('sigmoid', 0.0), pytest.param('sigmoid', 0.1, marks=_slow),
    pytest.param('ipo', 0.0, marks=_slow), pytest.param('hinge', 0.0, marks=_slow),
    pytest.param('simpo', 0.1, marks=_slow), pytest.param('orpo', 0.0, marks=_slow)])
def test_full_finetune_loss_and_gradient_equal_trl(models, loss, smoothing):
  cfg, hf_policy, hf_reference = models
  c = _config(cfg, loss, label_smoothing=smoothing, beta=0.5)
  pairs = _pairs()
  hf_policy.zero_grad()
  policy = _trl_logps(hf_policy, pairs)
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    reference = _trl_logps(hf_reference, pairs)
  want = _trl_loss(loss, policy, reference, c.dpo)
  want.backward()
  want_grads = helpers.hf_grads_as_ours(cfg, hf_policy)

  ours = helpers.reference_ours(cfg, hf_policy)
  ours_ref = helpers.reference_ours(cfg, hf_reference)
  objective = dpo.Preference(c)
  graphdef, params = nnx.split(ours, nnx.Param)
  batch = _packed_batch(pairs)

  def mean_loss(params):
    total, sums = objective.loss_sums(nnx.merge(graphdef, params), batch,
                                      {dpo.REFERENCE: ours_ref})
    return total / sums['weight_sum'], sums
  (value, sums), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
  assert float(sums['weight_sum']) == len(pairs)
  helpers.assert_close(value, want.item(), 'loss')
  for k, g in nnx.to_flat_state(grads):
    helpers.assert_close(g.get_value(), want_grads[k], k)


def _adapter_dir(path, c, values):
  """A PEFT adapter directory holding `values` (our LoRA trainables' layout) as A and B."""
  import json  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path.mkdir()
  tensors = peft_lib.adapter_tensors(c, {peft_lib._key(k): np.asarray(v.get_value())
                                         for k, v in nnx.to_flat_state(values)})
  (path / peft_lib.ADAPTER_WEIGHTS).write_bytes(safetensors.numpy.save(tensors))
  (path / peft_lib.ADAPTER_CONFIG).write_text(json.dumps(peft_lib.adapter_config(c)))
  return path


@_slow
@pytest.mark.parametrize('loss', ['sigmoid', 'ipo', 'hinge', 'simpo', 'orpo'])
def test_lora_loss_and_adapter_gradient_equal_trl_with_peft(models, loss, tmp_path):
  """LoRA: the reference is the base with the adapters off, as TRL with a PEFT model
  (model.disable_adapter()); the gradients of every A and B agree through PEFT."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cfg, hf_base, _ = models
  c = _config(cfg, loss, beta=0.5).replace(lora=dict(rank=4, alpha=8.0))
  model = decoder.build(c, nnx.Rngs(0))
  nnx.update(model, nnx.state(helpers.reference_ours(cfg, hf_base), nnx.Param))
  graphdef, adapters, base = nnx.split(model, lora.TRAINABLE, ...)
  keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(adapters))))
  adapters = jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape, a.dtype),
                          adapters)
  hf = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), str(_adapter_dir(tmp_path / 'a', c, adapters)),
                                      is_trainable=True)
  pairs = _pairs(seed=1)
  policy = _trl_logps(hf, pairs)
  with torch.no_grad(), hf.disable_adapter():
    reference = _trl_logps(hf, pairs)
  want = _trl_loss(loss, policy, reference, c.dpo)
  want.backward()
  grad_dir = tmp_path / 'g'
  grad_dir.mkdir()
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  named = {k.replace('.default', ''): p.grad for k, p in hf.named_parameters() if 'lora_' in k}
  safetensors.torch.save_file({k: v.contiguous() for k, v in named.items()},
                              str(grad_dir / peft_lib.ADAPTER_WEIGHTS))
  (grad_dir / peft_lib.ADAPTER_CONFIG).write_text(
      (tmp_path / 'a' / peft_lib.ADAPTER_CONFIG).read_text())
  want_grads = peft_lib.read_adapter(grad_dir, c, adapters)

  objective = dpo.Preference(c)
  batch = _packed_batch(pairs)

  def mean_loss(adapters):
    total, sums = objective.loss_sums(nnx.merge(graphdef, adapters, base), batch, {})
    return total / sums['weight_sum']
  value, grads = jax.jit(jax.value_and_grad(mean_loss))(adapters)
  helpers.assert_close(value, want.item(), 'loss')
  want_flat = dict(nnx.to_flat_state(want_grads))
  for k, g in nnx.to_flat_state(grads):
    helpers.assert_close(g.get_value(), want_flat[k].get_value(), k)


# --- the train step: sharded and one device ------------------------------------------------


def _step_grads(c, devices, batch):
  """The gradient of the mean DPO loss at the seed's init, the reference being that init."""
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import state as train_state  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(c, devices)
  s = train_state.setup(c, mesh)
  put = {k: jax.device_put(v, s.batch_sharding[k]) for k, v in batch.items()}

  def grads(params):
    def mean(p):
      model = nnx.merge(s.graphdef, p, *s.state['frozen'].values())
      ref = {} if c.lora.rank else {dpo.REFERENCE: nnx.merge(s.graphdef, params)}
      total, sums = s.objective.loss_sums(model, put, ref)
      return total / sums['weight_sum']
    return jax.grad(mean)(params)
  with sharding.use_mesh(mesh, s.rules):
    params = s.state['params']
    if c.lora.rank:  # adapters away from B = 0, so that policy and reference differ
      params = jax.tree.map(lambda a: a + 0.05, params)
    g = jax.jit(grads)(params)
  return [np.asarray(x) for x in jax.tree.leaves(g)]


@_slow
@pytest.mark.parametrize('lora_rank', [0, 4])
def test_sharded_equals_one_device(lora_rank):
  """(fsdp=4, tensor=2) on 8 CPU devices: the same gradients as one device."""
  lora_cfg = dict(rank=lora_rank, alpha=8.0) if lora_rank else {}
  base = dict(train=dict(objective='dpo'), lora=lora_cfg, model=dict(num_layers=2))
  c1 = helpers.small_config(mesh=dict(fsdp=-1), **base)
  c8 = helpers.small_config(mesh=dict(fsdp=4, tensor=2), **base)
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(12):
    prompt = [2, *rng.integers(3, 512, rng.integers(1, 4))]
    pairs.append((prompt, list(rng.integers(3, 512, rng.integers(1, 4))),
                  list(rng.integers(3, 512, rng.integers(1, 4)))))
  batch = _packed_batch_rows(pairs, c1.data.seq_len, c1.train.global_batch_size)
  g1 = _step_grads(c1, jax.devices()[:1], batch)
  g8 = _step_grads(c8, jax.devices(), batch)
  helpers.assert_same_grads(g8, g1)


def _packed_batch_rows(pairs, seq_len, rows):
  """The pairs as our pipeline packs them (pair_piece, then first-fit rows), numpy
  [rows, seq_len]."""
  pieces = []
  for prompt, chosen, rejected in pairs:
    pieces.append(preference.pair_piece(*[
        (np.asarray(prompt + comp, np.int32),
         np.r_[np.zeros(len(prompt)), np.ones(len(comp))].astype(np.float32))
        for comp in (chosen, rejected)]))
  packed = packing.pack_group(pieces, seq_len)
  assert len(packed) <= rows
  packed += [{k: np.zeros_like(v) for k, v in packed[0].items()}] * (rows - len(packed))
  return {k: np.stack([r[k] for r in packed]) for k in packed[0]}


def test_step_flops_count_the_online_reference_forward():
  from gemma3_train.training import flops  # pylint: disable=g-import-not-at-top
  c = helpers.small_config(train=dict(objective='dpo'))
  T, B = c.data.seq_len, c.train.global_batch_size
  step = flops.model_flops_per_step(c.model, T, B)  # 3 x forward
  assert flops.train_flops_per_step(c) == pytest.approx(step * 4 / 3, rel=1e-12)
  for no_reference in (dict(reference_logps='precompute'), dict(loss='orpo'),
                       dict(loss='simpo')):
    assert flops.train_flops_per_step(c.replace(dpo=no_reference)) == step


@pytest.mark.parametrize('name,topology', [('dpo_1b', 'v5e-8'), ('dpo_lora_27b', 'v5e-16')])
def test_dpo_configs_are_the_ones_their_aot_proofs_compiled(name, topology):
  """docs/aot/NAME_TOPOLOGY.json (compiles of 3 and ~25 minutes, rerun by hand with
  gemma3-train --config=configs/NAME.py --aot_topology=T --aot_report=...) still describes the
  config, reference forward included, and fits with the shipped configs' headroom."""
  import importlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import flops  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(importlib.import_module(f'configs.{name}').get_config())
  r = json.loads((helpers.ROOT / 'docs' / 'aot' / f'{name}_{topology}.json').read_text())
  assert r['fits'] and r['headroom'] >= aot.HEADROOM and not r['error'] and r['tpu_kernels'] > 0
  chips = aot.parse_topology(topology).total_chips
  want = dict(topology=topology, chips=chips, mesh=sharding.mesh_shape(c, chips),
              remat_policy=c.model.remat_policy, seq_len=c.data.seq_len,
              global_batch=c.train.global_batch_size, param_dtype=c.model.param_dtype,
              dtype=c.model.dtype)
  r['mesh'] = {**{k: 1 for k in want['mesh']}, **r['mesh']}  # reports before the context axis
  assert {k: r[k] for k in want} == want
  assert c.train.objective == 'dpo' and c.dpo.reference_logps == 'online'
  assert r['model_flops_per_step'] == pytest.approx(flops.train_flops_per_step(c), rel=1e-12)


@_slow
def test_int8_reference_holds_the_start_quantized_per_channel_and_scores_with_it():
  """dpo.reference_dtype=int8 (a full fine-tune): the reference holds the seven projections as
  int8 with one absmax / 127 scale per output channel (of the weights read in bfloat16, as a
  QLoRA base loads them) and the rest in bfloat16; its
  log-probabilities are those of a float model with the dequantized weights (numpy)."""
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import restore as restore_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import state as train_state  # pylint: disable=g-import-not-at-top
  c = helpers.small_config(train=dict(objective='dpo'), dpo=dict(reference_dtype='int8'),
                           model=dict(num_layers=2))
  s = train_state.setup(c, sharding.make_mesh(c, jax.devices()[:1]))
  ref = restore_lib._load_frozen_model(s, dpo.REFERENCE, '')  # pylint: disable=protected-access
  start = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(s.state['params'])}
  held = {k: v.get_value() for k, v in nnx.to_flat_state(ref)}
  dequantized = {}
  for k, w in start.items():
    if k[-1] in lora.WEIGHT_TARGET:
      w = np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32))
      q, scale = np.asarray(held[k]), np.asarray(held[k[:-1] + (f'{k[-1]}_scale',)])
      axes = lora.weight_in_axes(k)
      assert q.dtype == np.int8 and scale.dtype == np.float32, k
      np.testing.assert_allclose(scale, np.abs(w).max(axis=axes, keepdims=True) / 127,
                                 rtol=2.4e-7)  # 2 ulp: XLA divides by multiplying by 1/127
      dequantized[k] = q.astype(np.float32) * scale
      err = np.abs(dequantized[k] - w) / scale
      assert np.all(err <= 0.5 + 1e-5), (k, err.max(), np.abs(q).max())
    else:
      assert held[k].dtype == jnp.bfloat16, k
      dequantized[k] = np.asarray(held[k].astype(jnp.float32))
  rng = np.random.default_rng(0)
  pairs = [([2, *rng.integers(3, 512, 3)], list(rng.integers(3, 512, 4)),
            list(rng.integers(3, 512, 5))) for _ in range(6)]
  batch = jax.tree.map(jnp.asarray, _packed_batch_rows(pairs, c.data.seq_len,
                                                       c.train.global_batch_size))
  float_model = nnx.merge(s.graphdef, nnx.from_flat_state(
      [(k, v.replace(jnp.asarray(dequantized[k]))) for k, v in
       nnx.to_flat_state(s.state['params'])]))
  objective = s.objective
  int8_model = nnx.merge(s.frozen_model_graphdef[dpo.REFERENCE], ref)
  got = objective.reference_logps(None, batch, {dpo.REFERENCE: int8_model})
  want = objective.reference_logps(None, batch, {dpo.REFERENCE: float_model})
  helpers.assert_close(got, want, 'reference logps')
  # The train step reads the int8 reference from the state, placed by its shardings.
  policy = nnx.merge(s.graphdef, s.state['params'])
  _, sums = objective.loss_sums(policy, batch, {dpo.REFERENCE: float_model})
  want_loss = objective.metrics(sums)['loss']
  state = {**s.state, 'frozen_models': {dpo.REFERENCE: ref}}
  _, metrics = s.train_step(state, {k: jax.device_put(v, s.batch_sharding[k])
                                    for k, v in batch.items()})
  helpers.assert_close(metrics['loss'], want_loss, 'loss')
