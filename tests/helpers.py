"""Helpers that several test modules share: plain functions and constants, no tests, no fixtures.

Test modules import these from here, never from one another.

  the small CLI model     train_cmd / run_train / train_ok drive `gemma3_train.cli.train` in a
                          subprocess on a 7-layer, 512-piece model with synthetic data;
                          logged_losses, wait_for_step and final_params read what it left
  in-process training     small_config, packed_batch (the same model, for train.setup), free_port,
                          save_peaked_teacher (a small distillation teacher on disk)
  transformers models     the random HF models the converters and the reference checks use
                          (torch and transformers are imported only when these are called)
  data iterators          assert_same_batches, assert_resumes
  profiles                traced_steps
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent

# --- the small model, trained through the real CLI ------------------------------------------

# Flags of the small Gemma-3-shaped model (7 layers: a scanned block of six and one tail layer)
# on synthetic data that the CLI tests train.
SMALL_FLAGS = ['--config=configs/tiny.py', '--config.data.source=synthetic',
               '--config.model.vocab_size=512', '--config.model.num_layers=7',
               '--config.data.seq_len=32', '--config.train.global_batch_size=8',
               '--config.train.eval_every=0', '--config.logging.log_every=1',
               '--config.logging.tensorboard=False', '--config.checkpoint.every=5',
               '--config.optim.warmup_steps=5']


def cli_env(devices=8):
  """This process's environment for a subprocess on the CPU backend with `devices` devices."""
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def train_cmd(workdir, steps, *extra):
  """The command line that trains the small model in workdir for `steps` steps."""
  return [sys.executable, '-m', 'gemma3_train.cli.train', *SMALL_FLAGS, f'--workdir={workdir}',
          f'--config.train.num_steps={steps}', *extra]


def run_train(workdir, steps, *extra, devices=8):
  """Runs train_cmd to its end (at most 15 minutes); returns the CompletedProcess (text)."""
  return subprocess.run(train_cmd(workdir, steps, *extra), cwd=ROOT, env=cli_env(devices),
                        capture_output=True, text=True, timeout=900)


def train_ok(workdir, steps, *extra, devices=8):
  """run_train, asserting that the run exited 0."""
  r = run_train(workdir, steps, *extra, devices=devices)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def logged_losses(workdir) -> dict[int, float]:
  """step -> loss; a step logged twice (before a crash and after the resume) keeps the last."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if 'loss' in row and row['loss'] is not None:
      out[row['step']] = row['loss']
  return out


def wait_for_step(path, step, proc, timeout=600):
  """Until metrics.jsonl at `path` has logged `step`; the process must still be running."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, 'training ended before it could be interrupted'
    if path.exists() and any(json.loads(l).get('step', 0) >= step
                             for l in path.read_text().splitlines() if l.strip()):
      return
    time.sleep(0.2)
  raise TimeoutError(step)


def final_params(workdir, out=None):
  """The small model's final params as numpy, read with the trainer's own restore; workdir may
  be gs:// (then give `out`, the local .npz file to pass them through; else workdir/params.npz)."""
  out = workdir / 'params.npz' if out is None else out
  code = f'''
import sys, numpy as np, jax
sys.argv = ['x']
from configs import tiny
from gemma3_train import config as C, sharding
from gemma3_train.training import checkpoint
from gemma3_train.training import state as train_state
from flax import nnx
c = C.from_config_dict(tiny.get_config())
c = c.replace(data=dict(source='synthetic', seq_len=32), model=dict(vocab_size=512, num_layers=7),
              train=dict(global_batch_size=8))
s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
state, step = checkpoint.Checkpointer({str(workdir)!r}, c).restore_latest(
    train_state.saved(s.abstract_state), None)
flat = jax.tree.leaves(nnx.to_pure_dict(state['params']))
np.savez({str(out)!r}, *[np.asarray(x) for x in flat])
'''
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=cli_env(), check=True, timeout=600)
  return list(np.load(out).values())


# --- the small model, in process -----------------------------------------------------------


def small_config(**sections):
  """configs/tiny.py shrunk to the small model (7 layers, vocabulary 512, rows of 32, batch 8,
  constant lr 1e-2), updated per section with `sections` (e.g. mesh=dict(fsdp=4, tensor=2))."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(tiny.get_config())
  base = dict(model=dict(num_layers=7, vocab_size=512), data=dict(seq_len=32),
              train=dict(global_batch_size=8, z_loss=1e-4, loss_chunk_size=16),
              optim=dict(warmup_steps=0, schedule='constant', lr=1e-2))
  for k, v in sections.items():
    base[k] = {**base.get(k, {}), **v}
  return c.replace(**base)


def packed_batch(c, seed=0):
  """Random packed rows of c's shape: two documents per row, one padded tail (weights 0)."""
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


def free_port():
  """A TCP port on localhost that nothing listens on now (for jax.distributed)."""
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def save_peaked_teacher(path, student_cfg):
  """A 2-layer distillation teacher of the student's vocabulary (width 32), saved with our
  writer at `path`; returns the model. Its embedding is scaled by 4, peaked as a trained
  teacher is: a random init's distribution over 262144 ids is so flat that float32 rounding of
  its CDF (which differs with the batch shape) moves ~1 draw in 1,000 to the neighbouring id."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import layout, ours  # pylint: disable=g-import-not-at-top
  from gemma3_train.models import decoder  # pylint: disable=g-import-not-at-top
  tcfg = dataclasses.replace(student_cfg, num_layers=2, embed_dim=32, head_dim=16,
                             query_pre_attn_scalar=16.0)
  teacher = decoder.Gemma3(tcfg, rngs=nnx.Rngs(7))
  table = teacher.embedder.embedding
  table.set_value(table.get_value() * 4.0)
  top, layers = layout.state_to_canonical(tcfg, nnx.state(teacher, nnx.Param))
  ours.save_params(path, tcfg, top, enumerate(layers))
  return teacher


# --- random transformers models --------------------------------------------------------------

# The converters' text model (tests/test_convert.py): vocabulary, width, layers, query heads,
# key/value heads, head width, MLP width, sliding window; and a batch of its tokens.
V, D, L, N, K, H, F, W = 512, 64, 8, 4, 2, 16, 128, 8
TOKENS = np.random.default_rng(0).integers(0, V, size=(2, 24)).astype(np.int32)


def hf_text_config(vocab=V, **kw):
  """transformers.Gemma3TextConfig of the converters' text model (4b-style RoPE scaling)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.Gemma3TextConfig(
      vocab_size=vocab, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
      num_attention_heads=N, num_key_value_heads=K, head_dim=H, query_pre_attn_scalar=H,
      sliding_window=W, max_position_embeddings=128,
      rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 8.0,
                                          'rope_theta': 1e6},
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}}, **kw)


def randomize_hf(model, seed):
  """Overwrites every parameter of a torch model with seeded noise; returns it in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Norm scales too (they init to zero), so that a skipped or misnamed norm shows.
      std = 0.5 if p.ndim == 1 else 0.2
      p.copy_(torch.randn(p.shape, generator=g) * std)
  return model.eval()


def hf_logits(model, tokens):
  """A transformers causal LM's logits for int token ids [B, L], as float32 numpy."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(tokens)).long()).logits.float().numpy()


# The reference checks' models (tests/test_hf_reference.py): width 32, MLP 48, float32.
REFERENCE_VOCAB = 512

REFERENCE_CASES = {
    # 8 layers = one scanned block of six + a two-layer tail; GQA 4:2; 4b-style linear RoPE
    # scaling on global layers; query_pre_attn_scalar != head_dim; 20 tokens > window 5.
    'gqa_ropescale_scanned': dict(num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16,
                                  query_pre_attn_scalar=24.0, global_rope_scale=8.0,
                                  sliding_window=5, scan_layers=True),
    'same_unscanned': dict(num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16,
                           query_pre_attn_scalar=24.0, global_rope_scale=8.0,
                           sliding_window=5, scan_layers=False),
    # 13 layers = two blocks + one tail layer; MQA (K=1), no RoPE scaling, scalar == head_dim.
    'mqa_norope_13layers': dict(num_layers=13, num_heads=4, num_kv_heads=1, head_dim=8,
                                query_pre_attn_scalar=8.0, global_rope_scale=1.0,
                                sliding_window=7, scan_layers=True),
}


def reference_configs(**kw):
  """(our ModelConfig, the equivalent transformers.Gemma3TextConfig) of a reference model; kw
  are ModelConfig fields (a REFERENCE_CASES entry)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  ours = config_lib.ModelConfig(
      preset='test', vocab_size=REFERENCE_VOCAB, embed_dim=32, mlp_dim=48,
      local_rope_base=10_000.0, global_rope_base=1_000_000.0, rms_norm_eps=1e-6,
      param_dtype='float32', dtype='float32', remat_policy='none', attention_impl='reference',
      **kw)
  if ours.global_rope_scale == 1.0:
    full = {'rope_type': 'default', 'rope_theta': ours.global_rope_base}
  else:
    full = {'rope_type': 'linear', 'factor': ours.global_rope_scale,
            'rope_theta': ours.global_rope_base}
  hf = transformers.Gemma3TextConfig(
      vocab_size=REFERENCE_VOCAB, hidden_size=ours.embed_dim, intermediate_size=ours.mlp_dim,
      num_hidden_layers=ours.num_layers, num_attention_heads=ours.num_heads,
      num_key_value_heads=ours.num_kv_heads, head_dim=ours.head_dim,
      hidden_activation='gelu_pytorch_tanh', max_position_embeddings=1024,
      initializer_range=0.02, rms_norm_eps=ours.rms_norm_eps, use_cache=False, pad_token_id=0,
      eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
      rope_parameters={'full_attention': full,
                       'sliding_attention': {'rope_type': 'default',
                                             'rope_theta': ours.local_rope_base}},
      attention_bias=False, attention_dropout=0.0,
      query_pre_attn_scalar=int(ours.query_pre_attn_scalar), sliding_window=ours.sliding_window,
      layer_types=['full_attention' if ours.is_global(i) else 'sliding_attention'
                   for i in range(ours.num_layers)],
      final_logit_softcapping=None, attn_logit_softcapping=None,
      use_bidirectional_attention=False, attn_implementation='eager')
  return ours, hf


def reference_hf_model(hf_cfg, seed=0):
  """A transformers.Gemma3ForCausalLM of hf_cfg with seeded random weights, in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(hf_cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      # Norm scales get a large spread so (1 + scale) is far from 1; matrices ~ 1/sqrt(fan_in).
      std = 0.5 if p.ndim == 1 else 0.5 if 'embed' in name else 0.15
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return model


def reference_ours(cfg, hf_model):
  """Our Gemma3 (ModelConfig cfg) with hf_model's weights: HF state_dict ->
  convert.hf_to_canonical -> layout.canonical_to_state."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import layout  # pylint: disable=g-import-not-at-top
  from gemma3_train.models import decoder as model_lib  # pylint: disable=g-import-not-at-top
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  top, layers = convert.hf_to_canonical(tensors, cfg)
  ours = nnx.eval_shape(lambda: model_lib.Gemma3(cfg, rngs=nnx.Rngs(0)))
  nnx.update(ours, layout.canonical_to_state(cfg, top, layers))
  return ours


def hf_grads_as_ours(cfg, hf_model):
  """The torch gradients of every parameter of a transformers Gemma 3 (after backward()), in
  our parameter layout: {state path: array}."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import layout  # pylint: disable=g-import-not-at-top
  grads = {k: p.grad.detach().numpy() for k, p in hf_model.named_parameters()}
  top, layers = convert.hf_to_canonical(grads, cfg)
  return {k: np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(layout.canonical_to_state(cfg, top, layers))}


def assert_close(ours, theirs, what, tol=1e-5):
  """max |ours - theirs| <= tol * max(1, max |theirs|), in float64."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  scale = max(1.0, float(np.max(np.abs(theirs))))
  assert np.max(np.abs(ours - theirs)) <= tol * scale, (what, np.max(np.abs(ours - theirs)))


def assert_same_grads(sharded, single, tol=1e-5):
  """Two lists of gradient leaves agree (relative L2 error per leaf), and are not all zero."""
  assert any(np.abs(x).max() > 0 for x in single)
  for x, y in zip(sharded, single):
    err = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
    assert err <= tol, err


# --- data iterators ----------------------------------------------------------------------


def assert_same_batches(xs, ys):
  """Two lists of batches are equal, every key of data.BATCH_DTYPES bitwise."""
  from gemma3_train import data  # pylint: disable=g-import-not-at-top
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in data.BATCH_DTYPES:
      np.testing.assert_array_equal(x[k], y[k])


def assert_resumes(c, skip: int, n: int) -> None:
  """After `skip` batches, get_state; a new iterator set to that state gives the n batches the
  first one went on to give."""
  from gemma3_train import data  # pylint: disable=g-import-not-at-top
  it = data.make_train_iterator(c)
  for _ in range(skip):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(n)]
  it.close()
  restored = data.make_train_iterator(c)
  restored.set_state(state)
  assert_same_batches([next(restored) for _ in range(n)], want)
  restored.close()


# --- profiles ------------------------------------------------------------------------------


def traced_steps(workdir) -> list[list[int]]:
  """Per trace file under WORKDIR/profile: the step_num of its 'train' step annotations."""
  out = []
  for path in sorted(pathlib.Path(workdir, 'profile').rglob('*.xplane.pb')):
    data = jax.profiler.ProfileData.from_file(str(path))
    out.append(sorted(dict(e.stats)['step_num'] for p in data.planes for line in p.lines
                      for e in line.events if e.name == 'train'))
  return out
