"""The chip table and how jax device kinds map onto it."""

import types

import jax

from gemma3_train import hardware


def test_chip_table_and_device_kinds():
  kinds = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5p': 'v5p', 'TPU v5': 'v5p',
           'TPU v6 lite': 'v6e', 'NVIDIA H100 80GB HBM3': 'h100', 'NVIDIA H200': 'h200'}
  for kind, key in kinds.items():
    assert hardware.chip_for_device(types.SimpleNamespace(device_kind=kind)) is hardware.CHIPS[key]
  assert hardware.chip_for_device(jax.devices('cpu')[0]) is None
  assert hardware.chip_for_device(types.SimpleNamespace(device_kind='NVIDIA H100 PCIe')) is None
  assert hardware.CHIPS['v5p'].peak_bf16_tflops == 459.0
  assert hardware.peak_tflops(jax.devices('cpu')[0]) is None
  assert hardware.peak_tflops(jax.devices('cpu')[0], override=0.07) == 0.07
