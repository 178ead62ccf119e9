"""Where a distillation step's time goes: the teacher, the sampling and the loss against plain
pretraining on the same student (configs/tiny.py's model and batch, in one process).

python benchmarks/distill_step.py                      # float32, 5 timed steps each
python benchmarks/distill_step.py --steps=9 --samples=256 --chunk=64 --profile

Jitted and timed, each the median of --steps calls after --warmup (compilation excluded):
  ce        the plain next-token train step (train.objective=ce);
  offline   the distill train step on stored targets (distill.teacher='', `sampled`, --samples
            ids per position): the student and the sampled loss, no teacher;
  online    the distill train step with a teacher of the student's shape (its checkpoint in a
            temporary directory): teacher forward + sampling + loss;
  teacher   the teacher's forward alone (its final hidden states);
  sampling  soft_targets.teacher_targets alone (the teacher's head, softmax, CDF, draws) on those;
  heads     the gradient of the LM head's loss alone on the student's hidden states: ce's
            (chunked_cross_entropy), the fused sampled loss the objective runs
            (soft_target_loss) and its plain jax.checkpoint form (soft_target_sums).
The loss's cost is offline - ce, the teacher's online - offline; the shares are of the online
step. The two teacher parts jitted alone can add up to more than their share of the step
(XLA's CPU runtime may run independent work of one step side by side).
The parts are timed in interleaved rounds, so that a shared box's load falls on all alike;
the load average is printed before and after. --profile traces the ce and offline steps
(benchmarks/hlo_profile.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))  # hlo_profile


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=5, help='timed calls per part (median reported)')
  p.add_argument('--warmup', type=int, default=1, help='untimed calls after compilation')
  p.add_argument('--samples', type=int, default=256, help='distill.samples')
  p.add_argument('--chunk', type=int, default=0,
                 help='train.loss_chunk_size (0 = configs/tiny.py\'s)')
  p.add_argument('--dtype', default='float32', help='model.dtype')
  p.add_argument('--profile', action='store_true',
                 help='trace 2 ce and offline steps each and print where their time goes')
  return p.parse_args(argv)


def _interleaved_medians(fns: dict, steps: int, warmup: int) -> dict[str, float]:
  """name -> median seconds of fns[name](): each compiled and warmed up, then timed in rounds
  that call every one once, so that a shared box's changing load falls on all alike."""
  import jax  # pylint: disable=g-import-not-at-top
  for fn in fns.values():
    for _ in range(1 + warmup):  # the first call compiles
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _batch(c, rng):
  """Random packed rows of c's shape (one document per row) with the objective's extra keys:
  stored targets (k distinct ids, probabilities summing to 1) or the draws' record keys."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  B, L, V = c.train.global_batch_size, c.data.seq_len, c.model.vocab_size
  tokens = rng.integers(0, V, size=(B, L + 1), dtype=np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
               segment_ids=np.ones((B, L), np.int32), weights=np.ones((B, L), np.float32))
  if c.train.objective == 'distill' and not c.distill.teacher:
    k = c.distill.samples
    ids = np.sort(np.stack([rng.choice(V, k, replace=False) for _ in range(B * L)]), -1)
    probs = rng.dirichlet(np.ones(k), size=B * L)
    batch.update(teacher_ids=ids.reshape(B, L, k).astype(np.int32),
                 teacher_probs=probs.reshape(B, L, k).astype(np.float32))
  elif c.train.objective == 'distill':
    batch.update(record=np.repeat(np.arange(B, dtype=np.int32)[:, None], L, 1),
                 record_pos=batch['positions'].copy())
  return batch


def main(argv):
  args = _args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gemma3_train import config as config_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train import sharding  # pylint: disable=g-import-not-at-top
  from gemma3_train.convert import layout, ours  # pylint: disable=g-import-not-at-top
  from gemma3_train.infra import cpu_peak  # pylint: disable=g-import-not-at-top
  from gemma3_train.models import decoder, lm_head  # pylint: disable=g-import-not-at-top
  from gemma3_train.models import soft_targets  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import restore as restore_lib  # pylint: disable=g-import-not-at-top
  from gemma3_train.training import state as train_state  # pylint: disable=g-import-not-at-top
  from gemma3_train.training.objectives import distill  # pylint: disable=g-import-not-at-top

  print(f'# {cpu_peak.describe_machine(args.dtype)}', flush=True)
  before = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  base = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'tiny.py'))
  train = dict(num_steps=1000, **({'loss_chunk_size': args.chunk} if args.chunk else {}))
  base = base.replace(model=dict(dtype=args.dtype), train=train)
  mesh = sharding.make_mesh(base, jax.devices()[:1])
  rng = np.random.default_rng(0)
  fns = {}

  def train_step(name, c, frozen_models=None):
    s = train_state.setup(c, mesh)
    state = s.state
    if frozen_models:
      state = {**state, 'frozen_models': frozen_models(s)}
    s.state = None  # the step donates it
    batch = {k: jax.device_put(v, s.batch_sharding[k]) for k, v in _batch(c, rng).items()}
    holder = {'state': state}

    def step():
      holder['state'], metrics = s.train_step(holder['state'], batch)
      return metrics['loss']
    fns[name] = step
    return s, holder, batch

  ce_s, ce_holder, ce_batch = train_step('ce', base.replace(train=dict(objective='ce')))
  d = dict(loss='sampled', samples=args.samples, alpha=0.0)
  offline = base.replace(train=dict(objective='distill'), distill=dict(teacher='', **d))
  off_s, off_holder, off_batch = train_step('offline', offline)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'teacher')  # a random teacher of the student's shape
    teacher = decoder.Gemma3(base.model, rngs=nnx.Rngs(7))
    top, layers = layout.state_to_canonical(base.model, nnx.state(teacher, nnx.Param))
    ours.save_params(path, base.model, top, enumerate(layers))
    del teacher
    online = base.replace(train=dict(objective='distill'),
                          distill=dict(teacher=path, teacher_dtype='float32', **d))
    load = lambda s: {distill.TEACHER: restore_lib._load_frozen_model(s, distill.TEACHER, path)}
    s, holder, batch = train_step('online', online, load)
  graphdef = s.frozen_model_graphdef[distill.TEACHER]
  teacher_part = lambda: holder['state']['frozen_models'][distill.TEACHER]  # (donated)
  t = online.train
  args_BL = batch['inputs'], batch['positions'], batch['segment_ids']

  @jax.jit
  def forward(part, args_BL):
    return nnx.merge(graphdef, part).hidden(*args_BL)

  @jax.jit
  def sampling(part, x_BLD, record_BL, pos_BL):
    return soft_targets.teacher_targets(x_BLD, nnx.merge(graphdef, part).embedder.table(),
                                        k=args.samples, temperature=1.0,
                                        chunk_size=t.loss_chunk_size, seed=t.seed,
                                        record_BL=record_BL, pos_BL=pos_BL)
  # The heads alone, on the student's hidden states: their gradients' cost without the model.
  table_VD = np.asarray(nnx.merge(graphdef, teacher_part()).embedder.table())  # a copy
  ids, q = off_batch['teacher_ids'], off_batch['teacher_probs']
  heads = {
      'ce head': lambda x, E: lm_head.chunked_cross_entropy(
          x, E, batch['targets'], batch['weights'], chunk_size=t.loss_chunk_size)['loss_sum'],
      'sampled head, fused': lambda x, E: soft_targets.soft_target_loss(
          x, E, ids, q, batch['targets'], batch['weights'], soft=1.0,
          chunk_size=t.loss_chunk_size)[0],
      'sampled head, jax.checkpoint': lambda x, E: soft_targets.soft_target_sums(
          x, E, ids, q, batch['targets'], batch['weights'],
          chunk_size=t.loss_chunk_size)['soft_sum']}
  with sharding.use_mesh(mesh, s.rules):
    x_BLD = forward(teacher_part(), args_BL)
    fns['teacher'] = lambda: forward(teacher_part(), args_BL)
    fns['sampling'] = lambda: sampling(teacher_part(), x_BLD, batch['record'],
                                       batch['record_pos'])
    for name, head in heads.items():
      grad = jax.jit(jax.grad(head, argnums=(0, 1)))
      fns[name] = functools.partial(grad, x_BLD, table_VD)
    times = _interleaved_medians(fns, args.steps, args.warmup)
  if args.profile:
    import hlo_profile  # pylint: disable=g-import-not-at-top  (beside us)
    for name, ss, h, b in (('ce', ce_s, ce_holder, ce_batch),
                           ('offline', off_s, off_holder, off_batch)):
      hlo = hlo_profile.HloModule(ss.train_step.lower(h['state'], b).compile().as_text())
      op_times = hlo_profile.trace_op_times(fns[name], 2, hlo)
      print(f'-- {name} train step --', flush=True)
      print(hlo_profile.breakdown(hlo, op_times, times[name], None, top=12), flush=True)
  after = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  c = base
  print(f'# jax {jax.__version__} ({jax.devices()[0].platform}, 1 device); configs/tiny.py: '
        f'{c.model.num_layers} layers, width {c.model.embed_dim}, vocabulary '
        f'{c.model.vocab_size}, batch {c.train.global_batch_size} x {c.data.seq_len}, '
        f'loss_chunk_size {c.train.loss_chunk_size}, {args.dtype}; `sampled`, {args.samples} '
        f'ids, alpha 0; median of {args.steps} after {args.warmup} warm-up; load average '
        f'{before} before, {after} after')
  on, ce = times['online'], times['ce']
  loss, teacher = times['offline'] - ce, on - times['offline']
  rows = [('ce train step (the student alone)', ce, None),
          ('offline distill train step (stored targets: student + sampled loss)',
           times['offline'], None),
          ('online distill train step', on, on),
          ('  student forward/backward and update (the ce step)', ce, ce),
          ('  sampled loss (offline - ce)', loss, loss),
          ('  teacher forward + teacher_targets (online - offline)', teacher, teacher),
          ('    teacher forward, jitted alone', times['teacher'], times['teacher']),
          ('    teacher_targets (head, softmax, CDF, draws), jitted alone', times['sampling'],
           times['sampling'])]
  print('| part | ms | share of the online step |')
  print('|---|---|---|')
  for name, value, share in rows:
    shown = '' if share is None else f'{100 * share / on:.0f}%'
    print(f'| {name} | {1e3 * value:.0f} | {shown} |')
  print(f'sampled loss / ce step: {100 * loss / ce:.1f}% (aim < 10%); online / ce: '
        f'{on / ce:.2f}x')
  print('\n| the head alone (its gradient, on the student\'s hidden states) | ms |')
  print('|---|---|')
  for name in heads:
    print(f'| {name} | {1e3 * times[name]:.0f} |')

if __name__ == '__main__':
  main(sys.argv[1:])
