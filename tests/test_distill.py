"""Distillation (train.objective=distill): the chunked losses against numpy on full logits, the
draws (the teacher's distribution, a function of (seed, record, position) only), a teacher of
another shape read from its checkpoint, and the sharded step against one device."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import data as data_lib
from gemma3_train import sharding
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.data import images as images_lib
from gemma3_train.models import decoder
from gemma3_train.models import soft_targets
from gemma3_train.training import loop
from gemma3_train.training import restore as restore_lib
from gemma3_train.training import state as train_state
from gemma3_train.training.objectives import distill
from tests import helpers


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _head(seed=0, B=2, L=10, V=64, D=8, Dt=12):
  """Random hidden states and tables of a student (D) and a teacher (Dt), targets, weights."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  table = rng.normal(size=(V, D)).astype(np.float32)
  tx = rng.normal(size=(B, L, Dt)).astype(np.float32)
  ttable = (1.5 * rng.normal(size=(V, Dt))).astype(np.float32)
  targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
  weights = (rng.random((B, L)) > 0.2).astype(np.float32)
  return x, table, tx, ttable, targets, weights


def _numpy_soft_ce(x, table, ids, t, targets, weights):
  """(soft sum, hard sum, d soft / d x, d soft / d table) in float64 on full logits: the
  formula sum_pos w * -sum_k t_k log q(id_k), its gradient dlogits = w (sum_k t_k q - t)."""
  x, table = x.astype(np.float64), table.astype(np.float64)
  logq = _log_softmax(x @ table.T)
  soft = -(weights * (t * np.take_along_axis(logq, ids, -1)).sum(-1)).sum()
  hard = -(weights * np.take_along_axis(logq, targets[..., None], -1)[..., 0]).sum()
  onehot = np.zeros_like(logq)
  B, L, K = ids.shape
  for b in range(B):
    for l in range(L):
      for k in range(K):
        onehot[b, l, ids[b, l, k]] += t[b, l, k]
  dlogits = weights[..., None] * (t.sum(-1, keepdims=True) * np.exp(logq) - onehot)
  return soft, hard, np.einsum('blv,vd->bld', dlogits, table), np.einsum('blv,bld->vd',
                                                                          dlogits, x)


def _keys(B, L):
  """The sampled loss's draw keys of [B, L] rows: row b is record 10 + b, from position 2."""
  record = np.repeat(np.arange(10, 10 + B, dtype=np.int32)[:, None], L, 1)
  return {'record': record, 'record_pos': np.broadcast_to(np.arange(2, 2 + L, dtype=np.int32),
                                                          (B, L)).copy()}


def _close(ours, want, tol, what=''):
  ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.max(np.abs(want))))
  assert np.max(np.abs(ours - want)) <= tol * scale, (what, np.max(np.abs(ours - want)))


@pytest.mark.parametrize('loss', ['sampled', 'topk'])
def test_sampled_and_topk_loss_and_gradient_equal_numpy(loss):
  """Given our drawn ids, the targets are the teacher's probabilities on the distinct ids
  renormalized (topk: on the k most probable), and loss and gradient are the formula's."""
  x, table, tx, ttable, targets, weights = _head()
  K, T = 16, 1.7
  keys = _keys(*targets.shape)
  draws = dict(seed=3, record_BL=keys['record'], pos_BL=keys['record_pos'])
  draws = draws if loss == 'sampled' else {}
  ids, q = soft_targets.teacher_targets(tx, ttable, k=K, temperature=T, chunk_size=4, **draws)
  ids, q = np.asarray(ids), np.asarray(q)
  p = np.exp(_log_softmax(tx.astype(np.float64) @ ttable.T.astype(np.float64) / T))
  t = np.zeros(ids.shape)
  for b in range(ids.shape[0]):
    for l in range(ids.shape[1]):
      if loss == 'topk':
        assert set(ids[b, l]) == set(np.argsort(-p[b, l])[:K])
      distinct = sorted(set(ids[b, l]))
      if loss == 'sampled':
        assert len(distinct) < K  # repeats happen at k = 16 of 64: they count once
      total = p[b, l, distinct].sum()
      seen = set()
      for k, i in enumerate(ids[b, l]):
        if i not in seen:
          t[b, l, k] = p[b, l, i] / total
          seen.add(i)
  _close(q, t, 1e-6, 'targets')

  def soft(x, table):
    sums = soft_targets.soft_target_sums(x, table, ids, q, targets, weights, chunk_size=4)
    return sums['soft_sum'], sums
  (value, sums), (dx, dtable) = jax.value_and_grad(soft, argnums=(0, 1), has_aux=True)(x, table)
  want, want_hard, want_dx, want_dtable = _numpy_soft_ce(x, table, ids, t, targets, weights)
  _close(value, want, 1e-6, 'loss')
  _close(sums['loss_sum'], want_hard, 1e-6, 'hard loss')
  _close(dx, want_dx, 1e-6, 'dx')
  _close(dtable, want_dtable, 1e-6, 'dtable')


@pytest.mark.parametrize('coefs', [(1.0, 0.0, 0.0), (0.7, 0.3, 0.0), (0.6, 0.4, 1e-2),
                                    (0.0, 1.0, 0.0)])
def test_fused_objective_and_gradient_equal_numpy(coefs):
  """soft_target_loss (the objective's fused gradient): soft * soft_sum + hard * loss_sum +
  z_loss * z_loss_sum and its gradient equal the float64 formula on full logits, with
  repeated ids (q 0), a position without targets (the stored ones' padding), a ragged chunk."""
  soft, hard, z = coefs
  x, table, tx, ttable, targets, weights = _head(seed=2)
  keys = _keys(*targets.shape)
  ids, q = soft_targets.teacher_targets(tx, ttable, k=16, temperature=1.0, chunk_size=4, seed=5,
                                        record_BL=keys['record'], pos_BL=keys['record_pos'])
  ids, q = np.asarray(ids), np.array(q)
  q[0, 1] = 0.0  # no targets here (its weight stays)
  weights[0, 1] = 1.0

  def objective(x, table):
    return soft_targets.soft_target_loss(x, table, ids, q, targets, weights, soft=soft, hard=hard,
                                         z_loss=z, chunk_size=4)
  (value, sums), (dx, dtable) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1),
                                                           has_aux=True))(x, table)
  x64, t64, q64 = x.astype(np.float64), table.astype(np.float64), q.astype(np.float64)
  logits = x64 @ t64.T
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logq = logits - lse[..., None]
  soft_sum = -(weights * (q64 * np.take_along_axis(logq, ids, -1)).sum(-1)).sum()
  hard_sum = -(weights * np.take_along_axis(logq, targets[..., None], -1)[..., 0]).sum()
  z_sum = (weights * lse ** 2).sum()
  p = np.exp(logq)
  dense = np.zeros_like(p)  # q scattered onto their ids, and the targets' one-hot
  onehot = np.zeros_like(p)
  for b, l in np.ndindex(*targets.shape):
    np.add.at(dense[b, l], ids[b, l], q64[b, l])
    onehot[b, l, targets[b, l]] = 1.0
  dlogits = weights[..., None] * (soft * (q64.sum(-1, keepdims=True) * p - dense)
                                  + hard * (p - onehot) + z * 2 * lse[..., None] * p)
  _close(value, soft * soft_sum + hard * hard_sum + z * z_sum, 1e-6, 'objective')
  _close(sums['soft_sum'], soft_sum, 1e-6, 'soft')
  _close(sums['loss_sum'], hard_sum, 1e-6, 'hard')
  _close(dx, np.einsum('blv,vd->bld', dlogits, t64), 1e-6, 'dx')
  _close(dtable, np.einsum('blv,bld->vd', dlogits, x64), 1e-6, 'dtable')


def test_draws_follow_the_teacher_and_depend_on_seed_record_position_only():
  logits = np.array([2.0, 0.5, -1.0, 1.0, -30.0, 0.0, 1.5, -0.5], np.float32)
  p = np.exp(_log_softmax(logits.astype(np.float64)))
  n = 200_000
  u = jax.random.uniform(jax.random.key(0), (1, 1, n))
  ids = np.asarray(soft_targets.draw_ids(jnp.asarray(p, jnp.float32)[None, None], u))[0, 0]
  freq = np.bincount(ids, minlength=8) / n
  assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)

  def values(seed, records, start, L):
    record = jnp.asarray(np.repeat(np.asarray(records, np.int32)[:, None], L, 1))
    pos = jnp.broadcast_to(jnp.arange(start, start + L, dtype=jnp.int32), record.shape)
    return np.asarray(soft_targets.position_uniforms(seed, record, pos, 4))
  base = values(0, [0, 1, 2], 0, 12)
  np.testing.assert_array_equal(values(0, [2], 0, 12)[0], base[2])  # other rows
  np.testing.assert_array_equal(values(0, [1, 0], 5, 7)[1], base[0, 5:])  # other columns
  assert not np.array_equal(values(0, [3, 4, 5], 0, 12), base)  # other records
  assert not np.array_equal(values(1, [0, 1, 2], 0, 12), base)  # another seed
  assert len(np.unique(base)) == base.size  # every position and slot its own value


def test_kl_equals_the_full_logits_kl_and_is_zero_for_the_student_itself():
  x, table, tx, ttable, targets, weights = _head(seed=1)
  T = 0.8

  def kl(x, table):
    return soft_targets.kl_sums(x, table, tx, ttable, targets, weights, temperature=T,
                                chunk_size=3)['soft_sum']

  def full(x, table):  # jax on the full [B, L, V] logits
    logp = jax.nn.log_softmax(tx @ ttable.T / T)
    logq = jax.nn.log_softmax(x @ table.T)
    return jnp.sum(weights * jnp.sum(jnp.exp(logp) * (logp - logq), -1))
  value, grads = jax.value_and_grad(kl, argnums=(0, 1))(x, table)
  want_grads = jax.grad(full, argnums=(0, 1))(x, table)
  logp = _log_softmax(tx.astype(np.float64) @ ttable.T.astype(np.float64) / T)
  logq = _log_softmax(x.astype(np.float64) @ table.T.astype(np.float64))
  want = (weights * (np.exp(logp) * (logp - logq)).sum(-1)).sum()
  _close(value, want, 1e-5, 'kl')
  for g, w in zip(grads, want_grads):
    _close(g, w, 1e-5, 'grad')
  same = soft_targets.kl_sums(x, table, x, table, targets, weights, temperature=1.0, chunk_size=3)
  assert abs(float(same['soft_sum'])) <= 1e-6 * float(weights.sum())


# --- the objective: a teacher of another shape, from its checkpoint ---------------------------


def _student_and_teacher(tmp_path, **distill_fields):
  """A 2-layer student config whose distill.teacher is a saved 3-layer teacher of another
  width (its random init, seed 7), and that teacher."""
  c = helpers.small_config(model=dict(num_layers=2),
                           train=dict(objective='distill', seed=0),
                           distill=dict(teacher=str(tmp_path / 'teacher'), **distill_fields))
  tcfg = dataclasses.replace(c.model, num_layers=3, embed_dim=48, mlp_dim=96, num_heads=2,
                             num_kv_heads=1, head_dim=24, query_pre_attn_scalar=24.0)
  teacher = decoder.Gemma3(tcfg, rngs=nnx.Rngs(7))
  top, layers = layout.state_to_canonical(tcfg, nnx.state(teacher, nnx.Param))
  ours.save_params(tmp_path / 'teacher', tcfg, top, enumerate(layers))
  return c, teacher


@pytest.mark.slow  # (fast-lane budget: 10-13 s each)
@pytest.mark.parametrize('loss', ['kl', 'sampled'])
def test_objective_with_a_larger_teacher_equals_full_logits(tmp_path, loss):
  """Student and teacher of different shapes: the objective's loss and metrics from the
  teacher's checkpoint config equal the formula on the models' full logits (numpy)."""
  c, teacher = _student_and_teacher(tmp_path, loss=loss, alpha=0.3, samples=24,
                                    temperature=1.3)
  objective = distill.Distill(c)
  tcfg = objective.frozen_model_config(distill.TEACHER)
  assert (tcfg.num_layers, tcfg.embed_dim, tcfg.head_dim) == (3, 48, 24)
  student = decoder.build(c, nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in helpers.packed_batch(c).items()}
  B = batch['inputs'].shape[0]
  batch.update(_keys(B, batch['inputs'].shape[1]))
  total, sums = jax.jit(lambda b: objective.loss_sums(student, b, {distill.TEACHER: teacher}))(
      batch)
  args = batch['inputs'], batch['positions'], batch['segment_ids']
  logq = _log_softmax(np.asarray(student.embedder.decode(student.hidden(*args)), np.float64))
  logp = _log_softmax(np.asarray(teacher.embedder.decode(teacher.hidden(*args)), np.float64) / 1.3)
  w = np.asarray(batch['weights'])
  hard = -(w * np.take_along_axis(logq, np.asarray(batch['targets'])[..., None], -1)[..., 0])
  if loss == 'kl':
    soft = (w * (np.exp(logp) * (logp - logq)).sum(-1)).sum()
  else:  # the targets on the ids the objective drew (checked against the formula above)
    ids, q = soft_targets.teacher_targets(
        teacher.hidden(*args), teacher.embedder.table(), k=24, temperature=1.3,
        chunk_size=c.train.loss_chunk_size,
        seed=0, record_BL=batch['record'], pos_BL=batch['record_pos'])
    soft = -(w * (np.asarray(q) * np.take_along_axis(logq, np.asarray(ids), -1)).sum(-1)).sum()
  want = 0.7 * soft + 0.3 * hard.sum() + c.train.z_loss * sums['z_loss_sum']
  _close(sums['distill_sum'] / w.sum(), soft / w.sum(), 1e-5, 'distill')
  _close(sums['hard_sum'] / w.sum(), hard.sum() / w.sum(), 1e-5, 'hard')
  _close(total / w.sum(), want / w.sum(), 1e-5, 'total')


# A small vision student: 16 x 16 images, 4 x 4 patches pooled 2 x 2 -> 4 soft tokens each.
_VISION = dict(num_layers=2, vision=True, vision_image_size=16, vision_patch_size=4,
               vision_width=16, vision_depth=2, vision_mlp_dim=32, vision_num_heads=2,
               vision_pool=2)


def _vision_student_and_teacher(tmp_path, **distill_fields):
  """A 2-layer vision student whose distill.teacher is a saved 3-layer vision teacher of
  another width and tower width (its random init, seed 7), and that teacher."""
  c = helpers.small_config(model=_VISION, data=dict(max_images=2),
                           train=dict(objective='distill', seed=0),
                           distill=dict(teacher=str(tmp_path / 'vteacher'),
                                        teacher_dtype='float32', **distill_fields))
  tcfg = dataclasses.replace(c.model, num_layers=3, embed_dim=48, mlp_dim=96, num_heads=2,
                             num_kv_heads=1, head_dim=24, query_pre_attn_scalar=24.0,
                             vision_width=24, vision_mlp_dim=48)
  teacher = decoder.Gemma3(tcfg, rngs=nnx.Rngs(7))
  params = nnx.state(teacher, nnx.Param)
  top, layers = layout.state_to_canonical(tcfg, params)
  ours.save_params(tmp_path / 'vteacher', tcfg, top, enumerate(layers),
                   vision=layout.vision_state_to_canonical(tcfg, params))
  return c, teacher


def _vision_batch(c):
  """Text rows with two runs of placeholders (the images) each; every target weighs 1, the
  placeholders' too (the objective must mask them)."""
  rng = np.random.default_rng(0)
  B, L, T, V = (c.train.global_batch_size, c.data.seq_len, c.model.tokens_per_image,
                c.model.vocab_size)
  tokens = rng.integers(3, V, size=(B, L + 1)).astype(np.int32)
  for start in (3, 15):
    tokens[:, start:start + T] = V
  S, N = c.model.vision_image_size, c.data.max_images
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
           'segment_ids': np.ones((B, L), np.int32), 'weights': np.ones((B, L), np.float32),
           'images': rng.integers(0, 256, size=(B, N, S, S, 3)).astype(np.uint8),
           'image_counts': np.full((B,), N, np.int32), **_keys(B, L)}
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.slow  # (fast-lane budget: ~10 s each)
@pytest.mark.parametrize('loss', ['kl', 'sampled'])
def test_vision_student_distils_from_a_vision_teacher_that_sees_the_images(tmp_path, loss):
  """A vision teacher read from its checkpoint (tower included) and the student both see the
  batch's images: the objective equals the formula on both models' full logits with the
  images, the placeholder targets masked, and not the formula with the teacher's images
  blanked; blanking the batch's images changes the loss."""
  c, teacher = _vision_student_and_teacher(tmp_path, loss=loss, samples=24, temperature=1.3)
  objective = distill.Distill(c)
  tcfg = objective.frozen_model_config(distill.TEACHER)
  assert tcfg.vision and (tcfg.num_layers, tcfg.vision_width) == (3, 24)
  s = train_state.setup(c, sharding.make_mesh(c, jax.devices()[:1]), abstract=True)
  loaded = nnx.merge(s.frozen_model_graphdef[distill.TEACHER],
                     restore_lib._load_frozen_model(s, distill.TEACHER, c.distill.teacher))
  student = decoder.build(c, nnx.Rngs(0))
  batch = _vision_batch(c)
  run = jax.jit(lambda b: objective.loss_sums(student, b, {distill.TEACHER: loaded}))
  total, sums = run(batch)
  args = batch['inputs'], batch['positions'], batch['segment_ids']
  V = c.model.vocab_size
  targets = np.asarray(batch['targets'])
  w = (targets < V).astype(np.float64)  # the placeholders weigh nothing
  targets = np.where(targets < V, targets, 0)
  images = images_lib.to_model_input(batch['images'])
  logq = _log_softmax(np.asarray(student.embedder.decode(student.hidden(*args, images=images)),
                                 np.float64))

  def soft(teacher_images):
    tx = teacher.hidden(*args, images=teacher_images)
    if loss == 'kl':
      logp = _log_softmax(np.asarray(teacher.embedder.decode(tx), np.float64) / 1.3)
      return (w * (np.exp(logp) * (logp - logq)).sum(-1)).sum()
    ids, q = soft_targets.teacher_targets(tx, teacher.embedder.table(), k=24, temperature=1.3,
                                          chunk_size=c.train.loss_chunk_size, seed=0,
                                          record_BL=batch['record'], pos_BL=batch['record_pos'])
    return -(w * (np.asarray(q) * np.take_along_axis(logq, np.asarray(ids), -1)).sum(-1)).sum()
  want = soft(images)
  hard = -(w * np.take_along_axis(logq, targets[..., None], -1)[..., 0]).sum()
  assert float(sums['weight_sum']) == w.sum()
  _close(sums['distill_sum'] / w.sum(), want / w.sum(), 1e-5, 'distill')
  _close(sums['hard_sum'] / w.sum(), hard / w.sum(), 1e-5, 'hard')
  blind = soft(images_lib.to_model_input(jnp.zeros_like(batch['images'])))
  assert abs(blind - want) / w.sum() > 1e-3, (blind, want)  # the teacher's images count
  _, blank = run({**batch, 'images': jnp.zeros_like(batch['images'])})
  assert abs(float(blank['distill_sum'] - sums['distill_sum'])) / w.sum() > 1e-3


def test_vision_student_needs_a_teacher_with_a_matching_tower(tmp_path):
  """A text-only teacher cannot see what a vision student's text refers to: one line; nor can
  a tower of another image size; stored (text) targets are refused for a vision student."""
  text, _ = _student_and_teacher(tmp_path)
  vision = text.replace(model=_VISION)
  with pytest.raises(config_lib.ConfigError, match=r"^distill.teacher='[^']*/teacher': has no "
                     r'vision tower; model.vision=True needs a teacher that sees the images'):
    distill.Distill(vision).frozen_model_config(distill.TEACHER)
  c, _ = _vision_student_and_teacher(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r'its tower reads 16-pixel images, '
                     r'model.vision_image_size is 32 \(both read'):
    distill.Distill(c.replace(model=dict(vision_image_size=32, vision_pool=4))
                    ).frozen_model_config(distill.TEACHER)
  with pytest.raises(config_lib.ConfigError, match=r'its tower gives 4 soft tokens per image, '
                     r'model.vision_patch_size=4 and model.vision_pool=1 give 16'):
    distill.Distill(c.replace(model=dict(vision_pool=1))).frozen_model_config(distill.TEACHER)
  assert distill.Distill(text).frozen_model_config(distill.TEACHER).vision is False
  config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match=r"^model.vision=True: expected False for "
                     r"train.objective=distill with distill.teacher=''"):
    config_lib.validate(c.replace(distill=dict(teacher='')))


def test_setup_and_restore_hold_the_teacher_of_its_own_shape_in_its_dtype(tmp_path):
  c, teacher = _student_and_teacher(tmp_path, teacher_dtype='bfloat16')
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  s = train_state.setup(c, mesh, abstract=True)
  loaded = restore_lib._load_frozen_model(s, distill.TEACHER, c.distill.teacher)
  want = dict(nnx.to_flat_state(nnx.state(teacher, nnx.Param)))
  for k, v in nnx.to_flat_state(loaded):
    assert v.get_value().dtype == jnp.bfloat16, k
    np.testing.assert_array_equal(np.asarray(v.get_value()),
                                  np.asarray(want[k].get_value().astype(jnp.bfloat16)))
  assert 'frozen_models' not in train_state.saved(s.abstract_state)
  assert s.frozen_model_graphdef[distill.TEACHER] != s.graphdef


def test_config_checks(tmp_path):
  c = helpers.small_config(train=dict(objective='distill'))
  with pytest.raises(config_lib.ConfigError, match=r"^distill.teacher='/nonexistent': "):
    distill.Distill(c.replace(distill=dict(teacher='/nonexistent'))).frozen_model_config('t')
  other, _ = _student_and_teacher(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r'its vocabulary has 512 pieces, '
                     r'model.vocab_size is 1024 \(the same tokenizer is needed\)$'):
    distill.Distill(other.replace(model=dict(vocab_size=1024))).frozen_model_config('t')
  config_lib.validate(c)  # no teacher: the stored targets (tests/test_teacher_labels.py)
  with pytest.raises(config_lib.ConfigError, match=r"^distill.loss='kl': expected sampled or "
                     r"topk without distill.teacher"):
    config_lib.validate(c.replace(distill=dict(loss='kl')))
  with pytest.raises(config_lib.ConfigError, match=r"^distill.teacher_preset='5b': expected "):
    config_lib.validate(c.replace(distill=dict(teacher='t', teacher_preset='5b')))
  preset = distill.teacher_config(c.replace(distill=dict(teacher='t', teacher_preset='27b')))
  assert (preset.num_layers, preset.embed_dim, preset.vocab_size) == (62, 5376, 512)
  with pytest.raises(config_lib.ConfigError,
                     match=r"^distill.loss='hard': expected sampled \| topk \| kl$"):
    config_lib.validate(c.replace(distill=dict(teacher='t', loss='hard')))
  with pytest.raises(config_lib.ConfigError, match=r'^distill.alpha=1.5: expected in \[0, 1\]$'):
    config_lib.validate(c.replace(distill=dict(teacher='t', alpha=1.5)))


@pytest.mark.slow  # (two in-process runs)
def test_teacher_eval_loss_is_logged_once_at_a_fresh_start(tmp_path):
  """Online, a fresh run logs the teacher's own next-token loss and accuracy on the run's eval
  batches at step 0 (numpy on the teacher's full logits over the same rows); a resume does not
  log it again."""
  c, teacher = _student_and_teacher(tmp_path, teacher_dtype='float32')
  c = c.replace(data=dict(source='synthetic'), logging=dict(tensorboard=False),
                train=dict(num_steps=1, eval_every=1, eval_steps=2))
  work = str(tmp_path / 'student')
  loop.train_and_evaluate(c, work)
  loop.train_and_evaluate(c.replace(train=dict(num_steps=2)), work)  # resumed at step 1
  rows = [json.loads(line) for line in (tmp_path / 'student' / 'metrics.jsonl').read_text()
          .splitlines()]
  logged = [row for row in rows if 'distill/teacher_eval_loss' in row]
  assert [row['step'] for row in logged] == [0], rows
  nll = correct = weight = 0.0
  batches = data_lib.make_eval_iterator(c)
  for _ in range(c.train.eval_steps):
    b = next(batches)
    logits = np.asarray(teacher.embedder.decode(teacher.hidden(
        b['inputs'], b['positions'], b['segment_ids'])), np.float64)
    at_target = np.take_along_axis(logits, b['targets'][..., None], -1)[..., 0]
    w = b['weights'].astype(np.float64)
    nll -= (w * (at_target - logits.max(-1) - np.log(np.exp(
        logits - logits.max(-1, keepdims=True)).sum(-1)))).sum()
    correct += (w * (at_target >= logits.max(-1))).sum()
    weight += w.sum()
  _close(logged[0]['distill/teacher_eval_loss'], nll / weight, 1e-5, 'teacher loss')
  assert logged[0]['distill/teacher_eval_accuracy'] == pytest.approx(correct / weight, abs=1e-9)


# --- the train step: sharded and one device ------------------------------------------------


def _step_grads(c, devices, batch):
  """The gradient of the mean distillation loss at the seed's init, through the batch's draw
  keys (record, record_pos) and the teacher as restore loads it onto the mesh."""
  mesh = sharding.make_mesh(c, devices)
  s = train_state.setup(c, mesh)
  teacher = restore_lib._load_frozen_model(s, distill.TEACHER, c.distill.teacher)
  put = {k: jax.device_put(v, s.batch_sharding[k]) for k, v in batch.items()}

  def grads(params, teacher_state, batch):

    def mean(p):
      model = nnx.merge(s.graphdef, p, *s.state['frozen'].values())
      frozen = {distill.TEACHER: nnx.merge(s.frozen_model_graphdef[distill.TEACHER],
                                           teacher_state)}
      total, sums = s.objective.loss_sums(model, batch, frozen)
      return total / sums['weight_sum']
    return jax.grad(mean)(params)
  with sharding.use_mesh(mesh, s.rules):
    params = s.state['params']
    if c.lora.rank:  # adapters away from B = 0: every adapter gets a gradient
      params = jax.tree.map(lambda a: a + 0.05, params)
    g = jax.jit(grads)(params, teacher, put)
  return [np.asarray(x) for x in jax.tree.leaves(g)]


@pytest.mark.parametrize('loss,lora_rank', [
    pytest.param('sampled', 0, marks=pytest.mark.slow),
    pytest.param('kl', 0, marks=pytest.mark.slow),
    pytest.param('topk', 4, marks=pytest.mark.slow)])
def test_sharded_equals_one_device(tmp_path, loss, lora_rank):
  """(fsdp=4, tensor=2) on 8 CPU devices: the same gradients (and draws) as one device; with
  LoRA, the adapters' gradients (the teacher is a model of its own)."""
  c1, _ = _student_and_teacher(tmp_path, loss=loss, samples=32, teacher_dtype='float32',
                               alpha=0.25)
  lora = dict(rank=lora_rank, alpha=8.0, targets='q,v,down') if lora_rank else {}
  c1 = c1.replace(mesh=dict(fsdp=-1), lora=lora)
  c8 = c1.replace(mesh=dict(fsdp=4, tensor=2))
  batch = helpers.packed_batch(c1)
  if loss == 'sampled':
    batch.update(_keys(*batch['inputs'].shape))
  g1 = _step_grads(c1, jax.devices()[:1], batch)
  g8 = _step_grads(c8, jax.devices(), batch)
  helpers.assert_same_grads(g8, g1)


# --- the CLI: a teacher trained first, then distilled into a smaller student ---------------


@pytest.mark.slow
def test_distill_run_from_a_trained_teacher_resumes_exactly(tmp_path):
  """A 7-layer teacher trained a few steps (ce), distilled (sampled) into a 2-layer student
  from its workdir: the metrics are logged, eval has the KL to the teacher, and a run resumed
  at step 2 logs the uninterrupted run's losses bit for bit (the draws follow the data)."""
  teacher = tmp_path / 'teacher'
  helpers.train_ok(teacher, 6, devices=1)
  flags = ['--config.train.objective=distill', f'--config.distill.teacher={teacher}',
           '--config.model.num_layers=2', '--config.distill.samples=16',
           '--config.distill.alpha=0.1', '--config.checkpoint.every=2',
           '--config.train.eval_every=2', '--config.train.eval_steps=1',
           '--config.optim.schedule=constant', '--config.optim.warmup_steps=0']
  straight = tmp_path / 'straight'
  r = helpers.train_ok(straight, 4, *flags, devices=1)
  assert 'Loading the frozen teacher model from' in r.stderr
  rows = [json.loads(line) for line in (straight / 'metrics.jsonl').read_text().splitlines()]
  train = [row for row in rows if 'distill/loss' in row and 'loss/hard' in row]
  assert len(train) >= 4, rows
  evals = [row for row in rows if any(k.endswith('distill/kl_to_teacher') for k in row)]
  assert evals, rows
  resumed = tmp_path / 'resumed'
  helpers.train_ok(resumed, 2, *flags, devices=1)
  assert 'Resumed from' in helpers.train_ok(resumed, 4, *flags, devices=1).stderr
  assert helpers.logged_losses(resumed) == helpers.logged_losses(straight)  # bitwise


def test_distill_27b_to_4b_holds_a_bfloat16_27b_teacher_without_its_checkpoint():
  """distill.teacher_preset gives the teacher's shapes without reading its checkpoint (what lets
  the AOT proof compile the real step anywhere): 27.0e9 bfloat16 teacher params in the
  abstract state, the draws' keys in the batch."""
  import importlib  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(importlib.import_module('configs.distill_27b_to_4b')
                                  .get_config())
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  s = train_state.setup(c, mesh, abstract=True)
  leaves = jax.tree.leaves(s.abstract_state['frozen_models'][distill.TEACHER])
  assert {l.dtype for l in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert sum(l.size for l in leaves) == pytest.approx(27.0e9, rel=1e-3)
  assert {'record', 'record_pos'} <= set(train_state.abstract_batch(c, mesh))


_DISTILL_PROOF = helpers.ROOT / 'docs' / 'aot' / 'distill_27b_to_4b_v6e-32.json'


def test_distill_27b_to_4b_is_the_config_its_aot_proof_compiled():
  """docs/aot/distill_27b_to_4b_v6e-32.json (rerun by hand with gemma3-train
  --config=configs/distill_27b_to_4b.py --aot_topology=v6e-32 --aot_report=...) still describes
  the config, the bfloat16 27b teacher's forward included, and fits with the shipped configs'
  headroom."""
  import importlib  # pylint: disable=g-import-not-at-top
  from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import flops  # pylint: disable=g-import-not-at-top
  c = config_lib.from_config_dict(importlib.import_module('configs.distill_27b_to_4b')
                                  .get_config())
  r = json.loads(_DISTILL_PROOF.read_text())
  assert r['fits'] and r['headroom'] >= aot.HEADROOM and not r['error'] and r['tpu_kernels'] > 0
  chips = aot.parse_topology('v6e-32').total_chips
  want = dict(topology='v6e-32', chips=chips, mesh=sharding.mesh_shape(c, chips),
              remat_policy=c.model.remat_policy, seq_len=c.data.seq_len,
              global_batch=c.train.global_batch_size, param_dtype=c.model.param_dtype,
              dtype=c.model.dtype)
  assert {k: r[k] for k in want} == want
  assert (c.distill.teacher_preset, c.distill.teacher_dtype) == ('27b', 'bfloat16')
  assert r['state_gib'] * aot.GIB * chips >= 2 * 27.0e9  # the bfloat16 teacher is in the state
  assert r['model_flops_per_step'] == pytest.approx(flops.train_flops_per_step(c), rel=1e-12)
