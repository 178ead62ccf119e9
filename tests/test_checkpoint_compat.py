"""Checkpoints written before the package was split into folders (tests/assets/old_checkpoints,
written at commit 28fa0fd) still resume: a plain run, a LoRA run (its base rebuilt from the
seed) and a frozen-vision-tower run (whose old checkpoints hold the encoder in 'params').

Each resumes from its step-2 checkpoint to step 3, and step 3's loss and gradient norm must be
what the old code logged at step 3 of the same run. Those figures were recorded on another
machine; XLA's CPU kernels may round differently in the last bits there, hence rtol 1e-6.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ASSETS = ROOT / 'tests' / 'assets' / 'old_checkpoints'

SMALL = dict(data=dict(source='synthetic', seq_len=32),
             model=dict(vocab_size=512, num_layers=2, mlp_dim=64),
             train=dict(global_batch_size=8, eval_every=0, num_steps=3, cache_dir=''),
             logging=dict(log_every=1, tensorboard=False),
             checkpoint=dict(every=2, async_save=False), optim=dict(warmup_steps=5))
KINDS = {'plain': ('configs/tiny.py', {}),
         'lora': ('configs/tiny.py', dict(lora=dict(rank=4))),
         'vision': ('configs/tiny_vision.py', dict(model=dict(vision_trainable=False),
                                                   data=dict(max_images=1)))}

# One process for the three runs (one jax start-up), one device as when they were written.
_RESUME = '''
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from gemma3_train import config as config_lib
from gemma3_train.training import loop
for workdir, config_file, overrides in json.loads(sys.argv[1]):
  d = config_lib.load_config_dict(config_file).to_dict()
  for section_overrides in overrides:
    for section, values in section_overrides.items():
      d[section].update(values)
  loop.train_and_evaluate(config_lib.from_dict(d), workdir)
'''


@pytest.mark.slow
def test_checkpoints_from_the_flat_layout_resume_to_the_same_step(tmp_path):
  expected = json.loads((ASSETS / 'expected.json').read_text())
  runs = []
  for kind, (config_file, extra) in KINDS.items():
    workdir = tmp_path / kind
    shutil.copytree(ASSETS / kind, workdir)
    runs.append((str(workdir), config_file, [SMALL, extra]))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', _RESUME, json.dumps(runs)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for kind in KINDS:
    rows = [json.loads(line) for line in (tmp_path / kind / 'metrics.jsonl').read_text()
            .splitlines()]
    step3 = [r for r in rows if r.get('step') == 3]
    assert len(step3) == 1 and not any(r.get('step') in (1, 2) for r in rows), (kind, rows)
    assert step3[0]['loss'] == pytest.approx(expected[kind]['loss_step3'], rel=1e-6), kind
    assert step3[0]['grad_norm'] == pytest.approx(expected[kind]['grad_norm_step3'],
                                                  rel=1e-6), kind
  assert out.stderr.count('Resumed from') == 3, out.stderr[-3000:]
  assert out.stderr.count('in the layout before frozen parts left the params') == 1  # vision
