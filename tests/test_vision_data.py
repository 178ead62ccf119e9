"""Images in the data pipeline: preprocessing and token layout equal Hugging Face's Gemma 3
processor; batches carry images with their documents through packing, restore and bad input."""

import json
import logging
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from gemma3_train import config as config_lib
from gemma3_train import data
from gemma3_train.data import documents
from gemma3_train.data import images
from gemma3_train.data import shapes
from gemma3_train.data import sources
from gemma3_train.data import tokenizer as tokenizer_lib

PHOTO = pathlib.Path(__file__).parent / 'assets' / 'astronaut.jpg'  # 512 x 300, NASA
S = 28  # image side of the pipeline tests (patch 14, pool 1: 4 soft tokens)
PH = 262144  # placeholder id = model.vocab_size


def vision_config(**data_fields) -> config_lib.Config:
  c = config_lib.from_config_dict(tiny.get_config())
  return c.replace(model=dict(vision=True, vision_image_size=S, vision_pool=1),
                   data=dict(dict(seq_len=64, prefetch=0), **data_fields))


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.Tokenizer('')


# --- preprocessing ---------------------------------------------------------------


@pytest.mark.parametrize('pan_and_scan', [False, True])
def test_preprocessing_equals_hf_image_processor(pan_and_scan):
  from transformers.models.gemma3 import image_processing_pil_gemma3  # pylint: disable=g-import-not-at-top
  hf = image_processing_pil_gemma3.Gemma3ImageProcessorPil(
      size={'height': 896, 'width': 896}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
  with Image.open(PHOTO) as im:
    want = hf(im, do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=256,
              pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
  u8 = images.load(str(PHOTO), 896, crops=pan_and_scan)
  assert u8.dtype == np.uint8 and u8.shape == (1 + 2 * pan_and_scan, 896, 896, 3)
  assert want['num_crops'] == [2 * pan_and_scan]  # 512 x 300: two 256-wide crops
  got = images.to_model_input(u8)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, np.stack(want['pixel_values']).transpose(0, 2, 3, 1))
  # The train step runs the same on device.
  np.testing.assert_array_equal(np.asarray(images.to_model_input(jnp.asarray(u8[:1]))), got[:1])


def test_pan_and_scan_rule():
  tall = Image.new('RGB', (300, 1100))
  # ratio 3.7 rounds to 4 crops, 1100 // 256 allows 4: four of ceil(1100 / 4) = 275 rows.
  assert [c.size for c in images.pan_and_scan(tall)] == [(300, 275)] * 4
  assert [c.size for c in images.pan_and_scan(Image.new('RGB', (600, 300)))] == [(300, 300)] * 2
  assert images.pan_and_scan(Image.new('RGB', (500, 450))) == []  # ratio < 1.2
  assert images.pan_and_scan(Image.new('RGB', (400, 200))) == []  # crops under 256


# --- tokens ----------------------------------------------------------------------


@pytest.fixture(scope='module')
def hf_processor(tmp_path_factory):
  """Gemma3Processor with our bundled tokenizer as transformers loads an export of it. In that
  SentencePiece model id 256000 is spelled <unused99> (Google's HF release names it
  <end_of_image>); the soft token <image_soft_token> is added at 262144."""
  from transformers import AutoTokenizer, Gemma3Processor  # pylint: disable=g-import-not-at-top
  from transformers.models.gemma3 import image_processing_pil_gemma3  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import hf_tokenizer  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('hf_tok')
  files = hf_tokenizer.tokenizer_files('')
  config = json.loads(files['tokenizer_config.json'])
  config['extra_special_tokens'] = {'boi_token': '<start_of_image>', 'eoi_token': '<unused99>',
                                    'image_token': '<image_soft_token>'}
  files['tokenizer_config.json'] = json.dumps(config).encode()
  for name, content in files.items():
    (d / name).write_bytes(content)
  hf_tok = AutoTokenizer.from_pretrained(d)
  assert hf_tok.convert_tokens_to_ids(['<start_of_image>', '<unused99>', '<image_soft_token>']
                                      ) == [255999, 256000, PH]
  return Gemma3Processor(image_processing_pil_gemma3.Gemma3ImageProcessorPil(
      size={'height': S, 'width': S}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
      hf_tok, image_seq_length=4)


TEXTS = ['Look:<start_of_image>and<start_of_image> compare them.',
         '<start_of_image><start_of_image>\n\nTwo images, first.',
         'Both at the end <start_of_image><start_of_image>']


@pytest.mark.slow  # transformers builds its tokenizer from the 262k pieces (10-30 s here)
@pytest.mark.parametrize('pan_and_scan', [False, True])
def test_token_expansion_equals_hf_processor(hf_processor, tok, pan_and_scan):
  wide, square = Image.new('RGB', (600, 300), 'red'), Image.new('RGB', (40, 40), 'blue')
  for text in TEXTS:
    want = hf_processor(text=[text], images=[[wide, square]], do_pan_and_scan=pan_and_scan)
    crops = [2 * pan_and_scan, 0]
    assert len(want['pixel_values']) == 2 + sum(crops)  # the wide one's two crops
    got = [tokenizer_lib.BOS] + tokenizer_lib.encode_with_images(tok, text, crops, 4, PH)
    assert got == list(want['input_ids'][0]), text
  # Chat with image parts, against the Gemma 3 chat template's rendering of it.
  messages = [{'role': 'user', 'content': [{'type': 'image', 'path': 'a.png'},
                                           {'type': 'text', 'text': ' What is this? '},
                                           {'type': 'image', 'path': 'b.png'}]},
              {'role': 'assistant', 'content': [{'type': 'text', 'text': 'Two squares.'}]}]
  rendered = ('<start_of_turn>user\n<start_of_image>What is this?<start_of_image><end_of_turn>\n'
              '<start_of_turn>model\nTwo squares.<end_of_turn>\n')
  want = hf_processor(text=[rendered], images=[[wide, square]], do_pan_and_scan=pan_and_scan)
  spec = images.ImageSpec(S, 4, PH, 9, pan_and_scan, 'images')
  encode = documents.image_encoder(tok, [2 * pan_and_scan, 0], spec, 'chat')
  tokens, _ = documents.format_chat(messages, tok, encode=encode)
  assert tokens.tolist() == list(want['input_ids'][0]) + [tokenizer_lib.EOS]
  assert documents.chat_images(messages) == ['a.png', 'b.png']


def test_image_marker_layout(tok):
  ids = tokenizer_lib.encode_with_images(tok, 'x<start_of_image>y', [0], 3, PH)
  assert ids == tok.encode('x\n\n') + [255999, PH, PH, PH, 256000] + tok.encode('\n\ny')
  with pytest.raises(ValueError):
    tokenizer_lib.encode_with_images(tok, 'x<start_of_image>', [], 3, PH)


# --- pipeline --------------------------------------------------------------------


def _png(path, colour, size=(40, 30)):
  Image.new('RGB', size, colour).save(path)
  return path.name


def _rows(tmp_path, n=12):
  (tmp_path / 'img').mkdir()
  rows = []
  for i in range(n):
    name = _png(tmp_path / 'img' / f'{i}.png', (20 * i, 100, 200 - 10 * i))
    if i % 3 == 0:
      rows.append({'text': f'plain text row {i}, no image at all.'})
    elif i % 3 == 1:
      rows.append({'text': f'<start_of_image> image {i}', 'images': [f'img/{name}']})
    else:
      rows.append({'messages': [
          {'role': 'user', 'content': [{'type': 'image', 'path': f'img/{name}'},
                                       {'type': 'text', 'text': 'Caption?'}]},
          {'role': 'model', 'content': f'row {i}'}]})
  return rows


def _write(tmp_path, rows, name='d.jsonl'):
  p = tmp_path / name
  p.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(p)


def _expected_pixels(path):
  return images.resize(Image.open(path).convert('RGB'), S)


def _check_rows(batches, tmp_path):
  """Each row's k-th placeholder run matches image k; the image is the file its text names."""
  seen = 0
  for b in batches:
    assert b['images'].dtype == np.uint8 and b['images'].shape[1:] == (2, S, S, 3)
    assert b['image_counts'].dtype == np.int32
    for r in range(len(b['inputs'])):
      x = b['inputs'][r]
      starts = np.flatnonzero(x == 255999)
      assert len(starts) == b['image_counts'][r] == np.count_nonzero(x == PH) // 4
      assert not b['images'][r, len(starts):].any()  # empty slots are zero
      assert b['weights'][r][x == PH].sum() == 0
      assert b['weights'][r][b['targets'][r] == PH].sum() == 0
      tok = tokenizer_lib.Tokenizer('')
      for k, s in enumerate(starts):
        seg = b['segment_ids'][r]
        text = tok.decode(x[(seg == seg[s]) & (x < PH)])
        i = int(re.search(r'(?:image|row) (\d+)', text).group(1))
        np.testing.assert_array_equal(b['images'][r, k],
                                      _expected_pixels(tmp_path / 'img' / f'{i}.png'))
        seen += 1
  return seen


def test_jsonl_text_and_chat_rows_with_images(tmp_path):
  rows = _rows(tmp_path)
  text = _write(tmp_path, [r for r in rows if 'text' in r], 'text.jsonl')
  chat = _write(tmp_path, [r for r in rows if 'messages' in r], 'chat.jsonl')
  for path, fmt in ((text, 'text'), (chat, 'chat')):
    for packing in (True, False):
      c = vision_config(source='jsonl', train_path=path, eval_path=path, format=fmt,
                        packing=packing)
      it = data.make_eval_iterator(c)
      batches = [next(it) for _ in range(2)]
      assert _check_rows(batches, tmp_path) > 0


def test_packing_keeps_images_with_documents(tmp_path):
  rows = [{'text': f'<start_of_image> image {i} <start_of_image>' if i % 2 else f'image {i}',
           'images': ([f'img/{i}.png', f'img/{i}.png'] if i % 2 else [])} for i in range(12)]
  (tmp_path / 'img').mkdir()
  for i in range(12):
    _png(tmp_path / 'img' / f'{i}.png', (10 * i, 0, 0))
  path = _write(tmp_path, rows)
  c = vision_config(source='jsonl', train_path=path, seq_len=48, max_images=2)
  it = data.make_train_iterator(c)
  batches = [next(it) for _ in range(3)]
  assert _check_rows(batches, tmp_path) > 0
  assert max(int(b['image_counts'].max()) for b in batches) == 2
  # Rows hold more than one document: text pieces fill the room the images leave.
  assert max(int(b['segment_ids'].max()) for b in batches) > 1


def test_restore_mid_epoch_gives_the_same_batches_with_images():
  c = vision_config(source='shapes')
  it = data.make_train_iterator(c)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  restored = data.make_train_iterator(c)
  restored.set_state(state)
  for got, w in zip([next(restored) for _ in range(3)], want):
    assert set(got) == set(data.BATCH_DTYPES) | set(data.IMAGE_BATCH_DTYPES)
    for k in got:
      np.testing.assert_array_equal(got[k], w[k])


def test_text_only_batches_unchanged_by_the_image_code():
  c = config_lib.from_config_dict(tiny.get_config()).replace(data=dict(prefetch=0))
  b = next(data.make_train_iterator(c))
  assert set(b) == set(data.BATCH_DTYPES)


def test_missing_or_broken_image_skips_the_row_with_a_warning(tmp_path, caplog):
  rows = _rows(tmp_path, 6)
  (tmp_path / 'img' / '1.png').unlink()  # missing
  (tmp_path / 'img' / '4.png').write_bytes(b'not a png')  # undecodable
  path = _write(tmp_path, [r for r in rows if 'text' in r])
  c = vision_config(source='jsonl', train_path=path, eval_path=path)
  with caplog.at_level(logging.WARNING):
    it = data.make_eval_iterator(c)
    batches = [next(it) for _ in range(2)]
  _check_rows(batches, tmp_path)
  warned = [r.getMessage() for r in caplog.records if 'unreadable image' in r.getMessage()]
  assert any('1.png' in m and 'd.jsonl line 2' in m for m in warned), warned
  assert any('4.png' in m and 'd.jsonl line 4' in m for m in warned), warned


@pytest.mark.parametrize('n, fields, match', [
    (3, dict(max_images=2), 'line 1: 3 images .* data.max_images=2'),
    (2, dict(max_images=4, seq_len=12), r'line 1: 2 images take 16 tokens, more than '
                                         r'data.seq_len=12'),
])
def test_too_many_images_is_an_error_naming_the_row(tmp_path, n, fields, match):
  (tmp_path / 'img').mkdir()
  name = _png(tmp_path / 'img' / 'a.png', 'red')
  path = _write(tmp_path, [{'text': '<start_of_image>' * n, 'images': [f'img/{name}'] * n}])
  c = vision_config(source='jsonl', train_path=path, **fields)
  with pytest.raises(sources.DataError, match=match):
    next(data.make_train_iterator(c))


def test_marker_count_mismatch_is_an_error(tmp_path):
  path = _write(tmp_path, [{'text': 'no marker', 'images': ['a.png']}])
  with pytest.raises(sources.DataError, match='line 1: 0 <start_of_image>'):
    next(data.make_train_iterator(vision_config(source='jsonl', train_path=path)))


# --- shapes ----------------------------------------------------------------------


def test_shapes_rows_are_deterministic_and_splits_differ():
  a, b = shapes.ShapesSource('train', S, 0), shapes.ShapesSource('train', S, 0)
  e = shapes.ShapesSource('eval', S, 0)
  for i in range(5):
    assert a[i]['text'] == b[i]['text']
    np.testing.assert_array_equal(a[i]['images'][0], b[i]['images'][0])
  assert [a[i]['text'] for i in range(20)] != [e[i]['text'] for i in range(20)]
  texts = {a[i]['text'] for i in range(400)}
  assert len(texts) > 100  # 162 captions
  assert all(t.startswith('<start_of_image> A') for t in texts)


def test_shapes_image_shows_its_caption():
  src = shapes.ShapesSource('train', 96, 0)
  for i in range(30):
    row = src[i]
    pixels = row['images'][0].astype(int)
    words = row['text'].rstrip('.').split()
    colour = next(w for w in words if w in shapes.COLOURS)
    mask = (np.abs(pixels - shapes.COLOURS[colour]).sum(-1) < 10)
    ys, xs = np.nonzero(mask)
    cy, cx = int(ys.mean() // 32), int(xs.mean() // 32)  # the cell of the shape's centre
    assert shapes.place(cy, cx) in row['text'], row['text']
