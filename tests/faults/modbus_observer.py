"""A well-behaved SCADA client in its own process: reads block A every `period` s until stopped, then prints
its (start time, latency) pairs as JSON (time.monotonic() is one clock for every process on Linux). Its own
process, so the abuse in the test process cannot stall it (the GIL).

    python -m tests.faults.modbus_observer PORT PERIOD STOP_FILE
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time


def read_block_a(sock: socket.socket, tid: int) -> None:
    sock.sendall(struct.pack(">HHHBBHH", tid, 0, 6, 1, 3, 0, 40))
    want, got = 9 + 80, b""
    while len(got) < want:
        chunk = sock.recv(want - len(got))
        if not chunk:
            raise ConnectionError("the server closed the observer's connection")
        got += chunk
    rtid, _, _, _, fc, count = struct.unpack(">HHHBBB", got[:9])
    if (rtid, fc, count) != (tid & 0xFFFF, 3, 80):
        raise AssertionError(f"bad answer {got[:9].hex()}")


def main(port: int, period: float, stop_file: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies: list[tuple[float, float]] = []
    errors: list[str] = []
    tid = 0
    next_at = time.monotonic()
    while not os.path.exists(stop_file):
        tid += 1
        start = time.monotonic()
        try:
            read_block_a(sock, tid)
            latencies.append((start, time.monotonic() - start))
        except (OSError, AssertionError) as error:  # every failure is reported; the test fails on any
            errors.append(f"{time.monotonic() - start:.3f} s: {error}")
            sock.close()
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))
    sock.close()
    print(json.dumps({"latencies": latencies, "errors": errors}))


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
