"""Prompts with images (inference/image_prompts.py, the sampler's prefill, the export's processor
files, gemma3-sample --image, multiple choice, the harness's multimodal generate_until) against
transformers: the generate and logits of Gemma3ForConditionalGeneration, AutoProcessor on our
export, and lm-eval's hf-multimodal model.

One random tiny vision model with the real vocabulary (the processor's <image_soft_token> is id
262144 = model.vocab_size): 28 x 28 images, patch 7, pool 2 -> 4 soft tokens per image; a decoder
of 6 layers (one scanned block: five local, one global) with window 3, narrower than an image
block, so the local layers' composition of window and image block is exercised.
"""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.gemma3 import image_processing_pil_gemma3

import gemma3_train
from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train import sharding
from gemma3_train.cli import sample as sample_cli
from gemma3_train.data import tokenizer as tokenizer_lib
from gemma3_train.inference import image_prompts
from gemma3_train.inference import sampler as sample
from gemma3_train.inference import scoring

V, S, T = 262144, 28, 4  # vocabulary = the image placeholder id, image side, soft tokens
BOI = tokenizer_lib.START_OF_IMAGE


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
  """(directory, model): a random Gemma3ForConditionalGeneration as transformers saves it, its
  64 appended embedding rows the mean row (as our export writes them)."""
  text = transformers.Gemma3TextConfig(
      vocab_size=V + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
      sliding_window=3, max_position_embeddings=512,
      rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 8.0,
                                          'rope_theta': 1e6},
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}})
  vision = dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4, image_size=S, patch_size=7,
                vision_use_head=False)
  config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                                     mm_tokens_per_image=T, image_token_index=V,
                                     attn_implementation='eager')
  model = transformers.Gemma3ForConditionalGeneration(config)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():  # norm scales and biases too
      p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 0.2))
    emb = model.get_input_embeddings().weight
    emb[V:] = emb[:V].double().mean(0).float()
  path = tmp_path_factory.mktemp('hf_vision')
  model.save_pretrained(path)
  return path, model.eval()


@pytest.fixture(scope='module')
def ours(hf_model):
  return gemma3_train.load(hf_model[0], dtype='float32', attention_impl='reference')


def _image(seed, shape=(40, 33)):
  """A uint8 image of another size than S (both preprocessings resize it)."""
  return np.random.default_rng(seed).integers(0, 256, (*shape, 3), np.uint8)


def _hf_pixels(images):
  """Hugging Face's Gemma 3 image processor (the reference preprocessing): [n, 3, S, S]."""
  processor = image_processing_pil_gemma3.Gemma3ImageProcessorPil(
      size={'height': S, 'width': S}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
  return torch.tensor(processor(images=list(images), return_tensors='np')['pixel_values'])


def _hf_generate(model, prompt, images, n):
  ids = torch.tensor([prompt])
  with torch.no_grad():
    out = model.generate(input_ids=ids, pixel_values=_hf_pixels(images),
                         token_type_ids=(ids == V).long(), attention_mask=torch.ones_like(ids),
                         max_new_tokens=n, do_sample=False, eos_token_id=list(sample.STOP_TOKENS),
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


def test_greedy_with_two_images_equals_transformers_generate(hf_model, ours):
  """Two images in one prompt (bare <start_of_image> ids, expanded) beside a one-image prompt of
  another length (left padding): greedy tokens equal Gemma3ForConditionalGeneration.generate's."""
  a, b, c = _image(1), _image(2, (20, 50)), _image(3)
  prompts = [[2, 651, 6037, BOI, 108, 1000, 2000, BOI, 3000],
             [2, BOI, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 11000, 12000]]
  images = [[a, b], [c]]
  n = 16
  got = ours.generate(prompts, n, images=images)
  for p, imgs, g in zip(prompts, images, got):
    want = _hf_generate(hf_model[1], image_prompts.expand(p, ours.cfg)[0], imgs, n)
    assert g == want
    assert len(g) == n  # no early stop: every step compared
  # The images matter: swapping the two of the first prompt changes its continuation.
  assert ours.generate(prompts[:1], n, images=[[b, a]]) != got[:1]


@pytest.fixture(scope='module')
def export(hf_model, tmp_path_factory):
  dst = tmp_path_factory.mktemp('export') / 'hf'
  convert.export_hf(hf_model[0], dst, dtype='float32', progress=False)
  return dst


@pytest.mark.slow  # (fast-lane budget)
def test_autoprocessor_on_the_export_gives_our_logits(export):
  """AutoProcessor builds Gemma3Processor from the export alone; its ids are ours, and
  transformers on the export gives our logits with the same two images, within 1e-4."""
  assert json.loads((export / 'processor_config.json').read_text()) == {
      'processor_class': 'Gemma3Processor', 'image_seq_length': T}
  processor = transformers.AutoProcessor.from_pretrained(export)
  assert type(processor).__name__ == 'Gemma3Processor'
  hf_tok = processor.tokenizer
  assert (hf_tok.boi_token_id, hf_tok.image_token_id, hf_tok.eoi_token_id) == (
      BOI, V, tokenizer_lib.END_OF_IMAGE)
  text = 'Compare <start_of_image> with<start_of_image>: which one is brighter?'
  images = [_image(4), _image(5, (60, 30))]
  inputs = processor(text=[text], images=[images], return_tensors='pt')
  hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(
      export, attn_implementation='eager').eval()
  with torch.no_grad():
    want = hf(**inputs).logits[0, :, :V].numpy()
  model = gemma3_train.load(export, dtype='float32', attention_impl='reference')
  ids = image_prompts.encode(text, tokenizer_lib.Tokenizer(), model.cfg, 2)
  assert ids == inputs['input_ids'][0].tolist()
  prompts, pixels = image_prompts.prepare([ids], [images], model.cfg)
  got = np.asarray(model(np.asarray(prompts), images=pixels))[0]
  text_pos = np.asarray(ids) != V  # no logits are read at image positions
  err = np.abs(got - want)[text_pos].max()
  print(f'max abs logit error {err:.2e} (logits up to {np.abs(want).max():.1f})')
  assert err < 1e-4
  # The processor's chat template with an image part: our chat prompt's ids.
  messages = [{'role': 'user', 'content': [{'type': 'image', 'image': Image.fromarray(images[0])},
                                           {'type': 'text', 'text': 'What is it?'}]}]
  chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors='np')
  assert chat['input_ids'][0].tolist() == sample.chat_prompt(
      [{'role': 'user', 'content': '<start_of_image>What is it?'}], tokenizer_lib.Tokenizer(),
      model.cfg)


def _png(tmp_path, name, pixels):
  path = tmp_path / name
  Image.fromarray(pixels).save(path)  # lossless: the same pixels read back
  return str(path)


def _cli(argv, stdin=''):
  out = io.StringIO()
  sample_cli.main([*argv, '--temperature=0', '--config.model.dtype=float32',
                   '--config.model.attention_impl=reference'], io.StringIO(stdin), out)
  return out.getvalue()


@pytest.mark.slow  # (fast-lane budget)
def test_cli_image_goes_where_the_prompt_says(hf_model, ours, tmp_path):
  """gemma3-sample --image: the continuation is generate()'s with the image where the prompt
  says; a prompt with no marker gets the image at its start."""
  tok = tokenizer_lib.Tokenizer()
  a = _image(6)
  text = 'A picture of'
  got = _cli([f'--ckpt={hf_model[0]}', f'--prompt={text}', f'--image={_png(tmp_path, "a.png", a)}',
              '--max_new_tokens=5'])
  ids = image_prompts.encode(text, tok, ours.cfg, 1)
  assert ids == image_prompts.encode('<start_of_image>' + text, tok, ours.cfg, 1)
  want = ours.generate([ids], 5, images=[[a]])[0]
  assert got == text + tok.decode([t for t in want if t not in sample.STOP_TOKENS]) + '\n'


@pytest.mark.slow  # four prompt shapes compiled twice (~40 s here)
def test_cli_chat_takes_image_lines(hf_model, ours, tmp_path, capsys):
  """gemma3-sample --chat: `/image PATH` adds an image to the next user message (at its start,
  or at its marker), the chat keeps its images, and an unreadable one is an error line that does
  not end the chat. Replies are generate()'s on the chat prompt with the images so far."""
  tok = tokenizer_lib.Tokenizer()
  a, b = _image(7), _image(8, (30, 60))
  lines = [f'/image {_png(tmp_path, "a.png", a)}', 'What is this?', '/image /no/such.png',
           f'/image {_png(tmp_path, "b.png", b)}', 'And<start_of_image> this one?', '']
  got = _cli([f'--ckpt={hf_model[0]}', '--chat', '--max_new_tokens=4'], '\n'.join(lines) + '\n')
  messages, replies = [], []
  for text, images in (('<start_of_image>What is this?', [a]),
                       ('And<start_of_image> this one?', [a, b])):
    messages.append({'role': 'user', 'content': text})
    ids = sample.chat_prompt(messages, tok, ours.cfg)
    reply = tok.decode([t for t in ours.generate([ids], 4, images=[images])[0]
                        if t not in sample.STOP_TOKENS])
    messages.append({'role': 'model', 'content': reply})
    replies.append(reply)
  assert got == f'> > {replies[0]}\n> > > {replies[1]}\n> '
  err = capsys.readouterr().err
  assert 'gemma3-sample: error: /image: /no/such.png: ' in err and err.count('error') == 1


def _hf_choice_logprob(model, ids, cont, pixels):
  """transformers' summed log p(cont | ids) over the text vocabulary (ours has no 64 extra
  rows, so the softmax is taken over the first V logits)."""
  seq = torch.tensor([ids + cont])
  with torch.no_grad():
    logits = model(input_ids=seq, pixel_values=pixels,
                   token_type_ids=(seq == V).long()).logits[0, :, :V].double()
  logp = torch.log_softmax(logits, -1)
  return sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(cont))


def test_multiple_choice_with_images_scores_as_transformers(hf_model, ours, tmp_path):
  """{context, choices, answer, images} rows (paths relative to the JSONL): each choice's score
  is transformers' summed log-probability with the same images; a row without images beside."""
  tok = tokenizer_lib.Tokenizer()
  a, b = _image(9), _image(10, (50, 20))
  _png(tmp_path, 'a.png', a)
  _png(tmp_path, 'b.png', b)
  rows = [{'context': 'Is<start_of_image> brighter than<start_of_image>?',
           'choices': [' yes', ' no'], 'answer': 0, 'images': ['a.png', 'b.png']},
          {'context': 'Its colour is', 'choices': [' red', ' green', ' blue'], 'answer': 2,
           'images': [str(tmp_path / 'b.png')]},
          {'context': 'No image here:', 'choices': [' fine', ' odd'], 'answer': 1}]
  path = tmp_path / 'choices.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  result = scoring.multiple_choice(ours, scoring.read_choices(str(path)), tok, batch_size=4,
                                   progress=False)
  for row, got in zip(rows, result['rows']):
    images = [{'a.png': a, 'b.png': b}[x.rpartition('/')[2]] for x in row.get('images', [])]
    ids = (image_prompts.encode(row['context'], tok, ours.cfg, len(images)) if images
           else [tokenizer_lib.BOS] + tok.encode(row['context']))
    pixels = _hf_pixels(images) if images else None
    want = [_hf_choice_logprob(hf_model[1], ids, tok.encode(c), pixels) for c in row['choices']]
    np.testing.assert_allclose(got['scores'], want, rtol=1e-5)


def test_image_blocks_and_bad_image_prompts(ours):
  cfg, tok = ours.cfg, tokenizer_lib.Tokenizer()
  block = [BOI] + [V] * T + [tokenizer_lib.END_OF_IMAGE]
  assert image_prompts.expand([2, BOI, 5], cfg) == ([2, *block, 5], 1)
  assert image_prompts.expand([2, *block, 5], cfg) == ([2, *block, 5], 1)  # kept as given
  for bad in ([2, V, 5], [2, BOI, V, V, tokenizer_lib.END_OF_IMAGE]):
    with pytest.raises(sample.PromptError):
      image_prompts.expand(bad, cfg)
  with pytest.raises(sample.PromptError, match='1 <start_of_image> but 2 images'):
    ours.generate([[2, BOI]], 2, images=[[_image(0), _image(1)]])
  with pytest.raises(sample.PromptError, match='2 <start_of_image> in the prompt for 1 images'):
    image_prompts.encode('<start_of_image>a<start_of_image>', tok, cfg, 1)
  with pytest.raises(sample.PromptError, match='no vision tower'):
    image_prompts.prepare([[2]], [[_image(0)]], dataclasses.replace(cfg, vision=False))


@pytest.mark.parametrize('argv,message', [
    (['--ckpt=x', '--prompt=a', '--prompt=b', '--image=a.png'], '--image goes with one --prompt'),
    (['--prompt=a', '--image=/no/such.png'], '--image: /no/such.png: FileNotFoundError'),
])
def test_cli_bad_image_is_one_line_exit_2(hf_model, argv, message, capsys, monkeypatch):
  argv = [f'--ckpt={hf_model[0]}', *argv] if argv[0] != '--ckpt=x' else argv
  monkeypatch.setattr('sys.argv', [sample_cli.PROG, *argv])
  with pytest.raises(SystemExit) as e:
    sample_cli.run()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('gemma3-sample: error: ') and message in err


VQA_YAML = """task: tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
process_docs: !function images_utils.load_images
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_image: images
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""
VQA_UTILS = '''from PIL import Image


def load_images(dataset):
  return dataset.map(lambda doc: {'images': [Image.open(p).convert('RGB') for p in doc['paths']]})
'''


@pytest.fixture(scope='module')
def vqa_tasks(tmp_path_factory):
  """A local multimodal generate_until task: PIL images in its documents (process_docs opens
  them, as a hub dataset's Image feature gives them); two images in one context."""
  d = tmp_path_factory.mktemp('vqa')
  paths = [_png(d, f'{k}.png', _image(20 + k, shape)) for k, shape in
           enumerate([(40, 33), (20, 50), (28, 28)])]
  rows = [{'question': 'Compare <image> with <image>: which is brighter?', 'paths': paths[:2],
           'answer': 'left'},
          {'question': '<image>What is in the picture?', 'paths': paths[2:], 'answer': 'noise'},
          {'question': 'Describe <image> in one word.', 'paths': paths[1:2], 'answer': 'blue'}]
  (d / 'vqa.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (d / 'vqa.yaml').write_text(VQA_YAML.format(data=d / 'vqa.jsonl'))
  (d / 'images_utils.py').write_text(VQA_UTILS)
  return d


@pytest.mark.slow  # (fast-lane budget: the harness and its hf-multimodal model)
def test_harness_multimodal_generate_until_matches_hf_multimodal(ours, export, vqa_tasks):
  """A multimodal task through lm-eval with our Gemma3LM and with its own hf-multimodal model
  (Gemma3ForConditionalGeneration.generate, AutoProcessor on our export): the same greedy
  texts."""
  from lm_eval.models import hf_vlms  # pylint: disable=g-import-not-at-top
  from gemma3_train.inference import harness  # pylint: disable=g-import-not-at-top
  lm = harness.Gemma3LM(ours, batch_size=4)
  # Gemma3Processor expands <start_of_image>; the harness's default would put the soft token.
  hf = hf_vlms.HFMultimodalLM(pretrained=str(export), image_string='<start_of_image>',
                              device='cpu', dtype='float32', batch_size=4)

  def texts(model):
    results = harness.run_tasks(model, ['tiny_vqa'], include_path=str(vqa_tasks),
                                log_samples=True, bootstrap_iters=0)
    return [s['resps'][0][0] for s in sorted(results['samples']['tiny_vqa'],
                                              key=lambda s: s['doc_id'])]
  got, want = texts(lm), texts(hf)
  assert got == want and all(got)
  # The images matter: the first document with a black first image reads otherwise.
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  images = [Image.new('RGB', (S, S)), Image.open(vqa_tasks / '1.png')]
  kwargs = {'until': ['\n\n'], 'max_gen_toks': 8, 'do_sample': False}
  black = lm.generate_until([Instance('generate_until', {}, (
      'Compare <image> with <image>: which is brighter?', kwargs, {'visual': images}), 0)])
  assert black != got[:1]
  with pytest.raises(harness.HarnessError, match='log-likelihoods with images'):
    lm.loglikelihood([Instance('loglikelihood', {}, ('<image>Is it', ' red', {'visual': images}),
                               0)])


@pytest.mark.slow
def test_greedy_with_images_under_context_2_equals_context_1(ours):
  """The sampler with the prompt's columns and the KV cache split over context 2 (balanced,
  rows over fsdp), an image block across a shard boundary: the same greedy tokens as context 1
  and every step's logits within 1e-5."""
  prompts = [[2, 651, BOI, 108, 1000, 2000, BOI, 3000], [2, 4000, 5000, BOI, 6000, 7000, 8000,
                                                       9000]]
  images = [[_image(1), _image(2, (20, 50))], [_image(3)]]
  want = sample.Sampler(ours).generate(prompts, 12, images=images, return_logits=True,
                                       stop_tokens=())
  c = config_lib.Config(model=ours.cfg, mesh=config_lib.MeshConfig(context=2, fsdp=-1))
  s = sample.Sampler(ours, sharding.make_mesh(c), dict(sharding.DEFAULT_RULES))
  got = s.generate(prompts, 12, images=images, return_logits=True, stop_tokens=())
  assert got[0] == want[0]
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
  # The balanced layout's shard boundaries of the padded prompt are at P / 4 and 3 P / 4: an
  # image block crosses one of them.
  tokens, _ = sample.left_pad(image_prompts.prepare(prompts, images, ours.cfg)[0], s.bucket)
  P = tokens.shape[1]
  crosses = [(tokens[:, b - 1] == V) & (tokens[:, b] == V) for b in (P // 4, 3 * P // 4)]
  assert np.any(crosses), (P, tokens)
