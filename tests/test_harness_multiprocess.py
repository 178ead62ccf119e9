"""The harness on one mesh over two jax processes (2 CPU devices each, gloo) gives one process's
results (4 devices): every process runs every request (the jitted calls are collective, so all
processes must make the same ones) and ends with the whole results dict; the sampler's chunks
and stop strings too."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import helpers
from tests import test_harness

_WORKER = textwrap.dedent('''
    import json, os, sys
    pid, nproc, (port, tasks, out) = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:6]
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={4 // nproc}'
    os.environ['HF_DATASETS_OFFLINE'] = os.environ['HF_HUB_OFFLINE'] = '1'
    import jax
    if nproc > 1:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(f'localhost:{port}', nproc, pid)
    from flax import nnx
    from gemma3_train import config as config_lib, sharding
    from gemma3_train.inference import harness, sampler
    cfg = config_lib.ModelConfig(
        preset='test', vocab_size=262144, embed_dim=32, mlp_dim=48, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=16, sliding_window=4, param_dtype='float32', dtype='float32',
        attention_impl='reference')
    model = sampler.Gemma3(cfg, rngs=nnx.Rngs(0))  # the same weights in every process
    mesh = sharding.make_mesh(config_lib.Config(model=cfg, mesh=config_lib.MeshConfig(fsdp=-1)))
    lm = harness.Gemma3LM(model, batch_size=4, mesh=mesh, rules=dict(sharding.DEFAULT_RULES))
    results = harness.run_tasks(lm, ['tiny_mc', 'tiny_gen'], include_path=tasks, log_samples=True,
                                bootstrap_iters=0)
    samples = {t: [s['resps'] for s in sorted(v, key=lambda s: s['doc_id'])]
               for t, v in results['samples'].items()}
    # Sampled rows past several chunks, and stopped by a string from the middle of row 0.
    prompts = [lm.tok_encode(t) for t in ('One two three', 'The capital of France is', 'Hi')]
    hot = sampler.Sampling(1.0)  # no top-k: no sort of the 262k vocabulary per token
    free = lm.sampler.generate(prompts, 40, hot, stop_tokens=())
    text = lm.tok.decode(free[0])
    stopped = lm.sampler.generate(prompts, 40, hot, stop_tokens=(), detokenize=lm.tok.decode,
                                  stop_strings=[text[len(text) // 2:][:3]])
    with open(out, 'w') as f:
      json.dump({'results': results['results'], 'samples': samples, 'free': free,
                 'stopped': stopped, 'processes': jax.process_count(),
                 'devices': jax.device_count()}, f, default=str)
''')


@pytest.mark.slow  # three jax processes, each compiling the harness's calls (~60 s of CPU)
def test_two_processes_give_one_process_results(tmp_path):
  tasks = test_harness.write_tasks(tmp_path)
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, PYTHONPATH=str(root))
  env.pop('XLA_FLAGS', None)
  port = str(helpers.free_port())
  runs = [(0, 1), (0, 2), (1, 2)]  # (process id, processes)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(n), port, str(tasks),
                             str(tmp_path / f'{i}of{n}.json')], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, n in runs]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  one, *two = [json.loads((tmp_path / f'{i}of{n}.json').read_text()) for i, n in runs]
  assert [r['processes'] for r in (one, *two)] == [1, 2, 2]
  assert all(r['devices'] == 4 for r in (one, *two))
  for other in two:
    assert other['samples']['tiny_gen'] == one['samples']['tiny_gen']
    for a, b in zip(other['samples']['tiny_mc'], one['samples']['tiny_mc']):
      np.testing.assert_allclose([x[0][0] for x in a], [x[0][0] for x in b], atol=1e-5, rtol=0)
      assert [x[0][1] for x in a] == [x[0][1] for x in b]
    assert other['results'] == one['results']
    assert other['free'] == one['free'] and other['stopped'] == one['stopped']
  assert all(s == f[:len(s)] for s, f in zip(one['stopped'], one['free']))
  assert len(one['stopped'][0]) < 40
