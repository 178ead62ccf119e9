"""validate(Config): every check that needs no devices, files or jax. Each raises a one-line
ConfigError naming the field, its value and what was expected."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gemma3_train.config import mixture
from gemma3_train.config.fields import QAT_EMBEDDING_MODES, QAT_MODES
from gemma3_train.config.fields import DISTILL_LOSSES, DISTILL_TEACHER_DTYPES, PRESETS
from gemma3_train.config.fields import RL_LOSSES, RL_SCALE_REWARDS
from gemma3_train.config.fields import (ATTENTION_IMPLS, CONTEXT_LAYOUTS, DPO_LOSSES, DPO_REFERENCE_DTYPES,
                                        DPO_REFERENCE_LOGPS, DTYPES, LORA_BASE_DTYPES, LORA_TARGETS,
                                        MESH_AXES, MIXTURE_EXHAUSTED, OBJECTIVES, REMAT_POLICIES,
                                        REMAT_UNITS,
                                        SCAN_UNITS, SCHEDULES, SOURCES, Config, ConfigError,
                                        LoraConfig, ModelConfig, lora_dims)


def require(ok: bool, name: str, value: Any, expected: str) -> None:
  if not ok:
    raise ConfigError(f'{name}={value!r}: expected {expected}')


def validate(c: Config) -> None:
  """Checks what can be checked without devices. Raises ConfigError (one line)."""
  m = c.model
  for k in ('vocab_size', 'num_layers', 'embed_dim', 'mlp_dim', 'num_heads', 'num_kv_heads',
            'head_dim', 'attention_block_size'):
    require(getattr(m, k) > 0, f'model.{k}', getattr(m, k), 'a positive integer')
  require(m.num_heads % m.num_kv_heads == 0, 'model.num_kv_heads', m.num_kv_heads,
          f'a divisor of model.num_heads={m.num_heads}')
  require(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim, 'an even number (RoPE halves)')
  require(m.sliding_window > 0, 'model.sliding_window', m.sliding_window, 'a window > 0')
  require(m.query_pre_attn_scalar > 0, 'model.query_pre_attn_scalar',
          m.query_pre_attn_scalar, 'a positive number')
  require(m.global_rope_scale >= 1.0, 'model.global_rope_scale', m.global_rope_scale, '>= 1')
  require(m.rms_norm_eps > 0, 'model.rms_norm_eps', m.rms_norm_eps, 'a positive number')
  for k in ('param_dtype', 'dtype'):
    require(getattr(m, k) in DTYPES, f'model.{k}', getattr(m, k), ' | '.join(DTYPES))
  require(m.remat_policy in REMAT_POLICIES, 'model.remat_policy', m.remat_policy,
          ' | '.join(REMAT_POLICIES))
  require(m.remat_unit in REMAT_UNITS, 'model.remat_unit', m.remat_unit, ' | '.join(REMAT_UNITS))
  require(m.scan_unit in SCAN_UNITS, 'model.scan_unit', m.scan_unit, ' | '.join(SCAN_UNITS))
  require(m.scan_unit == 'block' or m.scan_layers, 'model.scan_unit', m.scan_unit,
          "'block' when model.scan_layers=False (the inner scan runs inside the block scan)")
  require(m.attention_impl in ATTENTION_IMPLS, 'model.attention_impl', m.attention_impl,
          ' | '.join(ATTENTION_IMPLS))
  require(m.context_layout in CONTEXT_LAYOUTS, 'model.context_layout', m.context_layout,
          ' | '.join(CONTEXT_LAYOUTS))
  if m.vision:
    _validate_vision(m)

  for k in MESH_AXES + tuple(f'dcn_{a}' for a in MESH_AXES):
    v = getattr(c.mesh, k)
    require(v == -1 or v >= 1, f'mesh.{k}', v, 'a degree >= 1 or -1 (fill)')
  require(c.mesh.ici().count(-1) <= 1, 'mesh', c.mesh.ici(),
          f'at most one of {"/".join(MESH_AXES)} = -1')
  require(c.mesh.rules == '' or re.fullmatch(r'\w+=[\w+]*(,\w+=[\w+]*)*', c.mesh.rules),
          'mesh.rules', c.mesh.rules, "'logical=axis[+axis],...' e.g. 'mlp=tensor,embed=fsdp'")

  d = c.data
  require(d.source in SOURCES, 'data.source', d.source, ' | '.join(SOURCES))
  require(d.format in ('text', 'chat'), 'data.format', d.format, 'text | chat')
  require(d.seq_len > 1, 'data.seq_len', d.seq_len, 'an integer > 1')
  require(d.num_workers >= 0, 'data.num_workers', d.num_workers, '>= 0')
  require(d.prefetch >= 0, 'data.prefetch', d.prefetch, '>= 0')
  require(d.max_images >= 1, 'data.max_images', d.max_images, '>= 1')
  if d.source in ('jsonl', 'parquet', 'arrayrecord', 'prepared'):
    require(bool(d.train_path), 'data.train_path', d.train_path,
            f'a file or glob for data.source={d.source!r}')
  if d.source == 'tfds':
    require(bool(d.tfds_name), 'data.tfds_name', d.tfds_name, 'a TFDS dataset name')
  if d.source == 'shapes':  # captions: text rows
    require(d.format == 'text', 'data.format', d.format, "text for data.source='shapes'")
  require(d.mixture_exhausted in MIXTURE_EXHAUSTED, 'data.mixture_exhausted',
          d.mixture_exhausted, ' | '.join(MIXTURE_EXHAUSTED))

  o = c.optim
  require(o.lr >= 0, 'optim.lr', o.lr, 'a learning rate >= 0')
  require(o.schedule in SCHEDULES, 'optim.schedule', o.schedule, ' | '.join(SCHEDULES))
  require(o.warmup_steps >= 0, 'optim.warmup_steps', o.warmup_steps, '>= 0')
  require(0 <= o.decay_fraction <= 1, 'optim.decay_fraction', o.decay_fraction, 'in [0, 1]')
  require(0 <= o.min_lr_ratio <= 1, 'optim.min_lr_ratio', o.min_lr_ratio, 'in [0, 1]')
  require(0 <= o.b1 < 1, 'optim.b1', o.b1, 'in [0, 1)')
  require(0 <= o.b2 < 1, 'optim.b2', o.b2, 'in [0, 1)')
  require(o.eps > 0, 'optim.eps', o.eps, '> 0')
  require(o.weight_decay >= 0, 'optim.weight_decay', o.weight_decay, '>= 0')
  require(o.clip_norm >= 0, 'optim.clip_norm', o.clip_norm, '>= 0 (0 = off)')
  require(o.grad_accum_steps >= 1, 'optim.grad_accum_steps', o.grad_accum_steps, '>= 1')

  t = c.train
  require(t.num_steps >= 1, 'train.num_steps', t.num_steps, '>= 1')
  require(t.objective in OBJECTIVES, 'train.objective', t.objective, ' | '.join(OBJECTIVES))
  require(t.global_batch_size >= 1, 'train.global_batch_size', t.global_batch_size, '>= 1')
  require(t.global_batch_size % o.grad_accum_steps == 0, 'train.global_batch_size',
          t.global_batch_size, f'a multiple of optim.grad_accum_steps={o.grad_accum_steps}')
  require(t.eval_every >= 0, 'train.eval_every', t.eval_every, '>= 0')
  require(t.eval_steps >= 0, 'train.eval_steps', t.eval_steps, '>= 0')
  require(t.loss_chunk_size >= 1, 'train.loss_chunk_size', t.loss_chunk_size, '>= 1')
  require(t.sample_every >= 0, 'train.sample_every', t.sample_every, '>= 0 (0 = never)')
  require(not t.sample_every or any(p.strip() for p in t.sample_prompts.split('|')),
          'train.sample_prompts', t.sample_prompts, "one or more prompts separated by '|'")
  require(t.z_loss >= 0, 'train.z_loss', t.z_loss, '>= 0')
  require(t.eval_tasks_every >= 0, 'train.eval_tasks_every', t.eval_tasks_every,
          '>= 0 (0 = never)')
  require(not t.eval_tasks_every or bool(t.eval_tasks.strip(' ,')), 'train.eval_tasks',
          t.eval_tasks, 'task names separated by commas (train.eval_tasks_every is set)')
  require(t.eval_tasks_limit >= 0, 'train.eval_tasks_limit', t.eval_tasks_limit, '>= 0 (0 = all)')

  k = c.checkpoint
  require(k.every >= 0, 'checkpoint.every', k.every, '>= 0')
  require(k.keep >= 1, 'checkpoint.keep', k.keep, '>= 1')
  require(k.keep_period >= 0, 'checkpoint.keep_period', k.keep_period, '>= 0')
  require(k.lease_timeout_s > 0, 'checkpoint.lease_timeout_s', k.lease_timeout_s, '> 0')

  g = c.logging
  require(g.log_every >= 1, 'logging.log_every', g.log_every, '>= 1')
  require(g.peak_tflops >= 0, 'logging.peak_tflops', g.peak_tflops, '>= 0')
  require(re.fullmatch(r'(\d+(,\d+)*)?', g.profile_steps) is not None,
          'logging.profile_steps', g.profile_steps, "a comma list of steps, e.g. '5,6'")
  if c.lora != LoraConfig():
    _validate_lora(c)
  if c.quant.qat or c.quant.embedding:
    _validate_quant(c)
  if t.objective == 'dpo':
    _validate_dpo(c)
  if t.objective == 'distill':
    _validate_distill(c)
  if t.objective == 'grpo':
    _validate_rl(c)
  if c.data.mixture:
    for m in mixture.parse_mixture(c.data.mixture):  # each source as if it were data.*
      try:
        validate(dataclasses.replace(c, data=mixture.source_data(c.data, m)))
      except ConfigError as e:
        raise ConfigError(f'data.mixture source {m.name!r}: {e}') from None


def _validate_vision(m: ModelConfig) -> None:
  """The model.vision_* checks of a vision model."""
  for k in ('vision_image_size', 'vision_patch_size', 'vision_width', 'vision_depth',
            'vision_mlp_dim', 'vision_num_heads', 'vision_pool'):
    require(getattr(m, k) > 0, f'model.{k}', getattr(m, k), 'a positive integer')
  grid = m.vision_image_size // m.vision_patch_size
  require(m.vision_image_size % m.vision_patch_size == 0, 'model.vision_image_size',
          m.vision_image_size, f'a multiple of model.vision_patch_size={m.vision_patch_size}')
  require(grid % m.vision_pool == 0, 'model.vision_pool', m.vision_pool,
          f'a divisor of the patch grid side {grid}')
  require(m.vision_width % m.vision_num_heads == 0, 'model.vision_num_heads',
          m.vision_num_heads, f'a divisor of model.vision_width={m.vision_width}')


def _validate_quant(c: Config) -> None:
  """The quant.* checks: known modes, and rows that Q4_0 / Q8_0 cut into blocks of 32."""
  q, m = c.quant, c.model
  require(q.qat in ('',) + QAT_MODES, 'quant.qat', q.qat, "'' (off) | " + ' | '.join(QAT_MODES))
  require(q.embedding in ('',) + QAT_EMBEDDING_MODES, 'quant.embedding', q.embedding,
          "'' (off) | " + ' | '.join(QAT_EMBEDDING_MODES))
  rows = {'model.embed_dim': m.embed_dim, 'model.mlp_dim': m.mlp_dim,
          'model.num_heads * model.head_dim': m.num_heads * m.head_dim}
  for field, mode, sizes in (('quant.qat', q.qat, rows),
                             ('quant.embedding', q.embedding, {'model.embed_dim': m.embed_dim})):
    if mode in ('q4_0', 'q8_0'):
      for name, size in sizes.items():
        require(size % 32 == 0, field, mode, f'rows in blocks of 32, but {name}={size} is not '
                'a multiple of 32')
  require(not (q.qat and c.lora.rank and c.lora.dropout), 'lora.dropout', c.lora.dropout,
          '0 with quant.qat (a QAT LoRA forward merges the adapters into the quantized weight)')


def _validate_lora(c: Config) -> None:
  """The lora.* checks, when any lora.* field is set."""
  r = c.lora
  if r.rank == 0:
    changed = [f.name for f in dataclasses.fields(r)
               if getattr(r, f.name) != f.default and f.name != 'rank']
    require(not changed, 'lora.rank', r.rank,
            f'> 0 when lora.{changed[0] if changed else ""} is set (rank 0 = LoRA off)')
    return
  require(r.rank > 0, 'lora.rank', r.rank, '> 0 (or 0 = off)')
  names = ' | '.join(LORA_TARGETS)
  targets = r.target_list()
  require(bool(targets), 'lora.targets', r.targets, f'a comma list of {names}')
  for t in targets:
    require(t in LORA_TARGETS, 'lora.targets', r.targets, f'names among {names} (unknown: {t!r})')
  require(len(set(targets)) == len(targets), 'lora.targets', r.targets, 'no repeated name')
  sizes = lora_dims(c.model)
  for t in targets:
    require(r.rank <= min(sizes[t]), 'lora.rank', r.rank,
            f'<= {min(sizes[t])}, the smaller dimension of target {t!r} {sizes[t]}')
  require(r.alpha > 0, 'lora.alpha', r.alpha, '> 0')
  require(0 <= r.dropout < 1, 'lora.dropout', r.dropout, 'in [0, 1)')
  require(r.base_dtype in LORA_BASE_DTYPES, 'lora.base_dtype', r.base_dtype,
          ' | '.join(LORA_BASE_DTYPES))


def _validate_distill(c: Config) -> None:
  """The distill.* checks of train.objective='distill'."""
  d = c.distill
  require(bool(d.teacher) or d.loss != 'kl', 'distill.loss', d.loss,
          "sampled or topk without distill.teacher (stored targets); 'kl' needs the teacher")
  require(not d.teacher_preset or d.teacher_preset in PRESETS, 'distill.teacher_preset',
          d.teacher_preset, "'' or one of " + ' | '.join(PRESETS))
  require(d.teacher_dtype in DISTILL_TEACHER_DTYPES, 'distill.teacher_dtype', d.teacher_dtype,
          ' | '.join(DISTILL_TEACHER_DTYPES))
  require(d.loss in DISTILL_LOSSES, 'distill.loss', d.loss, ' | '.join(DISTILL_LOSSES))
  require(1 <= d.samples <= c.model.vocab_size, 'distill.samples', d.samples,
          f'in [1, model.vocab_size = {c.model.vocab_size}]')
  require(d.temperature > 0, 'distill.temperature', d.temperature, '> 0')
  require(0 <= d.alpha <= 1, 'distill.alpha', d.alpha, 'in [0, 1]')
  require(bool(d.teacher) or not c.model.vision, 'model.vision', c.model.vision,
          "False for train.objective=distill with distill.teacher='' (the stored targets are "
          "a text teacher's)")
  hard = [m.name for m in mixture.parse_mixture(c.data.mixture) if m.labels == 'hard']
  require(not (hard and d.loss == 'kl'), 'distill.loss', d.loss,
          f'sampled or topk with labels=hard mixture sources ({", ".join(hard)}): the full '
          'KL has no per-row switch to hard labels')


def _validate_dpo(c: Config) -> None:
  """The dpo.* checks of train.objective='dpo'."""
  p = c.dpo
  require(p.loss in DPO_LOSSES, 'dpo.loss', p.loss, ' | '.join(DPO_LOSSES))
  require(p.beta > 0, 'dpo.beta', p.beta, '> 0')
  require(0 <= p.label_smoothing < 0.5, 'dpo.label_smoothing', p.label_smoothing, 'in [0, 0.5)')
  require(p.simpo_gamma >= 0, 'dpo.simpo_gamma', p.simpo_gamma, '>= 0')
  require(p.orpo_lambda >= 0, 'dpo.orpo_lambda', p.orpo_lambda, '>= 0')
  require(p.max_prompt_len >= 0, 'dpo.max_prompt_len', p.max_prompt_len, '>= 0 (0 = no limit)')
  half = c.data.seq_len // 2
  require(0 <= p.max_len <= half, 'dpo.max_len', p.max_len,
          f'in [0, data.seq_len // 2 = {half}] (both sequences of a pair share a row)')
  require(p.max_prompt_len < (p.max_len or half), 'dpo.max_prompt_len', p.max_prompt_len,
          f'< dpo.max_len ({p.max_len or half}), leaving room for the completion')
  for k in ('prompt_field', 'chosen_field', 'rejected_field'):
    require(bool(getattr(p, k)), f'dpo.{k}', getattr(p, k), 'a field name')
  require(p.reference_logps in DPO_REFERENCE_LOGPS, 'dpo.reference_logps', p.reference_logps,
          ' | '.join(DPO_REFERENCE_LOGPS))
  require(p.reference_dtype in DPO_REFERENCE_DTYPES, 'dpo.reference_dtype', p.reference_dtype,
          "'' (model.param_dtype) | " + ' | '.join(DPO_REFERENCE_DTYPES[1:]))
  require(c.data.packing, 'data.packing', c.data.packing,
          'True for train.objective=dpo (a row holds whole pairs, by segment ids)')
  require(not c.data.mixture, 'data.mixture', c.data.mixture,
          "'' for train.objective=dpo (one preference source)")
  require(not (c.lora.rank and c.lora.train_embedding), 'lora.train_embedding',
          c.lora.train_embedding, 'False for train.objective=dpo (the reference is the base '
          'with the adapters off, which needs the base embedding)')


def _validate_rl(c: Config) -> None:
  """The rl.* checks of train.objective='grpo'."""
  r, t = c.rl, c.train
  require(r.loss in RL_LOSSES, 'rl.loss', r.loss, ' | '.join(RL_LOSSES))
  for k in ('prompts_per_step', 'group_size', 'updates_per_batch', 'max_completion_len'):
    require(getattr(r, k) >= 1, f'rl.{k}', getattr(r, k), '>= 1')
  require(t.global_batch_size == r.prompts_per_step * r.group_size, 'train.global_batch_size',
          t.global_batch_size, f'rl.prompts_per_step * rl.group_size = '
          f'{r.prompts_per_step * r.group_size} for train.objective=grpo (one row per completion)')
  require(r.max_completion_len < c.data.seq_len, 'rl.max_completion_len', r.max_completion_len,
          f'< data.seq_len = {c.data.seq_len} (a row holds prompt + completion)')
  require(r.temperature > 0, 'rl.temperature', r.temperature, '> 0')
  require(0 < r.top_p <= 1, 'rl.top_p', r.top_p, 'in (0, 1]')
  require(r.top_k >= 0, 'rl.top_k', r.top_k, '>= 0 (0 = off)')
  require(r.beta >= 0, 'rl.beta', r.beta, '>= 0')
  require(0 <= r.epsilon_low < 1, 'rl.epsilon_low', r.epsilon_low, 'in [0, 1)')
  require(r.epsilon_high >= 0, 'rl.epsilon_high', r.epsilon_high, '>= 0')
  require(r.scale_rewards in RL_SCALE_REWARDS, 'rl.scale_rewards', r.scale_rewards,
          "'' (group; none for dr_grpo) | " + ' | '.join(RL_SCALE_REWARDS[1:]))
  names = [x.strip() for x in r.rewards.split(',')]
  require(all(names), 'rl.rewards', r.rewards, "comma-separated 'module:function' or built-ins")
  weights = [x.strip() for x in r.reward_weights.split(',')] if r.reward_weights else []
  ok = all(re.fullmatch(r'-?(\d+\.?\d*|\.\d+)([eE]-?\d+)?', w) for w in weights)
  require(ok and len(weights) in (0, len(names)), 'rl.reward_weights', r.reward_weights,
          f'{len(names)} comma-separated numbers, one per rl.rewards entry')
  require(bool(r.prompt_field), 'rl.prompt_field', r.prompt_field, 'a field name')
  try:
    re.compile(r.format_regex)
  except re.error as e:
    raise ConfigError(f'rl.format_regex={r.format_regex!r}: expected a regex ({e})') from None
  require(r.reference_dtype in DPO_REFERENCE_DTYPES, 'rl.reference_dtype', r.reference_dtype,
          "'' (model.param_dtype) | " + ' | '.join(DPO_REFERENCE_DTYPES[1:]))
  require(not (t.eval_every and t.eval_steps), 'train.eval_every', t.eval_every,
          '0 for train.objective=grpo (the rollout metrics are its evaluation)')
  require(not c.data.mixture, 'data.mixture', c.data.mixture,
          "'' for train.objective=grpo (one prompt source)")
  require(not c.model.vision, 'model.vision', c.model.vision,
          'False for train.objective=grpo (text prompts)')
  require(not (c.lora.rank and c.lora.train_embedding and r.beta), 'lora.train_embedding',
          c.lora.train_embedding, 'False for train.objective=grpo with rl.beta > 0 (the '
          'reference is the base with the adapters off)')
