"""Training with images: the frozen tower, the train step's image inputs and loss mask, resume,
vision FLOPs, and (slow) the tiny vision config reading its images."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma3_train
from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import sharding
from gemma3_train.training import checkpoint as checkpoint_lib
from gemma3_train.training import flops
from gemma3_train.training import frozen as frozen_lib
from gemma3_train.training import restore as restore_lib
from gemma3_train.training import state as train_state

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENCODER = ('vision', 'encoder')
PROJECTOR = ('vision', 'projector')


def _config(**sections):
  """A tiny vision model: 16 x 16 images, 4 x 4 patches pooled 2 x 2 -> 4 soft tokens each."""
  c = config_lib.from_config_dict(tiny.get_config())
  base = dict(
      model=dict(num_layers=2, vocab_size=512, vision=True, vision_image_size=16,
                 vision_patch_size=4, vision_width=16, vision_depth=2, vision_mlp_dim=32,
                 vision_num_heads=2, vision_pool=2),
      data=dict(seq_len=32, max_images=2),
      train=dict(global_batch_size=8, loss_chunk_size=16),
      optim=dict(warmup_steps=0, schedule='constant', lr=1e-2))
  for k, v in sections.items():
    base[k] = {**base.get(k, {}), **v}
  return c.replace(**base)


def _batch(c, seed=0):
  """Rows of text with two images each (runs of T placeholders); image targets weigh 0."""
  rng = np.random.default_rng(seed)
  B, L, T, V = (c.train.global_batch_size, c.data.seq_len, c.model.tokens_per_image,
                c.model.vocab_size)
  tokens = rng.integers(3, V, size=(B, L + 1)).astype(np.int32)
  for start in (3, 15):  # two runs of T placeholders per row
    tokens[:, start:start + T] = V
  weights = (tokens[:, 1:] != V).astype(np.float32)
  S, N = c.model.vision_image_size, c.data.max_images
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
          'segment_ids': np.ones((B, L), np.int32), 'weights': weights,
          'images': rng.integers(0, 256, size=(B, N, S, S, 3)).astype(np.uint8),
          'image_counts': np.full((B,), N, np.int32)}


def _put(batch, s):
  return {k: jax.device_put(v, s.batch_sharding[k]) for k, v in batch.items()}


def _flat(state_part):
  return {tuple(map(str, k)): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(state_part)}


def _under(flat, prefix):
  return {k: v for k, v in flat.items() if k[:len(prefix)] == prefix}


@pytest.fixture(scope='module')
def frozen():
  """One setup of the frozen-tower config, shared (each test starts from s.init_state())."""
  c = _config(checkpoint=dict(async_save=False))
  return c, train_state.setup(c, sharding.make_mesh(c), abstract=True)


def _model_state(state):
  """The whole model's flat state: the trainable params and the frozen parts."""
  return _flat(frozen_lib.merged(state['params'], state['frozen']))


def _steps(c, s, n, seed=0):
  """(model state before, state after n steps) from a fresh init."""
  state = s.init_state()
  before = _model_state(state)
  for i in range(n):
    state, metrics = s.train_step(state, _put(_batch(c, seed + i), s))
  assert np.isfinite(float(metrics['loss']))
  return before, state


def _opt_paths(opt_state):
  paths = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(
      opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    paths.add(tuple(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path))
  return paths


def _touches(paths, prefix):
  return any(tuple(prefix) == p[i:i + len(prefix)] for p in paths for i in range(len(p)))


def test_frozen_tower_has_no_optimizer_state_and_does_not_move(frozen):
  c, s = frozen
  before, state = _steps(c, s, 2)
  after = _model_state(state)
  assert _under(before, ENCODER) and _under(before, PROJECTOR)
  # The encoder is a frozen part (training/frozen.py), outside the params.
  assert not _under(_flat(state['params']), ENCODER)
  assert set(_flat(state['frozen']['vision_encoder'])) == set(_under(before, ENCODER))
  # The encoder: no Adam moments (not even zeros), weights bitwise unchanged.
  paths = _opt_paths(state['opt_state'])
  assert not _touches(paths, ENCODER), sorted(p for p in paths if 'encoder' in p)[:3]
  assert _touches(paths, PROJECTOR)
  for k, v in _under(before, ENCODER).items():
    np.testing.assert_array_equal(after[k], v, err_msg=str(k))
  # The projector and the decoder train.
  for prefix in (PROJECTOR + ('projection',), ('embedder',)):
    (k, v), = _under(before, prefix).items()
    assert not np.array_equal(after[k], v), k
  # Moments: exactly twice the trainable (non-encoder) parameters (Adam's mu and nu).
  trainable = sum(v.size for k, v in before.items() if k[:2] != ENCODER)
  moments = sum(x.size for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0)
  assert moments == 2 * trainable
  assert jax.tree.structure(state) == jax.tree.structure(s.abstract_state)


def test_trainable_tower_moves_and_has_optimizer_state():
  c = _config(model=dict(vision_trainable=True))
  before, state = _steps(c, train_state.setup(c, sharding.make_mesh(c), abstract=True), 2)
  after = _model_state(state)
  assert state['frozen'] == {}
  assert _touches(_opt_paths(state['opt_state']), ENCODER)
  moved = [k for k, v in _under(before, ENCODER).items() if not np.array_equal(after[k], v)]
  assert len(moved) == len(_under(before, ENCODER))


def test_images_change_the_loss_and_image_targets_are_masked(frozen):
  """The step reads the images (other pixels, other loss); a target equal to the placeholder id
  (one past the table) counts for nothing even when the data gives it weight."""
  c, s = frozen
  state = s.init_state()
  batch = _batch(c)
  losses = {}
  for name, b in {'images': batch,
                  'other images': {**batch, 'images': 255 - batch['images']},
                  'weighted placeholders': {**batch, 'weights': np.ones_like(batch['weights'])},
                  }.items():
    losses[name] = s.eval_step(state, _put(b, s))
  assert losses['images']['loss_sum'] != losses['other images']['loss_sum']
  for k in ('loss_sum', 'weight_sum', 'correct_sum'):
    assert float(losses['weighted placeholders'][k]) == float(losses['images'][k])
  assert float(losses['images']['weight_sum']) == float(batch['weights'].sum())


def test_images_are_sharded_over_the_batch_axes():
  c = _config()
  mesh = sharding.make_mesh(c)
  ab = train_state.abstract_batch(c, mesh)
  S = c.model.vision_image_size
  assert ab['images'].shape == (8, 2, S, S, 3) and ab['images'].dtype == np.uint8
  assert ab['image_counts'].shape == (8,)
  spec = ab['images'].sharding.spec
  assert tuple(spec)[0] == sharding.BATCH_AXES
  s = train_state.setup(c, mesh, abstract=True)
  assert set(s.batch_sharding) == set(ab)


@pytest.mark.slow
def test_gradient_accumulation_with_images_equals_one_batch():
  """Microbatches split the images with their rows: same loss and gradient norm."""
  metrics = []
  for accum in (1, 2):
    c = _config(optim=dict(grad_accum_steps=accum), train=dict(global_batch_size=16))
    s = train_state.setup(c, sharding.make_mesh(c), abstract=True)
    _, m = s.train_step(s.init_state(), _put(_batch(c), s))
    metrics.append({k: float(v) for k, v in m.items()})
  for k in ('loss', 'grad_norm', 'tokens'):
    assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-5), k


def test_resume_with_images_is_exact(tmp_path, frozen):
  """Save after 2 steps, restore, take a 3rd step both ways: bitwise equal. The checkpoint holds
  neither the frozen encoder nor optimizer state for it; the encoder is rebuilt from the seed."""
  c, s = frozen
  _, state = _steps(c, s, 2)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), c)
  ckpt.save(2, state, None, force=True)
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), c)
  restored, step = restore_lib.restore_or_init(s, ckpt, None)
  ckpt.close()
  assert step == 2
  tree = (tmp_path / 'checkpoints' / '2' / 'state' / '_METADATA').read_text()
  assert 'projector' in tree and 'encoder' not in tree  # the saved tree's keys
  assert not _under(_flat(restored['params']), ENCODER)
  for k, v in _flat(restored['frozen']['vision_encoder']).items():
    np.testing.assert_array_equal(v, _flat(state['frozen']['vision_encoder'])[k])
  cont_a, _ = s.train_step(state, _put(_batch(c, 2), s))
  cont_b, _ = s.train_step(restored, _put(_batch(c, 2), s))
  a, b = _flat(cont_a['params']), _flat(cont_b['params'])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
  for x, y in zip(jax.tree.leaves(cont_a['opt_state']), jax.tree.leaves(cont_b['opt_state'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_vision_flops_match_the_compiled_encoder():
  """flops.vision_forward_flops against XLA's cost analysis of one image through the encoder
  and projector (float32, unscanned so every layer is counted)."""
  c = _config(model=dict(scan_layers=False, vision_width=32, vision_mlp_dim=64, embed_dim=48,
                         num_heads=4, head_dim=12))
  m = c.model
  from gemma3_train.models import decoder as model_lib  # pylint: disable=g-import-not-at-top
  gemma = model_lib.Gemma3(m, rngs=nnx.Rngs(0))
  S = m.vision_image_size
  images = jnp.zeros((1, 1, S, S, 3), jnp.float32)
  graphdef, params = nnx.split(gemma.vision)
  fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  cost = fn.lower(params, images).compile().cost_analysis()
  encoder, projector = flops.vision_forward_flops(m)
  # XLA also counts elementwise ops (norms, gelu, softmax, biases, pooling): a few percent.
  assert encoder + projector <= cost['flops'] <= 1.15 * (encoder + projector)
  # Per step: the forward for every slot, the projector's backward, the encoder's only when
  # it trains.
  B, N = c.train.global_batch_size, c.data.max_images
  assert flops.vision_flops_per_step(c) == B * N * (encoder + 3 * projector)
  trainable = c.replace(model=dict(vision_trainable=True))
  assert flops.vision_flops_per_step(trainable) == 3 * B * N * (encoder + projector)
  text = c.replace(model=dict(vision=False))
  assert flops.train_flops_per_step(c) - flops.train_flops_per_step(text) == pytest.approx(
      flops.vision_flops_per_step(c))


@pytest.mark.parametrize('size', ['4b', '12b', '27b'])
def test_vision_configs_and_their_tpu_attention_path(size):
  """The fine-tuning configs: vision on, frozen tower, images fit the rows; on TPU their decoder
  attention is the reference (splash cannot take image blocks), so the AOT report counts no
  splash FLOPs for them and a text config still runs splash."""
  from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
  from gemma3_train.planning import estimate  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(str(ROOT / 'configs' / f'vision_{size}.py'))
  m = c.model
  assert m.vision and not m.vision_trainable and m.dtype == 'bfloat16'
  assert m.remat_policy == 'full' and m.tokens_per_image == 256
  assert m.num_layers == config_lib.PRESETS[size]['num_layers']
  assert c.data.max_images * (m.tokens_per_image + 4) < c.data.seq_len
  tpu = aot.tpu_run_config(c)
  assert aot.attention_path(tpu) == 'reference'
  assert 'reference' in aot._attention_note(tpu) and 'splash' in aot._attention_note(tpu)
  assert estimate.executed_flops_per_step(tpu)[1] == 0
  text = aot.tpu_run_config(c.replace(model=dict(vision=False)))
  assert aot.attention_path(text) == 'splash' and estimate.executed_flops_per_step(text)[1] > 0


@pytest.mark.slow
def test_tiny_vision_trains_from_the_cli(tmp_path):
  """`gemma3-train --config=configs/tiny_vision.py` right after install: the shapes source, the
  encoder and an eval with images, a few steps (benchmarks/vision_gap.py runs it long enough to
  show the images are read: docs/vision.md)."""
  run = subprocess.run(
      [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny_vision.py',
       f'--workdir={tmp_path / "run"}', '--config.train.num_steps=3',
       '--config.train.eval_every=3', '--config.train.eval_steps=1', '--config.logging.log_every=1',
       '--config.logging.tensorboard=False', f'--config.train.cache_dir={tmp_path / "cache"}'],
      cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}, timeout=900)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in rows if r.get('loss') is not None]
  assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0], rows
  assert any(r.get('eval_loss') is not None for r in rows), rows
  assert (tmp_path / 'run' / 'checkpoints' / '3').is_dir()


@pytest.mark.slow  # two train steps, a save and a whole load
def test_a_frozen_tower_workdir_loads_whole(tmp_path, frozen):
  """A frozen-tower run's checkpoint holds no encoder; reading its workdir (gemma3_train.load,
  export, init_from) takes the encoder from the run's source, here the seed's random init: the
  loaded model is the trained one, every parameter bitwise."""
  c, s = frozen
  _, state = _steps(c, s, 1)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), c)
  ckpt.save(1, state, None, force=True)
  ckpt.close()
  loaded = _flat(nnx.state(gemma3_train.load(str(tmp_path)), nnx.Param))
  want = _model_state(state)
  assert sorted(loaded) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=str(k))
