#!/usr/bin/env bash
# One-shot GPU benchmark: configs/1b.py in bfloat16 with cuDNN attention on one H100/H200,
# through benchmarks/train_step.py (median of 10 steps after compile). Finishes in < 8 min.
#
#   bash benchmarks/gpu_1b.sh                 # results in $OUT (default /tmp/gpu_1b)
#   BATCH=8 EXTRA='--set=model.remat_policy=none' bash benchmarks/gpu_1b.sh
#
# Installs the project from this repo with jax[cuda12] (`pip install -e .[gpu]`) when the
# python at hand has no GPU-enabled jax. A lent device machine has no internet but ships
# jax+CUDA, flax, optax, orbax, etils, absl; carry the two missing pure-Python wheels there.
# Prepare them here first, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections tensorboardX
# and run with carry=['.whl'] and command 'bash benchmarks/gpu_1b.sh'.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_1b}
PY=${PYTHON:-python3}
BATCH=${BATCH:-0}  # 0 = configs/1b.py's global batch (16 x 4096 tokens)
STEPS=${STEPS:-10}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
start=$(date +%s)

have_gpu_jax() { "$PY" -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" \
  >/dev/null 2>&1; }

# 1. jax with CUDA, and the project.
if [ -d .whl ]; then  # offline: the carried wheels (ml-collections, tensorboardX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if have_gpu_jax; then
  # jax+CUDA already there: install only this repo, without touching its jax.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || export PYTHONPATH=$PWD:${PYTHONPATH:-}
else
  "$PY" -m pip install -q -e ".[gpu]"
  have_gpu_jax || { echo "jax sees no GPU after installing jax[cuda12]" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv \
  | tee "$OUT/gpu.txt" || true
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
echo "setup took $(( $(date +%s) - start ))s"

# 2. the benchmark (killed at 6.5 min so the whole script stays under 8).
set -o pipefail
timeout 390 "$PY" benchmarks/train_step.py --config=configs/1b.py --dtypes=bfloat16 \
  --set=model.attention_impl=cudnn --batch="$BATCH" --steps="$STEPS" --warmup=2 \
  --json="$OUT/gpu_1b.json" $EXTRA 2>&1 | tee "$OUT/gpu_1b.log"
echo "total $(( $(date +%s) - start ))s"
