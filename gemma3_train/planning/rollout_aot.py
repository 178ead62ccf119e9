"""AOT compile of a GRPO run's rollout programs (train.objective=grpo) for a TPU topology.

A rollout (training/rollout.py) runs on the training mesh while the whole train state stays in
HBM: the sampler's prefill and decode loop (inference/sampler.py), then, with rl.beta or
rl.updates_per_batch > 1, the scoring forward (objectives/grpo.py: score_fn). Each is compiled
here as the run compiles it, at its largest shapes: rl.prompts_per_step x rl.group_size rows,
prompts of data.seq_len - rl.max_completion_len tokens (rounded up to the sampler's bucket for
the mesh's context degree), rl.max_completion_len new tokens; under context parallelism the
prompt's columns and the cache's are split over the context axis, as the sampler splits them.
Each program also takes the rest of the train state (optimizer state, frozen models) as an
argument it keeps but does not read, so the compiler's per-chip memory is the state that stays
resident plus what the program adds: the KV cache over rows x columns, the logits, the swapped
projections. aot.compile_report compiles and
measures; its time estimates are the train step's and are dropped here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma3_train import config as config_lib
from gemma3_train.inference import sampler as sampler_lib
from gemma3_train.planning import aot
from gemma3_train import sharding
from gemma3_train.training import state as train_state
from gemma3_train.training.objectives import grpo

# Report fields that describe a train step's time (FLOPs, MFU): not a rollout's.
_STEP_ONLY = ('model_flops_per_step', 'compiler_flops', 'compiler_bytes', 'compiler_seconds',
              'executed_flops', 'splash_flops', 'xla_seconds', 'splash_seconds',
              'step_seconds', 'tokens_per_sec', 'mfu')


@dataclasses.dataclass(frozen=True)
class Shapes:
  rows: int  # rl.prompts_per_step x rl.group_size
  prompt: int  # P: the longest prompt, padded to the sampler's bucket
  new: int  # N: rl.max_completion_len

  @property
  def columns(self) -> int:
    return self.prompt + self.new


def shapes(c: config_lib.Config, degree: int = 1) -> Shapes:
  """The rollout's largest shapes; degree: the mesh's context degree (1 without context
  parallelism), which pads the prompt to the sampler's bucket for it (sampler.prompt_bucket)."""
  r = c.rl
  longest = c.data.seq_len - r.max_completion_len
  bucket = sampler_lib.prompt_bucket(degree, c.model.context_layout)
  return Shapes(r.prompts_per_step * r.group_size, -(-longest // bucket) * bucket,
                r.max_completion_len)


def _mesh_shapes(c: config_lib.Config, mesh) -> Shapes:
  return shapes(c, sampler_lib.context_degree(mesh, sharding.parse_rules(c.mesh.rules)))


def _report_shapes(c: config_lib.Config, r: aot.Report) -> Shapes:
  """shapes at the context degree of the mesh a report was compiled on."""
  rules = sharding.parse_rules(c.mesh.rules)
  return shapes(c, math.prod(r.mesh[a] * r.mesh[f'dcn_{a}'] for a in rules.get('act_len', ())))


def _replicated(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def _sampler_params(graphdef, state):
  """(sampler graphdef, params) of the model the rollout builds: the train state's params and
  frozen parts merged, as Rollouts._generate does (the same arrays, no copy)."""
  model = nnx.merge(graphdef, state['params'], *state['frozen'].values())
  return nnx.split(model)


def _sampling_args(c: config_lib.Config, mesh, rows: int) -> tuple[Any, ...]:
  """(pad [B], key, knobs, stop tokens), replicated as the sampler's host inputs are."""
  r = c.rl
  knobs = sampler_lib.sampling_knobs(
      sampler_lib.Sampling(r.temperature, r.top_k or None, r.top_p if r.top_p < 1 else None))
  like = lambda x: _replicated(mesh, x.shape, x.dtype)
  return (_replicated(mesh, (rows,), jnp.int32), like(jax.random.PRNGKey(0)),
          jax.tree.map(like, knobs),
          _replicated(mesh, (len(sampler_lib.STOP_TOKENS),), jnp.int32))


def prefill_builder(c: config_lib.Config, mesh):
  """The sampler's jitted prefill over every rollout row (aot.StepBuilder)."""
  s = train_state.setup(c, mesh, abstract=True)
  sh = _mesh_shapes(c, mesh)
  pad_B, key, knobs, _ = _sampling_args(c, mesh, sh.rows)
  tokens_BP = _replicated(mesh, (sh.rows, sh.prompt), jnp.int32)

  def prefill(state, tokens_BP, pad_B, key, knobs):
    graphdef, params = _sampler_params(s.graphdef, state)
    return sampler_lib.prefill(graphdef, params, tokens_BP, pad_B, key, knobs, None,
                               total=sh.columns, mesh=mesh, rules=s.rules)
  step = jax.jit(prefill, keep_unused=True)
  return step, (s.abstract_state, tokens_BP, pad_B, key, knobs), s.abstract_state


def _abstract_cache(c: config_lib.Config, mesh, s, state) -> Any:
  """The prefill's cache as abstract arrays, sharded as the sampler lays them out
  (sampler.cache_sharding: the columns over the context axis), scanned blocks stacked ahead."""
  sh = _mesh_shapes(c, mesh)
  pad_B, key, knobs, _ = _sampling_args(c, mesh, sh.rows)
  graphdef, params = _sampler_params(s.graphdef, state)
  cache, _, _ = jax.eval_shape(
      lambda p, t, pad, k, kn: sampler_lib.prefill(
          graphdef, p, t, pad, k, kn, None, total=sh.columns, mesh=mesh, rules=s.rules),
      params, _replicated(mesh, (sh.rows, sh.prompt), jnp.int32), pad_B, key, knobs)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sampler_lib.cache_sharding(x.shape, mesh, s.rules)), cache)


def decode_builder(c: config_lib.Config, mesh):
  """The sampler's jitted decode loop for rl.max_completion_len - 1 steps over every rollout
  row, its carry (the cache included) donated as the sampler donates it (aot.StepBuilder)."""
  s = train_state.setup(c, mesh, abstract=True)
  sh = _mesh_shapes(c, mesh)
  pad_B, key, knobs, stops = _sampling_args(c, mesh, sh.rows)
  scalar = _replicated(mesh, (), jnp.int32)
  carry = {'cache': _abstract_cache(c, mesh, s, s.abstract_state),
           'tokens': _replicated(mesh, (sh.rows,), jnp.int32), 'step': scalar,
           'done': _replicated(mesh, (sh.rows,), jnp.bool_),
           'out': _replicated(mesh, (sh.new, sh.rows), jnp.int32), 'logits': None}

  def decode(state, carry, end, P, pad_B, key, knobs, stops):
    graphdef, params = _sampler_params(s.graphdef, state)
    return sampler_lib.decode_loop(graphdef, params, carry, end, P, pad_B, key, knobs, stops,
                                   mesh=mesh, rules=s.rules)
  step = jax.jit(decode, donate_argnums=(1,), keep_unused=True)
  args = (s.abstract_state, carry, scalar, scalar, pad_B, key, knobs, stops)
  return step, args, s.abstract_state


def score_builder(c: config_lib.Config, mesh):
  """objectives/grpo.py's score_fn on the rollout batch: the rollout policy's and the
  reference's log-probabilities (aot.StepBuilder)."""
  s = train_state.setup(c, mesh, abstract=True)
  score = grpo.score_fn(s, s.objective)
  step = jax.jit(lambda state, batch: score(state, batch), keep_unused=True)
  batch = train_state.abstract_batch(c, mesh)
  return step, (s.abstract_state, batch), s.abstract_state


def programs(c: config_lib.Config) -> dict[str, aot.StepBuilder]:
  """The rollout's programs by name; scoring only where it computes something."""
  out = {'prefill': prefill_builder, 'decode': decode_builder}
  if c.rl.beta or c.rl.updates_per_batch > 1:
    out['score'] = score_builder
  return out


def compile_reports(c: config_lib.Config, topology: str) -> dict[str, aot.Report]:
  """Each rollout program compiled for the topology: memory from the compiler, fits with the
  train state resident; the train step's time fields left empty."""
  topo = aot.parse_topology(topology, aot.num_slices(c))
  device_list = aot.devices(topo)
  out = {}
  for name, builder in programs(c).items():
    r = aot.compile_report(c, topo, device_list=device_list, builder=builder)
    if name == 'decode' and r.error.startswith('splash attention was interpreted'):
      r.error = ''  # a decode step attends its cache with the reference kernel, by design
    for field in _STEP_ONLY:
      setattr(r, field, None)
    out[name] = r
  return out


def format_reports(c: config_lib.Config, reports: dict[str, aot.Report]) -> str:
  first = next(iter(reports.values()))
  sh = _report_shapes(c, first)
  lines = [f'AOT compile of the {first.config} rollout for {first.topology}: {sh.rows} rows, '
           f'prompts padded to {sh.prompt} + {sh.new} new tokens, the train state resident']
  for name, r in reports.items():
    if r.argument_gib is None:
      need = f'{r.total_gib:.2f} GiB' if r.total_gib is not None else 'more than HBM'
      lines.append(f'  {name:8s} DOES NOT FIT: needs {need} of {r.hbm_gib:g} GiB ({r.error})')
      continue
    lines.append(
        f'  {name:8s} {r.total_gib:6.2f} GiB of {r.hbm_gib:g} per chip '
        f'({"fits" if r.fits else "DOES NOT FIT"}, {100 * r.headroom:.1f}% headroom): '
        f'arguments {r.argument_gib:.2f} (state {r.state_gib:.2f}), temporaries '
        f'{r.temp_gib:.2f}, outputs {r.output_gib:.2f} ({r.alias_gib:.2f} aliased); compiled '
        f'in {r.compile_seconds:.0f} s' + (f'; WARNING: {r.error}' if r.error else ''))
  return '\n'.join(lines)


def write_reports(path: str, c: config_lib.Config, reports: dict[str, aot.Report]) -> None:
  sh = _report_shapes(c, next(iter(reports.values())))
  payload = {'rows': sh.rows, 'prompt_columns': sh.prompt, 'new_tokens': sh.new,
             **{name: dataclasses.asdict(r) for name, r in reports.items()}}
  epath.Path(path).write_text(json.dumps(payload, indent=2))


def main(c: config_lib.Config, topology: str, *, report_path: str | None = None
         ) -> dict[str, aot.Report]:
  """With --aot_topology for train.objective=grpo: the rollout's programs after the train step;
  --aot_report=F.json also writes F_rollout.json."""
  reports = compile_reports(c, topology)
  print(format_reports(c, reports))
  if report_path:
    write_reports(rollout_report_path(report_path), c, reports)
  bad = [name for name, r in reports.items() if not r.fits]
  if bad:
    raise config_lib.ConfigError(
        f'--aot_topology={topology}: the rollout ({", ".join(bad)}) does not fit with the train '
        'state resident; try fewer rl.prompts_per_step or rl.group_size, a shorter '
        'rl.max_completion_len or a larger slice')
  return reports


def rollout_report_path(report_path: str) -> str:
  """docs/aot/X.json -> docs/aot/X_rollout.json."""
  stem = report_path[:-5] if report_path.endswith('.json') else report_path
  return f'{stem}_rollout.json'
