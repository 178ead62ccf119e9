"""Every config field, declared once. Size and task configs import this and change deltas.

Run: gemma3-train --config=configs/tiny.py --workdir=/tmp/run [--config.optim.lr=1e-3 ...]
Each field's trailing comment is its documentation (`gemma3-train --helpfull` prints it).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- model: Gemma 3 decoder shape (defaults are the 1b preset) -----------
  c.model = ml_collections.ConfigDict()
  c.model.preset = '1b'  # name of the size this config describes (informational; shapes below rule)
  c.model.vocab_size = 262144  # embedding rows; the Gemma 3 tokenizer has 262144 pieces
  c.model.num_layers = 26  # decoder layers; layer i is global when i % 6 == 5
  c.model.embed_dim = 1152  # d_model D
  c.model.mlp_dim = 6912  # GeGLU hidden size F (per branch)
  c.model.num_heads = 4  # query heads N
  c.model.num_kv_heads = 1  # key/value heads K (GQA); must divide num_heads
  c.model.head_dim = 256  # H, per-head width
  c.model.query_pre_attn_scalar = 256.0  # queries are scaled by this ** -0.5 (27b: 168)
  c.model.sliding_window = 512  # a local-layer query sees this many keys, itself included
  c.model.local_rope_base = 10_000.0  # RoPE base on sliding-window layers
  c.model.global_rope_base = 1_000_000.0  # RoPE base on global layers
  c.model.global_rope_scale = 1.0  # linear RoPE scaling factor on global layers (8.0 on 4b+)
  c.model.rms_norm_eps = 1e-6  # RMSNorm epsilon
  c.model.param_dtype = 'float32'  # dtype of the stored (master) parameters
  c.model.dtype = 'float32'  # compute dtype of matmuls (bfloat16 on accelerators)
  c.model.scan_layers = True  # scan over blocks of six layers (compile time O(1) in depth)
  c.model.remat_policy = 'none'  # none | full | minimal | save_decoder_layer_input | save_qkv_proj
  c.model.attention_impl = 'auto'  # auto (splash on TPU, cudnn on GPU, else reference) | reference | cudnn | splash
  c.model.attention_block_size = 512  # splash attention q/kv block size (TPU)

  # --- mesh: device mesh and sharding --------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel degree within a slice (-1 = fill)
  c.mesh.fsdp = -1  # fully-sharded data-parallel degree within a slice (-1 = fill)
  c.mesh.tensor = 1  # tensor-parallel degree within a slice (-1 = fill)
  c.mesh.dcn_data = 1  # data-parallel degree across slices (multi-slice over DCN)
  c.mesh.dcn_fsdp = 1  # fsdp degree across slices
  c.mesh.dcn_tensor = 1  # tensor degree across slices
  c.mesh.rules = ''  # logical->mesh overrides, e.g. 'mlp=tensor,vocab=tensor,embed=fsdp'

  # --- data: sources, tokenizer, packing ------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = 'bundled'  # bundled | synthetic | jsonl | parquet | arrayrecord | tfds
  c.data.train_path = ''  # file, glob or comma list (local or gs://) for train data
  c.data.eval_path = ''  # same for the held-out eval split ('' = source's own eval split)
  c.data.format = 'text'  # text (pretraining) | chat (SFT with Gemma chat format)
  c.data.text_field = 'text'  # field holding the document text (jsonl, parquet, tfds)
  c.data.messages_field = 'messages'  # field holding chat messages [{role, content}, ...]
  c.data.tfds_name = ''  # TFDS dataset name, e.g. 'lm1b' (needs the tfds extra)
  c.data.tfds_eval_split = 'test'  # TFDS split used for eval
  c.data.tokenizer_path = ''  # SentencePiece model ('' = the bundled Gemma 3 tokenizer)
  c.data.seq_len = 1024  # tokens per packed row
  c.data.packing = True  # pack documents into rows (segment_ids, positions); else pad
  c.data.shuffle = True  # shuffle documents by (seed, epoch)
  c.data.seed = 0  # data shuffling seed
  c.data.num_workers = 0  # grain worker processes (0 = in the main process)
  c.data.prefetch = 2  # batches prefetched ahead of the train step

  # --- optim: optax AdamW, schedule, clipping, accumulation -----------------
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4  # peak learning rate
  c.optim.schedule = 'cosine'  # cosine | linear | constant | wsd (all after linear warmup)
  c.optim.warmup_steps = 100  # linear warmup from 0 to lr
  c.optim.decay_fraction = 0.2  # wsd only: fraction of steps spent in the final decay
  c.optim.min_lr_ratio = 0.1  # final lr as a fraction of peak (cosine, linear, wsd)
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.95  # Adam beta2
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.weight_decay = 0.1  # decoupled weight decay on matrices
  c.optim.decay_norms = False  # also apply weight decay to norm scales
  c.optim.decay_embedding = False  # also apply weight decay to the embedding table
  c.optim.clip_norm = 1.0  # global gradient-norm clip (0 = off)
  c.optim.grad_accum_steps = 1  # microbatches per step (a scan inside the step)

  # --- train: loop lengths, batch, loss -------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.seed = 0  # parameter init seed
  c.train.num_steps = 1000  # optimizer steps in the whole run
  c.train.global_batch_size = 8  # rows per optimizer step over all processes
  c.train.eval_every = 200  # run eval every N steps (0 = never)
  c.train.eval_steps = 10  # eval batches per eval
  c.train.loss_chunk_size = 1024  # tokens per chunk of the chunked cross-entropy
  c.train.z_loss = 0.0  # weight of the z-loss (log Z)^2 term (0 = off)

  # --- checkpoint: orbax saves and fine-tune init ---------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200  # save every N steps (0 = only at the end and on SIGTERM)
  c.checkpoint.keep = 3  # keep the newest K checkpoints
  c.checkpoint.keep_period = 0  # also keep every M-th step forever (0 = off)
  c.checkpoint.async_save = True  # write checkpoints in the background
  c.checkpoint.init_from = ''  # params-only init: our checkpoint, HF dir or Kaggle dir

  # --- logging: metrics, TensorBoard, profiles ------------------------------
  c.logging = ml_collections.ConfigDict()
  c.logging.log_every = 10  # progress line and metrics.jsonl row every N steps
  c.logging.tensorboard = True  # write TensorBoard event files under workdir
  c.logging.profile_steps = ''  # comma list of steps to trace with jax.profiler, e.g. '5,6'
  c.logging.peak_tflops = 0.0  # per-device peak for MFU (0 = from the chip table)

  return c
