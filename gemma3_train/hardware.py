"""Accelerator facts: peak FLOP/s, HBM and bandwidth per chip, TPU slice topologies.

The one table that metrics (MFU), aot (fit and step time) and the launch scripts read.
Standard library only, so the scripts can ask it without jax installed:
  python3 gemma3_train/hardware.py v5p-128   (prints the slice's GKE/xpk fields as shell words)
"""

from __future__ import annotations

import dataclasses
from typing import Any


# --- chips -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_tflops: float  # dense (no 2:4 sparsity), per chip
  hbm_gib: float  # per chip, as the vendor states it


# Sources (checked 2026): cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} "Peak compute per chip
# (bf16)" and HBM capacity (v5e/v5p/v6e pages say GB); NVIDIA H100/H200 SXM datasheets:
# BF16 Tensor Core 1,979 TFLOPS *with sparsity*, i.e. 989 dense; H100 80 GB, H200 141 GB.
CHIPS: dict[str, Chip] = {
    'v4': Chip('TPU v4', 275.0, 32.0),
    'v5e': Chip('TPU v5e', 197.0, 16.0),
    'v5p': Chip('TPU v5p', 459.0, 95.0),
    'v6e': Chip('TPU v6e', 918.0, 32.0),
    'h100': Chip('NVIDIA H100 SXM', 989.0, 80.0),
    'h200': Chip('NVIDIA H200 SXM', 989.0, 141.0),
}

# jax device_kind (lowercased) substrings -> CHIPS key; first match wins, so order matters.
_KINDS = (
    ('tpu v4', 'v4'),
    ('tpu v5 lite', 'v5e'), ('tpu v5e', 'v5e'),
    ('tpu v5p', 'v5p'), ('tpu v5', 'v5p'),  # a bare 'TPU v5' is the v5p
    ('tpu v6 lite', 'v6e'), ('tpu v6e', 'v6e'),
    ('h200', 'h200'),
    ('h100', 'h100'),
)


def chip_for_device(device: Any) -> Chip | None:
  """The CHIPS entry for a jax device, or None (CPU, unknown kinds, H100 PCIe/NVL)."""
  kind = str(getattr(device, 'device_kind', '')).lower()
  if 'h100' in kind and ('pcie' in kind or 'nvl' in kind):
    return None  # 756/835 TFLOP/s parts; the SXM peak would understate their MFU
  for needle, key in _KINDS:
    if needle in kind:
      return CHIPS[key]
  return None


@dataclasses.dataclass(frozen=True)
class TpuKind:
  chip: str  # key of CHIPS
  cores_per_chip: int  # what the -N suffix of a slice name counts per chip
  hbm_gbps: float  # HBM bandwidth per chip, GB/s (cloud.google.com/tpu/docs/<kind>)
  shapes: dict[int, str]  # chips in a slice -> libtpu's physical topology
  chip_config: str  # libtpu chip_config_name: 'megacore' makes one device per v4/v5p chip
  gke_accelerator: str  # GKE node label cloud.google.com/gke-tpu-accelerator
  xpk_prefix: str  # xpk --tpu-type spelling (v5e slices are 'v5litepod-N')


_PLANAR = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
           256: '16x16'}
_CUBE = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
         256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}

TPU_KINDS: dict[str, TpuKind] = {
    'v4': TpuKind('v4', 2, 1200.0, _CUBE, 'megacore', 'tpu-v4-podslice', 'v4'),
    'v5e': TpuKind('v5e', 1, 819.0, _PLANAR, 'default', 'tpu-v5-lite-podslice', 'v5litepod'),
    'v5p': TpuKind('v5p', 2, 2765.0, _CUBE, 'megacore', 'tpu-v5p-slice', 'v5p'),
    'v6e': TpuKind('v6e', 1, 1640.0, _PLANAR, 'default', 'tpu-v6e-slice', 'v6e'),
}



def peak_tflops(device: Any, override: float = 0.0) -> float | None:
  """Per-device peak for MFU: the config override, else the chip table (None when unknown)."""
  if override > 0:
    return override
  chip = chip_for_device(device)
  return chip.peak_bf16_tflops if chip else None


