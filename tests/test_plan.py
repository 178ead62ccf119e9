"""The planner's two stages: memory predicted per block from shortened compiles, then the best
candidates confirmed by full compiles (plan.py). A stand-in compile checks the arithmetic and the
search; a real one (libtpu's compile-only devices) checks the prediction against a full compile.
"""

import collections
import dataclasses
import importlib
import math
import os
import re
import types

import numpy as np
import pytest

from gemma3_train import config as config_lib
from gemma3_train.planning import aot
from gemma3_train.planning import estimate
from gemma3_train.planning import comms
from gemma3_train.planning import plan
from gemma3_train import sharding
from gemma3_train.training import flops

if not aot.libtpu_available() and os.environ.get('CI'):
  raise RuntimeError('libtpu is not installed; CI must install the test extra (it pins libtpu)')
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason='libtpu not installed')

TOPO = aot.parse_topology('v5e-4')  # 16 GiB per chip


def _tiny(**model) -> config_lib.Config:
  c = config_lib.from_config_dict(importlib.import_module('configs.tiny').get_config())
  return dataclasses.replace(c, model=dataclasses.replace(c.model, **model))


# GiB per chip of the stand-in compile, affine in the scanned blocks: state (in the arguments,
# donated into the outputs) per block, and saved residuals per block and row by remat policy.
KEEP = {'none': 0.5, 'minimal': 0.3, 'full': 0.05}


def _memory(m: config_lib.ModelConfig, rows: float) -> dict[str, float]:
  blocks = m.num_layers // config_lib.GLOBAL_EVERY
  state = 0.5 + 0.2 * blocks
  return dict(argument=state + 0.01 * rows, output=state, alias=state,
              temp=1 + rows * (0.3 + KEEP[m.remat_policy] * blocks), code=0.05, state=state)


def _stand_in(calls: list, full_depth: int, extra: dict | None = None):
  """A compile_report whose memory is _memory, plus at full depth 0.25 GiB of temporaries that
  no probe shows (so a confirmed plan's figures differ from its prediction) and `extra` GiB for
  the chosen (remat, batch) candidates."""
  def compile_report(trial, topo, device_list=None):
    del device_list
    m = trial.model
    calls.append((m.num_layers, m.remat_policy, trial.train.global_batch_size))
    r = aot._base_report(trial, topo, sharding.mesh_shape(trial, topo.total_chips, 1))
    gib = _memory(m, trial.train.global_batch_size / topo.total_chips)
    if m.num_layers == full_depth:
      gib['temp'] += 0.25 + (extra or {}).get((m.remat_policy, trial.train.global_batch_size), 0)
    r.state_gib = gib['state']
    r.model_flops_per_step = flops.train_flops_per_step(trial)
    r.compile_seconds = float(m.num_layers)
    aot._fill_memory(r, types.SimpleNamespace(**{
        f'{k}_size_in_bytes': gib[k] * aot.GIB for k in ('argument', 'output', 'alias', 'temp')},
        generated_code_size_in_bytes=gib['code'] * aot.GIB))
    estimate.fill_time(r, aot.tpu_run_config(trial), topo, {'flops': 1.0, 'bytes accessed': 1.0})
    return r
  return compile_report


def test_predict_extrapolates_each_component_per_block(monkeypatch):
  c = _tiny(num_layers=62, remat_policy='full')  # ten blocks of six and a two-layer tail, as 27b
  calls = []
  monkeypatch.setattr(aot, 'compile_report', _stand_in(calls, full_depth=-1))
  r = plan.predict_report(c, TOPO, [None] * 4)
  assert [n for n, _, _ in calls] == [14, 20]  # two and three blocks, each with the tail
  assert r.predicted and r.probe_seconds == (14.0, 20.0) and r.compile_seconds == 34.0
  want = _memory(c.model, c.train.global_batch_size / 4)
  for k in ('argument', 'output', 'alias', 'temp', 'code', 'state'):
    assert getattr(r, f'{k}_gib') == pytest.approx(want[k]), k
  assert r.total_gib == pytest.approx(
      want['argument'] + want['output'] - want['alias'] + want['temp'] + want['code'])
  assert r.fits and r.headroom == pytest.approx(1 - r.total_gib / 16)
  full = aot.compile_report(c, TOPO)  # the stand-in at full depth: same shapes, same estimate
  assert r.tokens_per_sec == pytest.approx(full.tokens_per_sec, rel=1e-12)
  assert r.model_flops_per_step == full.model_flops_per_step


def test_predict_stops_at_a_probe_misfit_and_compiles_short_models_whole(monkeypatch):
  calls = []
  monkeypatch.setattr(aot, 'compile_report', _stand_in(calls, full_depth=-1))
  big = _tiny(num_layers=62, remat_policy='none')
  big = dataclasses.replace(big, train=dataclasses.replace(big.train, global_batch_size=256))
  r = plan.predict_report(big, TOPO, [None] * 4)  # 64 rows per chip: two blocks need > 16 GiB
  assert [n for n, _, _ in calls] == [14]
  assert r.predicted and not r.fits and r.error.startswith('the 2-block model does not fit')
  calls.clear()
  short = plan.predict_report(_tiny(num_layers=20), TOPO, [None] * 4)  # three blocks: no cheaper
  assert [n for n, _, _ in calls] == [20] and not short.predicted and short.fits


def test_search_confirms_only_the_best_predictions(monkeypatch):
  c = _tiny(num_layers=62)
  calls = []
  # The best prediction (minimal, batch 4) does not fit when compiled whole: it is dropped and
  # the next one confirmed.
  monkeypatch.setattr(aot, 'compile_report', _stand_in(calls, 62, {('minimal', 4): 20.0}))
  monkeypatch.setattr(aot, 'devices', lambda topo: [None] * topo.chips)
  space = plan.PlanSpace(remat_policies=('none', 'full', 'minimal'), rows_per_shard=(1, 2, 4),
                         tensor_degrees=(1,), confirm=2,
                         layouts=('block/block',))
  plans = plan.search_plans(c, TOPO, space)
  probes = [call for call in calls if call[0] != 62]
  confirms = [call[1:] for call in calls if call[0] == 62]
  # Stage 1: both probes of each candidate. Predicted GiB at 1/2/4 rows: none 8.9/14.2/24.8
  # (4 rows predicted not to fit; 8 never tried), full 4.4/5.2/6.8, minimal 6.9/10.2/16.9.
  assert len(probes) == 2 * 9 and {n for n, _, _ in probes} == {14, 20}
  # Stage 2, best first: none and minimal tie on tokens/s (neither replays a matmul), so
  # headroom ranks them; full replays its forward and comes last.
  assert confirms == [('minimal', 4), ('none', 4), ('minimal', 8)]
  assert [(p.remat_policy, p.global_batch) for p in plans] == [('none', 4), ('minimal', 8)]
  for p in plans:  # the figures are the full compile's; the prediction is kept beside them
    want = _memory(p_model := dataclasses.replace(c.model, remat_policy=p.remat_policy),
                   p.per_chip_batch)
    predicted = (want['argument'] + want['output'] - want['alias'] + want['temp'] +
                 want['code'])
    assert p_model.num_layers == 62 and not p.predicted
    assert p.total_gib == pytest.approx(predicted + 0.25)
    assert p.predicted_gib == pytest.approx(predicted)
    assert plan.prediction_error(p) == pytest.approx(-0.25 / p.total_gib)
  table = plan.format_plan(plans).splitlines()
  assert len(table) == 2 + len(plans) and 'predicted' in table[1] and 'error' in table[1]
  assert f'{plans[0].total_gib:.2f} {plans[0].predicted_gib:.2f}' in ' '.join(table[2].split())
  assert f'{100 * plan.prediction_error(plans[0]):+.1f}%' in table[2]

  calls.clear()  # confirm=0 with every=True: every candidate compiled whole
  every = plan.search_plans(c, TOPO, dataclasses.replace(space, confirm=0, every=True))
  # none 4/8/16 (16 does not fit), full 4/8/16, minimal 4 (does not fit whole: the row ends)
  assert {n for n, _, _ in calls} == {62} and len(calls) == 7
  assert len(every) == 5 and all(p.predicted_gib is None for p in every)
  assert ' - ' in plan.format_plan(every).splitlines()[2]


def test_confirm_flag():
  assert plan.parse_plan_space().confirm == 0
  assert plan.parse_plan_space(confirm='0').confirm == 0
  assert plan.parse_plan_space(confirm='5').confirm == 5
  for text in ('-1', 'all', '1,2', '٣'):
    with pytest.raises(config_lib.ConfigError) as e:
      plan.parse_plan_space(confirm=text)
    assert str(e.value).startswith('--aot_plan_confirm=') and '\n' not in str(e.value)


@needs_libtpu
@pytest.mark.slow
def test_prediction_against_a_full_compile_on_v5e_4():
  # tiny widened to 128 lanes (tiny's 16-wide heads pad to TPU tiles in layouts that vary with
  # the program) and 4096 vocabulary rows, 26 layers: four blocks and a two-layer tail. Probes
  # of two and three blocks against the full compile, each ~15-20 s here.
  c = _tiny(num_layers=26, vocab_size=4096, embed_dim=128, head_dim=128, num_heads=2,
            num_kv_heads=1, mlp_dim=512, query_pre_attn_scalar=128.0)
  devices = aot.devices(TOPO)
  predicted = plan.predict_report(c, TOPO, devices)
  full = aot.compile_report(c, TOPO, device_list=devices)
  assert predicted.predicted and len(predicted.probe_seconds) == 2 and full.fits
  # The state (in the arguments) is affine in the blocks: measured +0.4%.
  assert predicted.argument_gib == pytest.approx(full.argument_gib, rel=0.01)
  # The temporaries are not quite: XLA's schedule of the scanned loop changes with its trip
  # count (per block 0.046, 0.036, 0.041 GiB for blocks 2->3, 3->4, 4->6 of this model), so
  # the total is over-predicted by 7.1% (0.166 against 0.155 GiB; libtpu 0.0.42.1). At 1b's
  # widths the same extrapolation was within 0.04% (docs/tpu_gpu.md).
  assert predicted.total_gib == pytest.approx(full.total_gib, rel=0.08)
  # The step estimate ranks the candidates. For so small a model the compiler's cost analysis
  # (the 3-block probe's, not the full program's) outweighs the matmul FLOPs from the shapes:
  # measured 1.4% apart. At real sizes the shapes' count rules and is the full config's.
  assert predicted.tokens_per_sec == pytest.approx(full.tokens_per_sec, rel=0.02)


def _layout_stand_in(calls: list, temp_per_row: dict[str, float]):
  """A compile whose memory is 1 GiB of state plus temp_per_row[layout] GiB per row per chip."""
  def compile_report(trial, topo, device_list=None):
    del device_list
    m = trial.model
    layout = f'{m.remat_unit}/{m.scan_unit}'
    calls.append((layout, trial.train.global_batch_size))
    r = aot._base_report(trial, topo, sharding.mesh_shape(trial, topo.total_chips, 1))
    rows = trial.train.global_batch_size / topo.total_chips
    r.state_gib = 1.0
    r.model_flops_per_step = flops.train_flops_per_step(trial)
    aot._fill_memory(r, types.SimpleNamespace(
        argument_size_in_bytes=aot.GIB, output_size_in_bytes=0, alias_size_in_bytes=0,
        temp_size_in_bytes=temp_per_row[layout] * rows * aot.GIB,
        generated_code_size_in_bytes=0))
    estimate.fill_time(r, aot.tpu_run_config(trial), topo, {'flops': 1.0, 'bytes accessed': 1.0})
    return r
  return compile_report


@pytest.mark.parametrize('every', [True, False])
def test_a_fit_without_headroom_tries_the_next_layout(monkeypatch, every):
  calls = []
  # 16 GiB chips: block/block at 2 rows needs 15 GiB (6% free, ranked last), layer/layer 9.
  monkeypatch.setattr(aot, 'compile_report', _layout_stand_in(
      calls, {'block/block': 7.0, 'layer/layer': 4.0}))
  monkeypatch.setattr(aot, 'devices', lambda topo: [None] * topo.chips)
  space = plan.PlanSpace(remat_policies=('full',), rows_per_shard=(2,), tensor_degrees=(1,),
                         every=every)
  plans = plan.search_plans(_tiny(remat_policy='full'), TOPO, space)
  assert calls == [('block/block', 8), ('layer/layer', 8)]
  assert [(p.remat_unit, p.total_gib) for p in plans] == [('layer', 9.0), ('block', 15.0)]


def test_search_tries_the_next_layout_only_when_one_does_not_fit(monkeypatch):
  """Layouts (model.remat_unit/scan_unit) in order per candidate: layer/layer, which replays the
  forward once more, is compiled only where block/block does not fit, and a batch stops growing
  when no layout fits."""
  calls = []
  compile_report = _layout_stand_in(calls, {'block/block': 6.0, 'layer/layer': 3.0})
  monkeypatch.setattr(aot, 'compile_report', compile_report)
  monkeypatch.setattr(aot, 'devices', lambda topo: [None] * topo.chips)
  space = plan.PlanSpace(remat_policies=('full',), rows_per_shard=(1, 2, 4, 8),
                         tensor_degrees=(1,), every=True)
  assert space.layouts == ('block/block', 'layer/layer')  # the default
  plans = plan.search_plans(_tiny(remat_policy='full'), TOPO, space)
  # 16 GiB chips: block/block fits 1 and 2 rows (7, 13 GiB), not 4 (25): layer/layer fits 4
  # rows (13); at 8 rows neither does (49, 25), which ends the search.
  assert calls == [('block/block', 4), ('block/block', 8), ('block/block', 16),
                   ('layer/layer', 16), ('block/block', 32), ('layer/layer', 32)]
  # Ranked: block/block's two (equal tokens/s, more headroom first), then layer/layer's
  # (its second replay lowers the estimate).
  assert [(p.remat_unit, p.scan_unit, p.global_batch) for p in plans] == [
      ('block', 'block', 4), ('block', 'block', 8), ('layer', 'layer', 16)]
  assert plans[2].tokens_per_sec < plans[1].tokens_per_sec
  table = plan.format_plan(plans).splitlines()
  assert '--config.model.remat_unit=layer --config.model.scan_unit=layer' in table[4]


def _timed_stand_in(calls: list, extra: dict, slow: dict):
  """_stand_in's memory at full depth (+ `extra` GiB per (remat, tensor, batch)); the compiler's
  optimal_seconds 10x the shapes' step time for the (remat, tensor, batch) in `slow`, so their
  estimate falls far below their bound."""
  def compile_report(trial, topo, device_list=None):
    del device_list
    m, batch = trial.model, trial.train.global_batch_size
    key = (m.remat_policy, trial.mesh.tensor, batch)
    calls.append(key)
    r = aot._base_report(trial, topo, sharding.mesh_shape(trial, topo.total_chips, 1))
    gib = _memory(m, batch / topo.total_chips)
    gib['temp'] += extra.get(key, 0.0)
    r.state_gib = gib['state']
    r.model_flops_per_step = flops.train_flops_per_step(trial)
    aot._fill_memory(r, types.SimpleNamespace(**{
        f'{k}_size_in_bytes': gib[k] * aot.GIB for k in ('argument', 'output', 'alias', 'temp')},
        generated_code_size_in_bytes=gib['code'] * aot.GIB))
    cost = {'flops': 1.0, 'bytes accessed': 1.0}
    if key in slow:
      cost['optimal_seconds'] = 10 * batch * trial.data.seq_len / aot.throughput_bound(
          trial, topo)
    estimate.fill_time(r, aot.tpu_run_config(trial), topo, cost)
    return r
  return compile_report


@pytest.mark.parametrize('extra,slow', [
    ({}, {}),
    ({('none', 1, 4): 20.0, ('minimal', 1, 4): 20.0}, {}),  # the tensor-1 ties do not fit
    ({}, {('none', 1, 4), ('minimal', 1, 4), ('none', 2, 2)}),  # estimates far below bounds
    ({('none', 2, 2): 6.0}, {('none', 1, 4)}),  # fits, but under 10% free: ranked last
])
def test_best_first_finds_the_full_searchs_top_plan_with_fewer_compiles(monkeypatch, extra,
                                                                       slow):
  c = _tiny(num_layers=62, num_heads=4, num_kv_heads=2)  # tensor 1 and 2 on v5e-4
  monkeypatch.setattr(aot, 'devices', lambda topo: [None] * topo.chips)
  space = plan.PlanSpace(remat_policies=('none', 'minimal', 'full'), rows_per_shard=(1, 2, 4),
                         tensor_degrees=(1, 2), layouts=('block/block',))
  runs = {}
  for every in (True, False):
    calls = []
    monkeypatch.setattr(aot, 'compile_report', _timed_stand_in(calls, extra, slow))
    plans = plan.search_plans(c, TOPO, dataclasses.replace(space, every=every))
    runs[every] = plans, calls
  (every, every_calls), (best, best_calls) = runs[True], runs[False]
  top = lambda p: (p.remat_policy, p.mesh['tensor'], p.global_batch, p.total_gib,
                   p.tokens_per_sec)
  assert top(best[0]) == top(every[0])
  assert best[0].headroom >= aot.HEADROOM
  assert set(best_calls) <= set(every_calls) and len(best_calls) < len(every_calls)
  # Every plan it compiled is ranked as the full search ranks it.
  assert [top(p) for p in best] == [top(p) for p in every if top(p) in map(top, best)]


def test_best_first_order_and_stop(monkeypatch):
  c = _tiny(num_layers=62)
  calls = []
  monkeypatch.setattr(aot, 'devices', lambda topo: [None] * topo.chips)
  monkeypatch.setattr(aot, 'compile_report', _timed_stand_in(
      calls, {('none', 1, 4): 20.0}, {('minimal', 1, 4)}))
  space = plan.PlanSpace(remat_policies=('none', 'minimal', 'full'), rows_per_shard=(1, 2, 4),
                         tensor_degrees=(1,), layouts=('block/block',))
  plans = plan.search_plans(c, TOPO, space)
  # none and minimal share the highest bound (no replay); none at 1 row per chip does not fit
  # (its larger batches are skipped), minimal's estimate there is far below its bound, so
  # minimal's 2 rows (same bound) is next and fits: it outranks full's bound, which replays the
  # forward, so full is never compiled.
  assert calls == [('none', 1, 4), ('minimal', 1, 4), ('minimal', 1, 8)]
  assert [(p.remat_policy, p.global_batch) for p in plans] == [('minimal', 8), ('minimal', 4)]
  full = _with_policy(c, 'full', 8)
  assert aot.throughput_bound(full, TOPO) < plans[0].tokens_per_sec


def _with_policy(c: config_lib.Config, remat: str, batch: int) -> config_lib.Config:
  return dataclasses.replace(
      c, model=dataclasses.replace(c.model, remat_policy=remat),
      train=dataclasses.replace(c.train, global_batch_size=batch))


# --- the context axis's cost model (comms.py) ---------------------------------------------


def _config(name: str, **changes) -> config_lib.Config:
  c = config_lib.from_config_dict(importlib.import_module(f'configs.{name}').get_config())
  return c.replace(**changes) if changes else c


def test_context_traffic_of_long_27b_by_hand():
  """configs/long_27b.py (one 131,072-token row over context 16 on a v5p-32, splash, remat full
  per layer and scanned per layer) against the arithmetic of docs/long_context.md."""
  c = aot.tpu_run_config(_config('long_27b'))
  topo = aot.parse_topology('v5p-32')
  t = comms.context_traffic(c, sharding.mesh_shape(c, topo.total_chips))
  kv = 2 * 16 * 128 * 2  # K and V of one key: 16 kv heads of 128, bfloat16
  gathered = 15 * 131072 // 16  # 122,880 keys into each chip per global layer and pass
  # Every layer of a block of six runs forward three times (the forward, the block's replay, its
  # own replay: the scan over the six cannot drop the global one's), the two tail layers twice.
  assert [comms.forward_runs(c.model, i) for i in (0, 5, 59, 60, 61)] == [3, 3, 3, 2, 2]
  # 10 global layers: three gathers and the backward's reduce-scatter, 1.007 GB each
  assert t.gather == 10 * gathered * kv * (3 + 1) == 40_265_318_400
  # 52 local layers, chunks of 4,096: the busiest chip's two chunks take W - 1 = 1,023 keys each
  assert list(comms.halo_keys(16, 'balanced', 4096, 1023)) == [1023] + [2046] * 14 + [1023]
  assert t.halo == (50 * (3 + 1) + 2 * (2 + 1)) * 2 * 1023 * kv == 3_452_731_392
  # to_balanced and from_balanced, forward and backward: two chunks of 4,096 x 5,376 bf16 each
  assert t.relayout == 4 * 2 * 4096 * 5376 * 2 == 352_321_536
  # splash reads the segment ids only (4 bytes a key), with each forward run
  assert t.ids == 4 * (10 * 3 * gathered + (50 * 3 + 2 * 2) * 2046 + 2 * 2 * 4096)
  assert t.total == pytest.approx(44.09e9, rel=1e-3)
  # At v5p's 600 GB/s into a chip: 73 ms a step, against 6.09 s of compute (the AOT report)
  assert t.total / (topo.spec.ici_gbps * 1e9) == pytest.approx(0.0735, rel=1e-2)
  # An all-gather of K/V on every layer would move 5.7x the gathers and halos
  every = (50 * 4 + 2 * 3 + 10 * 4) * gathered * kv
  assert every / (t.gather + t.halo) == pytest.approx(5.66, rel=1e-2)


def test_context_traffic_counts_layouts_remat_and_images():
  c = _config('tiny', data=dict(seq_len=128), mesh=dict(context=4, fsdp=2),
              train=dict(global_batch_size=4), model=dict(num_layers=12))
  shape = sharding.mesh_shape(c, 8)
  flat = c.replace(mesh=dict(context=1, fsdp=4))
  assert comms.context_traffic(flat, sharding.mesh_shape(flat, 4)) == comms.ContextTraffic()
  # window 32 over chunks of 16: the halo reaches two chunks back; a chunk whose neighbour is
  # on its own chip takes nothing (shard 3 holds chunks 3 and 4)
  assert list(comms.halo_keys(4, 'balanced', 16, 31)) == [31, 47, 62, 46]
  assert list(comms.halo_keys(4, 'contiguous', 32, 31)) == [0, 31, 31, 31]
  assert [list(x) for x in comms.relayout_chunks(4)] == [[1, 2, 1, 2], [1, 2, 1, 2]]
  assert [list(x) for x in comms.relayout_chunks(2)] == [[1, 1], [1, 1]]
  base = comms.context_traffic(c, shape)
  # rows scale every term; no remat runs each layer's forward once
  double = comms.context_traffic(c.replace(train=dict(global_batch_size=8)), shape)
  assert double.total == 2 * base.total
  none = comms.context_traffic(c.replace(model=dict(remat_policy='none')), shape)
  kv = 2 * 1 * 16 * 4  # tiny: one kv head of 16, float32
  # 2 rows per chip, 2 global layers, 3/4 of 128 keys, forward and backward
  assert none.gather == 2 * 2 * 96 * (1 + 1) * kv
  assert c.model.remat_policy == 'none' and none == base  # tiny's default
  full = comms.context_traffic(c.replace(model=dict(remat_policy='full')), shape)
  assert full.gather == 2 * 2 * 96 * (2 + 1) * kv  # a replay: one more gather per layer
  # tensor parallelism splits the kv heads where they divide
  wide = c.replace(model=dict(num_heads=4, num_kv_heads=2), mesh=dict(context=4, fsdp=1,
                                                                      tensor=2))
  one = comms.context_traffic(wide.replace(mesh=dict(context=4, fsdp=2, tensor=1)),
                              sharding.mesh_shape(wide.replace(
                                  mesh=dict(context=4, fsdp=2, tensor=1)), 8))
  split = comms.context_traffic(wide, sharding.mesh_shape(wide, 8))
  assert split.gather == one.gather  # half the heads, twice the rows per chip
  # images: a look-ahead of tokens_per_image - 1 keys after each chunk, image block ids
  vision = c.replace(model=dict(vision=True, vision_image_size=16, vision_patch_size=4,
                                vision_width=16, vision_depth=2, vision_mlp_dim=32,
                                vision_num_heads=2, vision_pool=2))
  with_images = comms.context_traffic(vision, shape)
  assert vision.model.tokens_per_image == 4
  assert list(comms.halo_keys(4, 'balanced', 16, 31, 3)) == [34, 53, 68, 49]
  assert with_images.halo > base.halo and with_images.ids > base.ids


_BYTES = {'f32': 4, 's32': 4, 'bf16': 2, 'pred': 1}
_COLLECTIVE = re.compile(r'^\s*(?:ROOT )?%\S+ = (.+?) (collective-permute|all-gather|'
                         r'reduce-scatter|all-reduce|all-to-all)(?:-start)?\(')


def _computations(hlo: str) -> dict[str, list[str]]:
  """The compiled module's computations by name ('ENTRY' for the entry), their lines."""
  out, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r'^(ENTRY )?%(\S+) .*\{$', line)
    if head:
      name = 'ENTRY' if head.group(1) else head.group(2)
      out[name] = []
    elif line.startswith('}'):
      name = None
    elif name:
      out[name].append(line)
  return out


def _executions(comps: dict[str, list[str]]) -> collections.Counter:
  """How often each computation runs per call of the entry: a while body its known trip count
  times its caller's, anything called (fusions, calls) as often as its caller."""
  runs, todo = collections.Counter({'ENTRY': 1}), ['ENTRY']
  while todo:
    name = todo.pop()
    for line in comps[name]:
      assert 'conditional(' not in line  # a branch's count would depend on the data
      body = re.search(r'body=%([\w.\-]+)', line)
      if body:
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        runs[body.group(1)] += runs[name] * int(trips.group(1))
        todo.append(body.group(1))
        continue
      for callee in re.findall(r'(?:calls|to_apply)=%([\w.\-]+)', line):
        runs[callee] += runs[name]
        todo.append(callee)
  return runs


def _context_bytes_received(hlo: str, devices: int) -> dict[str, np.ndarray]:
  """{'float', 'int'}: [devices] bytes each device receives by the collectives models/context.py
  issues (its shard_map's ppermutes, all-gathers and their reduce-scatters) in one step: a
  collective-permute's result into each target of its pairs, an all-gather's (g - 1) / g of its
  result, a reduce-scatter's (g - 1) results (g: the group size)."""
  comps = _computations(hlo)
  runs = _executions(comps)
  out = {'float': np.zeros(devices), 'int': np.zeros(devices)}
  for name, lines in comps.items():
    for line in lines:
      m = _COLLECTIVE.search(line)
      if not m or not runs[name] or not re.search(
          r'op_name="[^"]*shard_map/(ppermute|all_gather|reduce_scatter)"', line):
        continue
      size = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(',') if d)
                 for t, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)))
      got = np.zeros(devices)
      if m.group(2) == 'collective-permute':
        pairs = re.search(r'source_target_pairs=\{(.*?)\}\}', line).group(1)
        for target in re.findall(r'\d+,(\d+)', pairs):
          got[int(target)] += size
      else:
        g = len(re.search(r'replica_groups=\{\{([\d,]*)\}', line).group(1).split(','))
        got[:] = size * {'all-gather': (g - 1) / g, 'reduce-scatter': g - 1}[m.group(2)]
      out['int' if m.group(1).lstrip('(').startswith('s32') else 'float'] += got * runs[name]
  return out


@pytest.mark.slow
@pytest.mark.parametrize('layers,remat,unit,degree,layout', [
    (12, 'full', 'layer', 4, 'balanced'),  # blocks only: nested replays, halos two chunks back
    (14, 'full', 'layer', 8, 'balanced'),  # a two-layer tail; chunks of 8: halos 4 chunks back
    (14, 'none', 'block', 4, 'contiguous'),
    (14, 'minimal', 'block', 4, 'balanced'),
])
def test_context_traffic_equals_the_compiled_train_step(layers, remat, unit, degree, layout):
  """comms.context_traffic against the collectives of models/context.py in the train step
  compiled for the 8-device CPU mesh (tiny, 128 tokens a row, window 32, float32, reference
  attention; each 20-30 s to compile here), counted with the while loops' trip counts.

  K, V and the activations agree to the byte, except that XLA may merge a tail layer's replay
  with its forward (the tail's checkpoint is not in a scan, and its prevent_cse is off): then
  the model is over by whole tail-layer replays, which it keeps (a scanned program cannot merge
  them; 27b's two tail layers are 0.08% of its step). The positions and segment ids: XLA moves
  them once for all the layers of a loop body, the model per layer, so the model is an upper
  bound there.
  """
  c = _config('tiny', mesh=dict(context=degree, fsdp=-1),
              train=dict(global_batch_size=8 // degree),
              model=dict(num_layers=layers, vocab_size=512, remat_policy=remat, remat_unit=unit,
                         scan_unit='block', context_layout=layout))
  mesh = sharding.make_mesh(c)
  step, args, _ = aot.train_step_builder(c, mesh)
  got = _context_bytes_received(step.lower(*args).compile().as_text(), 8)
  want = comms.context_traffic(c, sharding.mesh_shape(c, 8))
  floats = want.gather + want.halo + want.relayout
  chunk = 128 // (degree * (2 if layout == 'balanced' else 1))
  # K and V of the busiest chip's halo keys, once per tail layer whose replay was merged
  replay = max(comms.halo_keys(degree, layout, chunk, 31)) * 2 * 16 * 4
  merged = (floats - got['float'].max()) / replay
  assert merged == int(merged) and 0 <= merged <= layers % 6 * (remat != 'none'), merged
  assert 0 < got['int'].max() <= want.ids


def _positions_stand_in(calls: list, gib_per_position: float):
  """A compile whose memory is 1 GiB of state plus gib_per_position for each position a chip
  holds (its rows x seq_len / context): what splitting the sequence saves."""
  def compile_report(trial, topo, device_list=None):
    del device_list
    calls.append(trial.mesh.context)
    r = aot._base_report(trial, topo, sharding.mesh_shape(trial, topo.total_chips, 1))
    rows = trial.train.global_batch_size / (r.mesh['fsdp'] * r.mesh['data'])
    r.state_gib = 1.0
    r.model_flops_per_step = flops.train_flops_per_step(trial)
    aot._fill_memory(r, types.SimpleNamespace(
        argument_size_in_bytes=aot.GIB, output_size_in_bytes=0, alias_size_in_bytes=0,
        temp_size_in_bytes=gib_per_position * rows * trial.data.seq_len / trial.mesh.context
        * aot.GIB, generated_code_size_in_bytes=0))
    estimate.fill_time(r, aot.tpu_run_config(trial), topo, {'flops': 1.0, 'bytes accessed': 1.0})
    return r
  return compile_report


def _context_search(monkeypatch, seq_len: int, gib_per_position: float, every: bool):
  calls = []
  monkeypatch.setattr(aot, 'devices', lambda topo: [None] * topo.chips)
  monkeypatch.setattr(aot, 'compile_report', _positions_stand_in(calls, gib_per_position))
  space = plan.PlanSpace(remat_policies=('full',), rows_per_shard=(1,), tensor_degrees=(1,),
                         context_degrees=(1, 2, 4), layouts=('block/block',), every=every)
  return plan.search_plans(_config('tiny', data=dict(seq_len=seq_len)), TOPO, space), calls


def test_planner_prefers_the_smaller_context_degree_for_its_traffic(monkeypatch):
  """8,192-token rows on a v5e-4, which fit at every degree: the same compute per token (FLOPs
  and attention shards), so the context axis's transfers alone rank them."""
  plans, calls = _context_search(monkeypatch, 8192, 1e-5, every=True)
  assert calls == [1, 2, 4]
  assert [p.mesh['context'] for p in plans] == [1, 2, 4]
  assert plans[0].context_seconds == 0 < plans[1].context_seconds < plans[2].context_seconds
  for p in plans:  # one row per fsdp shard: the compute per row is the same, plus the transfers
    assert (p.step_seconds - p.context_seconds) / p.global_batch == pytest.approx(
        plans[0].step_seconds / plans[0].global_batch)
    assert p.context_seconds == pytest.approx(p.context_bytes / 200e9)  # v5e ICI, GB/s in
    assert 'at 200 GB/s ICI' in p.step_source or p.mesh['context'] == 1
  assert plans[0].tokens_per_sec > plans[1].tokens_per_sec * (1 + 1e-6)  # not a tie
  # Best first: the bound counts the transfers too, so degree 1's plan outranks every bound left
  best, calls = _context_search(monkeypatch, 8192, 1e-5, every=False)
  assert calls == [1] and best[0].mesh['context'] == 1
  for p in plans[1:]:
    assert aot.throughput_bound(plan._with(
        _config('tiny', data=dict(seq_len=8192)), remat='full', tensor=1, fsdp=4 // p.mesh[
            'context'], batch=4 // p.mesh['context'], context=p.mesh['context']),
        TOPO) == pytest.approx(p.tokens_per_sec)


def test_planner_takes_the_context_degree_memory_needs(monkeypatch):
  """32,768-token rows: a chip holding 32,768 or 16,384 positions runs out of HBM (16 GiB less
  10%), 8,192 fit; the planner takes context 4 though its transfers are the largest."""
  for every in (True, False):
    plans, calls = _context_search(monkeypatch, 32768, 1e-3, every=every)
    assert calls == [1, 2, 4]
    assert [(p.mesh['context'], p.fits) for p in plans] == [(4, True)]
    assert plans[0].context_seconds > 0
