#!/usr/bin/env bash
# Install Mosquitto (broker and mosquitto_passwd) from Debian's `mosquitto` package, as root, without starting
# its service (tests/run uses this; on a broker host, enable the service yourself afterwards).
# Exit 0 when mosquitto is available, 1 with apt's reason otherwise.
set -u
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then  # "101: action not allowed": maintainer scripts do not start the service
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mosquitto; }
install >/tmp/smallbms-apt-mosquitto.log 2>&1 \
  || { apt-get update -q >>/tmp/smallbms-apt-mosquitto.log 2>&1 && install >>/tmp/smallbms-apt-mosquitto.log 2>&1; }
status=$?
[ "$made_policy" = 1 ] && rm -f "$policy"
if [ "$status" != 0 ] || { ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; }; then
  echo "install-debian: apt-get install mosquitto failed:" >&2
  tail -5 /tmp/smallbms-apt-mosquitto.log >&2
  exit 1
fi
echo "install-debian: $( (mosquitto -h 2>/dev/null || /usr/sbin/mosquitto -h) | head -1)"
