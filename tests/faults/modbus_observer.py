"""A well-behaved SCADA client in its own process: reads block A every `period` s until stopped, then prints
its (start time, latency) pairs as JSON (time.monotonic() is one clock for every process on Linux), as
"latencies", and the same less the machine's scheduling as "own_latencies". Its own process, so the abuse in
the test process cannot stall it (the GIL).

The machine's scheduling: while a request waits, the service's event-loop thread (its main thread, which
serves Modbus) and this client may be runnable but not running because other processes have the CPUs (a
loaded 2-core machine). The kernel counts that time per thread (/proc/.../schedstat, run_delay);
"own_latencies" subtract it, so a bound on them holds the service to what it does (its work for other
clients, a blocking call, a stall: none of them is waiting for a CPU) and not to the machine's load.
Without SERVICE_PID only this client's own wait is subtracted.

    python -m tests.faults.modbus_observer PORT PERIOD STOP_FILE [SERVICE_PID]
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


def run_delay(path: str) -> float:
    """Seconds a thread has spent runnable but waiting for a CPU (schedstat's second field, ns)."""
    try:
        with open(path) as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):  # the service gone: nothing to subtract
        return 0.0


def main(port: int, period: float, stop_file: str, service_pid: int | None = None) -> None:
    me = "/proc/thread-self/schedstat"
    service = f"/proc/{service_pid}/task/{service_pid}/schedstat" if service_pid else None

    def waited() -> float:
        return run_delay(me) + (run_delay(service) if service else 0.0)

    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies: list[tuple[float, float]] = []
    own_latencies: list[tuple[float, float]] = []
    errors: list[str] = []
    tid = 0
    next_at = time.monotonic()
    while not os.path.exists(stop_file):
        tid += 1
        before = waited()
        start = time.monotonic()
        try:
            read_block_a(sock, tid)
            latency = time.monotonic() - start
            latencies.append((start, latency))
            own_latencies.append((start, max(0.0, latency - (waited() - before))))
        except (OSError, AssertionError) as error:  # every failure is reported; the test fails on any
            errors.append(f"{time.monotonic() - start:.3f} s: {error}")
            sock.close()
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))
    sock.close()
    print(json.dumps({"latencies": latencies, "own_latencies": own_latencies, "errors": errors}))


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
