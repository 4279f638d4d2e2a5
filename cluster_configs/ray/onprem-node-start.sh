#!/usr/bin/env bash
# Start Ray on this host with the resources of its Tandem role (on-prem clusters, Ray's local provider).
#
#   onprem-node-start.sh --head ROLES_FILE               # on the head host
#   onprem-node-start.sh --address HEAD:6379 ROLES_FILE  # on a worker host
#
# ROLES_FILE lines: "<host-address> <role> <accelerator_type>" (see onprem-roles.txt). The host finds its
# line by any of its own addresses. Resources declared per role, one unit per accelerator:
#   prefill -> {"prefill_node": N, "accelerator_type:<type>": 1}   N = NVIDIA GPUs (nvidia-smi -L)
#   decode  -> {"decode_node": N, "accelerator_type:<type>": 1}    N = GPUs, or Gaudi cards (hl-smi -L) as HPU
#   head    -> {"frontend_node": 1}
# Serving YAMLs ask for these resources in each pool's placement, so workers land on hosts of their role.
set -euo pipefail

mode="" address=""
case "${1:-}" in
  --head) mode=head; shift ;;
  --address) mode=worker; address="${2:?--address needs HOST:PORT}"; shift 2 ;;
  *) echo "usage: $0 --head ROLES_FILE | --address HEAD:PORT ROLES_FILE" >&2; exit 2 ;;
esac
roles="${1:?missing ROLES_FILE}"

addrs=" $(hostname -I 2>/dev/null || true) $(hostname) "
line=$(grep -v '^\s*#' "$roles" | while read -r host role accel; do
  [[ -n "${host:-}" && "$addrs" == *" $host "* ]] && { echo "$role ${accel:-none}"; break; }
done || true)
if [[ -z "$line" ]]; then
  echo "$0: none of this host's addresses ($addrs) is listed in $roles" >&2
  exit 1
fi
read -r role accel <<<"$line"

gpus=0 hpus=0
command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L | grep -c '^GPU' || true)
command -v hl-smi >/dev/null 2>&1 && hpus=$(hl-smi -L | grep -c 'Module ID' || true)

case "$role" in
  head) res='{"frontend_node": 1}' ;;
  prefill|decode)
    n=$(( gpus > 0 ? gpus : hpus ))
    if (( n == 0 )); then echo "$0: role $role but no GPU or Gaudi card found" >&2; exit 1; fi
    res="{\"${role}_node\": $n"
    (( hpus > 0 && gpus == 0 )) && res="$res, \"HPU\": $hpus"
    [[ "$accel" != "none" ]] && res="$res, \"accelerator_type:$accel\": 1"
    res="$res}" ;;
  *) echo "$0: unknown role '$role' (head | prefill | decode)" >&2; exit 1 ;;
esac

echo "starting Ray as $role with resources $res"
if [[ "$mode" == head ]]; then
  exec ray start --head --port=6379 --autoscaling-config="$HOME/ray_bootstrap_config.yaml" \
    --dashboard-host=127.0.0.1 --resources="$res"
else
  exec ray start --address="$address" --resources="$res"
fi
