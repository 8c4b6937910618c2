"""Modbus benchmark: block-A reads (40 registers, FC3) by 1, 8 and 32 concurrent clients.

    .venv/bin/python benchmarks/modbus.py [--seconds 3] [--repeats 3] [--json out.json]

Two servers, measured in the same run, each in its own process pinned to the first core:
- smallbms-bus: `smallbms-bus demo` (the real Service: virtual batteries 2s2p on a virtual bus, the BMS
  core deciding every 100 ms and on every frame, BMS_STATE, store) serving Modbus;
- bare: a pymodbus 3.16 ModbusTcpServer serving a static 40-register block from SimData, nothing else.
The load is one process pinned to the second core: asyncio connections with a minimal MBAP client
(the pymodbus client would measure itself), each sending one request and waiting for its answer, for
`--seconds` per trial. Requests/s and p50/p99 latency per trial; the figures are medians over
`--repeats` trials; ratios compare the two servers measured in this run.
A benchmark, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import time

from common import free_port, pin, write_json

CLIENTS = (1, 8, 32)
BLOCK_A = struct.pack(">BHH", 3, 0, 40)
ANSWER = 7 + 2 + 80  # MBAP + function + byte count + 40 registers


# -- the bare server ------------------------------------------------------------------------------------
def serve_bare(port: int) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def main() -> None:
        device = SimDevice(1, simdata=SimData(0, values=list(range(40)), datatype=DataType.REGISTERS))
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        await server.serve_forever()

    pin(0)
    asyncio.run(main())


# -- the load ------------------------------------------------------------------------------------------------
async def _client(port: int, until: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    tid = 0
    try:
        while time.perf_counter() < until:
            tid = (tid + 1) & 0xFFFF
            started = time.perf_counter()
            writer.write(struct.pack(">HHHB", tid, 0, len(BLOCK_A) + 1, 1) + BLOCK_A)
            answer = await reader.readexactly(ANSWER)
            latencies.append(time.perf_counter() - started)
            if answer[7] != 3:
                raise RuntimeError(f"exception answer {answer.hex()}")
    finally:
        writer.close()


async def _load(port: int, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    warm = time.perf_counter() + 0.3
    await asyncio.gather(*(_client(port, warm, []) for _ in range(clients)))
    until = time.perf_counter() + seconds
    await asyncio.gather(*(_client(port, until, latencies) for _ in range(clients)))
    latencies.sort()
    return {"requests_per_s": len(latencies) / seconds,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


def load(port: int, clients: int, seconds: float) -> dict[str, float]:
    """One trial, in a fresh process on the second core (so the load never shares a core with the server)."""
    out = subprocess.run([sys.executable, __file__, "--load", str(port), str(clients), str(seconds)],
                         capture_output=True, text=True, check=True, timeout=seconds + 60)
    return json.loads(out.stdout)


def wait_serving(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(struct.pack(">HHHB", 1, 0, len(BLOCK_A) + 1, 1) + BLOCK_A)
                if len(s.recv(ANSWER)) > 7:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server not serving")


def start_servers() -> dict[str, tuple[int, subprocess.Popen]]:
    ours, bare = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    servers = {
        "smallbms-bus": (ours, subprocess.Popen(
            ["taskset", "-c", str(sorted(os.sched_getaffinity(0))[0]), sys.executable, "-m", "smallbms_bus.cli",
             "--log-level", "WARNING", "demo", "--modbus-port", str(ours), "--metrics-port", "0", "--every", "1e9"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)),
        "bare": (bare, subprocess.Popen([sys.executable, __file__, "--serve-bare", str(bare)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)),
    }
    try:
        for port, process in servers.values():
            wait_serving(port, process)
    except BaseException:  # a server that did not come up: stop the other, never leave it running
        for _, process in servers.values():
            process.kill()
        raise
    time.sleep(11)  # let the demo learn its bank (discovery window 10 s): measured while the BMS is running
    return servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    if args.load:
        pin(1)
        port, clients, seconds = int(args.load[0]), int(args.load[1]), float(args.load[2])
        print(json.dumps(asyncio.run(_load(port, clients, seconds))))
        return 0
    servers = start_servers()
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in servers}
    try:
        for clients in CLIENTS:
            trials: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for _ in range(args.repeats):
                for name, (port, _) in servers.items():  # interleaved: both see the same machine state
                    trials[name].append(load(port, clients, args.seconds))
            for name in servers:
                results[name][clients] = {k: statistics.median(t[k] for t in trials[name]) for k in trials[name][0]}
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(timeout=20)
    print(f"block A (40 registers, FC3), {args.seconds:g} s per trial, median of {args.repeats}; "
          f"python {platform.python_version()}, {os.cpu_count()} cores")
    print(f"{'clients':>7} | {'smallbms-bus req/s':>18} {'p50 ms':>7} {'p99 ms':>7} | {'bare req/s':>10} "
          f"{'p50 ms':>7} {'p99 ms':>7} | ratio")
    for clients in CLIENTS:
        o, b = results["smallbms-bus"][clients], results["bare"][clients]
        print(f"{clients:>7} | {o['requests_per_s']:>18,.0f} {o['p50_ms']:>7.2f} {o['p99_ms']:>7.2f} | "
              f"{b['requests_per_s']:>10,.0f} {b['p50_ms']:>7.2f} {b['p99_ms']:>7.2f} | "
              f"{o['requests_per_s'] / b['requests_per_s']:.2f}")
    write_json(args.json, results, seconds=args.seconds, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
