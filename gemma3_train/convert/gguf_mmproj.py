"""The vision tower's GGUF: the mmproj file llama.cpp (llama-mtmd-cli, llama-server) and Ollama
load beside the text model, so that a fine-tuned vision model keeps its images.

llama.cpp's conventions for a Gemma 3 mmproj (convert_hf_to_gguf.py, Gemma3VisionModel; the
tensor names are the gguf package's table for MODEL_ARCH.MMPROJ, read here, not restated):
- general.architecture 'clip', general.type 'mmproj'; clip.has_vision_encoder, projector type
  'gemma3', clip.vision.*: image and patch size, width, MLP size, depth, heads, layer-norm eps
  1e-6, GELU, the processor's mean and std, projection_dim = the decoder width; the pooling
  factor (image side / patch / sqrt(tokens per image)) only when it is not the released 4;
- tensors as Hugging Face stores them (SiglipVisionModel + Gemma3MultiModalProjector, our
  export's hub names, vision_keys.py), under v.* / mm.* names: Linear weights [out, in], the
  patch Conv2d [W, 3, P, P], the projection [W, D] as is;
- mm.soft_emb_norm stored with its +1 (a Gemma RMSNorm; SigLIP's LayerNorms are plain);
- types: the projection in float16 and the patch and position embeddings in float32, as
  llama.cpp forces them; 1-D tensors float32; the other matrices in the file's type (f32, f16
  or bf16; a q8_0 / q4_0 text file gets an f16 mmproj, the type llama.cpp's own mmproj
  releases use).
"""

from __future__ import annotations

import gguf
import numpy as np
from etils import epath

from gemma3_train import config as config_lib
from gemma3_train.convert import gguf as gguf_text
from gemma3_train.convert import vision_keys
from gemma3_train.convert.source import ConversionError
from gemma3_train.convert.source import Source

RELEASED_POOL = 4  # llama.cpp's default projector scale factor (896 / 14 / 16)


def path_for(text_file) -> epath.Path:
  """Where the mmproj of the text file FILE.gguf goes: mmproj-FILE.gguf beside it."""
  text_file = epath.Path(text_file)
  return text_file.parent / f'mmproj-{text_file.name}'


def tensor_kind(hf_name: str, ndim: int, kind: str) -> str:
  """The GGUF type (f32 | f16 | bf16) of one tower tensor in a file of `kind` (the module
  docstring's rules)."""
  if 'input_projection' in hf_name:
    return 'f16'
  if '.embeddings.' in hf_name or ndim == 1:
    return 'f32'
  return _matrix_kind(kind)


def _matrix_kind(kind: str) -> str:
  """The type of the tower's matrices in a file of `kind`: no quantized tower."""
  return kind if kind in ('f32', 'bf16') else 'f16'


def _metadata(w: gguf.GGUFWriter, cfg: config_lib.ModelConfig, kind: str) -> None:
  w.add_type(gguf.GGUFType.MMPROJ)
  w.add_file_type(gguf_text.FILE_TYPES[_matrix_kind(kind)])
  w.add_clip_has_vision_encoder(True)
  w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
  w.add_vision_projection_dim(cfg.embed_dim)
  w.add_vision_image_size(cfg.vision_image_size)
  w.add_vision_patch_size(cfg.vision_patch_size)
  w.add_vision_embedding_length(cfg.vision_width)
  w.add_vision_feed_forward_length(cfg.vision_mlp_dim)
  w.add_vision_block_count(cfg.vision_depth)
  w.add_vision_head_count(cfg.vision_num_heads)
  w.add_vision_attention_layernorm_eps(1e-6)
  w.add_vision_use_gelu(True)
  processor = vision_keys.hf_preprocessor_config(cfg)
  w.add_vision_image_mean(processor['image_mean'])
  w.add_vision_image_std(processor['image_std'])
  if cfg.vision_pool != RELEASED_POOL:
    w.add_vision_projector_scale_factor(cfg.vision_pool)


def hf_tensors(src: Source):
  """(HF name, array) of the tower and projector, in our HF export's names and layouts."""
  vision = src.vision()
  if vision is None:
    raise ConversionError(f'{src.path}: model.vision is set but the checkpoint has no vision '
                          'weights')
  top, layers = vision
  yield from vision_keys.canonical_top_to_hf(top).items()
  for j, layer in enumerate(layers):
    yield from vision_keys.canonical_layer_to_hf(layer, j).items()


def write(src: Source, dst_file, kind: str = 'f16') -> epath.Path:
  """src's vision tower and projector -> one mmproj GGUF at dst_file (which must not exist)."""
  cfg = src.cfg
  dst = epath.Path(dst_file)
  if dst.exists():
    raise ConversionError(f'{dst}: destination exists')
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, cfg.vision_depth)
  w = gguf.GGUFWriter(str(dst), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ],
                      use_temp_file=True)
  _metadata(w, cfg, kind)
  for hf_name, x in hf_tensors(src):
    # The projector's matrix is a bare parameter ('..._weight'), a '.weight' to the name map.
    name = hf_name.replace('mm_input_projection_weight', 'mm_input_projection.weight')
    gguf_name = names.get_name(name, try_suffixes=('.weight', '.bias'))
    if gguf_name is None:
      raise ConversionError(f'{hf_name}: no mmproj GGUF name for it in gguf {gguf.__name__}')
    x = np.asarray(x, np.float32)
    if name.endswith('mm_soft_emb_norm.weight'):
      x = x + 1.0
    gguf_text.add_encoded(w, gguf_name, x, tensor_kind(name, x.ndim, kind))
  gguf_text.finish(w)
  return dst
