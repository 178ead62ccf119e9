#!/usr/bin/env bash
# Launch gemma3-train on GPU nodes (8 GPUs each) of a GKE cluster with xpk.
#
#   CLUSTER=my-cluster PROJECT=my-project ZONE=us-central1-c IMAGE=us-docker.pkg.dev/P/R/gemma3-train:gpu \
#   DEVICE_TYPE=h100-80gb-8 NUM_NODES=4 CONFIG=configs/12b.py WORKDIR=gs://my-bucket/runs/12b \
#   scripts/xpk_gpu.sh [--config.optim.lr=1e-4 ...]
#
# Extra arguments are passed to gemma3-train. Off TPU, jax.distributed needs an explicit
# coordinator: xpk's GPU workloads set JAX_COORDINATOR_ADDRESS (pod 0 of the JobSet),
# JAX_COORDINATOR_PORT, NNODES and NODE_RANK in every pod, and the command below reads them
# there (hence the escaped \$). DRY_RUN=1 prints the xpk command instead of running it.
# Rerunning with the same WORKDIR resumes from its newest checkpoint.
set -euo pipefail

: "${CLUSTER:?set CLUSTER (the xpk cluster name)}"
: "${IMAGE:?set IMAGE (built from docker/Dockerfile.gpu)}"
: "${CONFIG:?set CONFIG, e.g. configs/12b.py}"
: "${WORKDIR:?set WORKDIR, a gs:// directory shared by all nodes}"
DEVICE_TYPE="${DEVICE_TYPE:-h100-80gb-8}"  # xpk spelling: h100-80gb-8, h100-mega-80gb-8, h200-141gb-8
NUM_NODES="${NUM_NODES:-1}"
WORKLOAD="${WORKLOAD:-gemma3-gpu-$(date +%m%d-%H%M%S)}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"

command="gemma3-train"
for arg in "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@"; do
  command+=" $(printf '%q' "${arg}")"
done
if [[ "${NUM_NODES}" -gt 1 ]]; then
  # shellcheck disable=SC2016  # expanded in the pod, not here
  command+=' --coordinator_address="${JAX_COORDINATOR_ADDRESS}:${JAX_COORDINATOR_PORT}"'
  # shellcheck disable=SC2016
  command+=' --num_processes="${NNODES}" --process_id="${NODE_RANK}"'
fi

xpk_args=(workload create
  --cluster "${CLUSTER}"
  --workload "${WORKLOAD}"
  --device-type "${DEVICE_TYPE}"
  --num-nodes "${NUM_NODES}"
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
