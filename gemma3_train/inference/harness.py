"""EleutherAI's lm-evaluation-harness over our model: Gemma3LM, an lm_eval `LM`, and
run_tasks, which runs harness tasks by name (the harness's own, or local YAMLs).

Gemma3LM answers the harness's three request kinds:
  loglikelihood(_rolling)  the chunked LM head (lm_head.py) over right-padded rows sorted by
                           length; only the continuation's positions reach the head, so a long
                           context costs its forward pass and no [L, V] logits;
  generate_until           the KV-cache sampler (sampler.py) with the request's max_gen_toks and
                           sampling settings, stopping each row at its first `until` string
                           (checked between chunks of decode steps); the text is cut there; a
                           vision model (MULTIMODAL) takes a multimodal task's images;
  apply_chat_template      the Gemma 3 chat format (docs/gemma3.md section 4).
Every sequence starts with BOS, as training documents do (Gemma 3 scores badly without it; the
harness's `hf` model needs add_bos_token=True for the same inputs). Text is tokenized as the
harness's `hf` model does it: a context and context + continuation are encoded whole and the
continuation is the difference.

Only the CLI (--tasks) and the trainer (train.eval_tasks) import this module, so lm_eval is
loaded when a harness task is run and never at start-up.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api import model as lm_model
from lm_eval.models import utils as lm_model_utils
from tqdm import tqdm

from gemma3_train import config as config_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import image_prompts
from gemma3_train.inference import sampler as sampler_lib
from gemma3_train.models import lm_head
from gemma3_train import sharding

log = logging.getLogger(__name__)

_BOS_TEXT = '<bos>'  # a chat-templated context starts with it (the hf model's tokenizer text)
_EOS_TEXT = '<eos>'  # the harness adds the EOS text to every request's `until`
_IMAGE_TEXT = '<image>'  # where a multimodal task's context puts an image (the harness's)
_CHUNK = config_lib.TrainConfig().loss_chunk_size
MAX_GEN_TOKS = 256  # the harness's default for a request that names none (its hf model's)


class HarnessError(ValueError):
  """A task the harness cannot run here (missing dataset, unknown name): one line."""


def _bucket(n: int, step: int) -> int:
  """n rounded up to a multiple of step, so that nearby lengths share a compiled call."""
  return max(step, -(-n // step) * step)


def _length_bucket(n: int) -> int:
  # Multiples of 32 up to 256, then of 128: few compiles, little padding either way.
  return _bucket(n, 32 if n <= 256 else 128)


def _continuation_scores(graphdef, state, inputs_BL, starts_B, targets_BK, *, chunk_size: int,
                         mesh, rules):
  """(log p(target) [B, K], target is the argmax [B, K]) at positions starts_B + k: the hidden
  states of the whole row, the LM head only at the K positions that predict the continuation."""
  with sharding.use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext():
    model = nnx.merge(graphdef, state)
    x_BLD = model.hidden(inputs_BL)
    K = targets_BK.shape[1]
    idx_BK = jnp.minimum(starts_B[:, None] + jnp.arange(K, dtype=jnp.int32)[None, :],
                         inputs_BL.shape[1] - 1)
    x_BKD = jnp.take_along_axis(x_BLD, idx_BK[:, :, None], axis=1)
    table_VD = model.embedder.table()
    # lm_head.token_logprobs' chunks, keeping the max logit too (is_greedy: the harness's acc
    # on loglikelihood tasks); no gradients here, so no checkpoint.
    x_nBCD, targets_nBC = lm_head.chunks(chunk_size, x_BKD, targets_BK)

    def body(_, xs):
      x_BCD, t_BC = xs
      logits_BCV = lm_head.chunk_logits(x_BCD, table_VD)
      lse_BC, target_BC, max_BC = lm_head.chunk_stats(logits_BCV, t_BC)
      return None, (target_BC - lse_BC, target_BC >= max_BC)

    _, (logp_nBC, greedy_nBC) = lm_head.scan_chunks(body, None, (x_nBCD, targets_nBC),
                                                    targets_nBC.shape[0])
    B = targets_BK.shape[0]
    flat = lambda a: a.swapaxes(0, 1).reshape(B, -1)[:, :K]
    return flat(logp_nBC), flat(greedy_nBC)


def chat_text(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
  """The Gemma 3 chat template as text: <bos>, then <start_of_turn>{user|model}\\n{content,
  trimmed}<end_of_turn>\\n per turn (a system message opens the first user turn), then
  <start_of_turn>model\\n; without the generation prompt the last turn is left open (the
  harness's continue_final_message)."""
  messages = list(messages)
  system = ''
  if messages and messages[0]['role'] == 'system':
    system = messages.pop(0)['content'].strip() + '\n\n'
  out = [_BOS_TEXT]
  for i, m in enumerate(messages):
    role = {'assistant': 'model'}.get(m['role'], m['role'])
    want = 'user' if i % 2 == 0 else 'model'
    if role != want:
      raise ValueError(f'chat message {i} has role {m["role"]!r} where {want!r} was expected '
                       '(roles alternate user/model from user)')
    text = (system if i == 0 else '') + m['content'].strip()
    out.append(f'<start_of_turn>{role}\n{text}<end_of_turn>\n')
  if add_generation_prompt:
    out.append('<start_of_turn>model\n')
  elif len(out) > 1:
    out[-1] = out[-1][:-len('<end_of_turn>\n')]
  return ''.join(out)


class Gemma3LM(lm_model.TemplateLM):
  """An lm_eval LM over a Gemma 3 model (gemma3_train.load's, or the trainer's graph with
  set_params each eval). mesh/rules: run sharded over that mesh, as training does.

  Over several processes it stays the harness's rank 0 of 1 in each: every jitted call is
  collective over the mesh, so every process runs every request (none splits the documents)
  and gathers each batch's answers; all end with the same results."""

  def __init__(self, model, tokenizer: tokenizer_lib.Tokenizer | None = None, *,
               batch_size: int = 16, max_length: int | None = None,
               max_gen_toks: int = MAX_GEN_TOKS, chunk_size: int = _CHUNK, mesh=None,
               rules: dict[str, tuple[str, ...]] | None = None, seed: int = 0):
    super().__init__()
    self.tok = tokenizer or tokenizer_lib.Tokenizer()
    self.cfg = model.cfg
    self.sampler = sampler_lib.Sampler(model, mesh, rules)
    self.mesh, self.rules = mesh, self.sampler.rules
    self.params = self.sampler.state
    degree = 1 if mesh is None else mesh.shape['data'] * mesh.shape['fsdp']
    self.batch_size = _bucket(batch_size, degree)
    self.max_length = max_length or sampler_lib.context_length(model.cfg)
    self.max_gen_toks = max_gen_toks
    self.seed = seed
    if model.cfg.vision:  # the harness then hands it multimodal tasks' images
      self.MULTIMODAL = True  # pylint: disable=invalid-name
    self._score = jax.jit(lambda state, i, s, t: _continuation_scores(
        self.sampler.graphdef, state, i, s, t, chunk_size=chunk_size, mesh=mesh,
        rules=self.rules))

  def set_params(self, params) -> None:
    """Score and sample these params (an nnx.State of the model's graph) from now on."""
    self.params = params

  # --- tokens -------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return tokenizer_lib.EOS

  @property
  def prefix_token_id(self) -> int:
    return tokenizer_lib.BOS

  @property
  def tokenizer_name(self) -> str:
    return 'gemma3'

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return 'gemma3' if chat_template else None

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """[BOS] + pieces (a leading '<bos>' text is that BOS); add_special_tokens=False: the
    pieces alone."""
    del kwargs
    if add_special_tokens is False:
      ids = self.tok.encode(string)
    else:
      ids = [tokenizer_lib.BOS] + self.tok.encode(string.removeprefix(_BOS_TEXT))
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, ids) -> str:
    return self.tok.decode(ids)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    return chat_text(chat_history, add_generation_prompt)

  # --- log-likelihoods ------------------------------------------------------------

  def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], progress: bool = False
                   ) -> list[tuple[float, bool]]:
    """(summed log p(continuation | context), whether every continuation token is the argmax)
    per (context ids, continuation ids); a row longer than max_length + 1 loses its oldest
    context tokens. Rows run longest first, batch_size at a time."""
    rows = []
    for ctx, cont in pairs:
      seq = (list(ctx) + list(cont))[-(self.max_length + 1):]
      rows.append((seq, min(len(cont), len(seq) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    B = self.batch_size
    bar = tqdm(total=len(rows), desc='loglikelihood', disable=not progress)
    for first in range(0, len(order), B):
      batch = order[first:first + B]
      L = _length_bucket(max(len(rows[i][0]) - 1 for i in batch))
      K = _bucket(max(rows[i][1] for i in batch), 16)
      inputs = np.zeros((B, L), np.int32)
      targets = np.zeros((B, K), np.int32)
      starts = np.zeros((B,), np.int32)
      for b, i in enumerate(batch):
        seq, n = rows[i]
        inputs[b, :len(seq) - 1] = seq[:-1]
        targets[b, :n] = seq[len(seq) - n:]
        starts[b] = len(seq) - 1 - n
      logp, greedy = map(sampler_lib.to_host,
                         self._score(self.params, *self._put(inputs, starts, targets)))
      for b, i in enumerate(batch):
        n = rows[i][1]
        out[i] = (float(np.sum(logp[b, :n], dtype=np.float64)), bool(np.all(greedy[b, :n])))
      bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]

  def _put(self, *arrays):
    """Host arrays as global arrays with their rows over the mesh's batch axes."""
    if self.mesh is None:
      return arrays
    rows = NamedSharding(self.mesh, PartitionSpec(sharding.BATCH_AXES))
    return tuple(jax.make_array_from_callback(a.shape, rows, lambda idx, a=a: a[idx])
                 for a in arrays)

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    if any(len(req.args) > 2 and req.args[2].get('visual') for req in requests):
      raise HarnessError('log-likelihoods with images (a multimodal multiple-choice task) are '
                         'not supported; multimodal generate_until tasks are')
    return super().loglikelihood(requests, disable_tqdm)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del kwargs
    out = self.score_tokens([(ctx, cont) for _, ctx, cont in requests],
                            progress=not disable_tqdm)
    for (key, _, _), answer in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-likelihood after BOS, in windows of max_length tokens (the harness's
    rolling windows), every token predicted once."""
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok.encode(text), prefix_token=tokenizer_lib.BOS,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((ctx, pred))
        owner.append(i)
    scores = self.score_tokens(windows, progress=not disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, scores):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # --- generation -----------------------------------------------------------------

  def _prompt(self, args, keep: int) -> tuple[list[int], list]:
    """A generate_until request's (ids, images). A multimodal task's request carries
    {'visual': images} third: image k goes where the context's k-th <image> is (all at the
    start when it has none), laid out as Gemma3Processor lays <start_of_image> out; such a
    prompt is not truncated (an image block cannot be cut)."""
    visual = args[2].get('visual') if len(args) > 2 else None
    images = [] if visual is None else list(visual) if isinstance(visual, (list, tuple)) else [
        visual]
    if not images:
      return self.tok_encode(args[0], left_truncate_len=keep), []
    text = lm_model_utils.replace_placeholders(args[0].removeprefix(_BOS_TEXT), _IMAGE_TEXT,
                                               tokenizer_lib.IMAGE_MARKER, len(images))
    return image_prompts.encode(text, self.tok, self.cfg, len(images)), images

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations (greedy unless the request samples), cut at the first `until` string;
    requests with the same settings run together, longest prompt first; a multimodal task's
    images go into the prompt (_prompt)."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, req in enumerate(requests):
      groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
    out: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc='generate_until', disable=disable_tqdm)
    for indices in groups.values():
      kwargs = lm_model_utils.normalize_gen_kwargs(dict(requests[indices[0]].args[1]),
                                                   self.max_gen_toks)
      until = lm_model_utils.handle_stop_sequences(kwargs.pop('until', None), eos=_EOS_TEXT)
      max_gen = int(kwargs.pop('max_gen_toks'))
      sampling = sampler_lib.Sampling(
          temperature=float(kwargs.get('temperature') or 0.0) if kwargs.get('do_sample') else 0.0,
          top_k=kwargs.get('top_k') or None, top_p=kwargs.get('top_p'))  # others: ignored
      keep = max(1, self.max_length - max_gen)
      prompts = {i: self._prompt(requests[i].args, keep) for i in indices}
      order = sorted(indices, key=lambda i: -len(prompts[i][0]))
      for first in range(0, len(order), self.batch_size):
        batch = order[first:first + self.batch_size]
        images = [prompts[i][1] for i in batch]
        # A row stops once its text holds an `until` string; the loop, once every row has.
        new = self.sampler.generate([prompts[i][0] for i in batch], max_gen, sampling, self.seed,
                                    params=self.params, stop_strings=until,
                                    detokenize=self.tok.decode,
                                    images=images if any(images) else None)
        for i, ids in zip(batch, new):
          text = self.tok.decode([t for t in ids if t not in sampler_lib.STOP_TOKENS])
          out[i] = lm_model_utils.postprocess_generated_text(text, until, None)
          # Keyed by (context, settings), as the hf models key it: images do not hash.
          self.cache_hook.add_partial('generate_until', requests[i].args[:2], out[i])
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


# --- running tasks ---------------------------------------------------------------------


def _failed_download(tb) -> Any:
  """The harness Task whose dataset download raised, from the traceback (None if none)."""
  found = None
  while tb is not None:
    frame = tb.tb_frame
    task = frame.f_locals.get('self')
    if frame.f_code.co_name == 'download' and hasattr(task, 'DATASET_PATH'):
      found = task
    tb = tb.tb_next
  return found


def _missing_dataset(e: BaseException) -> str | None:
  """One line naming the dataset a task could not load and how to fetch it."""
  task = _failed_download(e.__traceback__)
  if task is None:
    return None
  path, name = task.DATASET_PATH, task.DATASET_NAME
  call = f'{path!r}' + (f', {name!r}' if name else '')
  label = getattr(getattr(task, 'config', None), 'task', None) or type(task).__name__
  return (f'task {label}: dataset {path}' + (f' ({name})' if name else '') +
          f' is not available here ({type(e).__name__}); fetch it into the Hugging Face cache '
          f'with network access: python -c "import datasets; datasets.load_dataset({call})"')


@functools.lru_cache(maxsize=8)
def _index(include_path: str, defaults: bool):
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  return TaskManager(include_path=include_path or None, include_defaults=defaults)


def task_manager(tasks: tuple[str, ...], include_path: str = ''):
  """An lm_eval TaskManager that knows these task names: over include_path's YAMLs alone when
  they name every task (indexing the harness's own ~200 folders takes seconds), else over both.
  Cached: the trainer asks again at each eval. Raises HarnessError for an unknown name."""
  if include_path:
    local = _index(include_path, False)
    if all(t in local.all_tasks for t in tasks):
      return local
  manager = _index(include_path, True)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise HarnessError(f'unknown task {unknown[0]!r} (`lm-eval ls tasks` lists the harness\'s; '
                       'local task YAMLs need --include_path)')
  return manager


def run_tasks(lm: Gemma3LM, tasks: Sequence[str], *, num_fewshot: int | None = None,
              limit: float | None = None, include_path: str | None = None,
              log_samples: bool = False, apply_chat_template: bool = False,
              bootstrap_iters: int = 100_000) -> dict[str, Any]:
  """lm_eval.simple_evaluate over these task names: the harness's results dict (its
  'results', 'configs', 'versions', 'n-shot', ...; bootstrap_iters 0: no stderr). Raises
  HarnessError for an unknown task or a dataset that cannot be loaded."""
  from lm_eval import evaluator  # pylint: disable=g-import-not-at-top
  manager = task_manager(tuple(tasks), include_path or '')
  try:
    return evaluator.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, log_samples=log_samples, apply_chat_template=apply_chat_template,
        bootstrap_iters=bootstrap_iters)
  except Exception as e:  # pylint: disable=broad-except
    line = _missing_dataset(e)
    if line is None:
      raise
    raise HarnessError(line) from None


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """{'eval/TASK/METRIC': value} of a results dict's numbers ('acc,none' -> 'acc'; another
  filter is kept: 'exact_match,strict-match' -> 'exact_match_strict-match'); stderr and the
  document count left out."""
  out = {}
  for task, metrics in results.get('results', {}).items():
    for key, value in metrics.items():
      metric, _, filt = key.partition(',')
      if (not isinstance(value, (int, float)) or isinstance(value, bool)
          or metric.endswith('_stderr') or metric == 'sample_len'):
        continue
      name = metric if filt in ('', 'none') else f'{metric}_{filt}'
      out[f'eval/{task}/{name}'] = float(value)
  return out


def task_names(text: str) -> list[str]:
  """'hellaswag, arc_easy' -> ['hellaswag', 'arc_easy']."""
  return [t.strip() for t in text.split(',') if t.strip()]


class TrainTasks:
  """train.eval_tasks during training: the harness tasks on the current params, on the
  training mesh (no checkpoint round trip), as {'eval/TASK/METRIC': value}. The LM (and its
  compiled calls) is built on first use, then given each eval's params. s is the trainer's
  Setup (graphdef, config, mesh, rules)."""

  def __init__(self, s):
    self.s = s
    self.lm: Gemma3LM | None = None

  def __call__(self, state: dict) -> dict[str, float]:
    c = self.s.config
    model = nnx.merge(self.s.graphdef, state['params'], *state['frozen'].values())
    if self.lm is None:
      tok = tokenizer_lib.Tokenizer(c.data.tokenizer_path)
      if tok.vocab_size > c.model.vocab_size:
        log.warning('train.eval_tasks: the tokenizer has %d pieces but model.vocab_size=%d; '
                    'not evaluating', tok.vocab_size, c.model.vocab_size)
        return {}
      self.lm = Gemma3LM(model, tok, batch_size=c.train.global_batch_size,
                         chunk_size=c.train.loss_chunk_size, mesh=self.s.mesh,
                         rules=self.s.rules)
    else:
      self.lm.set_params(nnx.split(model)[1])
    results = run_tasks(self.lm, task_names(c.train.eval_tasks),
                        limit=c.train.eval_tasks_limit or None,
                        include_path=c.train.eval_tasks_include_path, bootstrap_iters=0)
    return flat_metrics(results)


def table(results: dict[str, Any]) -> str:
  """The harness's own results table (as its CLI prints it)."""
  return lm_utils.make_table(results)
