"""Does QAT recover what post-training q4_0 loses? configs/tiny.py, float vs PTQ vs QAT, on CPU.

  python benchmarks/qat_effect.py [--workdir=/tmp/gemma3_qat_effect] [--float_workdir=DIR]
      [--float_steps=400] [--steps=60] [--eval_every=20] [--eval_steps=8] [--batch=4] [--lr=1e-4]
      [--schedule=constant] [--loss=kl] [--alpha=0] [--temperature=1] [--embedding_quant=q4_0]
      [--arms=distill,ce] [--plot=docs/qat_effect.png]

Runs the real CLI on one CPU device. The float model is configs/tiny.py trained --float_steps steps
on the bundled text (or --float_workdir, an existing run). Its held-out loss, and that of its
post-training q4_0 model (PTQ): the numbers `gemma3-convert export --format=gguf --quant=q4_0`
writes, i.e. models/quant.py's Q4_0 blocks of the decoder's seven projections, and of the embedding
(the tied head) unless --embedding_quant='' (the export's --embedding_quant=f32). The QAT arms
start from the float checkpoint (checkpoint.init_from) with quant.qat=q4_0 (and
quant.embedding=--embedding_quant), on tiny.py's data order, for --steps steps, at once (two
processes): `distill` with the float run as the teacher (train.objective=distill, the Gemma 3 QAT
recipe), `ce` on the data's next tokens. Each eval of a QAT run is the held-out loss of its q4_0
model (its forward is the fake-quantized one, the export's numbers). Every model is scored on the
same --eval_steps batches of the eval split the trainer uses, with the exact full-vocabulary
KL(float || model) besides the loss. Then each QAT run and the float run are exported to GGUF q4_0
with the CLI, and the file's dequantized tensors are compared with models/quant.py's q4_0 of the
checkpoint's weights (the count of values that differ is printed). Each workdir resumes when it
already holds a run. Prints a table; writes the curves to --plot (needs matplotlib).
docs/quantization.md has the figures, and the settings tried.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}


def _load() -> str:
  return ' '.join(f'{x:.1f}' for x in os.getloadavg())


def _start(workdir: pathlib.Path, flags: list[str], log: pathlib.Path) -> subprocess.Popen:
  """Starts (or resumes) gemma3-train on configs/tiny.py."""
  cmd = [sys.executable, '-m', 'gemma3_train.cli.train', '--config=configs/tiny.py',
         f'--workdir={workdir}', '--config.logging.tensorboard=False', *flags]
  with log.open('a') as f:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, start: float) -> float:
  """Waits for a run; returns its wall seconds."""
  if proc.wait():
    raise subprocess.CalledProcessError(proc.returncode, proc.args)
  return time.time() - start


def _evals(workdir: pathlib.Path) -> dict[int, dict]:
  """step -> the eval row of metrics.jsonl (the last one written for a step)."""
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines() if l]
  return {r['step']: r for r in rows if any(k.startswith('eval_') for k in r)}


def _config(eval_steps: int):
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  cd = config_lib.load_config_dict(str(ROOT / 'configs' / 'tiny.py'))
  cd.train.eval_steps = eval_steps
  return config_lib.from_config_dict(cd)


class Scorer:
  """Held-out loss, accuracy and KL(float || model) of a checkpoint run with a given fake
  quantization, on the first eval_steps batches of the eval split (the trainer's eval batches:
  inference/scoring.py reads them as its evals do)."""

  def __init__(self, float_dir: pathlib.Path, eval_steps: int):
    import jax  # pylint: disable=g-import-not-at-top
    from gemma3_train import convert  # pylint: disable=g-import-not-at-top
    from gemma3_train import data as data_lib  # pylint: disable=g-import-not-at-top
    from gemma3_train.models import soft_targets  # pylint: disable=g-import-not-at-top
    self.c = _config(eval_steps)
    ds = data_lib.make_dataset(self.c.replace(data=dict(num_workers=0, shuffle=False)), 'eval',
                               num_epochs=1)
    it = iter(ds)
    self.batches = [next(it) for _ in range(eval_steps)]
    self.teacher = convert.load(str(float_dir))
    chunk = self.c.train.loss_chunk_size

    def sums(model, teacher, b):
      x = model.hidden(b['inputs'], b['positions'], b['segment_ids'])
      tx = teacher.hidden(b['inputs'], b['positions'], b['segment_ids'])
      return soft_targets.kl_sums(x, model.embedder.table(), tx, teacher.embedder.table(),
                                  b['targets'], b['weights'], temperature=1.0, chunk_size=chunk)
    from flax import nnx  # pylint: disable=g-import-not-at-top
    self._sums = nnx.jit(sums)
    self._jnp = jax.numpy

  def __call__(self, workdir: pathlib.Path, qat: str = '', embedding: str = '') -> dict:
    from gemma3_train import convert  # pylint: disable=g-import-not-at-top
    from gemma3_train.models import decoder  # pylint: disable=g-import-not-at-top
    model = decoder.set_qat(convert.load(str(workdir)), qat, embedding)
    tot: dict[str, float] = {}
    for b in self.batches:
      out = self._sums(model, self.teacher, {k: self._jnp.asarray(v) for k, v in b.items()})
      for k, v in out.items():
        tot[k] = tot.get(k, 0.0) + float(v)
    w = tot['weight_sum']
    return {'loss': tot['loss_sum'] / w, 'accuracy': tot['correct_sum'] / w,
            'kl': tot['soft_sum'] / w, 'tokens': w}


def check_gguf(workdir: pathlib.Path, dst: pathlib.Path, embedding: str) -> tuple[int, int, int]:
  """Exports workdir with the CLI at --quant=q4_0 and compares every matrix in the file with
  models/quant.py's q4_0 (or, for a float embedding, f32) of the checkpoint's weight, computed
  op by op (which equals ggml's reference quantizer, tests/test_qat.py). Returns (tensors,
  values that differ, values)."""
  import gguf  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import hf  # pylint: disable=g-import-not-at-top
  from gemma3_train.models import quant  # pylint: disable=g-import-not-at-top
  if dst.exists():
    dst.unlink()
  subprocess.run([sys.executable, '-m', 'gemma3_train.cli.convert', 'export', '--format=gguf',
                  '--quant=q4_0', f'--embedding_quant={embedding or "f32"}', f'--src={workdir}',
                  f'--dst={dst}'], cwd=ROOT, env=ENV, check=True, capture_output=True)
  cfg, top, layers = convert.load_canonical(str(workdir))
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_layers)
  want = {'token_embd.weight': (np.asarray(top['embedding'], np.float32), embedding)}
  for i, layer in enumerate(layers):
    for name, x in hf.canonical_layer_to_hf(layer, 'model.', i).items():
      if x.ndim == 2:
        want[names.get_name(name.removesuffix('.weight')) + '.weight'] = (
            np.asarray(x, np.float32), 'q4_0')
  tensors = {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}
  differ = total = 0
  for name, (x, mode) in want.items():
    t = tensors[name]
    got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(x.shape)
    ref = np.asarray(quant.dequantized(x, (1,), mode)) if mode else x
    differ, total = differ + int(np.sum(got != ref)), total + got.size
  dst.unlink()  # 20-40 MB; the comparison is what is kept
  return len(want), differ, total


def _plot(path: str, curves: dict, float_row: dict, ptq_row: dict, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only for the plot)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
  for (name, curve), marker in zip(curves.items(), 'so^'):
    steps = sorted(curve)
    ax.plot(steps, [curve[s]['loss'] for s in steps], marker + '-', label=f'QAT, {name}')
    kl_steps = [s for s in steps if 'kl' in curve[s]]  # ce: the start and the end only
    ax_kl.plot(kl_steps, [curve[s]['kl'] for s in kl_steps], marker + '-', label=f'QAT, {name}')
  for a, key in ((ax, 'loss'), (ax_kl, 'kl')):
    a.axhline(ptq_row[key], color='C3', ls='--', label=f'post-training q4_0 ({ptq_row[key]:.4f})')
  ax.axhline(float_row['loss'], color='gray', ls='--', label=f'float ({float_row["loss"]:.4f})')
  ax.set(xlabel='QAT step', ylabel='held-out next-token loss (q4_0 model)', title=title)
  ax_kl.set(xlabel='QAT step', ylabel='KL(float || q4_0 model), held out',
            title='distance to the float model')
  ax.legend(fontsize=8)
  ax_kl.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/gemma3_qat_effect')
  p.add_argument('--float_workdir', default='', help='an existing configs/tiny.py run to use')
  p.add_argument('--float_steps', type=int, default=400)
  p.add_argument('--steps', type=int, default=60)
  p.add_argument('--eval_every', type=int, default=20)
  p.add_argument('--eval_steps', type=int, default=8, help='held-out batches of 8 x 128')
  p.add_argument('--batch', type=int, default=4, help="the QAT runs' rows per step (tiny.py: 8)")
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--schedule', default='constant')
  p.add_argument('--loss', default='kl', help='distill.loss of the distill arm')
  p.add_argument('--alpha', type=float, default=0.0)
  p.add_argument('--temperature', type=float, default=1.0)
  p.add_argument('--embedding_quant', default='q4_0', help="'' keeps the embedding float")
  p.add_argument('--arms', default='distill,ce')
  p.add_argument('--plot', default=str(ROOT / 'docs' / 'qat_effect.png'))
  args = p.parse_args()
  sys.path.insert(0, str(ROOT))
  os.environ.update(JAX_PLATFORMS='cpu')
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  print('#', cpu_peak.describe_machine(), flush=True)
  out = pathlib.Path(args.workdir)
  out.mkdir(parents=True, exist_ok=True)

  float_dir = pathlib.Path(args.float_workdir) if args.float_workdir else out / 'float'
  if not args.float_workdir:
    seconds = _wait(_start(float_dir, [f'--config.train.num_steps={args.float_steps}',
                                       '--config.train.eval_every=100',
                                       f'--config.train.eval_steps={args.eval_steps}'],
                           out / 'float.log'), time.time())
    print(f'float: configs/tiny.py, {args.float_steps} steps ({seconds:.0f} s; load {_load()})',
          flush=True)
  emb = args.embedding_quant
  common = ['--config.checkpoint.init_from=' + str(float_dir), '--config.quant.qat=q4_0',
            f'--config.quant.embedding={emb}', f'--config.train.num_steps={args.steps}',
            f'--config.train.eval_every={args.eval_every}',
            # The same held-out rows as the scorer's (batches of 8): eval_steps * 8 / batch.
            f'--config.train.global_batch_size={args.batch}',
            f'--config.train.eval_steps={args.eval_steps * 8 // args.batch}',
            '--config.checkpoint.every=0',
            f'--config.optim.lr={args.lr}', f'--config.optim.schedule={args.schedule}',
            # data.seed stays: it also orders the eval split, and the arms' evals must be the
            # float model's held-out rows.
            '--config.optim.warmup_steps=10',
            '--config.train.loss_chunk_size=64']
  arms = {'distill': ['--config.train.objective=distill', f'--config.distill.teacher={float_dir}',
                      f'--config.distill.loss={args.loss}', f'--config.distill.alpha={args.alpha}',
                      f'--config.distill.temperature={args.temperature}',
                      '--config.distill.teacher_dtype=float32'],
          'ce': ['--config.train.objective=ce']}
  # The arms run at once: on a shared box two processes get two shares of it.
  start, names = time.time(), args.arms.split(',')
  procs = {name: _start(out / name, common + arms[name], out / f'{name}.log') for name in names}
  score = Scorer(float_dir, args.eval_steps)
  rows = {'float': score(float_dir),
          'PTQ q4_0, projections only': score(float_dir, 'q4_0'),
          f'PTQ q4_0, embedding {emb or "float"}': score(float_dir, 'q4_0', emb)}
  ptq = rows[f'PTQ q4_0, embedding {emb or "float"}']
  for name, r in rows.items():
    print(f'{name}: held-out loss {r["loss"]:.4f}, KL to float {r["kl"]:.5f}', flush=True)

  curves = {}
  for name in names:
    seconds = _wait(procs[name], start)
    evals = _evals(out / name)
    key = 'eval_loss/hard' if name == 'distill' else 'eval_loss'
    curves[name] = {0: ptq, **{s: {'loss': r[key], **({'kl': r['eval_distill/kl_to_teacher']}
                                                      if name == 'distill' else {})}
                               for s, r in evals.items()}}
    last = evals[max(evals)]  # the trainer's eval: the scorer's rows, the QAT forward
    rows[f'QAT {name}, {args.steps} steps, q4_0'] = final = {
        'loss': curves[name][max(evals)]['loss'], 'accuracy': last['eval_accuracy'],
        'kl': curves[name][max(evals)].get('kl', float('nan')), 'tokens': ptq['tokens']}
    n, differ, total = check_gguf(out / name, out / f'{name}.gguf', emb)
    print(f'QAT {name}: {seconds:.0f} s this run (load {_load()}); final held-out loss '
          f'{final["loss"]:.4f}; GGUF q4_0 export: {n} tensors, {differ} of {total} values '
          'differ from quant.py on the checkpoint', flush=True)
  n, differ, total = check_gguf(float_dir, out / 'float.gguf', emb)
  print(f'float, GGUF q4_0 export (PTQ): {n} tensors, {differ} of {total} values differ from '
        'quant.py on the checkpoint', flush=True)

  gap = ptq['loss'] - rows['float']['loss']
  print(f'\n# load {_load()} (1/5/15 min) at the end')
  print('| model | held-out loss | accuracy | KL(float \\|\\| model) | share of the PTQ gap '
        'recovered |')
  print('|---|---|---|---|---|')
  for name, r in rows.items():
    rec = (ptq['loss'] - r['loss']) / gap if name.startswith('QAT') and gap > 0 else None
    kl = '-' if r['kl'] != r['kl'] else f'{r["kl"]:.5f}'  # ce's evals have no KL
    print(f'| {name} | {r["loss"]:.4f} | {r["accuracy"]:.4f} | {kl} | '
          f'{"" if rec is None else f"{rec:.0%}"} |')
  print(f'\nPTQ gap {gap:+.4f} nats over {ptq["tokens"]:.0f} held-out tokens')
  print('\nstep  ' + '  '.join(f'{n:>12s}' for n in curves))
  for s in sorted(set.intersection(*(set(c) for c in curves.values()))):
    print(f'{s:4d}  ' + '  '.join(f'{c[s]["loss"]:12.4f}' for c in curves.values()))
  title = (f'tiny.py, QAT q4_0 (embedding {emb or "float"}), lr {args.lr:g} {args.schedule}, '
           f'batch {args.batch}')
  try:
    _plot(args.plot, curves, rows['float'], ptq, title)
    print(f'plot: {args.plot}')
  except ImportError:
    print('plot: skipped (pip install matplotlib)')


if __name__ == '__main__':
  main()
