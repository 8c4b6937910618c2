#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's `prometheus` package, as root, without starting its service
# (tests/run uses this; on a monitoring host, enable the service yourself afterwards).
# Exit 0 when both commands are available, 1 with apt's reason otherwise.
set -u
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then  # "101: action not allowed": maintainer scripts do not start the service
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }
install >/tmp/smallbms-apt.log 2>&1 || { apt-get update -q >>/tmp/smallbms-apt.log 2>&1 && install >>/tmp/smallbms-apt.log 2>&1; }
status=$?
[ "$made_policy" = 1 ] && rm -f "$policy"
if [ "$status" != 0 ] || ! command -v promtool >/dev/null 2>&1; then
  echo "install-debian: apt-get install prometheus failed:" >&2
  tail -5 /tmp/smallbms-apt.log >&2
  exit 1
fi
echo "install-debian: $(prometheus --version 2>&1 | head -1)"
