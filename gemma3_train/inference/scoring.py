"""Scoring a model: loss / perplexity / token accuracy over a dataset, and multiple choice.

Dataset metrics run the training data pipeline (data.*: any source and format it reads, text or
chat, packed or padded) once over a split and sum the same chunked cross-entropy the trainer
uses (models/lm_head.py): loss = summed target NLL / weighted targets, perplexity = exp(loss),
accuracy = the fraction of targets that are the argmax.

Multiple choice follows lm-eval-harness's log-likelihood rule: each row is {context, choices,
answer}; a choice's score is the summed log-probability of its tokens after [BOS] + context
(context and choice tokenized separately, so a choice usually starts with a space). The
prediction is the highest score (accuracy), and also the highest score per UTF-8 byte of the
choice (accuracy_norm, lm-eval's acc_norm). A row may add `images` (paths, relative to the JSONL's
folder) for a vision model: they go where the context says <start_of_image>, or at its start, as
gemma3-sample places them (inference/image_prompts.py).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train import data as data_lib
from gemma3_train.data import images as images_lib
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import image_prompts
from gemma3_train.infra import progress as progress_lib
from gemma3_train.models import lm_head as loss_lib

def dataset_metrics(model, c: config_lib.Config, *, split: str = 'eval', max_batches: int = 0,
                    progress: bool = True) -> dict[str, float]:
  """{loss, perplexity, accuracy, tokens, batches} over one pass of the split (or max_batches
  batches of train.global_batch_size rows): the sums the trainer's evals take, summed the same
  way (sum_batches, lm_head.summarize)."""
  graphdef, state = nnx.split(model)
  t = c.train

  def sums(state, batch):
    return loss_lib.next_token_sums(nnx.merge(graphdef, state), batch,
                                    images_lib.from_batch(batch), chunk_size=t.loss_chunk_size,
                                    z_loss=t.z_loss)
  step = jax.jit(sums)
  c = c.replace(data=dict(num_workers=0, shuffle=False))
  ds = data_lib.make_dataset(c, split, num_epochs=1)
  meter = (progress_lib.Progress(f'{split} split', max_batches or None, 'batches') if progress
           else None)
  iterator = iter(ds)
  try:
    totals, n = sum_batches(lambda b: step(state, {k: jnp.asarray(v) for k, v in b.items()}),
                            iterator, max_batches=max_batches,
                            on_batch=meter.update if meter else None)
  finally:
    close = getattr(iterator, 'close', None)
    if close:
      close()
  if meter:
    meter.close()
  return {**loss_lib.summarize(totals), 'batches': n}


# Positions per chunk of the LM head where no config says (multiple choice): its default.
_CHUNK = config_lib.TrainConfig().loss_chunk_size


# --- multiple choice ---------------------------------------------------------------


def read_choices(path: str) -> list[dict[str, Any]]:
  """Rows of a JSONL of {context: str, choices: [str, ...], answer: int, images?: [str, ...]}
  (image paths made relative to the file's folder); raises ValueError naming the file and line
  of the first bad row."""
  p = epath.Path(path)
  if not p.exists():
    raise ValueError(f'{path}: no such file')
  rows = []
  for i, line in enumerate(p.read_text().splitlines(), 1):
    if not line.strip():
      continue
    where = f'{path}:{i}'
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{where}: not valid JSON ({e.msg})') from None
    ok = (isinstance(row, dict) and isinstance(row.get('context'), str)
          and isinstance(row.get('choices'), list) and len(row['choices']) >= 1
          and all(isinstance(x, str) and x for x in row['choices'])
          and isinstance(row.get('answer'), int) and 0 <= row['answer'] < len(row['choices'])
          and isinstance(row.get('images', []), list)
          and all(isinstance(x, str) and x for x in row.get('images', [])))
    if not ok:
      raise ValueError(f'{where}: expected {{"context": str, "choices": [non-empty str, ...], '
                       f'"answer": index into choices, optional "images": [path, ...]}}, got '
                       f'{line[:80]!r}')
    if row.get('images'):
      row['images'] = [x if '://' in x or epath.Path(x).is_absolute() else str(p.parent / x)
                       for x in row['images']]
    rows.append(row)
  if not rows:
    raise ValueError(f'{path}: no rows')
  return rows


def _row_logprob(graphdef, state, inputs_BL, targets_BL, weights_BL, images, chunk_size: int):
  """Summed log p(target) of the weighted targets, per row [B] (the chunked LM head's
  per-token log-probabilities); images float32 [B, N, S, S, 3] or None."""
  model = nnx.merge(graphdef, state)
  logp_BL = loss_lib.token_logprobs(model.hidden(inputs_BL, images=images),
                                    model.embedder.table(),
                                    targets_BL, chunk_size=chunk_size)
  return jnp.sum(weights_BL * logp_BL, axis=1)


def choice_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 8,
                    progress: Callable[[int], None] | None = None,
                    chunk_size: int = _CHUNK,
                    images: Sequence[Sequence[Any]] | None = None) -> list[float]:
  """Summed log p(continuation | context) for (context ids, continuation ids) pairs; images:
  per pair, the images of its context's image blocks (image_prompts), read a batch at a time."""
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, i, t, w, x: _row_logprob(graphdef, s, i, t, w, x, chunk_size))
  N = max((len(x) for x in images), default=0) if images is not None else 0
  out: list[float] = []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    seqs = [ctx + cont for ctx, cont in chunk]
    # Bucketed lengths keep the number of compiled shapes small.
    L = -(-max(len(s) - 1 for s in seqs) // 32) * 32
    inputs = np.zeros((batch_size, L), np.int32)
    targets = np.zeros((batch_size, L), np.int32)
    weights = np.zeros((batch_size, L), np.float32)
    for b, ((ctx, cont), seq) in enumerate(zip(chunk, seqs)):
      n = len(seq) - 1
      inputs[b, :n], targets[b, :n] = seq[:-1], seq[1:]
      weights[b, len(ctx) - 1:n] = 1.0  # the targets that are continuation tokens
    # Image placeholders (id vocab_size, weight 0) as targets would gather NaN into the sums.
    targets[targets >= model.cfg.vocab_size] = 0
    pixels = None
    if N:  # one N for every batch: one compiled shape; a row's choices share its images
      S = model.cfg.vision_image_size
      pixels = np.zeros((batch_size, N, S, S, 3), np.float32)
      read = {}
      for b, refs in enumerate(images[start:start + batch_size]):
        if refs:
          if id(refs) not in read:
            read[id(refs)] = [image_prompts.pixels(x, model.cfg) for x in refs]
          pixels[b, :len(refs)] = read[id(refs)]
    logp = np.asarray(step(state, inputs, targets, weights, pixels))
    out += [float(x) for x in logp[:len(chunk)]]
    if progress:
      progress(len(out))
  return out


def multiple_choice(model, rows: Sequence[dict[str, Any]], tok: tokenizer_lib.Tokenizer, *,
                    batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
  """{accuracy, accuracy_norm, rows: [{index, scores, pred, pred_norm, answer}]}."""
  pairs, owner, images = [], [], []
  for i, row in enumerate(rows):
    refs = row.get('images') or []
    if refs:
      if not model.cfg.vision:
        raise ValueError(f'row {i} has images but the model has no vision tower')
      try:
        ctx = image_prompts.encode(row['context'], tok, model.cfg, len(refs))
      except image_prompts.PromptError as e:
        raise ValueError(f'row {i}: {e}') from None
    else:
      ctx = [tokenizer_lib.BOS] + tok.encode(row['context'])
    for choice in row['choices']:
      pairs.append((ctx, tok.encode(choice)))
      owner.append(i)
      images.append(refs)
  meter = (progress_lib.Progress('multiple choice', len(pairs), 'choices') if progress
           else None)
  scores = choice_logprobs(model, pairs, batch_size, meter.update if meter else None,
                           images=images)
  if meter:
    meter.close()
  per_row: list[list[float]] = [[] for _ in rows]
  for i, score in zip(owner, scores):
    per_row[i].append(score)
  results = []
  for i, (row, s) in enumerate(zip(rows, per_row)):
    norm = [x / len(c.encode('utf-8')) for x, c in zip(s, row['choices'])]
    results.append({'index': i, 'scores': s, 'pred': int(np.argmax(s)),
                    'pred_norm': int(np.argmax(norm)), 'answer': row['answer']})
  n = len(results)
  return {'accuracy': sum(r['pred'] == r['answer'] for r in results) / n,
          'accuracy_norm': sum(r['pred_norm'] == r['answer'] for r in results) / n,
          'num_rows': n, 'rows': results}



# --- summing over batches --------------------------------------------------------------


def sum_batches(step: Callable[[Any], dict], batches: Iterable, *, max_batches: int = 0,
                on_batch: Callable[[int], None] | None = None) -> tuple[dict[str, float], int]:
  """(sums of step(batch) added over the batches on the host, batches taken): at most
  max_batches (0 = until the batches run out). The trainer's evals and gemma3-eval both sum
  this way; each then summarizes (lm_head.summarize, or its objective's eval_summary)."""
  totals: dict[str, float] = {}
  n = 0
  iterator = iter(batches)
  while not max_batches or n < max_batches:
    try:
      batch = next(iterator)
    except StopIteration:
      break
    for k, v in jax.device_get(step(batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
    if on_batch:
      on_batch(n)
  return totals, n
