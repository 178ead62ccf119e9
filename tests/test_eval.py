"""gemma3-eval's scores against numpy computed from the model's full logits; samples in training."""

import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma3_train.cli import evaluate as eval_cli
from gemma3_train import config as config_lib
from gemma3_train.convert import layout
from gemma3_train.convert import ours
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import scoring as evaluate
from gemma3_train.models import decoder as model_lib

DOCS = ['The cat sat on the mat.', 'Paris is the capital of France.', 'One two three four five.']
ROWS = [{'context': 'The capital of France is', 'choices': [' Paris', ' Berlin', ' a big city'],
         'answer': 0},
        {'context': 'One two three', 'choices': [' four', ' seven'], 'answer': 1}]


@pytest.fixture(scope='module')
def model():
  cfg = config_lib.ModelConfig(preset='test', vocab_size=262144, num_layers=2, embed_dim=16,
                               mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=8,
                               query_pre_attn_scalar=8.0, sliding_window=4,
                               attention_impl='reference')
  return model_lib.Gemma3(cfg, rngs=nnx.Rngs(1))


def _log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _logprobs(model, seq):
  """log p(seq[j+1] | seq[:j+1]) for every j, from the full forward (float64 softmax)."""
  lp = _log_softmax(jax.jit(lambda t: model(t))(jnp.asarray([seq], jnp.int32))[0])
  return np.asarray([lp[j, seq[j + 1]] for j in range(len(seq) - 1)]), lp


def test_dataset_loss_equals_hand_computation(model, tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in DOCS))
  c = config_lib.Config().replace(
      model={k: getattr(model.cfg, k) for k in config_lib.MODEL_SHAPE_FIELDS},
      data=dict(source='jsonl', train_path=str(path), eval_path=str(path), seq_len=16,
                packing=False, prefetch=0),
      train=dict(global_batch_size=2))
  got = evaluate.dataset_metrics(model, c, progress=False)
  tok = tokenizer_lib.Tokenizer()
  nll, correct, n = 0.0, 0, 0
  for d in DOCS:
    seq = [tokenizer_lib.BOS] + tok.encode(d) + [tokenizer_lib.EOS]
    assert len(seq) - 1 <= 16
    lps, lp = _logprobs(model, seq)
    nll -= lps.sum()
    correct += sum(int(lp[j].argmax() == seq[j + 1]) for j in range(len(seq) - 1))
    n += len(seq) - 1
  assert got['tokens'] == n and got['batches'] == 2
  np.testing.assert_allclose(got['loss'], nll / n, rtol=1e-5)
  np.testing.assert_allclose(got['perplexity'], np.exp(nll / n), rtol=1e-5)
  assert got['accuracy'] == pytest.approx(correct / n)


def _save(tmp_path, m):
  top, layers = layout.state_to_canonical(m.cfg, nnx.state(m, nnx.Param))
  ours.save_params(tmp_path / 'ckpt', m.cfg, top, enumerate(layers))
  return str(tmp_path / 'ckpt')


def test_multiple_choice_cli_equals_summed_logprobs(model, tmp_path):
  """gemma3-eval --choices: per-choice summed log-probs of the choice tokens after
  [BOS] + context (lm-eval-harness's rule), accuracy, JSON with per-row scores."""
  choices = tmp_path / 'mc.jsonl'
  choices.write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
  out = tmp_path / 'scores.json'
  ckpt = _save(tmp_path, model)
  eval_cli.main([f'--ckpt={ckpt}', f'--choices={choices}', f'--output={out}', '--batch_size=2'],
                stdout=io.StringIO())
  got = json.loads(out.read_text())
  tok = tokenizer_lib.Tokenizer()
  preds = []
  for row, result in zip(ROWS, got['rows']):
    ctx = [tokenizer_lib.BOS] + tok.encode(row['context'])
    want = []
    for choice in row['choices']:
      cont = tok.encode(choice)
      lps, _ = _logprobs(model, ctx + cont)
      want.append(lps[len(ctx) - 1:].sum())
    np.testing.assert_allclose(result['scores'], want, rtol=1e-4, atol=1e-4)
    assert result['pred'] == int(np.argmax(want)) and result['answer'] == row['answer']
    preds.append(result['pred'])
  assert got['accuracy'] == np.mean([p == r['answer'] for p, r in zip(preds, ROWS)])
  assert got['num_rows'] == 2 and 'accuracy_norm' in got


@pytest.mark.parametrize('argv,message', [
    (['--ckpt=/no/such/ckpt'], '--ckpt=/no/such/ckpt'),
    (['--ckpt=x', '--choices=/no/such.jsonl'], '/no/such.jsonl: no such file'),
    (['--ckpt=x', '--split=test'], "--split: invalid choice: 'test'"),
    (['--ckpt=x', '--config.data.seq_len=abc'], '--config.data.seq_len=abc: expected int'),
])
def test_eval_cli_bad_input_is_one_line_exit_2(argv, message, capsys, monkeypatch):
  monkeypatch.setattr(sys, 'argv', [eval_cli.PROG, *argv])
  with pytest.raises(SystemExit) as e:
    eval_cli.run()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('gemma3-eval: error: ') and message in err


@pytest.mark.slow
def test_training_writes_samples(tmp_path):
  """train.sample_every: sample rows in metrics.jsonl (their own rows), beside the step rows."""
  from gemma3_train.training import loop as train  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file('configs/tiny.py').replace(
      model=dict(num_layers=2), data=dict(seq_len=32, prefetch=0),
      train=dict(num_steps=2, eval_every=0, sample_every=2, sample_prompts='Hello|The sky is'),
      checkpoint=dict(every=0, async_save=False), logging=dict(tensorboard=False, log_every=1),
      mesh=dict(fsdp=-1))
  train.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  samples = [r for r in rows if 'sample_text' in r]
  assert [(r['step'], r['sample_prompt']) for r in samples] == [(2, 'Hello'), (2, 'The sky is')]
  assert all(isinstance(r['sample_text'], str) and r['sample_text'] for r in samples)
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2]
