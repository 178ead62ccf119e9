#!/usr/bin/env bash
# Launch gemma3-train on a TPU slice (or several, over DCN) of a GKE cluster with xpk.
#
#   CLUSTER=my-cluster PROJECT=my-project ZONE=us-east5-a IMAGE=us-docker.pkg.dev/P/R/gemma3-train:tpu \
#   TPU_TYPE=v5p-128 NUM_SLICES=1 CONFIG=configs/27b.py WORKDIR=gs://my-bucket/runs/27b \
#   scripts/xpk_tpu.sh [--config.optim.lr=1e-4 ...]
#
# Extra arguments are passed to gemma3-train. With NUM_SLICES > 1 the slices are joined by
# data parallelism over DCN (--config.mesh.dcn_data=NUM_SLICES) unless an argument sets
# mesh.dcn_* itself. Before creating the workload the script compiles the train step for the
# slice with libtpu (gemma3-train --aot_topology) so a config that cannot fit fails here, not on
# the pod; SKIP_AOT=1 skips that. DRY_RUN=1 prints the xpk command instead of running it.
# Rerunning with the same WORKDIR resumes from its newest checkpoint (e.g. after preemption).
set -euo pipefail

: "${CLUSTER:?set CLUSTER (the xpk cluster name)}"
: "${TPU_TYPE:?set TPU_TYPE, e.g. v5p-128, v5e-16, v6e-256}"
: "${IMAGE:?set IMAGE (built from docker/Dockerfile.tpu)}"
: "${CONFIG:?set CONFIG, e.g. configs/27b.py}"
: "${WORKDIR:?set WORKDIR, a gs:// directory shared by all hosts}"
NUM_SLICES="${NUM_SLICES:-1}"
WORKLOAD="${WORKLOAD:-gemma3-$(date +%m%d-%H%M%S)}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"  # xpk restarts the whole workload after a preemption

args=("--config=${CONFIG}" "--workdir=${WORKDIR}")
dcn_set=0
for arg in "$@"; do
  case "${arg}" in
    --config.mesh.dcn_*) dcn_set=1 ;;
  esac
  args+=("${arg}")
done
if [[ "${NUM_SLICES}" -gt 1 && "${dcn_set}" -eq 0 ]]; then
  args+=("--config.mesh.dcn_data=${NUM_SLICES}")
fi

# shellcheck source=scripts/tpu_slice.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu_slice.sh"
tpu_slice "${TPU_TYPE}"  # sets XPK_TPU_TYPE (xpk spells v5e slices v5litepod-N)

if [[ "${SKIP_AOT:-0}" != 1 ]]; then
  echo "Compiling for ${TPU_TYPE} x ${NUM_SLICES} with libtpu (SKIP_AOT=1 skips)..." >&2
  gemma3-train "${args[@]}" --aot_topology="${TPU_TYPE}"
fi

# xpk runs the command with bash -c inside the container; quote each argument for it.
command="gemma3-train"
for arg in "${args[@]}"; do
  command+=" $(printf '%q' "${arg}")"
done

xpk_args=(workload create
  --cluster "${CLUSTER}"
  --workload "${WORKLOAD}"
  --tpu-type "${XPK_TPU_TYPE}"
  --num-slices "${NUM_SLICES}"
  --docker-image "${IMAGE}"
  --max-restarts "${MAX_RESTARTS}"
  --command "${command}")
if [[ -n "${PROJECT:-}" ]]; then xpk_args+=(--project "${PROJECT}"); fi
if [[ -n "${ZONE:-}" ]]; then xpk_args+=(--zone "${ZONE}"); fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' xpk "${xpk_args[@]}"
  echo
else
  xpk "${xpk_args[@]}"
fi
