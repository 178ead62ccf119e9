#!/usr/bin/env bash
# Run gemma3-train on TPU slices of a GKE cluster with a plain JobSet (no xpk):
# fills scripts/gke_jobset_tpu.yaml and applies it with kubectl.
#
#   IMAGE=us-docker.pkg.dev/P/R/gemma3-train:tpu TPU_TYPE=v5p-128 NUM_SLICES=1 \
#   CONFIG=configs/27b.py WORKDIR=gs://my-bucket/runs/27b scripts/gke_tpu.sh [--config.X=Y ...]
#
# Extra arguments go to gemma3-train; NUM_SLICES > 1 adds --config.mesh.dcn_data=NUM_SLICES
# unless an argument sets mesh.dcn_*. DRY_RUN=1 prints the manifest instead of applying it.
# Follow the run with: kubectl logs -f jobs/${NAME}-slice-0 (or the pods of that job).
set -euo pipefail

: "${TPU_TYPE:?set TPU_TYPE, e.g. v5p-128, v5e-16, v6e-256}"
: "${IMAGE:?set IMAGE (built from docker/Dockerfile.tpu)}"
: "${CONFIG:?set CONFIG, e.g. configs/27b.py}"
: "${WORKDIR:?set WORKDIR, a gs:// directory shared by all hosts}"
export IMAGE
export NUM_SLICES="${NUM_SLICES:-1}"
export NAME="${NAME:-gemma3-$(date +%m%d-%H%M%S)}"
export MAX_RESTARTS="${MAX_RESTARTS:-10}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

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
# A YAML flow sequence of double-quoted strings: every argument stays one string, whatever it holds.
ARGS=""
for arg in "${args[@]}"; do
  arg="${arg//\\/\\\\}"
  ARGS+="${ARGS:+, }\"${arg//\"/\\\"}\""
done
export ARGS="[${ARGS}]"

# shellcheck source=scripts/tpu_slice.sh
source "${here}/tpu_slice.sh"
tpu_slice "${TPU_TYPE}"  # sets ACCELERATOR, TOPOLOGY, HOSTS, CHIPS_PER_HOST

# shellcheck disable=SC2016  # envsubst takes the literal names of the variables it may replace
manifest="$(envsubst '${NAME} ${MAX_RESTARTS} ${NUM_SLICES} ${HOSTS} ${ACCELERATOR} ${TOPOLOGY} ${IMAGE} ${ARGS} ${CHIPS_PER_HOST}' \
  <"${here}/gke_jobset_tpu.yaml")"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${manifest}"
else
  kubectl apply -f - <<<"${manifest}"
fi
