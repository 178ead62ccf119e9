# shellcheck shell=bash
# Sourced by the launch scripts: `tpu_slice v5p-128` sets and exports ACCELERATOR (GKE node
# label), TOPOLOGY, HOSTS (TPU VMs per slice), CHIPS_PER_HOST and XPK_TPU_TYPE for a slice name,
# or returns 1 with a one-line error. The facts come from the one table, gemma3_train/infra/hardware.py,
# which runs with the standard library alone (python3, no jax, on the launching workstation).
tpu_slice() {
  local facts table
  table="$(dirname "${BASH_SOURCE[0]}")/../gemma3_train/infra/hardware.py"
  # -I -S: neither gemma3_train/ nor site-packages on sys.path, the standard library alone.
  facts="$(python3 -I -S "${table}" "$1")" || return 1
  eval "${facts}"
  export ACCELERATOR TOPOLOGY HOSTS CHIPS_PER_HOST XPK_TPU_TYPE
}
