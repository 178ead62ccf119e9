"""The hint for an unknown config field: the names other trainers give our fields (Hugging Face
TrainingArguments, PEFT, Lightning, nanoGPT-style scripts) map to ours, in any section.

  suggest('optim.learning_rate') -> 'optim.lr'
  suggest('train.max_grad_norm') -> 'optim.clip_norm'
"""

from __future__ import annotations

import difflib

from gemma3_train.config.fields import field_docs

# Other trainers' spelling -> (our dotted field, a note where the meaning differs).
ALIASES: dict[str, tuple[str, str]] = {}


def _alias(target: str, *names: str, note: str = '') -> None:
  for name in names:
    ALIASES[name] = (target, note)


_alias('optim.lr', 'learning_rate', 'peak_lr', 'max_lr', 'base_lr', 'lr_rate')
_alias('optim.schedule', 'lr_schedule', 'scheduler', 'lr_scheduler', 'lr_scheduler_type',
       'schedule_type', 'decay_schedule')
_alias('optim.warmup_steps', 'warmup', 'num_warmup_steps', 'lr_warmup_steps', 'warmup_iters')
_alias('optim.warmup_steps', 'warmup_ratio', 'warmup_fraction',
       note='a number of steps, not a fraction of the run')
_alias('optim.min_lr_ratio', 'min_lr', 'final_lr', note='a fraction of optim.lr')
_alias('optim.weight_decay', 'wd', 'decay')
_alias('optim.clip_norm', 'max_grad_norm', 'grad_clip', 'gradient_clip_val', 'clip_grad_norm',
       'grad_clip_norm', 'clip_grad')
_alias('optim.grad_accum_steps', 'gradient_accumulation_steps', 'grad_accum',
       'accumulate_grad_batches', 'gradient_accumulation', 'accum_steps')
_alias('optim.b1', 'adam_beta1', 'beta1')
_alias('optim.b2', 'adam_beta2', 'beta2')
_alias('optim.eps', 'adam_epsilon', 'epsilon', 'adam_eps')
_alias('train.global_batch_size', 'batch_size', 'train_batch_size', 'global_batch',
       'total_batch_size', 'global_batch_size')
_alias('train.global_batch_size', 'per_device_train_batch_size', 'micro_batch_size',
       'per_device_batch_size', note='rows per step over all devices, not per device')
_alias('train.num_steps', 'max_steps', 'num_train_steps', 'steps', 'total_steps',
       'train_steps', 'max_iters', 'num_iterations', 'training_steps')
_alias('train.seed', 'seed', 'random_seed', note='the init seed; data.seed shuffles the data')
_alias('train.eval_every', 'eval_steps', 'eval_interval', 'eval_freq', 'evaluation_steps',
       'val_check_interval',
       note='evaluate every N steps; train.eval_steps is the number of batches per eval')
_alias('train.eval_steps', 'eval_iters', 'eval_batches', 'num_eval_batches')
_alias('checkpoint.every', 'save_steps', 'save_every', 'checkpoint_every', 'ckpt_every',
       'save_interval', 'checkpoint_steps')
_alias('checkpoint.keep', 'save_total_limit', 'max_to_keep', 'keep_checkpoints')
_alias('checkpoint.init_from', 'model_name_or_path', 'init_checkpoint', 'pretrained',
       'pretrained_model', 'base_model', 'resume_from')
_alias('logging.log_every', 'logging_steps', 'log_interval', 'log_steps', 'log_freq')
_alias('data.seq_len', 'seq_length', 'max_seq_length', 'max_length', 'block_size',
       'max_seq_len', 'sequence_length', 'context_length', 'max_len', 'seqlen', 'seq_len')
_alias('data.train_path', 'train_file', 'train_data', 'data_path', 'dataset_path',
       'train_files', 'data_files')
_alias('data.eval_path', 'validation_file', 'eval_file', 'eval_data', 'valid_path',
       'val_path', 'validation_path')
_alias('data.tokenizer_path', 'tokenizer', 'tokenizer_name', 'tokenizer_name_or_path',
       'tokenizer_model')
_alias('lora.rank', 'lora_r', 'r', 'lora_rank')
_alias('lora.alpha', 'lora_alpha')
_alias('lora.dropout', 'lora_dropout')
_alias('lora.targets', 'target_modules', 'lora_target_modules')
_alias('model.remat_policy', 'gradient_checkpointing', 'activation_checkpointing', 'remat')


def suggest(name: str) -> tuple[str, str] | None:
  """(the dotted field meant by an unknown `name`, a note or '') or None.

  In order: another trainer's name for a field (whatever section it was given in), a field of
  ours given in the wrong section (its last part names exactly one field), then the closest
  spelling of a whole dotted name."""
  fields = [d.name for d in field_docs()]
  leaf = name.rpartition('.')[2]
  if leaf in ALIASES:
    target, note = ALIASES[leaf]
    if target != name:
      return target, note
  same_leaf = [f for f in fields if f.rpartition('.')[2] == leaf]
  if len(same_leaf) == 1:
    return same_leaf[0], ''
  close = difflib.get_close_matches(name, fields, n=1)
  return (close[0], '') if close else None


def hint(name: str, prefix: str = '') -> str:
  """'; did you mean PREFIXfield?' (with the note in parentheses), or ''."""
  found = suggest(name)
  if found is None:
    return ''
  target, note = found
  return f'; did you mean {prefix}{target}' + (f' ({note})' if note else '') + '?'
