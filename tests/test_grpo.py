"""RL with verifiable rewards (train.objective=grpo) against TRL's GRPOTrainer formulas.

The reference side is transformers' Gemma3ForCausalLM on a rollout batch as TRL lays it out
(prompts left-padded, completions right-padded with tokens after the stop token present but
masked), scored as GRPOTrainer._get_per_token_logps_and_entropies does (logits / temperature),
then _compute_loss's lines and _generate_and_score_completions' advantages written out in
torch. Ours runs on the same rollout as our rows (rollout.layout: one completion per row, nothing
after the stop token). Losses, every parameter's gradient, the reference's log-probabilities
and the kl / entropy / clip metrics agree to float32 precision, for each rl.loss.
"""

import copy
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train.training import rewards as rewards_lib
from gemma3_train.training import rollout
from gemma3_train.training.objectives import grpo
from tests import helpers

V = helpers.REFERENCE_VOCAB
SEQ_LEN = 32
GROUP = 3
MAX_COMPLETION = 9
_slow = pytest.mark.slow


def _rollout_rows(seed=0, prompts=2):
  """Prompts (BOS first, lengths 3..7) and GROUP completions each as TRL holds them: up to
  MAX_COMPLETION ids, some stopped by EOS with garbage after it."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(prompts):
    prompt = [2, *rng.integers(3, V, rng.integers(2, 7))]
    for _ in range(GROUP):
      ids = list(rng.integers(3, V, MAX_COMPLETION))
      stop = int(rng.integers(0, MAX_COMPLETION + 3))
      if stop < MAX_COMPLETION:
        ids[stop] = 1  # EOS; what follows is masked
      out.append((prompt, ids))
  return out


def _kept(ids):
  """The completion up to and including its first stop token (what our sampler returns)."""
  return ids[:ids.index(1) + 1] if 1 in ids else ids


def _trl_side(model, ref_model, rows, rewards, old_noise, c):
  """TRL's loss (a torch scalar, differentiable), per-token reference logps and metrics."""
  import torch  # pylint: disable=g-import-not-at-top
  r = c.rl
  P = max(len(p) for p, _ in rows)
  prompt_ids = torch.tensor([[0] * (P - len(p)) + p for p, _ in rows])
  prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p, _ in rows])
  completion_ids = torch.tensor([ids for _, ids in rows])
  # completion_mask: up to and including the first EOS (_generate_and_score_completions)
  is_eos = completion_ids == 1
  eos_idx = torch.full((len(rows),), MAX_COMPLETION, dtype=torch.long)
  eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
  seq_idx = torch.arange(MAX_COMPLETION).expand(len(rows), -1)
  mask = (seq_idx <= eos_idx.unsqueeze(1)).int()
  input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
  attention_mask = torch.cat([prompt_mask, mask], dim=1)

  def logps_and_entropy(m):
    logits = m(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -MAX_COMPLETION - 1:-1] / r.temperature
    logp_all = logits.log_softmax(-1)
    per_token = torch.gather(logp_all, 2, completion_ids[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return per_token, entropy

  # advantages: sum-then-normalize, scaled by the group's std (or none)
  rewards_t = torch.tensor(rewards, dtype=torch.float32)
  mean = rewards_t.view(-1, GROUP).mean(dim=1).repeat_interleave(GROUP)
  std = rewards_t.view(-1, GROUP).std(dim=1).repeat_interleave(GROUP)
  advantages = rewards_t - mean
  if rollout.scale_of(c) == 'group':
    advantages = advantages / (std + 1e-4)

  per_token_logps, entropies = logps_and_entropy(model)
  old = per_token_logps.detach() if old_noise is None else per_token_logps.detach() + old_noise
  log_ratio = per_token_logps - old
  coef_1 = torch.exp(log_ratio)
  ref = None
  if r.beta:
    with torch.no_grad():
      ref, _ = logps_and_entropy(ref_model)
    per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
  adv = advantages.unsqueeze(1)
  coef_2 = torch.clamp(coef_1, 1 - r.epsilon_low, 1 + r.epsilon_high)
  per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
  if r.beta:
    per_token_loss = per_token_loss + r.beta * per_token_kl
  if r.loss == 'grpo':
    loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
  elif r.loss == 'dr_grpo':
    loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * r.max_completion_len)
  else:  # dapo: num_items_in_batch, one process, no accumulation
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
  masked_mean = lambda x: ((x * mask).sum() / mask.sum()).item()
  low = ((coef_1 < 1 - r.epsilon_low) & (adv < 0)).float()
  high = ((coef_1 > 1 + r.epsilon_high) & (adv > 0)).float()
  metrics = {'entropy': masked_mean(entropies), 'clip_ratio/low_mean': masked_mean(low),
             'clip_ratio/high_mean': masked_mean(high),
             'clip_ratio/region_mean': masked_mean(torch.maximum(low, high))}
  if r.beta:
    metrics['kl'] = masked_mean(per_token_kl.detach())
  return loss, advantages.numpy(), ref, mask, metrics


def _to_rows(values_BC, rows, mask):
  """TRL's per-completion-position values [B, C] at our row positions [B, SEQ_LEN]."""
  out = np.zeros((len(rows), SEQ_LEN), np.float32)
  for b, (p, _) in enumerate(rows):
    n = int(mask[b].sum())
    out[b, len(p) - 1:len(p) - 1 + n] = values_BC[b, :n]
  return out


@pytest.fixture(scope='module')
def models():
  """(our ModelConfig, HF policy, HF reference): a random model, and a reference near it (as
  the policy's start is: exp(ref - log p) of two unrelated models would be far out of range)."""
  import torch  # pylint: disable=g-import-not-at-top
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES['gqa_ropescale_scanned'])
  policy = helpers.reference_hf_model(hf_cfg, seed=0)
  reference = copy.deepcopy(policy)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in reference.parameters():
      p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))
  return cfg, policy, reference


def _config(cfg, **rl):
  c = config_lib.Config(model=cfg)
  rl = dict(dict(group_size=GROUP, prompts_per_step=2, max_completion_len=MAX_COMPLETION), **rl)
  return c.replace(data=dict(seq_len=SEQ_LEN),
                   train=dict(objective='grpo', loss_chunk_size=12, global_batch_size=2 * GROUP,
                              eval_every=0),
                   rl=rl)


@pytest.mark.parametrize('loss,beta,updates,temperature', [
    pytest.param('dapo', 0.0, 1, 1.0, marks=_slow), ('grpo', 0.1, 2, 0.7),
    pytest.param('dr_grpo', 0.04, 2, 1.3, marks=_slow),
    pytest.param('grpo', 0.0, 1, 1.0, marks=_slow),
    pytest.param('dapo', 0.2, 2, 0.9, marks=_slow)])
def test_loss_and_gradient_equal_trl(models, loss, beta, updates, temperature):
  """updates > 1: the rollout's old log-probabilities differ from the policy's (clipping on
  both sides); 1: they are the policy's own, not differentiated."""
  import torch  # pylint: disable=g-import-not-at-top
  cfg, hf_policy, hf_reference = models
  c = _config(cfg, loss=loss, beta=beta, updates_per_batch=updates, temperature=temperature,
              epsilon_high=0.28)
  rows = _rollout_rows(seed=len(loss) + updates)
  rewards = np.random.default_rng(1).integers(0, 3, len(rows)).astype(np.float32)
  rewards[:GROUP] = 1.0  # a group of equal rewards: zero advantages
  noise = None
  if updates > 1:
    noise = torch.from_numpy(np.random.default_rng(2).normal(0, 0.4, (len(rows), MAX_COMPLETION))
                             .astype(np.float32))
  hf_policy.zero_grad()
  want, want_adv, want_ref, mask, want_metrics = _trl_side(hf_policy, hf_reference, rows,
                                                           rewards.tolist(), noise, c)
  want.backward()
  want_grads = helpers.hf_grads_as_ours(cfg, hf_policy)

  adv, zero_std = rollout.group_advantages(rewards, GROUP, rollout.scale_of(c))
  helpers.assert_close(adv, want_adv, 'advantages')
  assert zero_std.tolist() == [1.0] * GROUP + [0.0] * GROUP
  prompts, completions = [p for p, _ in rows], [_kept(ids) for _, ids in rows]
  batch = rollout.layout(prompts, completions, SEQ_LEN)
  np.testing.assert_array_equal(batch['weights'].sum(1), mask.sum(1).numpy())
  objective = grpo.Grpo(c)
  ours = helpers.reference_ours(cfg, hf_policy)
  batch.update(advantages=adv, rewards=rewards[:, None], zero_std=zero_std,
               truncated=np.zeros(len(rows), np.float32))
  batch = jax.tree.map(jnp.asarray, batch)
  if updates > 1:  # the policy's own log-probabilities plus TRL's noise, at our positions
    own = jax.jit(lambda m, b: objective.logps(m, b)[0])(ours, batch)
    batch['old_logps'] = own + _to_rows(noise.numpy(), rows, mask)
  if beta:
    ours_ref = helpers.reference_ours(cfg, hf_reference)
    batch['ref_logps'] = jax.jit(lambda m, b: objective.logps(m, b)[0])(ours_ref, batch)
    helpers.assert_close(batch['ref_logps'] * batch['weights'],
                  _to_rows(want_ref.numpy(), rows, mask), 'ref_logps')
  graphdef, params = nnx.split(ours, nnx.Param)

  def mean_loss(params):
    total, sums = objective.loss_sums(nnx.merge(graphdef, params), batch)
    return total / sums['weight_sum'], sums
  (value, sums), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
  helpers.assert_close(value, want.item(), 'loss')
  for k, g in nnx.to_flat_state(grads):
    helpers.assert_close(g.get_value(), want_grads[k], k)
  metrics = objective.metrics(sums)
  for k, v in want_metrics.items():
    helpers.assert_close(metrics[k], v, k)
  if updates > 1:
    assert want_metrics['clip_ratio/low_mean'] > 0 and want_metrics['clip_ratio/high_mean'] > 0
  assert float(metrics['completions/mean_length']) == pytest.approx(float(mask.sum()) / len(rows))


def test_completion_window_scores_as_the_whole_row(models):
  """The head on each row's rl.max_completion_len window (TRL's logits_to_keep) gives the
  whole row's log-probabilities and entropies on every completion token, 0 outside it; rows
  whose prompt ends within the last window (start moved left), a full row and an empty one
  included."""
  cfg, hf_policy, _ = models
  ours = helpers.reference_ours(cfg, hf_policy)
  rng = np.random.default_rng(3)
  lengths = [(4, 9), (SEQ_LEN - MAX_COMPLETION, MAX_COMPLETION), (SEQ_LEN - 3, 3),
             (SEQ_LEN - 5, 5), (10, 1)]
  prompts = [[2, *rng.integers(3, V, n - 1)] for n, _ in lengths]
  completions = [list(rng.integers(3, V, m)) for _, m in lengths]
  batch = rollout.layout(prompts, completions, SEQ_LEN)
  for k in batch:
    batch[k] = np.concatenate([batch[k], np.zeros_like(batch[k][:1])])  # a padding row
  batch = jax.tree.map(jnp.asarray, batch)
  score = jax.jit(lambda m, b, w: grpo.token_logps(m, b, temperature=0.8, chunk_size=4,
                                                   window=w), static_argnums=2)
  full = [np.asarray(a) for a in score(ours, batch, None)]
  cut = [np.asarray(a) for a in score(ours, batch, MAX_COMPLETION)]
  w = np.asarray(batch['weights']) > 0
  assert w.sum() == sum(m for _, m in lengths)
  for a_full, a_cut in zip(full, cut):
    np.testing.assert_allclose(a_cut[w], a_full[w], rtol=1e-6, atol=1e-6)
    for b, row in enumerate(w):
      start = min(int(np.argmax(row)), SEQ_LEN - MAX_COMPLETION)
      assert not np.any(a_cut[b, :start]) and not np.any(a_cut[b, start + MAX_COMPLETION:])


def test_batch_scaled_advantages_equal_trl():
  import torch  # pylint: disable=g-import-not-at-top
  rewards = np.random.default_rng(3).normal(size=12).astype(np.float32)
  adv, _ = rollout.group_advantages(rewards, 4, 'batch')
  t = torch.from_numpy(rewards)
  mean = t.view(-1, 4).mean(dim=1).repeat_interleave(4)
  helpers.assert_close(adv, ((t - mean) / (t.std() + 1e-4)).numpy(), 'advantages')


# --- rewards ------------------------------------------------------------------------------


def reward_raises(prompts, completions, completion_ids, **_):
  raise KeyError('no such thing\nsecond line')


def reward_short(prompts, completions, completion_ids, **_):
  return [0.0]


def reward_nan(prompts, completions, completion_ids, **_):
  return [float('nan')] * len(completions)


def reward_small_ids(prompts, completions, completion_ids, **_):
  """The share of a completion's ids below 64: reachable by the small model (learning check)."""
  return [float(np.mean([t < 64 for t in ids])) for ids in completion_ids]


def _rewards(names, **rl):
  c = config_lib.Config().replace(rl=dict(rewards=names, **rl))
  return rewards_lib.Rewards(c)


def test_builtin_rewards_and_one_line_errors():
  rw = _rewards('accuracy,format,length', reward_weights='1,0.5,1', max_completion_len=10)
  completions = ['So 6 * 7 = 42.\n#### 42', [{'role': 'assistant', 'content': 'it is 1,234'}],
                 '#### 41', 'no number']
  ids = [[5] * 10, [5] * 3, [5], [5, 5]]
  got = rw(['q'] * 4, completions, ids, {'answer': ['... #### 42', '#### 1,234', '#### 42',
                                                    '#### 1']})
  np.testing.assert_array_equal(got[:, 0], [1, 1, 0, 0])  # accuracy
  np.testing.assert_array_equal(got[:, 1], [1, 0, 1, 0])  # format: '#### <number>'
  np.testing.assert_allclose(got[:, 2], [-1.0, -0.3, -0.1, -0.2])  # length
  assert rw.weights.tolist() == [1.0, 0.5, 1.0]
  for name, message in (('reward_raises', 'raised KeyError'), ('reward_short', '1 values for 2'),
                        ('reward_nan', 'nan')):
    with pytest.raises(rewards_lib.RewardError, match=f'^rl.rewards: tests.test_grpo:{name} .*{message}') as e:
      _rewards(f'tests.test_grpo:{name}')(['q'] * 2, ['a', 'b'], [[1], [1]], {})
    assert '\n' not in str(e.value)
  with pytest.raises(config_lib.ConfigError, match='does not load'):
    _rewards('tests.test_grpo:missing')


def test_config_checks():
  c = helpers.small_config(train=dict(objective='grpo', eval_every=0),
                           rl=dict(prompts_per_step=2, group_size=4, max_completion_len=8))
  config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError,
                     match=r"^train.global_batch_size=8: expected rl.prompts_per_step \* "):
    config_lib.validate(c.replace(rl=dict(group_size=8)))
  with pytest.raises(config_lib.ConfigError, match=r"^rl.loss='ppo': expected grpo \| dapo"):
    config_lib.validate(c.replace(rl=dict(loss='ppo')))
  with pytest.raises(config_lib.ConfigError, match=r'^rl.reward_weights='):
    config_lib.validate(c.replace(rl=dict(rewards='accuracy,format', reward_weights='1')))



@pytest.mark.parametrize('name,topology', [('grpo_1b', 'v5e-8'), ('grpo_lora_4b', 'v5e-8')])
def test_grpo_configs_are_the_ones_their_aot_proofs_compiled(name, topology):
  """docs/aot/NAME_TOPOLOGY.json (the train step) and NAME_TOPOLOGY_rollout.json (the prefill,
  decode loop and scoring forward at the rollout's shapes, the train state resident), both
  written by gemma3-train --config=configs/NAME.py --aot_topology=T --aot_report=..., still
  describe the config and fit with the shipped configs' headroom."""
  import importlib  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
  from gemma3_train.planning import rollout_aot  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import flops  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(importlib.import_module(f'configs.{name}').get_config())
  r = json.loads((helpers.ROOT / 'docs' / 'aot' / f'{name}_{topology}.json').read_text())
  chips = aot.parse_topology(topology).total_chips
  want = dict(topology=topology, chips=chips, mesh=sharding.mesh_shape(c, chips),
              remat_policy=c.model.remat_policy, seq_len=c.data.seq_len,
              global_batch=c.train.global_batch_size, param_dtype=c.model.param_dtype,
              dtype=c.model.dtype)
  assert {k: r[k] for k in want} == want
  assert r['fits'] and r['headroom'] >= aot.HEADROOM and not r['error'] and r['tpu_kernels'] > 0
  assert r['model_flops_per_step'] == pytest.approx(flops.train_flops_per_step(c), rel=1e-12)
  rollout = json.loads((helpers.ROOT / 'docs' / 'aot' /
                        f'{name}_{topology}_rollout.json').read_text())
  sh = rollout_aot.shapes(c)
  assert (rollout['rows'], rollout['prompt_columns'], rollout['new_tokens']) == (
      sh.rows, sh.prompt, sh.new)
  assert set(rollout) - {'rows', 'prompt_columns', 'new_tokens'} == set(rollout_aot.programs(c))
  del want['remat_policy']  # the rollout's programs are forward passes: no remat
  for program in rollout_aot.programs(c):
    p = rollout[program]
    assert {k: p[k] for k in want} == want, program
    assert p['fits'] and p['headroom'] >= aot.HEADROOM and not p['error'], program



@_slow  # three small TPU compiles (~40 s of CPU)
def test_cli_compiles_the_rollout_for_a_topology(tmp_path):
  """--aot_topology with train.objective=grpo also compiles the rollout's programs and writes
  them beside the train step's report; the decode loop's carry (the cache) is donated."""
  from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
  if not aot.libtpu_available():
    pytest.skip('libtpu not installed')
  report = tmp_path / 'aot.json'
  flags = [f for f in CLI_FLAGS if not f.startswith(('--config.data.seq_len',
                                                     '--config.rl.max_completion_len'))]
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.train', *flags,
                      '--config.data.seq_len=256', '--config.rl.max_completion_len=128',
                      '--config.rl.beta=0.1', '--config.mesh.fsdp=-1', '--aot_topology=v5e-4',
                      f'--aot_report={report}'],
                     cwd=helpers.ROOT, env=helpers.cli_env(1), capture_output=True, text=True,
                     timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  rollout = json.loads((tmp_path / 'aot_rollout.json').read_text())
  assert (rollout['rows'], rollout['prompt_columns'], rollout['new_tokens']) == (16, 128, 128)
  assert rollout['prefill']['tpu_kernels'] > 0  # the prefill runs splash, as training does
  assert rollout['decode']['alias_gib'] > 0 and rollout['score']['fits']
  assert 'decode' in r.stdout and json.loads(report.read_text())['fits']


# --- the train step: sharded and one device ------------------------------------------------


def _step_grads(c, devices, batch):
  """The gradient of the mean loss at the seed's init on a rollout batch."""
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import state as train_state  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(c, devices)
  s = train_state.setup(c, mesh)
  put = {k: jax.device_put(v, s.batch_sharding[k]) for k, v in batch.items()}

  def mean(p):
    total, sums = s.objective.loss_sums(nnx.merge(s.graphdef, p, *s.state['frozen'].values()),
                                        put)
    return total / sums['weight_sum']
  with sharding.use_mesh(mesh, s.rules):
    g = jax.jit(jax.grad(mean))(s.state['params'])
  return [np.asarray(x) for x in jax.tree.leaves(g)]


def test_sharded_equals_one_device():
  """(fsdp=4, tensor=2) on 8 CPU devices: the same gradients as one device (clipped ratios
  against old log-probabilities and the KL term included)."""
  base = dict(train=dict(objective='grpo', eval_every=0), model=dict(num_layers=2),
              rl=dict(prompts_per_step=2, group_size=4, max_completion_len=8,
                      updates_per_batch=2, beta=0.1))
  c1 = helpers.small_config(mesh=dict(fsdp=-1), **base)
  c8 = helpers.small_config(mesh=dict(fsdp=4, tensor=2), **base)
  rng = np.random.default_rng(0)
  prompts = [[2, *rng.integers(3, V, rng.integers(2, 6))] for _ in range(8)]
  completions = [list(rng.integers(3, V, rng.integers(1, 9))) for _ in range(8)]
  batch = rollout.layout(prompts, completions, c1.data.seq_len)
  adv, zero_std = rollout.group_advantages(rng.normal(size=8).astype(np.float32), 4, 'group')
  batch.update(advantages=adv, zero_std=zero_std, rewards=np.zeros((8, 1), np.float32),
               truncated=np.zeros(8, np.float32),
               old_logps=rng.normal(-6.5, 0.3, (8, c1.data.seq_len)).astype(np.float32),
               ref_logps=rng.normal(-6.5, 0.3, (8, c1.data.seq_len)).astype(np.float32))
  g1 = _step_grads(c1, jax.devices()[:1], batch)
  g8 = _step_grads(c8, jax.devices(), batch)
  helpers.assert_same_grads(g8, g1)


# --- through the CLI: learning, samples, resume ----------------------------------------------

CLI_FLAGS = ['--config=configs/tiny.py', '--config.model.vocab_size=512',
             '--config.model.num_layers=2', '--config.data.seq_len=24',
             '--config.train.objective=grpo', '--config.train.eval_every=0',
             '--config.train.global_batch_size=16', '--config.rl.prompts_per_step=2',
             '--config.rl.group_size=8', '--config.rl.max_completion_len=8',
             '--config.rl.rewards=tests.test_grpo:reward_small_ids',
             '--config.logging.log_every=1', '--config.logging.tensorboard=False',
             '--config.optim.schedule=constant', '--config.optim.warmup_steps=0',
             '--config.optim.lr=3e-3', '--config.mesh.fsdp=1']


def _prompts(path, n=32):
  """Token-id prompts of the 512-piece model, each with a field the rewards may read."""
  rng = np.random.default_rng(0)
  with open(path, 'w') as f:
    for i in range(n):
      f.write(json.dumps({'prompt': [2, *map(int, rng.integers(64, V, 4))], 'id': i}) + '\n')
  return path


def _train(workdir, steps, data, *extra):
  r = subprocess.run([sys.executable, '-m', 'gemma3_train.cli.train', *CLI_FLAGS,
                      f'--config.data.train_path={data}', f'--workdir={workdir}',
                      f'--config.train.num_steps={steps}', *extra],
                     cwd=helpers.ROOT, env=helpers.cli_env(1), capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _rows(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@_slow
def test_small_model_learns_a_reachable_reward(tmp_path):
  """The share of completion ids below 64 (~1/8 at the random start) rises well above its
  start within 30 steps; TRL's metric names and the rollout's samples reach metrics.jsonl."""
  data = _prompts(tmp_path / 'prompts.jsonl')
  r = _train(tmp_path / 'run', 30, data, '--config.train.sample_every=10')
  rows = [x for x in _rows(tmp_path / 'run') if 'reward' in x]
  assert len(rows) == 30
  for name in ('reward_std', 'rewards/reward_small_ids/mean', 'completions/mean_length',
               'completions/clipped_ratio', 'entropy', 'clip_ratio/region_mean',
               'frac_reward_zero_std'):
    assert name in rows[-1], name
  start = np.mean([x['reward'] for x in rows[:3]])
  end = np.mean([x['reward'] for x in rows[-5:]])
  assert start < 0.3 and end > start + 0.3, (start, end)
  samples = [x for x in _rows(tmp_path / 'run') if 'sample_text' in x]
  assert samples and samples[0]['step'] == 10 and '[reward' in samples[0]['sample_text']
  assert 'sample @ step 30' in r.stdout


@_slow
def test_resume_is_exact_among_the_updates_of_one_rollout(tmp_path):
  """rl.updates_per_batch=2 and rl.beta: stopped after step 1 (the rollout of step 0 half
  used, kept in the checkpoint) and resumed, the run logs the same losses, rewards and KL, bit
  for bit, as an uninterrupted one; new rollouts draw the same samples (keys of seed, step)."""
  data = _prompts(tmp_path / 'prompts.jsonl')
  extra = ('--config.rl.updates_per_batch=2', '--config.rl.beta=0.05',
           '--config.checkpoint.every=1')
  _train(tmp_path / 'straight', 5, data, *extra)
  _train(tmp_path / 'resumed', 1, data, *extra)
  assert 'Resumed from' in _train(tmp_path / 'resumed', 5, data, *extra).stderr
  keys = ('loss', 'grad_norm', 'reward', 'kl', 'completions/mean_length', 'entropy')
  pick = lambda w: [{k: x[k] for k in keys} for x in _rows(w) if 'loss' in x]
  assert pick(tmp_path / 'resumed') == pick(tmp_path / 'straight')
  assert abs(pick(tmp_path / 'straight')[0]['kl']) <= 1e-6  # policy = reference at the start


@_slow
def test_lora_reference_is_the_base_with_the_adapters_off(tmp_path):
  """LoRA with rl.beta: no frozen copy; the KL starts at 0 (B = 0: the policy is the base) and
  grows once the adapters train."""
  data = _prompts(tmp_path / 'prompts.jsonl')
  _train(tmp_path / 'lora', 3, data, '--config.lora.rank=4', '--config.rl.beta=0.1',
         '--config.optim.lr=3e-2')
  kl = [x['kl'] for x in _rows(tmp_path / 'lora') if 'kl' in x]
  assert len(kl) == 3 and abs(kl[0]) <= 1e-6 and kl[-1] > 1e-4, kl
