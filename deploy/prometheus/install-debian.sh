#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's `prometheus` package, as root, without starting its service
# (tests/run uses this; on a monitoring host, enable the service yourself afterwards).
# Exit 0 when both commands are available, 1 with apt's reason otherwise.
set -u
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
bash "$(dirname "$0")/../apt-install.sh" prometheus || exit 1
if ! command -v promtool >/dev/null 2>&1; then
  echo "install-debian: the prometheus package brought no promtool" >&2
  exit 1
fi
echo "install-debian: $(prometheus --version 2>&1 | head -1)"
