"""The vision tower's mmproj GGUF (convert/gguf_mmproj.py) against the Hugging Face model it
came from: llama.cpp's metadata keys, and every tower and projector tensor under the gguf
package's MMPROJ names with its value (the +1 of the Gemma RMSNorm, the types llama.cpp forces).
"""

import gguf
import numpy as np
import pytest
import torch
import transformers

from gemma3_train.cli import convert as convert_cli
from gemma3_train import convert
from gemma3_train.convert import gguf_mmproj
from tests import test_gguf

V, D, VW, VM, VL, VN, S, P, TOKENS = 1024, 64, 32, 48, 2, 4, 56, 14, 4  # 4x4 patches -> 2x2


@pytest.fixture(scope='module')
def hf_vision(tmp_path_factory):
  """A random tiny Gemma3ForConditionalGeneration as transformers saves it (a GGUF-able text
  side: query scale = head_dim, no RoPE scaling), its tensors, and a cut tokenizer."""
  text = transformers.Gemma3TextConfig(
      vocab_size=V + 64, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
      sliding_window=8, max_position_embeddings=128)
  vision = dict(model_type='siglip_vision_model', hidden_size=VW, intermediate_size=VM,
                num_hidden_layers=VL, num_attention_heads=VN, image_size=S, patch_size=P,
                vision_use_head=False)
  config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                                     mm_tokens_per_image=TOKENS, image_token_index=V)
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():  # norms too, so that a missing +1 or a skipped leaf shows
      p.copy_(torch.randn(p.shape, generator=g) * 0.3)
  d = tmp_path_factory.mktemp('mmproj')
  model.save_pretrained(d / 'hf')
  tensors = {k: v.float().numpy() for k, v in model.state_dict().items()}
  return d, tensors, test_gguf.small_tokenizer(d / 'tok.model', V)


def _tower(tensors):
  """HF name -> array of the tower and projector, under the hub's names (which the gguf
  package's MMPROJ table maps; the in-memory names differ across transformers versions)."""
  out = {}
  for k, x in tensors.items():
    for prefix, hub in (('model.vision_tower.vision_model.', 'vision_tower.vision_model.'),
                        ('model.vision_tower.', 'vision_tower.vision_model.'),
                        ('model.multi_modal_projector.', 'multi_modal_projector.')):
      if k.startswith(prefix):
        out[hub + k[len(prefix):]] = x
        break
  return out


def _read(path):
  r = gguf.GGUFReader(str(path))
  fields = {k: f.contents() for k, f in r.fields.items()}
  tensors = {}
  for t in r.tensors:
    x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    tensors[t.name] = (x.reshape(tuple(reversed(t.shape.tolist()))), t.tensor_type)
  return fields, tensors


@pytest.mark.parametrize('quant', ['f32', 'q8_0'])
def test_mmproj_holds_the_tower_as_llama_cpp_reads_it(hf_vision, tmp_path, capsys, quant):
  d, hf_tensors, tok = hf_vision
  dst = tmp_path / 'model.gguf'
  convert_cli.main(['export', '--format=gguf', f'--quant={quant}',
                    f'--src={d / "hf"}', f'--dst={dst}', f'--tokenizer={tok}'])
  mmproj = tmp_path / 'mmproj-model.gguf'
  assert f'{mmproj}: its vision tower (mmproj)' in capsys.readouterr().out
  fields, tensors = _read(mmproj)
  want = {'general.architecture': 'clip', 'general.type': 'mmproj',
          'clip.has_vision_encoder': True, 'clip.projector_type': 'gemma3',
          'clip.vision.projection_dim': D, 'clip.vision.image_size': S,
          'clip.vision.patch_size': P, 'clip.vision.embedding_length': VW,
          'clip.vision.feed_forward_length': VM, 'clip.vision.block_count': VL,
          'clip.vision.attention.head_count': VN, 'clip.use_gelu': True,
          'clip.vision.image_mean': [0.5] * 3, 'clip.vision.image_std': [0.5] * 3,
          'clip.vision.projector.scale_factor': S // P // 2}
  for k, v in want.items():
    assert fields[k] == pytest.approx(v), k
  assert fields['clip.vision.attention.layer_norm_epsilon'] == pytest.approx(1e-6)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, VL)
  tower = _tower(hf_tensors)
  assert len(tower) == 3 + 2 + 2 + 16 * VL  # embeddings, post-LN, projector; 16 per layer
  seen = set()
  for hf_name, x in tower.items():
    name = hf_name.replace('mm_input_projection_weight', 'mm_input_projection.weight')
    gguf_name = names.get_name(name, try_suffixes=('.weight', '.bias'))
    got, qtype = tensors[gguf_name]
    seen.add(gguf_name)
    if name.endswith('soft_emb_norm.weight'):
      x = x + 1  # a Gemma RMSNorm: llama.cpp multiplies by the stored weight
    if 'input_projection' in name:
      assert qtype == gguf.GGMLQuantizationType.F16
      x = x.astype(np.float16)
    elif x.ndim == 1 or '.embeddings.' in name or quant == 'f32':
      assert qtype == gguf.GGMLQuantizationType.F32, name
    else:  # a q8_0 text file's tower: float16, as llama.cpp's own mmproj files
      assert qtype == gguf.GGMLQuantizationType.F16, name
      x = x.astype(np.float16)
    np.testing.assert_array_equal(got, x.astype(np.float32), err_msg=name)
  assert seen == set(tensors)  # nothing else in the file


def test_an_existing_mmproj_is_not_written_over(hf_vision, tmp_path):
  d, _, tok = hf_vision
  (tmp_path / 'mmproj-model.gguf').write_text('keep')
  with pytest.raises(convert.ConversionError, match='mmproj-model.gguf: destination exists'):
    convert.export_gguf(d / 'hf', tmp_path / 'model.gguf', 'f16', tok)
  assert (tmp_path / 'mmproj-model.gguf').read_text() == 'keep'
  assert not (tmp_path / 'model.gguf').exists()
  assert gguf_mmproj.path_for(tmp_path / 'x.gguf') == tmp_path / 'mmproj-x.gguf'
