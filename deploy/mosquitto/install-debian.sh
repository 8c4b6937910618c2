#!/usr/bin/env bash
# Install Mosquitto (broker and mosquitto_passwd) from Debian's `mosquitto` package, as root, without starting
# its service (tests/run uses this; on a broker host, enable the service yourself afterwards).
# Exit 0 when mosquitto is available, 1 with apt's reason otherwise.
set -u
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
bash "$(dirname "$0")/../apt-install.sh" mosquitto || exit 1
echo "install-debian: $( (mosquitto -h 2>/dev/null || /usr/sbin/mosquitto -h) | head -1)"
