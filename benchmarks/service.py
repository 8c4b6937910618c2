"""Service benchmarks: start-up to serving, and reaction latency from a frame to the relay command.

    .venv/bin/python benchmarks/service.py [--trials 200] [--starts 5] [--json out.json]

Reaction latency: the real `Service` (embedded config: python-can virtual bus, memory relay board,
store in a temporary directory) watches 50 virtual 12.8 V batteries (2s25p-12v100) sent by the
simulator in real time. Each trial makes battery 7's next BAT_STATUS carry CellHighVoltage (the flag
is forced: in a parallel bank a single over-charged cell's string discharges into the others, so its
physics would not reliably reach 3.75 V on cue). The clock starts when that frame is handed to the bus
and stops when the service commands the charge relay off (the board's write call). Then the flag is
dropped and the relay comes back on before the next trial. p50/p99 over the trials.

Start-up: `smallbms-bus run --config` as a fresh process (virtual bus, memory board, new store)
until it sends systemd's READY=1 on $NOTIFY_SOCKET; median of `--starts` runs.
A benchmark, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import can

from smallbms_bus.config import parse_config
from smallbms_bus.demo import demo_config
from smallbms_bus.outputs.memory import MemoryBoard
from smallbms_bus.reports import BatteryStatus
from smallbms_bus.service import Service
from smallbms_bus.sim.runner import Simulator

CHARGE = 2
NODE = 7
STATUS_ID = 0x100 + NODE


class TimedBoard(MemoryBoard):
    """A memory board that notes when the charge relay is commanded."""

    def __init__(self) -> None:
        super().__init__()
        self.charge_off_at: float | None = None
        self.charge_on = threading.Event()

    def write(self, channel: int, on: bool) -> None:
        if channel == CHARGE:
            if not on and self.charge_off_at is None:
                self.charge_off_at = time.perf_counter()
            if on:
                self.charge_on.set()
        super().write(channel, on)


class TimedBus:
    """The simulator's bus, noting when battery 7's first status frame with CellHighVoltage goes out."""

    def __init__(self, bus: can.BusABC) -> None:
        self.bus = bus
        self.flag_sent_at: float | None = None

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        if msg.arbitration_id == STATUS_ID and msg.data[6] & 1 and self.flag_sent_at is None:
            self.flag_sent_at = time.perf_counter()
        self.bus.send(msg, timeout)

    def recv(self, timeout: float | None = None) -> can.Message | None:
        return self.bus.recv(timeout)


def reaction_latency(trials: int) -> dict:
    channel = f"bench-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        text = demo_config(channel, f"{tmp}/state.db") + "[bms]\ndiscovery_window = 2.0\n"
        config = parse_config(text)
        board = TimedBoard()
        service = Service(config, board=board)
        simulator = Simulator.from_scenario("steady", "2s25p-12v100", ignore_bms=True)
        bus = TimedBus(can.Bus(interface="virtual", channel=channel))
        stop_sim = threading.Event()
        threading.Thread(target=simulator.run, args=(bus,), kwargs={"stop_event": stop_sim}, daemon=True).start()
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        server = threading.Thread(target=lambda: loop.run_until_complete(service.run(stop)), daemon=True)
        server.start()
        battery = simulator.bank.battery(NODE)
        forced = threading.Event()
        real_status = battery.status

        def status() -> BatteryStatus:
            report = real_status()
            return dataclasses.replace(report, cell_high_voltage=True) if forced.is_set() else report

        battery.status = status  # type: ignore[method-assign]
        samples: list[float] = []
        try:
            if not board.charge_on.wait(30):
                raise RuntimeError("the service did not switch the charge relay on")
            for _ in range(trials):
                board.charge_off_at, bus.flag_sent_at = None, None
                board.charge_on.clear()
                forced.set()
                deadline = time.monotonic() + 3
                while board.charge_off_at is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                if board.charge_off_at is not None and bus.flag_sent_at is not None:
                    samples.append((board.charge_off_at - bus.flag_sent_at) * 1000)
                forced.clear()
                board.charge_on.wait(3)
                time.sleep(0.05)
        finally:
            loop.call_soon_threadsafe(stop.set)
            server.join(timeout=15)
            stop_sim.set()
    samples.sort()
    # A trial yields no sample when the flagged frame went out before the trial's clock was armed.
    return {"workload": "50 x 12.8 V (2s25p-12v100), virtual bus, memory board", "trials": trials,
            "measured": len(samples),
            "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(samples[max(0, round(0.99 * len(samples)) - 1)], 3), "max_ms": round(samples[-1], 3)}


def startup(starts: int) -> dict:
    times = []
    for i in range(starts):
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "c.toml"
            config.write_text(demo_config(f"bench-start-{os.getpid()}-{i}", f"{tmp}/state.db"))
            address = f"{tmp}/notify.sock"
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(address)
                sock.settimeout(30)
                start = time.perf_counter()
                process = subprocess.Popen([sys.executable, "-m", "smallbms_bus.cli", "run", "--config", str(config)],
                                           env={**os.environ, "NOTIFY_SOCKET": address},
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while sock.recv(64) != b"READY=1":
                    pass
                times.append(time.perf_counter() - start)
                process.terminate()
                process.wait(timeout=20)
    return {"workload": "smallbms-bus run, virtual bus, memory board, new store: process start -> READY=1",
            "starts": starts, "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = {"startup": startup(args.starts), "reaction": reaction_latency(args.trials)}
    print(f"service benchmark: python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores")
    s, r = results["startup"], results["reaction"]
    print(f"start-up to READY=1: median {s['median_s']} s, max {s['max_s']} s over {s['starts']} starts "
          "(target <= 2 s)")
    print(f"CellHighVoltage frame -> charge relay command: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
          f"max {r['max_ms']} ms, {r['measured']} of {r['trials']} trials measured, {r['workload']} "
          "(target p99 <= 5 ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
