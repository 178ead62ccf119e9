# shellcheck shell=bash
# Sourced by the launch scripts: `tpu_slice v5p-128` sets ACCELERATOR (GKE node label), TOPOLOGY,
# HOSTS (TPU VMs per slice), CHIPS_PER_HOST and XPK_TPU_TYPE for a slice name, or returns 1 with
# a one-line error. It mirrors TPU_KINDS in gemma3_train/aot.py (tests/test_scripts.py checks
# every name), so launching needs no Python on the workstation.
tpu_slice() {
  local name="$1" kind count cores chips prefix
  kind="${name%-*}"
  count="${name##*-}"
  case "${kind}" in
    v4) ACCELERATOR=tpu-v4-podslice; prefix=v4; cores=2 ;;
    v5p) ACCELERATOR=tpu-v5p-slice; prefix=v5p; cores=2 ;;
    v5e) ACCELERATOR=tpu-v5-lite-podslice; prefix=v5litepod; cores=1 ;;
    v6e) ACCELERATOR=tpu-v6e-slice; prefix=v6e; cores=1 ;;
    *) cores=0 ;;
  esac
  TOPOLOGY=""
  if [[ "${cores}" -gt 0 && "${count}" =~ ^[0-9]+$ ]]; then
    chips=$((count / cores))
    if [[ "${cores}" -eq 2 ]]; then  # v4/v5p names count TensorCores, 2 per chip; 3-D tori
      case "$((chips * cores == count ? chips : 0))" in
        4) TOPOLOGY=2x2x1 ;; 8) TOPOLOGY=2x2x2 ;; 16) TOPOLOGY=2x2x4 ;; 32) TOPOLOGY=2x4x4 ;;
        64) TOPOLOGY=4x4x4 ;; 128) TOPOLOGY=4x4x8 ;; 256) TOPOLOGY=4x8x8 ;;
        512) TOPOLOGY=8x8x8 ;; 1024) TOPOLOGY=8x8x16 ;; 2048) TOPOLOGY=8x16x16 ;;
        4096) TOPOLOGY=16x16x16 ;;
      esac
    else  # v5e/v6e names count chips; 2-D tori
      case "${chips}" in
        1) TOPOLOGY=1x1 ;; 4) TOPOLOGY=2x2 ;; 8) TOPOLOGY=2x4 ;; 16) TOPOLOGY=4x4 ;;
        32) TOPOLOGY=4x8 ;; 64) TOPOLOGY=8x8 ;; 128) TOPOLOGY=8x16 ;; 256) TOPOLOGY=16x16 ;;
      esac
    fi
  fi
  if [[ -z "${TOPOLOGY}" ]]; then
    echo "error: TPU_TYPE=${name}: unknown TPU slice; expected e.g. v4-8, v5e-16, v5p-128, v6e-256" >&2
    return 1
  fi
  CHIPS_PER_HOST=$((chips < 4 ? chips : 4))
  if [[ "${cores}" -eq 1 && "${chips}" -eq 8 ]]; then
    CHIPS_PER_HOST=8  # v5e-8 / v6e-8 are one 8-chip VM
  fi
  HOSTS=$((chips / CHIPS_PER_HOST))
  XPK_TPU_TYPE="${prefix}-${count}"
  export ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST XPK_TPU_TYPE
}
