"""Knowledge distillation from a frozen teacher: train.objective='distill', distill.loss picks
the loss (docs/distillation.md).

The teacher is any checkpoint convert reads (distill.teacher), of any size with the student's
tokenizer: its ModelConfig is read from the checkpoint (frozen_model_config), it is held in
distill.teacher_dtype, sharded by the same rules and never differentiated, optimized or saved
(a frozen model of the objective seam). Per position, with p_T = softmax(teacher logits / T)
(T = distill.temperature) and log q the student's log-softmax over the whole vocabulary:
  sampled  -sum_i t_i log q_i over the distinct ids of distill.samples draws from p_T (with
           replacement), t = p_T on those ids renormalized (the Gemma 3 report: "The teacher's
           target distribution is set to zero probability for non-sampled logits, and
           renormalized"); the draws are a function of (train.seed, the document's record
           index, the position in the document) only: the batch's 'record' and 'record_pos'
  topk     the same on the teacher's distill.samples most probable ids
  kl       KL(p_T || q) over the whole vocabulary
and loss = (1 - alpha) * that + alpha * the next-token cross-entropy on the data (+ train.z_loss
* the z-loss), summed over the weighted targets; the step divides by their count. Every
[B, C, V] logits array lives in one chunk of the sequence (models/lm_head.py).

distill.teacher='' is offline: no teacher is held or run; sampled and topk read the targets
`gemma3-data prepare --teacher` stored with the tokens (the batch's 'teacher_ids' and
'teacher_probs', data/teacher.py), drawn with the same keys, so the losses are the online run's.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train import data as data_lib
from gemma3_train import sharding
from gemma3_train.data import images as images_lib
from gemma3_train.data import teacher as teacher_data
from gemma3_train.inference import scoring
from gemma3_train.models import lm_head
from gemma3_train.models import soft_targets
from gemma3_train.training.objectives import base
from gemma3_train.training.objectives import ce

TEACHER = 'teacher'
# What a teacher takes from its checkpoint; the rest (dtype, scan, attention kernel) is the
# student's, so that the teacher runs the way the student does.
_ARCHITECTURE = config_lib.MODEL_SHAPE_FIELDS + (
    'preset', 'query_pre_attn_scalar', 'sliding_window', 'local_rope_base', 'global_rope_base',
    'global_rope_scale', 'rms_norm_eps')
# A vision teacher's tower (teacher_config keeps it when the student reads images too).
_VISION = ('vision_image_size', 'vision_patch_size', 'vision_width', 'vision_depth',
           'vision_mlp_dim', 'vision_num_heads', 'vision_pool')


def teacher_config(c: config_lib.Config) -> config_lib.ModelConfig:
  """The teacher's ModelConfig: its checkpoint's architecture (config only, no weights read),
  or distill.teacher_preset's, with the student's runtime fields. A vision student's teacher
  keeps its own tower (a preset's is the student's: the released towers are one SigLIP), a
  text student's teacher reads text only. Raises ConfigError (one line)."""
  path = c.distill.teacher
  if c.distill.teacher_preset:
    arch = {k: getattr(config_lib.ModelConfig(), k) for k in _ARCHITECTURE if k != 'vocab_size'}
    arch.update(config_lib.PRESETS[c.distill.teacher_preset], preset=c.distill.teacher_preset)
    return dataclasses.replace(c.model, **arch)
  try:
    src = convert.open_source(path)
  except convert.ConversionError as e:
    raise config_lib.ConfigError(f'distill.teacher={path!r}: {e}') from e
  if src.cfg.vocab_size != c.model.vocab_size:
    raise config_lib.ConfigError(
        f'distill.teacher={path!r}: its vocabulary has {src.cfg.vocab_size} pieces, '
        f'model.vocab_size is {c.model.vocab_size} (the same tokenizer is needed)')
  arch = {k: getattr(src.cfg, k) for k in _ARCHITECTURE}
  if c.model.vision:
    _check_teacher_vision(path, src.cfg, c.model)
    arch.update({k: getattr(src.cfg, k) for k in _VISION})
  return dataclasses.replace(c.model, **arch)


def _check_teacher_vision(path: str, t: config_lib.ModelConfig,
                          m: config_lib.ModelConfig) -> None:
  """A vision student's teacher must see the batch's images: a tower reading images of the
  student's size into as many soft tokens (the placeholder runs are the student's)."""
  if not t.vision:
    raise config_lib.ConfigError(
        f'distill.teacher={path!r}: has no vision tower; model.vision=True needs a teacher '
        'that sees the images (a 4b, 12b or 27b checkpoint)')
  if t.vision_image_size != m.vision_image_size:
    raise config_lib.ConfigError(
        f'distill.teacher={path!r}: its tower reads {t.vision_image_size}-pixel images, '
        f'model.vision_image_size is {m.vision_image_size} (both read the batch\'s images)')
  if t.tokens_per_image != m.tokens_per_image:
    raise config_lib.ConfigError(
        f'distill.teacher={path!r}: its tower gives {t.tokens_per_image} soft tokens per '
        f'image, model.vision_patch_size={m.vision_patch_size} and model.vision_pool='
        f'{m.vision_pool} give {m.tokens_per_image} (the placeholder runs are the student\'s)')


class Distill(base.Objective):
  name = 'distill'

  def __init__(self, c: config_lib.Config):
    super().__init__(c)
    self._teacher_cfg = None
    self.online = bool(c.distill.teacher)  # else the stored targets (data/teacher.py)

  def batch_shapes(self) -> base.Shapes:
    """ce's arrays (with model.vision the images), and data/teacher.py's: the sampled draws'
    record keys [B, L] online, the stored targets [B, L, distill.samples] offline."""
    c = self.config
    B, L = c.train.global_batch_size, c.data.seq_len
    shapes = ce.CrossEntropy(c).batch_shapes()
    for k, (trailing, dtype) in teacher_data.batch_keys(c).items():
      shapes[k] = ((B, L, *trailing), dtype)
    return shapes

  def frozen_models(self) -> dict[str, str]:
    return {TEACHER: self.config.distill.teacher} if self.online else {}

  def frozen_model_config(self, name):
    if self._teacher_cfg is None:
      self._teacher_cfg = teacher_config(self.config)
    return self._teacher_cfg

  def frozen_param_dtype(self) -> str:
    return self.config.distill.teacher_dtype

  def _inputs(self, model, teacher, batch):
    """(student hidden states, teacher hidden states or None (offline), targets, weights).
    Both models see the batch's images (a vision student's teacher has its own tower)."""
    args = batch['inputs'], batch['positions'], batch['segment_ids']
    images = images_lib.from_batch(batch)
    x_BLD = model.hidden(*args, images=images)
    teacher_x_BLD = None
    if teacher is not None:
      teacher_x_BLD = jax.lax.stop_gradient(teacher.hidden(*args, images=images))
    targets, weights = lm_head.mask_image_targets(batch['targets'], batch['weights'],
                                                  model.cfg.vocab_size)
    return x_BLD, teacher_x_BLD, targets, weights

  def _loss(self, model, teacher, batch, inputs):
    """(the summed objective, its parts): (1 - alpha) * distillation + alpha * the data's
    cross-entropy (+ train.z_loss * the z-loss)."""
    c = self.config
    d, t = c.distill, c.train
    x_BLD, teacher_x_BLD, targets, weights = inputs
    table_VD = model.embedder.table()
    a = d.alpha
    if teacher is not None and d.loss == 'kl':
      sums = soft_targets.kl_sums(x_BLD, table_VD, teacher_x_BLD, teacher.embedder.table(), targets,
                                  weights, temperature=d.temperature, chunk_size=t.loss_chunk_size,
                                  z_loss=t.z_loss)
      total = soft_targets.weighted_objective(sums, (1.0 - a, a, t.z_loss))
    else:
      if teacher is None:  # offline: the stored targets
        ids, q = batch['teacher_ids'], batch['teacher_probs']
      else:
        keys = {}
        if d.loss == 'sampled':
          keys = dict(seed=t.seed, record_BL=batch['record'], pos_BL=batch['record_pos'])
        ids, q = soft_targets.teacher_targets(teacher_x_BLD, teacher.embedder.table(), k=d.samples,
                                              temperature=d.temperature,
                                              chunk_size=t.loss_chunk_size, **keys)
        if 'hard_labels' in batch:  # rows of labels=hard mixture sources: their next tokens
          hard_ids, hard_q = teacher_data.hard_targets(targets, d.samples,
                                                       model.cfg.vocab_size, jnp)
          hard_BL1 = batch['hard_labels'][..., None] > 0
          ids, q = jnp.where(hard_BL1, hard_ids, ids), jnp.where(hard_BL1, hard_q, q)
      # The fused gradient of the mixed objective: ce's cost plus a scatter (lm_head).
      total, sums = soft_targets.soft_target_loss(x_BLD, table_VD, ids, q, targets, weights,
                                                  soft=1.0 - a, hard=a, z_loss=t.z_loss,
                                                  chunk_size=t.loss_chunk_size)
    sums = {'objective_sum': total, 'distill_sum': sums.pop('soft_sum'),
            'hard_sum': sums.pop('loss_sum'), **sums}
    return total, sums

  def _teacher(self, frozen_models):
    return frozen_models[TEACHER] if self.online else None

  def loss_sums(self, model, batch, frozen_models=None):
    teacher = self._teacher(frozen_models)
    return self._loss(model, teacher, batch, self._inputs(model, teacher, batch))

  def eval_sums(self, model, batch, frozen_models=None):
    """loss_sums' parts and, online, the exact KL(teacher || student) at temperature 1, in
    chunks (offline there is no teacher to take it from)."""
    c = self.config
    teacher = self._teacher(frozen_models)
    inputs = self._inputs(model, teacher, batch)
    _, sums = self._loss(model, teacher, batch, inputs)
    if teacher is None:
      return sums
    if c.distill.loss == 'kl' and c.distill.temperature == 1.0:
      kl = sums['distill_sum']
    else:
      x_BLD, teacher_x_BLD, targets, weights = inputs
      kl = soft_targets.kl_sums(x_BLD, model.embedder.table(), teacher_x_BLD,
                                teacher.embedder.table(), targets, weights, temperature=1.0,
                                chunk_size=c.train.loss_chunk_size)['soft_sum']
    return {**sums, 'kl_to_teacher_sum': kl}

  def start_metrics(self, s, state, eval_batches):
    """Online: the teacher's own next-token loss and accuracy on the run's eval batches
    (train.eval_steps of them, with their images), as it is held (distill.teacher_dtype); only
    in a run that evaluates (loop.preflight checked its eval data then)."""
    t = self.config.train
    if not (self.online and t.eval_every and t.eval_steps and t.eval_every <= t.num_steps):
      return {}
    graphdef = s.frozen_model_graphdef[TEACHER]

    @jax.jit
    def sums(part, batch):
      with sharding.use_mesh(s.mesh, s.rules):
        return lm_head.next_token_sums(nnx.merge(graphdef, part), batch,
                                       images_lib.from_batch(batch),
                                       chunk_size=t.loss_chunk_size)
    part = state['frozen_models'][TEACHER]
    step = lambda local: sums(part, data_lib.global_batch(local, s.batch_sharding))
    with contextlib.closing(eval_batches()) as batches:
      totals, _ = scoring.sum_batches(step, batches, max_batches=t.eval_steps)
    r = lm_head.summarize(totals)
    return {'distill/teacher_eval_loss': r['loss'], 'distill/teacher_eval_accuracy': r['accuracy']}

  def metrics(self, sums):
    weight = jnp.maximum(sums['weight_sum'], 1.0)
    return {'loss': sums['objective_sum'] / weight, 'distill/loss': sums['distill_sum'] / weight,
            'loss/hard': sums['hard_sum'] / weight, 'z_loss': sums['z_loss_sum'] / weight,
            'accuracy': sums['correct_sum'] / weight}

  def eval_summary(self, totals):
    hard = lm_head.summarize({**totals, 'loss_sum': totals.get('hard_sum', 0.0)})
    weight = max(totals.get('weight_sum', 0.0), 1.0)
    return {'loss': totals['objective_sum'] / weight,
            'distill/loss': totals['distill_sum'] / weight,
            'loss/hard': hard['loss'], 'perplexity': hard['perplexity'],
            'accuracy': hard['accuracy'], 'tokens': hard['tokens'],
            **({'distill/kl_to_teacher': totals['kl_to_teacher_sum'] / weight}
               if 'kl_to_teacher_sum' in totals else {})}
