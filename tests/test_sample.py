"""The KV-cache sampler against the full forward pass, transformers' generate, and hand-built
sets; the chat template against the literal Gemma 3 turn markup; gemma3-sample's errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gemma3_train
from gemma3_train.cli import sample as sample_cli
from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import sampler as sample
from gemma3_train.models import decoder as model_lib
from gemma3_train import sharding

from tests import helpers

TOL = 1e-5
# 8 layers = one scanned block of six + a two-layer tail; window 5 is passed many times over.
SMALL = dict(num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24.0,
             global_rope_scale=8.0, sliding_window=5)


def _model(scan_layers=True, seed=0, **kw):
  fields = dict(preset='test', vocab_size=512, embed_dim=32, mlp_dim=48, param_dtype='float32',
                dtype='float32', attention_impl='reference', scan_layers=scan_layers, **SMALL)
  return model_lib.Gemma3(config_lib.ModelConfig(**{**fields, **kw}), rngs=nnx.Rngs(seed))


NEW = 24  # new tokens: > 4 windows of 5


@pytest.fixture(scope='module')
def sampler():
  """One sampler (one compile per batch shape) shared by the tests of the same model."""
  return sample.Sampler(_model())


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [[tokenizer_lib.BOS] + list(rng.integers(200, 512, n - 1)) for n in lengths]


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


PROMPTS = _prompts([3, 12, 18])  # pads 29, 20, 14 in a bucket of 32 columns


@pytest.mark.parametrize('scan_layers', [True, False])
def test_cached_logits_equal_full_forward(scan_layers, sampler):
  """Every step's logits (ring buffers wrapped several times; rows left-padded by different
  amounts) equal the uncached forward over the row's whole sequence."""
  _assert_cached_equals_full(sampler if scan_layers else sample.Sampler(_model(scan_layers=False)))


@pytest.mark.slow  # (fast-lane budget: 19 s)
def test_cached_logits_equal_full_forward_with_adapters_on_an_int8_base():
  """The decode loop reads q and the output projection relaid out (kv_cache.swap_projections):
  their int8 scales and LoRA adapters (non-zero B) must come along."""
  from gemma3_train.models import lora  # pylint: disable=g-import-not-at-top
  c = config_lib.Config(lora=config_lib.LoraConfig(rank=4, base_dtype='int8'))
  m = lora.adapt(_model(), c)
  graphdef, state = nnx.split(m)
  rng = np.random.default_rng(5)
  flat = [(path, var.replace(jnp.asarray(rng.normal(0, 0.3, var.shape), var.dtype))
           if path[-1] == 'b' else var) for path, var in nnx.to_flat_state(state)]
  # B of seven targets in each of the 8 layers (6 in the scanned block, 2 in the tail)
  assert sum(path[-1] == 'b' for path, _ in flat) == 7 * 8
  _assert_cached_equals_full(sample.Sampler(nnx.merge(graphdef, nnx.from_flat_state(flat))))


def _assert_cached_equals_full(s):
  m = nnx.merge(s.graphdef, s.state)
  prompts = PROMPTS
  # Sampled (not greedy) so that the continuations vary.
  out, logits = s.generate(prompts, NEW, sample.Sampling(1.0), seed=3, return_logits=True)
  # The full forward once over the rows right-padded to one length (causal: the padding after
  # a row's tokens changes none of its logits).
  seqs = [p + o for p, o in zip(prompts, out)]
  batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for b, seq in enumerate(seqs):
    batch[b, :len(seq)] = seq
  full = np.asarray(jax.jit(lambda t: m(t))(jnp.asarray(batch)))
  for b, p in enumerate(prompts):
    assert len(out[b]) == NEW or out[b][-1] in sample.STOP_TOKENS
    for i in range(len(out[b])):
      err = _rel(logits[i, b], full[b, len(p) - 1 + i])
      assert err <= TOL, (b, i, err)


def test_local_cache_is_a_window(sampler):
  """Local layers keep sliding_window entries, global layers the whole length."""
  s = sampler
  tokens, pad = sample.left_pad(PROMPTS)
  prefill, _ = s._jitted(32 + NEW)  # pylint: disable=protected-access
  cache, _, _ = prefill(s.state, jnp.asarray(tokens), jnp.asarray(pad), jax.random.PRNGKey(0),
                        sample.sampling_knobs(sample.Sampling()))
  shapes = [c['k'].shape for c in cache['blocks']]
  assert shapes[:5] == [(1, 3, 5, 2, 16)] * 5 and shapes[5] == (1, 3, 56, 2, 16)
  assert [c['k'].shape for c in cache['tail']] == [(3, 5, 2, 16)] * 2


@pytest.mark.slow
def test_greedy_equals_transformers_generate():
  """48 greedy tokens equal transformers' generate(do_sample=False) token for token, on a random
  model whose window (5) is far shorter than the output; our prompts run as one padded batch
  and through Gemma3.generate."""
  cfg, hf_cfg = helpers.reference_configs(**helpers.REFERENCE_CASES['gqa_ropescale_scanned'])
  hf_model = helpers.reference_hf_model(hf_cfg, seed=2)
  ours_model = helpers.reference_ours(cfg, hf_model)
  prompts = _prompts([4, 9], seed=1)
  got = sample.generate(ours_model, prompts, 48)
  for p, g in zip(prompts, got):
    with torch.no_grad():
      want = hf_model.generate(torch.tensor([p]), max_new_tokens=48, do_sample=False,
                               use_cache=True, eos_token_id=list(sample.STOP_TOKENS),
                               pad_token_id=0)[0, len(p):].tolist()
    assert g == want
  assert max(len(g) for g in got) > 2 * cfg.sliding_window


def _allowed(logits, s):
  """Independent numpy top-k then top-p set (float64)."""
  z = np.asarray(logits, np.float64) / s.temperature
  keep = np.ones_like(z, bool)
  if s.top_k:
    keep &= z >= np.sort(z)[::-1][s.top_k - 1]
  if s.top_p:
    zk = np.where(keep, z, -np.inf)
    order = np.argsort(-zk)
    probs = np.exp(zk[order] - zk[order][0])
    probs /= probs.sum()
    n = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1  # smallest prefix reaching top_p
    nucleus = np.zeros_like(keep)
    nucleus[order[:n]] = True
    keep &= nucleus
  return set(np.flatnonzero(keep))


@pytest.mark.parametrize('s', [sample.Sampling(1.0, top_k=5), sample.Sampling(0.7, top_p=0.6),
                               sample.Sampling(1.0, top_k=64, top_p=0.95),
                               sample.Sampling(2.0, top_k=20, top_p=0.3)])
def test_top_k_top_p_stay_inside_their_sets(s):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 300)) * 3, jnp.float32)
  draw = jax.jit(jax.vmap(lambda k: sample.sample_logits(logits, k, s)))
  draws = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 2000)))  # [2000, 4]
  for b in range(4):
    allowed = _allowed(logits[b], s)
    seen = set(draws[:, b].tolist())
    assert seen <= allowed, sorted(seen - allowed)
    assert len(seen) > 1 or len(allowed) == 1


def test_seeded_and_greedy(sampler):
  s = sampler
  hot = sample.Sampling(1.0, top_k=50)
  assert s.generate(PROMPTS, NEW, hot, seed=1) == s.generate(PROMPTS, NEW, hot, seed=1)
  assert s.generate(PROMPTS, NEW, hot, seed=1) != s.generate(PROMPTS, NEW, hot, seed=2)
  # A row's greedy tokens do not depend on the other rows of the batch.
  greedy = s.generate(PROMPTS, NEW)
  other = s.generate([PROMPTS[0]] + _prompts([20, 5], seed=9), NEW)
  assert greedy[0] == other[0] and greedy[1:] != other[1:]


def test_stops_per_row(sampler):
  """Each row ends at its own first stop token (kept); the others run on."""
  assert sample.STOP_TOKENS == (1, 106)  # EOS, <end_of_turn>
  s = sampler
  free = s.generate(PROMPTS, NEW, stop_tokens=())
  stop = free[0][3]  # a token row 0 produces; where does each row first produce it?
  got = s.generate(PROMPTS, NEW, stop_tokens=(stop,))
  for f, g in zip(free, got):
    assert g == (f[:f.index(stop) + 1] if stop in f else f)
  assert len(got[0]) <= 4


def test_sharded_equals_single_device(sampler):
  """Sampling on a (fsdp=4, tensor=2) mesh of 8 CPU devices gives the same tokens and logits."""
  m = nnx.merge(sampler.graphdef, sampler.state)
  prompts = PROMPTS
  c = config_lib.Config(model=m.cfg, mesh=config_lib.MeshConfig(fsdp=4, tensor=2))
  mesh = sharding.make_mesh(c)
  want, want_logits = sampler.generate(prompts, NEW, return_logits=True)
  s = sample.Sampler(m, mesh, dict(sharding.DEFAULT_RULES))
  leaf = s.state['blocks']['layers'][0]['attn']['q_einsum'].get_value()
  assert len(leaf.sharding.device_set) == 8
  got, got_logits = s.generate(prompts, NEW, return_logits=True)
  assert got == want
  assert _rel(got_logits, want_logits) <= TOL


def test_chat_template_is_gemma3_markup():
  """chat_prompt's ids are the literal Gemma 3 template tokenized (<start_of_turn> and
  <end_of_turn> are single pieces 105 and 106 of the Gemma 3 tokenizer)."""
  tok = tokenizer_lib.Tokenizer()
  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': ' Hi there '},
              {'role': 'assistant', 'content': 'Hello!'},
              {'role': 'user', 'content': 'Name a color.'}]
  text = ('<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n'
          '<start_of_turn>model\nHello!<end_of_turn>\n'
          '<start_of_turn>user\nName a color.<end_of_turn>\n'
          '<start_of_turn>model\n')
  want = [2] + tok.encode(text)
  got = sample.chat_prompt(messages, tok)
  assert got == want
  assert got[:2] == [2, 105] and got.count(105) == 4 and got.count(106) == 3


def test_prompt_longer_than_context_is_an_error(sampler):
  s = sampler
  limit = sample.context_length(s.cfg)
  assert limit == sample.CONTEXT_SCALED  # global_rope_scale 8 -> the 4b+ context
  with pytest.raises(sample.PromptError, match='exceeds the model context'):
    s.check([[2] * limit], 1)
  with pytest.raises(sample.PromptError, match='empty'):
    s.check([[]], 1)


@pytest.mark.parametrize('argv,message', [
    (['--ckpt=/no/such/dir', '--prompt=hi'], '--ckpt=/no/such/dir'),
    (['--ckpt=x', '--prompt=hi', '--top_p=1.5'], '--top_p=1.5'),
    (['--ckpt=x', '--prompt=hi', '--config.model.num_layers=3'], 'fixed by the checkpoint'),
    (['--ckpt=x', '--prompt=hi', '--config.optim.lr=1'], '--config.optim.lr'),
    (['--ckpt=x'], '--prompt=TEXT'),
    (['--bogus'], 'unrecognized arguments: --bogus'),
    (['--prompt=hi'], '--ckpt=PATH is required'),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys, monkeypatch):
  monkeypatch.setattr(sys, 'argv', [sample_cli.PROG, *argv])
  with pytest.raises(SystemExit) as e:
    sample_cli.run()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('gemma3-sample: error: ') and message in err


def _save(tmp_path, m):
  """Our params-only checkpoint of model m (what gemma3-convert import writes)."""
  state = nnx.state(m, nnx.Param)
  top, layers = layout.state_to_canonical(m.cfg, state)
  ours.save_params(tmp_path / 'ckpt', m.cfg, top, enumerate(layers))
  return tmp_path / 'ckpt'


def test_load_gives_a_model_that_generates(tmp_path):
  """gemma3_train.load returns the decoder with generate() (inference adds it: a model does not
  import the sampler); its greedy output is the sampler's on the same weights."""
  m = _model(num_layers=2)
  loaded = gemma3_train.load(_save(tmp_path, m))
  assert isinstance(loaded, model_lib.Gemma3)
  prompts = _prompts([3, 7], seed=4)
  assert loaded.generate(prompts, 5) == sample.generate(m, prompts, 5)


def test_cli_streams_a_continuation_and_rejects_a_long_prompt(tmp_path):
  """The real gemma3-sample: a greedy continuation equal to Gemma3.generate's, then a prompt
  longer than the model's context (a 1b-shaped context of 32k tokens) is one line, exit 2."""
  m = _model(vocab_size=262144, global_rope_scale=1.0, num_layers=2)
  ckpt = _save(tmp_path, m)
  tok = tokenizer_lib.Tokenizer()
  want = tok.decode([t for t in sample.generate(m, [sample.prompt_tokens('Hello', tok)], 6)[0]
                     if t not in sample.STOP_TOKENS])
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  cmd = [sys.executable, '-m', 'gemma3_train.cli.sample', f'--ckpt={ckpt}']
  run = subprocess.run(cmd + ['--prompt=Hello', '--temperature=0', '--max_new_tokens=6'],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
  assert run.returncode == 0, run.stderr
  assert run.stdout == f'Hello{want}\n'
  long = ' '.join(['a'] * 33_000)  # one piece per ' a'; 66 kB fits one argv string
  assert len(tok.encode(long)) > 32_768
  run = subprocess.run(cmd + [f'--prompt={long}'], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
  assert run.returncode == 2 and run.stdout == ''
  assert run.stderr.count('\n') == 1 and 'exceeds the model context of 32768' in run.stderr


def test_checkpoint_trained_with_a_named_kernel_samples_on_any_backend(tmp_path):
  """A run trained with attention_impl=cudnn (GPU) loads with 'auto', so it samples here with
  the reference (cuDNN would fail off a GPU); an explicit override still wins."""
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import layout, ours  # pylint: disable=g-import-not-at-top
  m = _model(attention_impl='cudnn', num_layers=2)
  top, layers = layout.state_to_canonical(m.cfg, nnx.state(m, nnx.Param))
  ours.save_params(tmp_path / 'ckpt', m.cfg, top, enumerate(layers))
  loaded = convert.load(tmp_path / 'ckpt')
  assert loaded.cfg.attention_impl == 'auto'
  assert convert.load(tmp_path / 'ckpt', attention_impl='splash').cfg.attention_impl == 'splash'
  tokens = np.asarray(_prompts([7])[0])[None]
  want = _model(num_layers=2)(tokens)
  np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(want), rtol=TOL, atol=TOL)
