"""Distillation with a data.mixture: a source of stored teacher targets beside plain sources
(labels=hard) learns exactly the next-token cross-entropy on the plain rows and, on its own rows,
what a run on it alone learns; the proportions and the resume are the mixture's; sources that
disagree with the run are one-line errors naming them. Online, labels=hard does the same."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train import data as data_lib
from gemma3_train.cli import data as data_cli
from gemma3_train.data import mixture
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.models import decoder
from gemma3_train.training import objectives
from gemma3_train.training import teacher_labels
from gemma3_train.training.objectives import distill
from tests import helpers

# Disjoint words per corpus: a row's source is read off its tokens (the independent check).
CORPORA = {'dist': 'apple orange lemon cherry', 'plain': 'river mountain cloud valley',
           'prep': 'violin trumpet drum guitar'}
K, SEQ_LEN, VOCAB = 16, 32, 262144


class _StandInTeacher:
  """training/teacher_labels.Labeler's interface, with targets from a generator seeded by the
  record index: the mixture is under test here, not the teacher (tests/test_teacher_labels.py
  checks the teacher pass). Some positions keep fewer than k ids (padded as stored)."""

  def __init__(self, spec: teacher_labels.Spec):
    self.spec, self.tokens, self.seconds = spec, 0, 1.0

  def __call__(self, docs):
    out = []
    for i, d in docs:
      rng = np.random.default_rng(i)
      P, k = len(d['tokens']) - 1, self.spec.samples
      ids, q = np.zeros((P, k), np.int32), np.zeros((P, k), np.float32)
      for j in range(P):
        n = int(rng.integers(1, k + 1))
        ids[j, :n] = rng.choice(VOCAB, n, replace=False)
        w = rng.random(n) + 0.1
        q[j, :n] = w / w.sum()
      out.append((ids, q))
      self.tokens += P
    return out


def _write(path, name, n=12):
  rng = np.random.default_rng(len(name))
  # Lengths around seq_len: some documents are split.
  texts = [' '.join(rng.choice(CORPORA[name].split(), size=6 + 5 * i)) for i in range(n)]
  tok = data_lib.Tokenizer()
  _TOKENS[name] = {t for text in texts for t in tok.encode(text)}
  path.write_text(''.join(json.dumps({'text': text}) + '\n' for text in texts))
  return str(path)


def _prepare(src, dst, samples=0, *change):
  """gemma3-data prepare, with the stand-in teacher's targets when samples; change: flags
  that replace (or, --teacher_topk, add to) the run's."""
  argv = ['prepare', f'--src={src}', f'--dst={dst}', '--workers=1', '--rows_per_shard=5']
  if samples:
    flags = {'--teacher': 'stand-in', '--teacher_samples': samples, '--seq_len': SEQ_LEN,
             '--teacher_temperature': 0.8, '--teacher_seed': 3}
    flags.update(f.split('=') for f in change)
    if '--teacher_topk' in flags:
      del flags['--teacher_samples']
    argv += [f'{k}={v}' for k, v in flags.items()]
  data_cli.main(argv)
  return str(dst)


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  """{name: path}: dist and dist8 prepared with stand-in teacher targets (k = 16 and 8), plain
  a JSONL file, prep prepared without a teacher."""
  tmp = tmp_path_factory.mktemp('corpora')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data_cli, '_labeler', lambda a: _StandInTeacher(teacher_labels.Spec(
        a.teacher, 'topk' if a.teacher_topk else 'sampled', a.teacher_topk or a.teacher_samples,
        a.teacher_temperature, a.teacher_seed, a.seq_len, a.teacher_dtype)) if a.teacher else None)
    dist_src = _write(tmp / 'dist.jsonl', 'dist')
    return {'dist': _prepare(dist_src, tmp / 'dist', K),
            'dist8': _prepare(dist_src, tmp / 'dist8', 8),
            'dist_topk': _prepare(dist_src, tmp / 'dist_topk', K, '--teacher_topk=16'),
            'dist64': _prepare(dist_src, tmp / 'dist64', K, '--seq_len=64'),
            'plain': _write(tmp / 'plain.jsonl', 'plain'),
            'prep': _prepare(_write(tmp / 'prep.jsonl', 'prep'), tmp / 'prep'),
            'tmp': tmp}


def _config(mixture_spec='', **data_fields):
  """Offline distillation (stored targets) of a 1-layer student with the real vocabulary."""
  c = helpers.small_config(
      model=dict(num_layers=1, vocab_size=VOCAB, embed_dim=16, mlp_dim=32, num_heads=2,
                 num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8.0),
      data=dict(mixture=mixture_spec, seq_len=SEQ_LEN, **data_fields),
      train=dict(objective='distill', seed=3, global_batch_size=2, loss_chunk_size=16,
                 z_loss=1e-4),
      distill=dict(teacher='', samples=K, temperature=0.8, alpha=0.25))
  config_lib.validate(c)
  return c


def _spec(corpora, dist='dist', weights=(2, 1, 1), dist_labels='teacher', plain_labels='hard',
          prep_labels='hard'):
  return (f"dist:{weights[0]} source=prepared train_path={corpora[dist]} labels={dist_labels}; "
          f"plain:{weights[1]} source=jsonl train_path={corpora['plain']} labels={plain_labels}; "
          f"prep:{weights[2]} source=prepared train_path={corpora['prep']} labels={prep_labels}")


_TOKENS = {}  # {corpus: the ids of its documents}, filled by the fixture


def _row_source(inputs_L, segment_ids_L) -> str:
  ids = set(inputs_L[segment_ids_L > 0].tolist()) - {tokenizer_lib.BOS, tokenizer_lib.EOS}
  (name,) = [n for n, s in _TOKENS.items() if ids <= s]
  return name


def _draw(c, n):
  it = data_lib.make_train_iterator(c)
  batches = [next(it) for _ in range(n)]
  drawn = data_lib.tokens_drawn(it)
  it.close()
  return batches, drawn


def _rows(batches):
  """[(source, row dict)] in order."""
  return [(_row_source(b['inputs'][r], b['segment_ids'][r]), {k: v[r] for k, v in b.items()})
          for b in batches for r in range(len(b['inputs']))]


def _per_row(c, model, objective_name):
  """A jitted function: a batch and a row index -> that row's loss sums (the other rows'
  weights zeroed: one compiled shape for every row)."""
  obj = objectives.get(c.replace(train=dict(objective=objective_name)))

  @jax.jit
  def sums(batch, r):
    keep_B1 = (np.arange(batch['weights'].shape[0]) == r)[:, None]
    total, s = obj.loss_sums(model, {**batch, 'weights': batch['weights'] * keep_B1})
    return {**s, 'total': total}
  return sums


@pytest.mark.slow  # (a student's loss on 24 rows under two objectives: 5-14 s)
def test_plain_rows_learn_cross_entropy_and_distilled_rows_their_source_alone(corpora):
  c = _config(_spec(corpora))
  batches, _ = _draw(c, 6)
  alone, _ = _draw(_config(source='prepared', train_path=corpora['dist']), 6)
  B = c.train.global_batch_size
  model = decoder.build(c, nnx.Rngs(0))
  ours_row, ce_row = _per_row(c, model, 'distill'), _per_row(c, model, 'ce')
  seen, j = set(), 0  # j: the distilled rows so far, which are the alone run's rows 0, 1, ...
  for batch in batches:
    for r in range(B):
      source = _row_source(batch['inputs'][r], batch['segment_ids'][r])
      seen.add(source)
      got = jax.device_get(ours_row(batch, r))
      if source == 'dist':
        a, ar = divmod(j, B)
        j += 1
        # The row of a run on that source alone, targets included, and so its loss.
        assert set(batch) == set(alone[a])
        for k in batch:
          np.testing.assert_array_equal(batch[k][r], alone[a][k][ar], err_msg=k)
        want = jax.device_get(ours_row(alone[a], ar))
        for k in ('total', 'distill_sum', 'hard_sum', 'weight_sum'):
          np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
      else:  # exactly the ce objective's loss on the row
        want = jax.device_get(ce_row(batch, r))
        assert got['weight_sum'] == want['weight_sum'] > 0
        for k in ('total', 'distill_sum', 'hard_sum'):
          np.testing.assert_allclose(got[k], want['total' if k == 'total' else 'loss_sum'],
                                     rtol=1e-6, err_msg=(source, k))
  assert seen == {'dist', 'plain', 'prep'} and j > 0


@pytest.mark.slow  # (four gradients of a 262144-row table: ~10-20 s)
def test_plain_rows_gradient_is_cross_entropys(corpora):
  """The hard targets' filler ids (probability 0) add nothing to the gradient either, whatever
  distill.alpha mixes."""
  c = _config(_spec(corpora, weights=(0, 1, 1)))  # plain rows only
  (batch,), _ = _draw(c, 1)
  model = decoder.build(c, nnx.Rngs(1))

  def grads(**fields):
    obj = objectives.get(c.replace(**fields))
    return nnx.state(jax.jit(nnx.grad(lambda m: obj.loss_sums(m, batch)[0]))(model))
  want = grads(train=dict(objective='ce'))
  for alpha in (0.0, 0.25, 1.0):
    # The two backward passes sum the same (softmax - one-hot) x terms in another order:
    # float32 rounding at the leaf's scale (measured up to 4e-6 of it; a filler id with any
    # weight would be off by O(1)).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(y))), err_msg=f'alpha {alpha}'),
        grads(distill=dict(alpha=alpha)), want)


def test_proportions_and_resume(corpora):
  c = _config(_spec(corpora))
  batches, drawn = _draw(c, mixture.WINDOW_BATCHES)  # one window: 200 rows, 100/50/50 exactly
  counts = {name: 0 for name in CORPORA}
  for source, row in _rows(batches):
    counts[source] += 1
    assert set(row) == set(data_lib.BATCH_DTYPES) | {'teacher_ids', 'teacher_probs'}
  assert counts == {'dist': 100, 'plain': 50, 'prep': 50}
  assert drawn == {f'tokens/{k}': float(n * SEQ_LEN) for k, n in counts.items()}
  helpers.assert_resumes(c, 5, 6)


def test_hard_rows_carry_their_next_token_alone(corpora):
  """Offline, a labels=hard row's targets: the next token with probability 1, then distinct
  ids at 0, also for a source that stores a teacher's targets (they are skipped)."""
  c = _config(_spec(corpora, weights=(1, 1, 0), dist_labels='hard'))
  batches, _ = _draw(c, 3)
  for source, row in _rows(batches):
    ids_LK, q_LK = row['teacher_ids'], row['teacher_probs']
    np.testing.assert_array_equal(ids_LK[:, 0], row['targets'])
    np.testing.assert_array_equal(q_LK[:, 0], 1.0)
    np.testing.assert_array_equal(q_LK[:, 1:], 0.0)
    assert all(len(set(ids)) == K for ids in ids_LK.tolist()), source


def _one_line_error(c, *expected):
  with pytest.raises(config_lib.ConfigError) as e:
    data_lib.make_train_iterator(c).close()
  assert all(x in str(e.value) for x in expected) and '\n' not in str(e.value), str(e.value)


@pytest.mark.parametrize('other,expected', [
    ('dist8', 'distill.samples=16: '), ('dist_topk', "distill.loss='sampled': "),
    ('dist64', 'data.seq_len=32: ')])
def test_distilled_sources_that_disagree_are_one_line_errors(corpora, other, expected):
  """Two distilled sources, the second stored with other samples, loss or seq_len than the
  first and the run: one line naming it, the field and what it stores."""
  spec = (f"dist:1 source=prepared train_path={corpora['dist']}; "
          f'{other}:1 source=prepared train_path={corpora[other]}')
  _one_line_error(_config(spec), f"data.mixture source '{other}': {expected}",
                  f'={corpora[other]!r} stores teacher targets made with')


def test_sources_without_targets_are_one_line_errors(corpora):
  # Sources with no stored targets and not labels=hard: the error names them and the way out.
  _one_line_error(_config(_spec(corpora, plain_labels='teacher')),
                  "data.mixture source 'plain': distill.teacher='': data.source='jsonl' has no "
                  'stored teacher targets', 'or give the mixture source labels=hard')
  _one_line_error(_config(_spec(corpora, prep_labels='teacher')),
                  "data.mixture source 'prep': distill.teacher='': ",
                  'holds no teacher targets', 'or give the mixture source labels=hard')
  with pytest.raises(config_lib.ConfigError, match=r"^data.mixture=.*'labels=soft': expected "
                     'labels=teacher | hard'):
    config_lib.parse_mixture('a:1 source=synthetic labels=soft')
  kl = _config(f"plain:1 source=jsonl train_path={corpora['plain']} labels=hard").replace(
      distill=dict(teacher='t', loss='kl'))
  with pytest.raises(config_lib.ConfigError, match=r"^distill.loss='kl': expected sampled or "
                     r'topk with labels=hard mixture sources \(plain\)'):
    config_lib.validate(kl)


def _online(corpora, mixture_spec='', **data_fields):
  """Online distillation (sampled) from a saved 2-layer teacher, peaked as a trained one is
  (tests/test_teacher_labels.py: a flat teacher's draws move with float32 rounding)."""
  path = corpora['tmp'] / 'teacher'
  c = _config(mixture_spec, **data_fields).replace(distill=dict(
      teacher=str(path), teacher_dtype='float32'))
  if not path.exists():
    helpers.save_peaked_teacher(path, c.model)
  return c


@pytest.mark.slow  # (a teacher and a student over 12 rows: ~25 s)
def test_online_mixture_distils_its_sources_and_labels_hard_is_cross_entropy(corpora):
  """Online, the teacher runs on every row: a mixture's rows of a distilled source get the
  loss of a run on that source alone, and a labels=hard source's rows their cross-entropy."""
  dist_src, plain_src = str(corpora['tmp'] / 'dist.jsonl'), corpora['plain']
  spec = (f'dist:1 source=jsonl train_path={dist_src}; '
          f'plain:1 source=jsonl train_path={plain_src}')
  plain_mixture, _ = _draw(_online(corpora, spec), 1)  # no labels=hard: the draws' keys only
  assert set(plain_mixture[0]) == set(data_lib.BATCH_DTYPES) | {'record', 'record_pos'}

  c = _online(corpora, spec + ' labels=hard')
  batches, _ = _draw(c, 3)
  alone, _ = _draw(_online(corpora, source='jsonl', train_path=dist_src), 3)
  assert set(batches[0]) == set(alone[0]) | {'hard_labels'}
  B = c.train.global_batch_size
  model = decoder.build(c, nnx.Rngs(0))
  teacher = {distill.TEACHER: convert.load(c.distill.teacher)}
  obj, ce = objectives.get(c), objectives.get(c.replace(train=dict(objective='ce')))

  @jax.jit
  def per_row(batch, r):
    keep = {**batch, 'weights': batch['weights'] * (np.arange(B) == r)[:, None]}
    (total, s), (ce_total, ce_s) = obj.loss_sums(model, keep, teacher), ce.loss_sums(model, keep)
    return {**s, 'total': total, 'ce_total': ce_total, 'ce_loss_sum': ce_s['loss_sum']}
  seen, j = set(), 0
  for batch in batches:
    for r in range(B):
      source = _row_source(batch['inputs'][r], batch['segment_ids'][r])
      seen.add(source)
      got = jax.device_get(per_row(batch, r))
      np.testing.assert_array_equal(batch['hard_labels'][r], source == 'plain')
      if source == 'dist':
        a, ar = divmod(j, B)
        j += 1
        for k in alone[a]:
          np.testing.assert_array_equal(batch[k][r], alone[a][k][ar], err_msg=k)
        # (the alone run has no labels=hard source: its batch says so for every row)
        want = jax.device_get(per_row(
            {**alone[a], 'hard_labels': np.zeros_like(batch['hard_labels'])}, ar))
        for k in ('total', 'distill_sum', 'hard_sum', 'weight_sum'):
          np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
        assert abs(got['distill_sum'] - got['hard_sum']) > 1e-3 * got['hard_sum']
      else:
        np.testing.assert_allclose(got['total'], got['ce_total'], rtol=1e-6)
        for k in ('distill_sum', 'hard_sum'):
          np.testing.assert_allclose(got[k], got['ce_loss_sum'], rtol=1e-6, err_msg=k)
  assert seen == {'dist', 'plain'} and j > 0
