"""lm-evaluation-harness with our model (inference/harness.py) against the harness's own `hf`
model on the same random Gemma 3, exported to a Hugging Face directory: local task YAMLs over
local JSONL data, no network."""

import json
import os
import re

# Before datasets / huggingface_hub read them at import; the fixture below also sets their
# constants, for a session that imported them earlier.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB = 262144  # the real tokenizer's: the hf model tokenizes with the export's tokenizer
MC_ROWS = [
    {'question': 'The capital of France is', 'choices': ['Paris', 'Berlin', 'a big city'],
     'answer': 0},
    {'question': 'One two three', 'choices': ['four', 'seven', 'eleven twelve'], 'answer': 1},
    {'question': 'Water is made of hydrogen and', 'choices': ['oxygen', 'gold'], 'answer': 0},
    {'question': 'A long question that runs past the sliding window of eight tokens, and so',
     'choices': ['on', 'forth and back again', 'stop'], 'answer': 2},
]
GEN_ROWS = [{'question': 'What is 2+2?', 'answer': '4'},
            {'question': 'Name a colour, please, in one word:', 'answer': 'red'},
            {'question': 'Hi', 'answer': 'hello'}]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Q:"]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope='module', autouse=True)
def offline():
  import datasets  # pylint: disable=g-import-not-at-top
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
  yield
  datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
  """A random Gemma 3 (8 layers, window 8, 4b-style RoPE scaling) exported by gemma3-convert
  in float32 with its tokenizer files."""
  import transformers  # pylint: disable=g-import-not-at-top
  from gemma3_train.cli import convert as convert_cli  # pylint: disable=g-import-not-at-top
  src = tmp_path_factory.mktemp('src')
  model = helpers.randomize_hf(transformers.Gemma3ForCausalLM(helpers.hf_text_config(VOCAB)), 3)
  model.save_pretrained(src)
  dst = tmp_path_factory.mktemp('export') / 'hf'
  convert_cli.main(['export', f'--src={src}', f'--dst={dst}', '--dtype=float32'])
  return dst


def write_tasks(d):
  """tiny_mc and tiny_gen: task YAMLs over JSONL data in folder d (returned)."""
  for name, rows, yaml in (('mc', MC_ROWS, MC_YAML), ('gen', GEN_ROWS, GEN_YAML)):
    (d / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (d / f'{name}.yaml').write_text(yaml.format(data=d / f'{name}.jsonl'))
  return d


@pytest.fixture(scope='module')
def tasks_dir(tmp_path_factory):
  return write_tasks(tmp_path_factory.mktemp('tasks'))


@pytest.fixture(scope='module')
def ours(export_dir):
  import gemma3_train  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top
  return harness.Gemma3LM(gemma3_train.load(str(export_dir)), batch_size=4)


@pytest.fixture(scope='module')
def reference(export_dir):
  """The harness's hf model on the same export, told to add BOS (Gemma 3 needs it)."""
  from lm_eval.models import huggingface  # pylint: disable=g-import-not-at-top
  return huggingface.HFLM(pretrained=str(export_dir), backend='causal', device='cpu',
                          dtype='float32', batch_size=4, add_bos_token=True)


def _run(lm, tasks_dir):
  from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top
  return harness.run_tasks(lm, ['tiny_mc', 'tiny_gen'], include_path=str(tasks_dir),
                           log_samples=True, bootstrap_iters=0)


def _responses(results, task):
  return [s['filtered_resps'] for s in sorted(results['samples'][task], key=lambda s: s['doc_id'])]


@pytest.fixture(scope='module')
def hf_results(reference, tasks_dir):
  return _run(reference, tasks_dir)


def test_harness_matches_hf_model(ours, hf_results, tasks_dir):
  """The same tasks through the harness: per-choice log-likelihoods within 1e-4, the same
  greedy flags and accuracies, the same greedy generations."""
  got, want = _run(ours, tasks_dir), hf_results
  ours_mc, hf_mc = _responses(got, 'tiny_mc'), _responses(want, 'tiny_mc')
  assert [len(r) for r in ours_mc] == [len(r['choices']) for r in MC_ROWS]
  for a, b in zip(ours_mc, hf_mc):
    np.testing.assert_allclose([x[0] for x in a], [x[0] for x in b], atol=1e-4, rtol=0)
    assert [x[1] for x in a] == [x[1] for x in b]
  for metric in ('acc,none', 'acc_norm,none'):
    assert got['results']['tiny_mc'][metric] == want['results']['tiny_mc'][metric]
  gens, hf_gens = _responses(got, 'tiny_gen'), _responses(want, 'tiny_gen')
  assert gens == hf_gens and any(g[0] for g in gens)
  assert got['results']['tiny_gen'] == want['results']['tiny_gen']


def _instances(kind, args):
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_requests_match_hf_model(ours, reference):
  """Requests handed to both models directly: a greedy continuation scores as greedy; an empty
  context scores after BOS alone; rolling log-likelihoods over several windows (the hf model
  without add_bos_token: its tok_encode would put BOS in the text it scores after BOS)."""
  gen_kwargs = {'until': ['\n\n'], 'max_gen_toks': 6, 'do_sample': False}
  prompts = ['The capital of France is', 'Once upon a time there was']
  gens = ours.generate_until(_instances('generate_until', [(p, gen_kwargs) for p in prompts]))
  assert gens == reference.generate_until(
      _instances('generate_until', [(p, gen_kwargs) for p in prompts]))
  pairs = [(p, g) for p, g in zip(prompts, gens)] + [('', 'Hello world'), ('Say ', 'yes')]
  got = ours.loglikelihood(_instances('loglikelihood', pairs))
  want = reference.loglikelihood(_instances('loglikelihood', pairs))
  np.testing.assert_allclose([x[0] for x in got], [x[0] for x in want], atol=1e-4, rtol=0)
  assert [x[1] for x in got] == [x[1] for x in want] and got[0][1] and got[1][1]

  texts = [' '.join(f'word{i}' for i in range(90)), 'A short text.']
  # pylint: disable=protected-access
  saved = ours.max_length, reference._max_length, reference.add_bos_token
  ours.max_length = reference._max_length = 100
  reference.add_bos_token = False
  try:
    assert len(ours.tok.encode(texts[0])) > 2 * ours.max_length  # three windows
    got = ours.loglikelihood_rolling(_instances('loglikelihood_rolling', [(t,) for t in texts]))
    want = reference.loglikelihood_rolling(
        _instances('loglikelihood_rolling', [(t,) for t in texts]))
  finally:
    ours.max_length, reference._max_length, reference.add_bos_token = saved
  # pylint: enable=protected-access
  # 1e-4, plus the float32 resolution of the hf model's totals (its window sums are float32:
  # one ulp of -3600 is 2.4e-4).
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=2 ** -23)


@pytest.mark.slow  # (fast-lane budget: two new generate shapes on each side)
def test_until_strings_stop_generation_as_hf_model(ours, reference, monkeypatch):
  """`until` strings from the middle of free runs (one may end inside a token): our rows stop
  there, well before max_gen_toks, and the texts equal the hf model's cut ones."""
  prompts = ['The capital of France is', 'Once upon a time there was', 'Q: What is 2+2?\nA:']
  free_kwargs = {'until': [], 'max_gen_toks': 24, 'do_sample': False}
  free = ours.generate_until(_instances('generate_until', [(p, free_kwargs) for p in prompts]))
  until = [t[len(t) // 2:len(t) // 2 + 3] for t in free]
  gen_kwargs = {'until': until, 'max_gen_toks': 24, 'do_sample': False}
  drawn = []
  generate = ours.sampler.generate
  monkeypatch.setattr(ours.sampler, 'generate', lambda *a, **k: drawn.append(generate(*a, **k))
                      or drawn[-1])
  gens = ours.generate_until(_instances('generate_until', [(p, gen_kwargs) for p in prompts]))
  assert gens == reference.generate_until(
      _instances('generate_until', [(p, gen_kwargs) for p in prompts]))
  assert all(len(g) < len(t) // 2 + 3 for g, t in zip(gens, free))
  assert max(len(ids) for ids in drawn[0]) < 24  # stopped early


@pytest.mark.parametrize('add_generation_prompt', [True, False])
def test_chat_template_matches_hf_tokenizer(ours, reference, add_generation_prompt):
  chat = [{'role': 'system', 'content': ' Be brief. '}, {'role': 'user', 'content': 'Hi!\n'},
          {'role': 'assistant', 'content': ' Hello.'}, {'role': 'user', 'content': '2+2?'}]
  if not add_generation_prompt:
    chat.append({'role': 'assistant', 'content': 'It is'})
  text = ours.apply_chat_template(chat, add_generation_prompt)
  assert text == reference.apply_chat_template(chat, add_generation_prompt)
  assert ours.tok_encode(text) == reference.tok_encode(text)


@pytest.mark.slow  # (fast-lane budget: the CLI loads the harness each time)
def test_eval_cli_tasks_writes_harness_results(export_dir, tasks_dir, hf_results, tmp_path,
                                               capsys):
  """gemma3-eval --tasks on a mesh of the 8 test devices: the harness's results JSON, with the
  hf model's scores."""
  from gemma3_train.cli import evaluate as eval_cli  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'results.json'
  eval_cli.main([f'--ckpt={export_dir}', '--tasks=tiny_mc,tiny_gen',
                 f'--include_path={tasks_dir}', '--num_fewshot=0', '--limit=3',
                 f'--output={out}'])
  got = json.loads(out.read_text())
  assert set(got) >= {'results', 'configs', 'versions', 'n-shot', 'config'}
  assert got['n-shot'] == {'tiny_mc': 0, 'tiny_gen': 0}
  assert got['n-samples']['tiny_mc'] == {'original': len(MC_ROWS), 'effective': 3}
  want = {s['doc_id']: s for s in hf_results['samples']['tiny_mc']}
  acc = np.mean([want[i]['acc'] for i in range(3)])
  assert got['results']['tiny_mc']['acc,none'] == pytest.approx(acc)
  assert 'tiny_mc' in capsys.readouterr().err  # the harness's table


@pytest.mark.slow  # (fast-lane budget: the CLI loads the harness each time)
@pytest.mark.parametrize('argv,message', [
    (['--tasks=arc_easy'], 'dataset allenai/ai2_arc (ARC-Easy) is not available'),
    (['--tasks=no_such_task'], "--tasks: unknown task 'no_such_task'"),
    (['--tasks=arc_easy', '--choices=x.jsonl'], '--tasks and --choices: give one of them'),
])
def test_eval_cli_tasks_bad_input_is_one_line(export_dir, argv, message):
  """A task whose dataset is not in the cache (offline) names it and how to fetch it."""
  from gemma3_train.cli import errors  # pylint: disable=g-import-not-at-top
  from gemma3_train.cli import evaluate as eval_cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UsageError, match=re.escape(message)) as e:
    eval_cli.main([f'--ckpt={export_dir}', *argv])
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_training_logs_eval_tasks(tasks_dir, tmp_path):
  """train.eval_tasks: eval/TASK/METRIC rows in metrics.jsonl at every train.eval_tasks_every
  step, the same scores as the harness gives the final checkpoint after the run."""
  import gemma3_train  # pylint: disable=g-import-not-at-top
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import loop as train  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file('configs/tiny.py').replace(
      model=dict(num_layers=2), data=dict(seq_len=32, prefetch=0),
      train=dict(num_steps=2, eval_every=0, eval_tasks='tiny_mc, tiny_gen', eval_tasks_every=1,
                 eval_tasks_limit=3, eval_tasks_include_path=str(tasks_dir)),
      checkpoint=dict(every=0, async_save=False), logging=dict(tensorboard=False, log_every=1),
      mesh=dict(fsdp=-1))
  train.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  tasks = [r for r in rows if any(k.startswith('eval/') for k in r)]
  assert [r['step'] for r in tasks] == [1, 2]
  assert set(tasks[-1]) == {'step', 'eval/tiny_mc/acc', 'eval/tiny_mc/acc_norm',
                            'eval/tiny_gen/exact_match'}
  lm = harness.Gemma3LM(gemma3_train.load(str(tmp_path)), batch_size=4)
  after = harness.flat_metrics(harness.run_tasks(lm, ['tiny_mc', 'tiny_gen'], limit=3,
                                                 include_path=str(tasks_dir), bootstrap_iters=0))
  assert after == {k: v for k, v in tasks[-1].items() if k != 'step'}


@pytest.mark.slow  # (fast-lane budget)
@pytest.mark.parametrize('train,message', [
    (dict(eval_tasks_every=5), "train.eval_tasks='': expected task names"),
    (dict(eval_tasks_every=-1), 'train.eval_tasks_every=-1: expected >= 0'),
    (dict(eval_tasks='x', eval_tasks_limit=-2), 'train.eval_tasks_limit=-2: expected >= 0'),
    (dict(eval_tasks='tiny_mc,nope', eval_tasks_every=1),
     "train.eval_tasks: unknown task 'nope'"),
])
def test_eval_tasks_config_errors_are_one_line(tasks_dir, train, message):
  """Checked before the workdir is touched: the fields, then (preflight) the task names."""
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import loop as train_loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)) as e:
    c = config_lib.Config().replace(
        train=dict(eval_every=0, eval_tasks_include_path=str(tasks_dir), **train))
    config_lib.validate(c)
    train_loop.preflight(c, resuming=False)
  assert '\n' not in str(e.value)
