"""Metrics benchmark: scrape time, CPU cost and event-loop stall for 50 x 51.2 V batteries (800 cells).

    .venv/bin/python benchmarks/metrics.py [--scrapes 200] [--json out.json]

The real `Service` (embedded demo configuration: virtual bus, memory board, store in a temporary
directory) holds a bank of 50 x 51.2 V batteries (800 cells) whose reports are fed to its core every
100 ms on the event loop, as the tick does (50 x 51.2 V exceeds the manual's 25-battery limit: the
core evaluates it fully and raises BANK_CONFIGURATION; the size is the point). `/metrics` is served
as `Service.run` serves it (`MetricsServer`), and a client in a separate process scrapes it over a
keep-alive connection with gzip, as Prometheus does, every 50 ms. Measured:

- scrape time: request sent -> whole answer received, at the client (p50, p99);
- encode: one scrape's build + encode on the metrics thread, in-process (p50), and its CPU time;
- CPU cost of a 5 s scrape interval: the server process's CPU time per scrape (minus the same run
  without scrapes) / 5 s, as a share of one core;
- event-loop stall: a thread wakes every 2 ms and posts a callback to the loop (as the bus receiver
  does); the delay to the callback's run, p99 and max, with no scrapes, with this server, with the
  same server unpaced (pause_s=0), encoding on the loop, and with prometheus-client's own threaded
  `start_http_server`.
A benchmark, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from common import write_json
from prometheus_client import start_http_server

from smallbms_bus.config import parse_config
from smallbms_bus.demo import demo_config
from smallbms_bus.metrics import MetricsServer, Snapshot, registry_for
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, SerialFragment
from smallbms_bus.service import Service

BATTERIES, UNITS = 50, 4
TARGET_MS = 10.0
INTERVAL_S = 5.0
FLAGS = dict(cell_high_voltage=False, cell_low_voltage=False, cell_low_pre_alarm=False, balancing=False,
             cell_imbalance=False, hardware_fault=False, firmware_updating=False)
CLIENT = r"""
import http.client, sys, time
port, count, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
out = []
for _ in range(count):
    start = time.perf_counter()
    conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    body = conn.getresponse().read()
    out.append(time.perf_counter() - start)
    time.sleep(gap)
print(" ".join(f"{x:.6f}" for x in out))
"""


def feed(service: Service, now: float, alive: int, *, identity: bool) -> None:
    core = service.core
    for node in range(1, BATTERIES + 1):
        if identity:
            core.on_report(BatteryInfo(node, UNITS, 100, (1, 0, 0), node, 1), now)
            serial = f"BENCH{node:09d}"
            core.on_report(SerialFragment(node, 0, serial[:7]), now)
            core.on_report(SerialFragment(node, 1, serial[7:]), now)
            core.on_report(BatteryTemps(node, 20.0, 22.0), now)
        for group in range(UNITS):
            base = 3.300 + (alive % 7) * 0.001
            core.on_report(CellVoltages(node, 4 * group + 1, (base, base + 0.002, base + 0.001, base)), now)
        core.on_report(BatteryStatus(node, 13.2 * UNITS, -5.0, 21.0, **FLAGS, alive_counter=alive % 256), now)


class OnLoop(MetricsServer):
    """The alternative of encoding on the event loop itself (for comparison only)."""

    async def render(self, gzipped: bool = False) -> bytes:
        return self._encode(Snapshot.of(self.service), gzipped)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Probe:
    """A thread that posts a callback to the loop every 2 ms and records how late it runs (the bus receiver's path)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.delays = loop, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        target = time.perf_counter()
        while not self.stop.is_set():
            target += 0.002
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.loop.call_soon_threadsafe(self._arrived, target)

    def _arrived(self, target: float) -> None:
        self.delays.append(time.perf_counter() - target)

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


async def scrape_run(port: int | None, scrapes: int) -> tuple[list[float], float, dict[str, float]]:
    """Client latencies, the server process's CPU seconds and the loop stall during `scrapes` scrapes (or, with
    port None, during the same wall time without any)."""
    loop = asyncio.get_running_loop()
    gap = 0.05
    cpu0 = time.process_time()
    with Probe(loop) as probe:
        if port is None:
            await asyncio.sleep(scrapes * (gap + 0.01))
            latencies: list[float] = []
        else:
            process = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(port), str(scrapes),
                                                           str(gap), stdout=subprocess.PIPE)
            out, _ = await process.communicate()
            latencies = [float(x) for x in out.split()]
    cpu = time.process_time() - cpu0
    return latencies, cpu, {"p99_ms": pct(probe.delays, 0.99) * 1e3, "max_ms": max(probe.delays) * 1e3}


async def measure(scrapes: int) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="smallbms-bench-")
    service = Service(parse_config(demo_config(f"bench-{os.getpid()}", f"{tmp}/state.db"), "<bench>"),
                      board=MemoryBoard())
    t, alive = 0.0, 0
    for _ in range(30):  # learn the bank (discovery window) with every battery fresh
        t, alive = t + 0.5, alive + 1
        feed(service, time.monotonic(), alive, identity=True)
        service.publish(service.core.evaluate(time.monotonic() + t, time.time()), time.monotonic())

    async def tick() -> None:  # the service's tick: new reports, one evaluation, every 100 ms
        nonlocal alive
        while True:
            alive += 1
            feed(service, time.monotonic(), alive, identity=alive % 10 == 0)
            service.publish(service.core.evaluate(time.monotonic(), time.time()), time.monotonic())
            await asyncio.sleep(0.1)

    ticker = asyncio.create_task(tick())
    server = MetricsServer(service, "127.0.0.1", 0)
    service.metrics = server
    await server.start()
    assert server.bound is not None
    port = server.bound[1]
    loop = asyncio.get_running_loop()
    encode, encode_cpu, series = [], [], 0
    for _ in range(50):
        snapshot = Snapshot.of(service)
        start = time.perf_counter()

        def timed(s: Snapshot = snapshot) -> tuple[bytes, float]:
            c = time.thread_time()
            body = server._encode(s, False)
            return body, time.thread_time() - c

        body, spent = await loop.run_in_executor(server._pool, timed)
        encode.append(time.perf_counter() - start)
        encode_cpu.append(spent)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    _, idle_cpu, idle_stall = await scrape_run(None, scrapes)
    latencies, cpu, stall = await scrape_run(port, scrapes)
    server.pause_s = 0.0
    _, _, unpaced_stall = await scrape_run(port, scrapes)
    await server.close()
    on_loop = OnLoop(service, "127.0.0.1", 0)
    await on_loop.start()
    assert on_loop.bound is not None
    _, _, on_loop_stall = await scrape_run(on_loop.bound[1], scrapes)
    await on_loop.close()
    httpd, _thread = start_http_server(0, addr="127.0.0.1", registry=registry_for(service))
    pc_latencies, _, pc_stall = await scrape_run(httpd.server_port, scrapes)
    httpd.shutdown()
    ticker.cancel()
    cpu_per_scrape = max(0.0, cpu - idle_cpu) / scrapes
    return {
        "series": series, "scrapes": scrapes,
        "scrape_p50_ms": statistics.median(latencies) * 1e3, "scrape_p99_ms": pct(latencies, 0.99) * 1e3,
        "encode_p50_ms": statistics.median(encode) * 1e3, "encode_cpu_p50_ms": statistics.median(encode_cpu) * 1e3,
        "cpu_per_scrape_ms": cpu_per_scrape * 1e3, "cpu_share_at_5s_pct": cpu_per_scrape / INTERVAL_S * 100,
        "stall": {"no scrapes": idle_stall, "this server (paced)": stall, "same, unpaced": unpaced_stall,
                  "encoding on the event loop": on_loop_stall,
                  "prometheus-client start_http_server": pc_stall},
        "prometheus_client_scrape_p50_ms": statistics.median(pc_latencies) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    print(f"metrics benchmark: python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{BATTERIES} x {12.8 * UNITS:.1f} V ({BATTERIES * 4 * UNITS} cells), {args.scrapes} scrapes 50 ms apart")
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    r = asyncio.run(measure(args.scrapes))
    fmt: Callable[[float], str] = lambda x: f"{x:.2f}"  # noqa: E731
    print(f"\nseries per scrape: {r['series']}")
    print("| measure | result | target |\n|---|---|---|")
    print(f"| scrape time (HTTP, gzip, keep-alive; client in another process) | p50 {fmt(r['scrape_p50_ms'])} ms, "
          f"p99 {fmt(r['scrape_p99_ms'])} ms | p50 <= {TARGET_MS:g} ms |")
    print(f"| build + encode on the metrics thread (pauses included) | p50 {fmt(r['encode_p50_ms'])} ms "
          f"(CPU {fmt(r['encode_cpu_p50_ms'])} ms) | |")
    print(f"| CPU per scrape (server process) | {fmt(r['cpu_per_scrape_ms'])} ms | |")
    print(f"| CPU cost of a {INTERVAL_S:g} s scrape interval | {r['cpu_share_at_5s_pct']:.3f} % of one core | |")
    print(f"| prometheus-client start_http_server, same bank | scrape p50 "
          f"{fmt(r['prometheus_client_scrape_p50_ms'])} ms | |")
    print("\nevent-loop stall (a thread posts a callback every 2 ms; delay to its run):")
    print("| serving | p99 | max |\n|---|---|---|")
    for name, stall in r["stall"].items():
        print(f"| {name} | {fmt(stall['p99_ms'])} ms | {fmt(stall['max_ms'])} ms |")
    write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
