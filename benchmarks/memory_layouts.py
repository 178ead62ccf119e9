"""Per-chip TPU memory of the memory layouts (model.remat_unit x scan_unit x remat policy), from AOT
compiles.

python benchmarks/memory_layouts.py                                   # 4b, 6 layers, v5e-8
python benchmarks/memory_layouts.py --config=configs/27b.py --topology=v5p-128 --layers=0

Each case is one real compile of the train step with the splash TPU kernel (aot.compile_report,
libtpu's compile-only devices; no TPU needed). --layers=N trims the model to N decoder layers
(6 = one scanned block of six, the unit the layouts change) so that a case compiles in minutes on
a small box; 0 keeps the config's depth. Prints argument / temporary / total GiB per chip, the
compile seconds and this machine's load, and optionally writes the reports as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from gemma3_train.planning import aot  # pylint: disable=g-import-not-at-top,wrong-import-position


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='configs/4b.py', help='config file')
  p.add_argument('--topology', default='v5e-8', help='TPU slice, e.g. v5e-8, v5p-128')
  p.add_argument('--layers', type=int, default=6, help='decoder layers (0 = the config\'s)')
  p.add_argument('--units', default=','.join(config_lib.REMAT_UNITS),
                 help='comma list of model.remat_unit values')
  p.add_argument('--scan_units', default='block', help='comma list of model.scan_unit values')
  p.add_argument('--policies', default='', help='comma list of model.remat_policy values '
                 "('' = the config's)")
  p.add_argument('--batch', type=int, default=0, help='global batch (0 = the config\'s)')
  p.add_argument('--set', action='append', default=[], metavar='SECTION.FIELD=VALUE',
                 help='override a config field, e.g. --set=train.loss_chunk_size=256 (repeatable)')
  p.add_argument('--json', default='', help='also write the reports to this JSON file')
  return p.parse_args(argv)


def _override(c: config_lib.Config, assignments) -> config_lib.Config:
  """c with each SECTION.FIELD=VALUE applied, VALUE converted to the field's current type."""
  for assignment in assignments:
    key, _, text = assignment.partition('=')
    section, _, field = key.partition('.')
    old = getattr(getattr(c, section), field)
    value = text.lower() in ('1', 'true') if isinstance(old, bool) else type(old)(text)
    c = dataclasses.replace(c, **{section: dataclasses.replace(getattr(c, section),
                                                                 **{field: value})})
  return c


def main(argv):
  args = _parse_args(argv)
  base = _override(config_lib.load_config_file(args.config), args.set)
  topo = aot.parse_topology(args.topology, aot.num_slices(base))
  model = base.model
  if args.layers:
    model = dataclasses.replace(model, num_layers=args.layers)
  train = base.train
  if args.batch:
    train = dataclasses.replace(train, global_batch_size=args.batch)
  policies = args.policies.split(',') if args.policies else [model.remat_policy]
  print(f'{args.config} on {args.topology}: {model.num_layers} layers, seq {base.data.seq_len}, '
        f'global batch {train.global_batch_size} {" ".join(args.set)}; {os.cpu_count()} cpus',
        flush=True)
  reports = []
  for policy in policies:
    for unit, scan in itertools.product(args.units.split(','), args.scan_units.split(',')):
      c = dataclasses.replace(
          base, model=dataclasses.replace(model, remat_policy=policy, remat_unit=unit,
                                          scan_unit=scan),
          train=train)
      config_lib.validate(c)
      load = os.getloadavg()[0]
      r = aot.compile_report(c, topo)
      row = dict(dataclasses.asdict(r), num_layers=model.num_layers, overrides=args.set,
                 loss_chunk_size=c.train.loss_chunk_size,
                 load_before=load, load_after=os.getloadavg()[0])
      reports.append(row)
      print(f'  {policy:<24} remat/{unit:<6} scan/{scan:<6} argument '
            f'{r.argument_gib or 0:7.3f}  temp {r.temp_gib or 0:7.3f}  total '
            f'{r.total_gib or 0:7.3f} GiB of {r.hbm_gib:g}  '
            f'fits {r.fits}  compile {r.compile_seconds or 0:6.0f} s  load '
            f'{load:.1f}->{row["load_after"]:.1f}  {r.error}', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(when=time.strftime('%Y-%m-%d %H:%M'), reports=reports), f, indent=2)


if __name__ == '__main__':
  main(sys.argv[1:])
