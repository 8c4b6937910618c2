"""A connect-and-hold attacker in its own process (so its work does not stall the measuring test's GIL): opens
N connections from SOURCE to PORT that never send anything, prints "held" once all N are open, then keeps N
open until STOP_FILE exists: every connection the server hangs up is opened again at once (with --churn; by
default they stay closed). Prints its counts as JSON at the end.

    python -m tests.faults.flood PORT SOURCE N STOP_FILE [--churn]
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def main(argv: list[str]) -> int:
    port, source, n, stop_file = int(argv[0]), argv[1], int(argv[2]), argv[3]
    churn = "--churn" in argv
    selector = selectors.DefaultSelector()
    opened = hung_up = failed = 0
    for _ in range(n):
        selector.register(connect(port, source), selectors.EVENT_READ)
        opened += 1
    print("held", flush=True)
    started = time.monotonic()
    while not os.path.exists(stop_file):
        for key, _ in selector.select(0.05):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(64)
            except OSError:
                data = b""
            if data:
                continue
            selector.unregister(sock)
            sock.close()
            hung_up += 1
            if churn:
                try:
                    selector.register(connect(port, source), selectors.EVENT_READ)
                    opened += 1
                except OSError:
                    failed += 1
    elapsed = time.monotonic() - started
    print(json.dumps({"opened": opened, "hung_up": hung_up, "failed": failed, "open_at_end": len(selector.get_map()),
                      "seconds": round(elapsed, 2), "reopens_per_s": round((opened - n) / max(elapsed, 1e-9))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
