"""A teacher's targets stored with the tokens (`gemma3-data prepare --teacher`), and the
per-token keys a distillation batch carries (train.objective=distill, docs/distillation.md).

A prepared directory made with --teacher has a manifest 'teacher' entry (the checkpoint, loss
sampled | topk, samples k, temperature, seed, seq_len, dtype, and the measured rate and bytes
per token), and each non-empty record is

  n uint32 | tokens int32 [n] | (chat: mask uint8 [n]) | counts uint16 [n - 1]
  | ids int32 [S] | probs float32 [S]          (S = sum of counts)

where position j (the target tokens[j + 1]) has counts[j] ids and their probabilities: the
distinct ids the teacher drew (or its top k) with p renormalized over them, as
soft_targets.teacher_targets puts them first. A batch gets them padded to k with id 0 and
probability 0, which add nothing to the loss: the stored targets are the online ones.

In a mixture, a source with labels=hard learns its hard labels: offline its rows carry
hard_targets (the next token with probability 1), online the batch's 'hard_labels' marks its
positions and the objective puts hard_targets in place of the teacher's there. Either way the
distillation term of those positions is exactly their next-token cross-entropy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma3_train import config as config_lib

_N = np.dtype('<u4')
_TOKEN = np.dtype('<i4')
_COUNT = np.dtype('<u2')  # k <= 65535
_PROB = np.dtype('<f4')
# The manifest's fields a run must agree with (the rest describe the prepare).
PLAN_KEYS = ('path', 'loss', 'samples', 'temperature', 'seed', 'seq_len', 'dtype')


def batch_keys(c: config_lib.Config) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Per-token arrays a batch carries besides the token arrays, {key: (trailing shape, dtype)}:
  distillation's stored targets (distill.teacher='': offline) or, online with the sampled
  loss, the draws' keys (the document's record index and the position in it), and online
  'hard_labels' (1 on the rows of labels=hard mixture sources) when the mixture has one. The
  pipeline adds exactly these and the objective reads exactly these."""
  if c.train.objective != 'distill':
    return {}
  d = c.distill
  if not d.teacher:
    return {'teacher_ids': ((d.samples,), np.int32), 'teacher_probs': ((d.samples,), np.float32)}
  keys = {}
  if d.loss == 'sampled':
    keys = {'record': ((), np.int32), 'record_pos': ((), np.int32)}
  if any(m.labels == 'hard' for m in config_lib.parse_mixture(c.data.mixture)):
    keys['hard_labels'] = ((), np.int32)
  return keys


def hard_targets(targets_BL, k: int, vocab_size: int, xp=np):
  """(ids, q [..., k]): the next token with probability 1, then k - 1 other ids with 0: the
  targets whose soft cross-entropy is exactly the hard one. The ids are distinct (the target
  and the ids after it, mod the vocabulary; k <= vocab_size), so the zeros add nothing however
  q is summed against the log-probabilities: by a gather, or by a scatter into the vocabulary.
  xp: numpy (the pipeline) or jax.numpy (the online objective)."""
  offsets = xp.arange(k, dtype=xp.int32).reshape((1,) * targets_BL.ndim + (k,))
  ids = (targets_BL[..., None] + offsets) % vocab_size
  q = xp.broadcast_to((offsets == 0).astype(xp.float32), ids.shape)
  return ids.astype(xp.int32), q


def check(c: config_lib.Config, teacher: dict | None, where: str, mixed: bool = False) -> None:
  """A run on stored targets (distill.teacher='') must read what was stored: one-line
  ConfigErrors naming the field that differs from the prepared directory `where` (mixed: a
  mixture source's, whose name the caller adds). Every distilled source of a mixture is held
  to the run's fields, so they all agree."""
  d = c.distill
  if not teacher:
    raise config_lib.ConfigError(
        f"distill.teacher='': {where} holds no teacher targets; prepare it with "
        'gemma3-data prepare --teacher=PATH, or set distill.teacher'
        + (', or give the mixture source labels=hard' if mixed else ''))
  for field, ours, theirs in (('distill.loss', d.loss, teacher['loss']),
                              ('distill.samples', d.samples, teacher['samples']),
                              ('distill.temperature', d.temperature, teacher['temperature']),
                              ('data.seq_len', c.data.seq_len, teacher['seq_len'])):
    if ours != theirs:
      raise config_lib.ConfigError(f'{field}={ours!r}: {where} stores teacher targets made '
                                   f'with {theirs!r}')


def encode(tokens_bytes: bytes, n: int, ids_PK: np.ndarray, q_PK: np.ndarray) -> bytes:
  """A document's record: its token bytes (prepared.encode's, n tokens) with the targets of
  its n - 1 positions (ids, q [n - 1, k], the kept entries first; q 0 after them)."""
  counts_P = np.count_nonzero(q_PK > 0, axis=-1).astype(_COUNT)
  kept_PK = np.arange(ids_PK.shape[-1]) < counts_P[:, None]
  return b''.join([np.array([n], _N).tobytes(), tokens_bytes, counts_P.tobytes(),
                   ids_PK[kept_PK].astype(_TOKEN).tobytes(),
                   q_PK[kept_PK].astype(_PROB).tobytes()])


def decode(record: bytes, chat: bool, k: int) -> tuple[bytes, np.ndarray, np.ndarray]:
  """(the token bytes as prepared.decode reads them, ids [n - 1, k] int32, probs [n - 1, k]
  float32 padded with 0)."""
  n = int(np.frombuffer(record, _N, count=1)[0])
  end = 4 + n * (5 if chat else 4)
  P = max(n - 1, 0)
  counts_P = np.frombuffer(record, _COUNT, count=P, offset=end).astype(np.int64)
  S = int(counts_P.sum())
  at = end + 2 * P
  kept_PK = np.arange(k) < counts_P[:, None]
  ids_PK = np.zeros((P, k), np.int32)
  q_PK = np.zeros((P, k), np.float32)
  ids_PK[kept_PK] = np.frombuffer(record, _TOKEN, count=S, offset=at)
  q_PK[kept_PK] = np.frombuffer(record, _PROB, count=S, offset=at + 4 * S)
  return record[4:end], ids_PK, q_PK
