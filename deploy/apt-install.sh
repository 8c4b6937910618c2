#!/usr/bin/env bash
# apt-get install PACKAGE... as root without starting any service a package ships (a temporary policy-rc.d:
# "101: action not allowed"), retrying once after apt-get update. The Prometheus and Mosquitto installers
# and tests/run use it. Exit 0 when installed; 1 with the last lines of apt's log otherwise.
set -u
[ "$#" -gt 0 ] || { echo "usage: deploy/apt-install.sh PACKAGE..." >&2; exit 2; }
log=/tmp/smallbms-apt-$1.log
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
install "$@" >"$log" 2>&1 || { apt-get update -q >>"$log" 2>&1 && install "$@" >>"$log" 2>&1; }
status=$?
[ "$made_policy" = 1 ] && rm -f "$policy"
if [ "$status" != 0 ]; then
  echo "apt-install: apt-get install $* failed:" >&2
  tail -5 "$log" >&2
  exit 1
fi
