"""Accelerator facts: peak FLOP/s, HBM and interconnect per chip, TPU slice names and topologies.

The one table that metrics (MFU), aot (fit and step time) and the launch scripts read. Standard
library only, so that the launchers can ask it on a workstation without jax:
  python3 gemma3_train/infra/hardware.py v5p-128
prints the slice's GKE/xpk facts (ACCELERATOR, TOPOLOGY, HOSTS, CHIPS_PER_HOST, XPK_TPU_TYPE) as
shell assignments (scripts/tpu_slice.sh evaluates them), or one error line and exits 1.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
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


def peak_tflops(device: Any, override: float = 0.0) -> float | None:
  """Per-device peak for MFU: the config override, else the chip table (None when unknown)."""
  if override > 0:
    return override
  chip = chip_for_device(device)
  return chip.peak_bf16_tflops if chip else None


# --- TPU slices ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuKind:
  chip: str  # key of CHIPS
  cores_per_chip: int  # what the -N suffix of a slice name counts per chip
  hbm_gbps: float  # HBM bandwidth per chip, GB/s (cloud.google.com/tpu/docs/<kind>)
  shapes: dict[int, str]  # chips in a slice -> libtpu's physical topology
  chip_config: str  # libtpu chip_config_name: 'megacore' makes one device per v4/v5p chip
  gke_accelerator: str  # GKE node label cloud.google.com/gke-tpu-accelerator
  type_prefix: str  # Cloud TPU accelerator type / xpk --tpu-type spelling (v5e: 'v5litepod')
  ici_gbps: float = 0.0  # GB/s into one chip over ICI, all its links, one direction (below)
  dcn_gbps: float | None = None  # GB/s into one chip over DCN (between slices); None: unstated


# Slice sizes GKE offers: v5e/v6e are 2-D tori, v4/v5p 3-D (cloud.google.com/kubernetes-engine/
# docs/concepts/plan-tpus, "TPU topology" tables).
_PLANAR = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
           256: '16x16'}
_CUBE = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
         256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}

# Interconnect per chip (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}, checked 2026-12): the v5e,
# v5p and v6e tables state "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip)"
# 400, 1200 and 800 GBps; into a chip (one direction) that is half: 200, 600, 400 GB/s (v5p's
# older page says 4,800 Gbps = 600 GB/s). The v4 page gives no per-chip figure, only "All-reduce
# bandwidth per Pod 1.1 PB/s" over 4,096 chips: 268.6 GB/s a chip, the same ratio as v5e's
# (51.2 TB/s over 256 chips = 200) and v6e's (102.4 TB/s over 256 = 400) to their one-direction
# figures. DCN: v5p "Data center network (DCN) bandwidth per chip" 50 Gbps = 6.25 GB/s; v5e
# "2 x 100 Gbps NIC" per host of 8 chips = 3.125 GB/s a chip; v4 and v6e state none.
TPU_KINDS: dict[str, TpuKind] = {
    'v4': TpuKind('v4', 2, 1200.0, _CUBE, 'megacore', 'tpu-v4-podslice', 'v4',
                  ici_gbps=1.1e6 / 4096),
    'v5e': TpuKind('v5e', 1, 819.0, _PLANAR, 'default', 'tpu-v5-lite-podslice', 'v5litepod',
                   ici_gbps=400.0 / 2, dcn_gbps=2 * 100 / 8 / 8),
    'v5p': TpuKind('v5p', 2, 2765.0, _CUBE, 'megacore', 'tpu-v5p-slice', 'v5p',
                   ici_gbps=1200.0 / 2, dcn_gbps=50 / 8),
    'v6e': TpuKind('v6e', 1, 1640.0, _PLANAR, 'default', 'tpu-v6e-slice', 'v6e',
                   ici_gbps=800.0 / 2),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or num_slices identical ones joined over DCN)."""
  name: str  # as given, e.g. 'v5p-128'
  kind: str  # key of TPU_KINDS
  chips: int  # per slice
  num_slices: int = 1

  @property
  def spec(self) -> TpuKind:
    return TPU_KINDS[self.kind]

  @property
  def chip(self) -> Chip:
    return CHIPS[self.spec.chip]

  @property
  def total_chips(self) -> int:
    return self.chips * self.num_slices

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU accelerator type, e.g. 'v5litepod-16' for v5e-16 (what xpk and libtpu use)."""
    return f'{self.spec.type_prefix}-{self.chips * self.spec.cores_per_chip}'

  def gke(self) -> dict[str, str | int]:
    """What a GKE JobSet or xpk needs for one slice; its keys, upper-cased, are the script's."""
    # A TPU VM has 4 chips, but an 8-chip v5e/v6e (1 core per chip) slice is one 8-chip VM.
    per_host = 8 if self.spec.cores_per_chip == 1 and self.chips == 8 else min(self.chips, 4)
    return dict(accelerator=self.spec.gke_accelerator, topology=self.spec.shapes[self.chips],
                hosts=self.chips // per_host, chips_per_host=per_host,
                xpk_tpu_type=self.accelerator_type)


def slice_name(kind: str, chips: int) -> str:
  """'v5p', 64 -> 'v5p-128': v4/v5p names count TensorCores (2 per chip), v5e/v6e chips."""
  return f'{kind}-{chips * TPU_KINDS[kind].cores_per_chip}'


def topology_names(kind: str) -> list[str]:
  """Every slice name of a kind that the table knows, smallest first."""
  return [slice_name(kind, n) for n in TPU_KINDS[kind].shapes]


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """'v5p-128' -> 64 v5p chips per slice; a one-line ValueError '<name>: unknown ...' otherwise."""
  match = re.fullmatch(r'(v4|v5e|v5p|v6e)-(\d+)', name.strip().lower())
  if match:
    kind = TPU_KINDS[match.group(1)]
    chips, rest = divmod(int(match.group(2)), kind.cores_per_chip)
    if not rest and chips in kind.shapes:
      return Topology(name, match.group(1), chips, num_slices)
  known = '; '.join(f'{k}: {", ".join(topology_names(k))}' for k in TPU_KINDS)
  raise ValueError(f'{name}: unknown TPU slice; expected KIND-N ({known}; v4/v5p count '
                   'TensorCores, 2 per chip, v5e/v6e count chips)')


def main(argv: list[str]) -> int:
  """`python3 gemma3_train/infra/hardware.py TPU_TYPE`: the slice's facts as shell assignments."""
  if len(argv) != 2 or argv[1].startswith('-'):
    print('usage: python3 gemma3_train/infra/hardware.py TPU_TYPE (e.g. v5p-128): prints '
          'ACCELERATOR, TOPOLOGY, HOSTS, CHIPS_PER_HOST and XPK_TPU_TYPE as shell assignments',
          file=sys.stderr)
    return 2
  try:
    topo = parse_topology(argv[1])
  except ValueError as e:
    print(f'error: TPU_TYPE={e}', file=sys.stderr)
    return 1
  for key, value in topo.gke().items():
    print(f'{key.upper()}={shlex.quote(str(value))}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
