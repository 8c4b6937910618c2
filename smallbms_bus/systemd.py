"""The service's life as systemd and the event log see it: sd_notify, and why the previous run left no STOPPED."""

from __future__ import annotations

import logging
import os
import socket
import time

from smallbms_bus.store import Store

log = logging.getLogger("smallbms_bus.service")


def unfinished_run(store: Store) -> str | None:
    """Why the previous run left no STOPPED event (killed, power cut, crash), or None when it stopped cleanly or
    there was none (a new store, or one written by a version that recorded no starts)."""
    last = next((e for e in store.events(None) if e["kind"] == "service" and e["name"] in ("STARTED", "STOPPED")),
                None)
    if last is None or last["name"] == "STOPPED":
        return None
    saved = store.saved_wall()
    return (f"the run started {_when(last['wall'])} (smallbms-bus {last['value']}) recorded no stop: it was killed, "
            f"lost power or crashed; the state is as last saved {_when(saved) if saved else 'never'}")


def _when(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify): a datagram to $NOTIFY_SOCKET; a no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        log.debug("sd_notify failed", exc_info=True)
