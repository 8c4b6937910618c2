#!/usr/bin/env bash
# Bring up a virtual SocketCAN interface for testing (default vcan0), as root.
#   deploy/can/vcan-up.sh [NAME]
# Exit 0 when NAME is up (already or now); 1 with the kernel's reason when it cannot be created
# (e.g. a kernel built without CONFIG_CAN/CONFIG_CAN_VCAN, as on some VMs and CI machines).
set -u
name=${1:-vcan0}
if [ -e "/sys/class/net/$name" ]; then
  ip link set "$name" up 2>/dev/null || true
else
  command -v modprobe >/dev/null 2>&1 && modprobe vcan 2>/dev/null
  if ! err=$(ip link add dev "$name" type vcan 2>&1); then
    echo "vcan-up: cannot create $name: ${err:-unknown error} (kernel $(uname -r) has no vcan support)" >&2
    exit 1
  fi
  ip link set "$name" up
fi
flags=$(cat "/sys/class/net/$name/flags" 2>/dev/null || echo 0)
if (( flags & 1 )); then
  echo "vcan-up: $name is up"
else
  echo "vcan-up: $name exists but is not up" >&2
  exit 1
fi
