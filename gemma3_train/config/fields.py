"""Every config field with its default and help text, as frozen dataclasses, and the presets.

The dataclasses below are the one declaration of the config: `default_config_dict()` turns them
into the ml_collections ConfigDict that config files start from (configs/base.py returns it),
`gemma3-train --helpfull` lists each field with its default and help text, and library code
only sees the frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

GLOBAL_EVERY = 6  # layer i is global (full attention) when i % 6 == 5

# The fields that fix the parameter shapes: a checkpoint resumes or initializes a model only
# when they all agree (the vocabulary may be cut from a larger table on import).
MODEL_SHAPE_FIELDS = ('vocab_size', 'num_layers', 'embed_dim', 'mlp_dim', 'num_heads',
                      'num_kv_heads', 'head_dim')

REMAT_POLICIES = ('none', 'full', 'minimal', 'save_decoder_layer_input', 'save_qkv_proj')
REMAT_UNITS = ('block', 'layer')
SCAN_UNITS = ('block', 'layer')
ATTENTION_IMPLS = ('reference', 'cudnn', 'splash', 'auto')
CONTEXT_LAYOUTS = ('balanced', 'contiguous')
DTYPES = ('float32', 'bfloat16', 'float16')
SOURCES = ('bundled', 'synthetic', 'jsonl', 'parquet', 'arrayrecord', 'tfds', 'prepared',
           'shapes')
SCHEDULES = ('cosine', 'linear', 'constant', 'wsd')
MIXTURE_EXHAUSTED = ('repeat', 'stop')
OBJECTIVES = ('ce', 'dpo', 'distill', 'grpo')  # train.objective: objectives/ implements each
DPO_LOSSES = ('sigmoid', 'ipo', 'hinge', 'orpo', 'simpo')  # dpo.loss (docs/preference.md)
DPO_REFERENCE_FREE = ('orpo', 'simpo')  # the dpo.loss values that need no reference model
DPO_REFERENCE_LOGPS = ('online', 'precompute')
DPO_REFERENCE_DTYPES = ('', 'float32', 'bfloat16', 'int8')
DISTILL_LOSSES = ('sampled', 'topk', 'kl')  # distill.loss (docs/distillation.md)
DISTILL_TEACHER_DTYPES = ('bfloat16', 'float32', 'int8')
RL_LOSSES = ('grpo', 'dapo', 'dr_grpo')  # rl.loss (docs/rl.md)
RL_SCALE_REWARDS = ('', 'group', 'batch', 'none')  # rl.scale_rewards
QAT_MODES = ('int8', 'int4_channel', 'q4_0')  # quant.qat (models/quant.py)
QAT_EMBEDDING_MODES = ('int8', 'int4_channel', 'q8_0', 'q4_0')  # quant.embedding


class ConfigError(ValueError):
  """A one-line, user-facing configuration error."""


# The published Gemma 3 text-model sizes (the 270m, 1b, 4b, 12b and 27b checkpoints' shapes).
# docs/gemma3.md section 1 tabulates them with their parameter counts.
# Configs apply these with `model.update(...)`; ModelConfig's defaults are the 1b row.
PRESETS: dict[str, dict[str, Any]] = {
    '270m': dict(num_layers=18, embed_dim=640, mlp_dim=2048, num_heads=4, num_kv_heads=1,
                 head_dim=256, query_pre_attn_scalar=256.0, sliding_window=512,
                 global_rope_scale=1.0),
    '1b': dict(num_layers=26, embed_dim=1152, mlp_dim=6912, num_heads=4, num_kv_heads=1,
               head_dim=256, query_pre_attn_scalar=256.0, sliding_window=512,
               global_rope_scale=1.0),
    '4b': dict(num_layers=34, embed_dim=2560, mlp_dim=10240, num_heads=8, num_kv_heads=4,
               head_dim=256, query_pre_attn_scalar=256.0, sliding_window=1024,
               global_rope_scale=8.0),
    '12b': dict(num_layers=48, embed_dim=3840, mlp_dim=15360, num_heads=16, num_kv_heads=8,
                head_dim=256, query_pre_attn_scalar=256.0, sliding_window=1024,
                global_rope_scale=8.0),
    '27b': dict(num_layers=62, embed_dim=5376, mlp_dim=21504, num_heads=32, num_kv_heads=16,
                head_dim=128, query_pre_attn_scalar=168.0, sliding_window=1024,
                global_rope_scale=8.0),
}
_1B = PRESETS['1b']


def _f(default: Any, help_text: str) -> Any:
  """A field's default and the help text `gemma3-train --helpfull` prints for it."""
  return dataclasses.field(default=default, metadata={'help': help_text})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  preset: str = _f('1b', 'name of the size this config describes (informational; shapes rule)')
  vocab_size: int = _f(262144, 'embedding rows; the Gemma 3 tokenizer has 262144 pieces')
  num_layers: int = _f(_1B['num_layers'], 'decoder layers; layer i is global when i % 6 == 5')
  embed_dim: int = _f(_1B['embed_dim'], 'd_model D')
  mlp_dim: int = _f(_1B['mlp_dim'], 'GeGLU hidden size F (per branch)')
  num_heads: int = _f(_1B['num_heads'], 'query heads N')
  num_kv_heads: int = _f(_1B['num_kv_heads'], 'key/value heads K (GQA); must divide num_heads')
  head_dim: int = _f(_1B['head_dim'], 'H, per-head width')
  query_pre_attn_scalar: float = _f(_1B['query_pre_attn_scalar'],
                                    'queries are scaled by this ** -0.5 (27b: 168)')
  sliding_window: int = _f(_1B['sliding_window'],
                           'a local-layer query sees this many keys, itself included')
  local_rope_base: float = _f(10_000.0, 'RoPE base on sliding-window layers')
  global_rope_base: float = _f(1_000_000.0, 'RoPE base on global layers')
  global_rope_scale: float = _f(_1B['global_rope_scale'],
                                'linear RoPE scaling factor on global layers (8.0 on 4b+)')
  rms_norm_eps: float = _f(1e-6, 'RMSNorm epsilon')
  param_dtype: str = _f('float32', 'dtype of the stored (master) parameters')
  dtype: str = _f('float32', 'compute dtype of matmuls (bfloat16 on accelerators)')
  scan_layers: bool = _f(True, 'scan over blocks of six layers (compile time O(1) in depth)')
  remat_policy: str = _f('none', ' | '.join(REMAT_POLICIES))
  remat_unit: str = _f('block', 'block: one checkpoint per scanned block of six (and per tail '
                       'layer) | layer: also one around each layer inside the block (nested), so '
                       "the block's backward holds one layer's activations at a time")
  scan_unit: str = _f('block', 'block: a scanned block runs its six layers unrolled | layer: as an '
                      'inner scan over single layers (local/global as data), so FSDP gathers one '
                      "layer's weights at a time (needs scan_layers; docs/memory.md)")
  attention_impl: str = _f('auto', 'auto (splash on TPU, cudnn on GPU in bfloat16/float16, '
                           'else reference) | reference | cudnn (GPU, 16-bit model.dtype) | '
                           'splash')
  attention_block_size: int = _f(512, 'splash attention q/kv block size (TPU)')
  context_layout: str = _f('balanced', 'with mesh.context > 1: balanced (each shard holds two '
                           'chunks from opposite ends of the sequence, so the causal work is '
                           'even) | contiguous (shard i holds the i-th slice; docs/long_context.md)')
  # The SigLIP So400m/14 encoder of the 4b, 12b and 27b checkpoints (docs/vision.md).
  vision: bool = _f(False, 'add the SigLIP image encoder and its projector: model(tokens, '
                    'images=...) (the released 4b, 12b and 27b have it)')
  vision_image_size: int = _f(896, 'image side S in pixels (images are S x S x 3 in [-1, 1])')
  vision_patch_size: int = _f(14, 'patch side; the encoder sees (S / patch)^2 patches')
  vision_width: int = _f(1152, 'encoder width')
  vision_depth: int = _f(27, 'encoder layers')
  vision_mlp_dim: int = _f(4304, 'encoder MLP hidden size')
  vision_num_heads: int = _f(16, 'encoder attention heads')
  vision_pool: int = _f(4, 'average-pool window over the patch grid: (S / patch / pool)^2 '
                        'soft tokens per image (256 for the released models)')
  vision_trainable: bool = _f(False, 'train the encoder too (else it is frozen: no gradient, '
                              'no optimizer state); the projector always trains')

  @classmethod
  def from_preset(cls, name: str, **overrides) -> 'ModelConfig':
    return cls(preset=name, **{**PRESETS[name], **overrides})

  def is_global(self, layer: int) -> bool:
    return layer % GLOBAL_EVERY == GLOBAL_EVERY - 1

  @property
  def tokens_per_image(self) -> int:
    return (self.vision_image_size // self.vision_patch_size // self.vision_pool) ** 2


# The mesh axes in mesh order: name -> (what it parallelizes, default degree within a slice).
# MeshConfig's degrees, the mesh sharding.py builds, validation and the planner all follow this
# one table; an axis of its own is a row here plus the rules (sharding.py) that use it.
MESH_AXIS_TABLE: dict[str, tuple[str, int]] = {
    'data': ('data-parallel', 1),
    'fsdp': ('fully-sharded data-parallel', -1),
    'context': ('context-parallel (the sequence of activations)', 1),
    'tensor': ('tensor-parallel', 1),
}
MESH_AXES = tuple(MESH_AXIS_TABLE)


def _ici(self) -> tuple[int, ...]:
  """The degrees within a slice, in MESH_AXES order (-1 = fill)."""
  return tuple(getattr(self, a) for a in MESH_AXES)


def _dcn(self) -> tuple[int, ...]:
  """The degrees across slices (multi-slice over DCN), in MESH_AXES order."""
  return tuple(getattr(self, f'dcn_{a}') for a in MESH_AXES)


# Field types are strings, as the annotations of the other sections are (`from __future__`).
MeshConfig = dataclasses.make_dataclass(
    'MeshConfig',
    [(a, 'int', _f(d, f'{what} degree within a slice (-1 = fill)'))
     for a, (what, d) in MESH_AXIS_TABLE.items()]
    + [(f'dcn_{a}', 'int', _f(1, f'{a} degree across slices (multi-slice, over DCN)'))
       for a in MESH_AXES]
    + [('rules', 'str', _f('', "logical->mesh overrides, e.g. "
                               "'mlp=tensor,vocab=tensor,embed=fsdp'"))],
    frozen=True, namespace={'ici': _ici, 'dcn': _dcn, '__module__': __name__})


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = _f('bundled', ' | '.join(SOURCES) + " (left at 'bundled' with "
                   'data.train_path set: taken from its kind, .jsonl[.gz] | .parquet | '
                   '.arrayrecord | a prepared directory)')
  train_path: str = _f('', 'file, glob or comma list (local or gs://) for train data')
  eval_path: str = _f('', "same for the held-out eval split ('' = source's own eval split)")
  format: str = _f('text', 'text (pretraining) | chat (SFT with Gemma chat format)')
  text_field: str = _f('text', 'field holding the document text (jsonl, parquet, tfds)')
  messages_field: str = _f('messages', 'field holding chat messages [{role, content}, ...]')
  tfds_name: str = _f('', "TFDS dataset name, e.g. 'lm1b' (needs the tfds extra)")
  tfds_eval_split: str = _f('test', 'TFDS split used for eval')
  tokenizer_path: str = _f('', "SentencePiece model ('' = the bundled Gemma 3 tokenizer)")
  seq_len: int = _f(1024, 'tokens per packed row')
  packing: bool = _f(True, 'pack documents into rows (segment_ids, positions); else pad')
  shuffle: bool = _f(True, 'shuffle documents by (seed, epoch)')
  seed: int = _f(0, 'data shuffling seed')
  num_workers: int = _f(0, 'grain worker processes (0 = in the main process)')
  prefetch: int = _f(2, 'batches prefetched ahead of the train step (prepared data on gs://: '
                     'chunks of records read ahead; local prepared shards are read inline)')
  mixture: str = _f('', "train sources mixed by weight, ';'-separated 'NAME:WEIGHT key=value "
                     "...' (keys: source, train_path, format, text_field, messages_field, "
                     "tfds_name; unset keys inherit data.*; labels=hard: under "
                     "train.objective=distill the source's rows learn their next tokens, not "
                     "the teacher), e.g. 'web:0.7 source=jsonl train_path=web/*.jsonl; "
                     "code:0.3 source=prepared train_path=code'")
  images_field: str = _f('images', "text rows' list of image paths (model.vision), taken in "
                         'order by the <start_of_image> markers of the text')
  max_images: int = _f(2, 'image slots per packed row (model.vision); a document with more '
                       'is an error naming its row')
  pan_and_scan: bool = _f(False, 'model.vision: add square crops of images that are not '
                          'square, after the whole image (Hugging Face do_pan_and_scan)')
  mixture_exhausted: str = _f('repeat', 'a mixture source that runs out: repeat (next epoch, '
                              'reshuffled) | stop (the train data ends)')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = _f(3e-4, 'peak learning rate')
  schedule: str = _f('cosine', ' | '.join(SCHEDULES) + ' (all after linear warmup)')
  warmup_steps: int = _f(100, 'linear warmup from 0 to lr')
  decay_fraction: float = _f(0.2, 'wsd only: fraction of steps spent in the final decay')
  min_lr_ratio: float = _f(0.1, 'final lr as a fraction of peak (cosine, linear, wsd)')
  b1: float = _f(0.9, 'Adam beta1')
  b2: float = _f(0.95, 'Adam beta2')
  eps: float = _f(1e-8, 'Adam epsilon')
  weight_decay: float = _f(0.1, 'decoupled weight decay on matrices')
  decay_norms: bool = _f(False, 'also apply weight decay to norm scales')
  decay_embedding: bool = _f(False, 'also apply weight decay to the embedding table')
  clip_norm: float = _f(1.0, 'global gradient-norm clip (0 = off)')
  grad_accum_steps: int = _f(1, 'microbatches per step (a scan inside the step)')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  seed: int = _f(0, 'parameter init seed')
  num_steps: int = _f(1000, 'optimizer steps in the whole run')
  global_batch_size: int = _f(8, 'rows per optimizer step over all processes')
  objective: str = _f('ce', 'what a train step optimizes: ' + ' | '.join(OBJECTIVES)
                      + ' (ce: the next token cross entropy of pretraining and SFT; dpo: '
                      'preference pairs, the dpo.* fields; distill: a frozen teacher, the '
                      'distill.* fields; grpo: RL with verifiable rewards, the rl.* fields)')
  eval_every: int = _f(200, 'run eval every N steps (0 = never)')
  eval_steps: int = _f(10, 'eval batches per eval')
  loss_chunk_size: int = _f(1024, 'tokens per chunk of the chunked cross-entropy')
  loss_vocab_parallel: bool = _f(False, "split the loss's vocabulary over the batch axes (each "
                                 "chunk's rows gathered): no whole table or [D, V] gradient "
                                 'partial per chip (docs/memory.md)')
  sample_every: int = _f(0, 'sample train.sample_prompts (greedy, 32 tokens) every N steps into '
                         'the log, metrics.jsonl and TensorBoard (0 = never)')
  sample_prompts: str = _f('The capital of France is|Once upon a time',
                           "prompts to sample, separated by '|'")
  eval_tasks: str = _f('', 'comma-separated lm-evaluation-harness tasks (hellaswag,arc_easy) run '
                       'on the current params every train.eval_tasks_every steps, logged as '
                       "eval/TASK/METRIC (needs the eval extra; docs/evaluation.md)")
  eval_tasks_every: int = _f(0, 'run train.eval_tasks every N steps (0 = never)')
  eval_tasks_limit: int = _f(0, 'at most N documents per train.eval_tasks task (0 = all)')
  eval_tasks_include_path: str = _f('', 'a folder of local task YAMLs for train.eval_tasks')
  z_loss: float = _f(0.0, 'weight of the z-loss (log Z)^2 term (0 = off)')
  cache_dir: str = _f('~/.cache/gemma3_train', "per-machine cache: jax's persistent "
                      "compilation cache (jax/) and the measured CPU matmul peak ('' = off)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = _f(200, 'save every N steps (0 = only at the end and on SIGTERM)')
  keep: int = _f(3, 'keep the newest K checkpoints')
  keep_period: int = _f(0, 'also keep every M-th step forever (0 = off)')
  async_save: bool = _f(True, 'write checkpoints in the background')
  init_from: str = _f('', 'params-only init: our checkpoint, HF dir or Kaggle dir')
  lease_timeout_s: float = _f(300.0, 'a workdir lease without heartbeat this long is stale '
                               'and taken over (its run died)')


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  log_every: int = _f(10, 'progress line and metrics.jsonl row every N steps')
  tensorboard: bool = _f(True, 'write TensorBoard event files under workdir')
  profile_steps: str = _f('', "comma list of steps to trace with jax.profiler, e.g. '5,6'")
  peak_tflops: float = _f(0.0, 'per-device peak for MFU (0 = from the chip table)')


# LoRA target names: the attention projections and the MLP's three matrices.
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
LORA_BASE_DTYPES = ('float32', 'bfloat16', 'int8')


def lora_dims(m: 'ModelConfig') -> dict[str, tuple[int, int]]:
  """(input size, output size) of each LoRA target's projection."""
  q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  return {'q': (m.embed_dim, q), 'k': (m.embed_dim, kv), 'v': (m.embed_dim, kv),
          'o': (q, m.embed_dim), 'gate': (m.embed_dim, m.mlp_dim),
          'up': (m.embed_dim, m.mlp_dim), 'down': (m.mlp_dim, m.embed_dim)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = _f(0, 'adapter rank (0 = off: full training); > 0 trains adapters only')
  alpha: float = _f(16.0, 'adapter scale alpha / rank (as PEFT lora_alpha)')
  dropout: float = _f(0.0, "dropout on the adapters' input (as PEFT lora_dropout)")
  targets: str = _f(','.join(LORA_TARGETS), 'comma list of adapted projections: '
                    + ' | '.join(LORA_TARGETS))
  train_embedding: bool = _f(False, 'also train the (tied) embedding table')
  base_dtype: str = _f('float32', 'frozen base storage: ' + ' | '.join(LORA_BASE_DTYPES)
                       + ' (int8: weight-only, per-channel scales)')
  init_adapter: str = _f('', 'start from this PEFT adapter directory (else B = 0)')

  def target_list(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.targets.split(',') if t.strip())


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization-aware training (docs/quantization.md): weights fake-quantized in the forward
  pass, the gradient passed straight through."""
  qat: str = _f('', "the decoder's linear weights: '' (off) | " + ' | '.join(QAT_MODES)
                + ' (int4_channel: int4 per output channel; q4_0: GGUF Q4_0 blocks of 32 with '
                'a float16 scale; int8: int8 per output channel)')
  embedding: str = _f('', "the embedding table (also the tied LM head): '' (float) | "
                      + ' | '.join(QAT_EMBEDDING_MODES))


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """train.objective='dpo': preference pairs (docs/preference.md; TRL's DPO/CPO/ORPO trainers'
  formulas and defaults)."""
  loss: str = _f('sigmoid', ' | '.join(DPO_LOSSES) + ' (orpo and simpo need no reference)')
  beta: float = _f(0.1, "the reward scale beta (TRL's DPOConfig/CPOConfig beta; IPO's tau)")
  label_smoothing: float = _f(0.0, 'conservative DPO / SimPO: the assumed share of flipped '
                              'labels, in [0, 0.5)')
  simpo_gamma: float = _f(0.5, "simpo: the target reward margin gamma (TRL's simpo_gamma)")
  orpo_lambda: float = _f(0.1, "orpo: the weight of the odds-ratio term (TRL's ORPOConfig "
                          'beta); the chosen NLL has weight 1')
  prompt_field: str = _f('prompt', 'field of the prompt: a string or a list of messages')
  chosen_field: str = _f('chosen', 'field of the preferred completion (string or messages)')
  rejected_field: str = _f('rejected', 'field of the dispreferred completion')
  max_prompt_len: int = _f(0, 'prompt tokens kept, from the end (0 = no limit)')
  max_len: int = _f(0, 'tokens of prompt + completion kept, completion cut from the end '
                    '(0 = data.seq_len // 2: both sequences of a pair fit one row)')
  reference_logps: str = _f('online', 'online (a frozen reference each step) | precompute '
                            '(one pass before training; no reference held while training)')
  reference_logps_dir: str = _f('', "precompute: where the tables are stored ('' = "
                                "WORKDIR/reference_logps)")
  reference_dtype: str = _f('', "a full fine-tune's frozen reference: '' (model.param_dtype) "
                            '| float32 | bfloat16 | int8 (projections int8 per output channel, the rest '
                            'bfloat16)')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """train.objective='distill': knowledge distillation from a frozen teacher of any size with
  the same tokenizer (docs/distillation.md)."""
  teacher: str = _f('', 'the teacher checkpoint: one of our workdirs or checkpoints, a HF or '
                    "Kaggle directory (its shapes are read from it); '' = offline: the "
                    'targets stored in the prepared shards (gemma3-data prepare --teacher)')
  teacher_preset: str = _f('', "the teacher's architecture from a preset (e.g. 27b) instead of "
                           "its checkpoint's config, e.g. to compile without the checkpoint "
                           "(--aot_topology); '' = read it from the checkpoint")
  teacher_dtype: str = _f('bfloat16', "the teacher's storage dtype: "
                          + ' | '.join(DISTILL_TEACHER_DTYPES))
  loss: str = _f('sampled', ' | '.join(DISTILL_LOSSES) + " (sampled: the Gemma 3 report's "
                 "distill.samples draws per token; topk: the teacher's top distill.samples; "
                 'kl: the full-vocabulary KL(teacher || student))')
  samples: int = _f(256, 'sampled: token ids drawn per position (with replacement); topk: k')
  temperature: float = _f(1.0, "the teacher's softmax temperature (the student's is 1)")
  alpha: float = _f(0.0, 'loss = (1 - alpha) * distillation + alpha * next-token CE on the data')


@dataclasses.dataclass(frozen=True)
class RlConfig:
  """train.objective='grpo': RL with verifiable rewards (docs/rl.md; TRL's GRPOConfig formulas
  and defaults)."""
  loss: str = _f('dapo', ' | '.join(RL_LOSSES) + " (TRL's loss_type: grpo a per-sequence mean, "
                 'dapo a token mean over the batch, dr_grpo a sum over max_completion_len)')
  prompts_per_step: int = _f(4, 'prompts read per rollout; train.global_batch_size must be '
                             'rl.prompts_per_step * rl.group_size')
  group_size: int = _f(8, "completions sampled per prompt (TRL's num_generations)")
  updates_per_batch: int = _f(1, "optimizer steps on each rollout batch (TRL's num_iterations)")
  max_completion_len: int = _f(256, 'new tokens per completion at most; data.seq_len holds '
                               'prompt + completion')
  temperature: float = _f(1.0, 'sampling temperature (> 0); log-probabilities use the same')
  top_p: float = _f(1.0, 'nucleus sampling mass (1 = off)')
  top_k: int = _f(0, 'sample among the k most likely tokens (0 = off)')
  beta: float = _f(0.0, 'weight of the k3 KL to a frozen reference (0 = no reference held)')
  epsilon_low: float = _f(0.2, "the ratio's lower clip 1 - epsilon_low (TRL's epsilon)")
  epsilon_high: float = _f(0.2, "the ratio's upper clip 1 + epsilon_high (DAPO: 0.28)")
  scale_rewards: str = _f('', "advantages divided by the reward std of the group | batch | none "
                          "('' = group, none for rl.loss=dr_grpo)")
  rewards: str = _f('accuracy', "comma-separated reward functions: 'module:function' or a "
                    'built-in (accuracy, format, length)')
  reward_weights: str = _f('', "comma-separated weights, one per reward ('' = all 1)")
  prompt_field: str = _f('prompt', 'field of the prompt: a string, a list of messages, or token '
                         'ids; the other fields go to the rewards')
  format_regex: str = _f(r'####\s*-?[\d,]*\.?\d+', 'the format reward: 1 when the completion '
                         'matches (re.search)')
  reference_dtype: str = _f('', "a full fine-tune's frozen reference: '' (model.param_dtype) "
                            '| float32 | bfloat16 | int8 (projections int8 per output channel, the rest '
                            'bfloat16)')


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = _f(ModelConfig(), 'Gemma 3 decoder shape (defaults: the 1b preset)')
  mesh: MeshConfig = _f(MeshConfig(), 'device mesh and sharding')
  data: DataConfig = _f(DataConfig(), 'sources, tokenizer, packing')
  optim: OptimConfig = _f(OptimConfig(), 'optax AdamW, schedule, clipping, accumulation')
  train: TrainConfig = _f(TrainConfig(), 'loop lengths, batch, loss')
  checkpoint: CheckpointConfig = _f(CheckpointConfig(), 'orbax saves and fine-tune init')
  logging: LoggingConfig = _f(LoggingConfig(), 'metrics, TensorBoard, profiles')
  lora: LoraConfig = _f(LoraConfig(), 'LoRA / QLoRA adapters on a frozen base (init_from)')
  quant: QuantConfig = _f(QuantConfig(), 'quantization-aware training (quant.qat)')
  dpo: DpoConfig = _f(DpoConfig(), 'preference tuning (train.objective=dpo)')
  distill: DistillConfig = _f(DistillConfig(), 'knowledge distillation (train.objective=distill)')
  rl: RlConfig = _f(RlConfig(), 'RL with verifiable rewards (train.objective=grpo)')

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  def replace(self, **sections) -> 'Config':
    """Returns a copy with fields changed, e.g. replace(train=dict(num_steps=5))."""
    new = {k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items()}
    return dataclasses.replace(self, **new)


@dataclasses.dataclass(frozen=True)
class FieldDoc:
  name: str  # dotted, e.g. 'optim.lr'
  default: Any
  help: str


def sections() -> list[tuple[str, str]]:
  """(section name, help text) in declaration order."""
  return [(s.name, s.metadata['help']) for s in dataclasses.fields(Config)]


def field_docs() -> list[FieldDoc]:
  """Every field of every section, in declaration order."""
  return [FieldDoc(f'{s.name}.{f.name}', f.default, f.metadata['help'])
          for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default)]


def default_config_dict() -> ml_collections.ConfigDict:
  """The defaults as the ConfigDict that config files change (configs/base.py returns it)."""
  return ml_collections.ConfigDict(dataclasses.asdict(Config()))


def use_chat_data(c: ml_collections.ConfigDict) -> None:
  """The data fields of a chat fine-tuning config (configs/sft_*, lora_*): JSONL chats in the
  Gemma chat format, loss on the model turns; the paths are placeholders to override."""
  c.data.source = 'jsonl'
  c.data.format = 'chat'
  c.data.train_path = 'chats/train.jsonl'  # your chat JSONL (local or gs://, globs)
  c.data.eval_path = 'chats/eval.jsonl'  # held-out chats
