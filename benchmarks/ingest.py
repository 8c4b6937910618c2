"""Ingest benchmark: frames per second through decode (DBC) + bank + BMS core, on one core.

    .venv/bin/python benchmarks/ingest.py [--seconds 60] [--repeats 7] [--json out.json]

The frames are the real traffic mix of a simulated bank (the simulator's scheduler, encoded through
the DBC): 50 x 12.8 V batteries (750 frames per second of bus time) and 25 x 51.2 V batteries. Each
figure is the median of `repeats` runs over the same pre-built frames; decode alone, update alone
and the pipeline are measured in the same process so their ratios are comparable. `bank.evaluate`
(what the core calls on every decision) is timed separately. "Through the core" is the service's own
path: decode, `BmsCore.on_report` (bank update and the protective check), and a full `evaluate` for
every report that crosses a threshold and every 100 ms of processing time (the service's tick is wall
time, not bus time: at N frames/s it still evaluates 10 times a second), timed after the first 5 s of
traffic (discovery, learning, every battery's first frames). The process is pinned
to one CPU.
A benchmark, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import can
from common import pin, write_json

from smallbms_bus.bank import Bank
from smallbms_bus.bms.core import BmsCore
from smallbms_bus.link.codec import FrameDecoder, FrameEncoder
from smallbms_bus.reports import Report
from smallbms_bus.sim.bank import BankShape, VirtualBank
from smallbms_bus.sim.runner import FrameScheduler

TARGET_FRAMES_PER_S = 50_000
WALL0 = 1_790_000_000.0
WARM_UP_S = 5.0  # bus seconds fed before timing the path through the core
WORKLOADS = {"50 x 12.8 V (1s50p-12v100)": "1s50p-12v100", "25 x 51.2 V (1s25p-48v100)": "1s25p-48v100"}


def traffic(shape_name: str, seconds: float, encoder: FrameEncoder) -> list[tuple[float, can.Message]]:
    bank = VirtualBank(BankShape.parse(shape_name), soc=60.0)
    scheduler = FrameScheduler(bank, encoder)
    frames: list[tuple[float, can.Message]] = []
    t = 0.0
    while t < seconds:
        frames += [(t, m) for m in scheduler.due(t)]
        t = round(t + 0.01, 2)
    return frames


def timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(shape_name: str, seconds: float, repeats: int) -> dict:
    decoder = FrameDecoder()
    encoder = FrameEncoder(decoder.db)
    frames = traffic(shape_name, seconds, encoder)
    messages = [m for _, m in frames]
    decode = decoder.decode
    reports: list[tuple[float, Report]] = [(t, r) for t, m in frames if (r := decode(m)) is not None]
    assert len(reports) == len(frames) and decoder.malformed_total == 0

    def decode_only() -> None:
        for m in messages:
            decode(m)

    def update_only() -> None:
        bank = Bank(0.0)
        for t, r in reports:
            bank.update(r, t)

    def pipeline() -> None:
        bank = Bank(0.0)
        update = bank.update
        for t, m in frames:
            r = decode(m)
            if r is not None:
                update(r, t)

    warm = [(t, m) for t, m in frames if t < WARM_UP_S]
    steady = [(t, m) for t, m in frames if t >= WARM_UP_S]

    def through_core() -> float:
        """Seconds for the steady part: the bank learned and every battery's first frames (each one new,
        so each decided at once) behind it, as in a service that has been running."""
        core = BmsCore(0.0, WALL0, discovery_window=1.0)
        on_report, evaluate, clock = core.on_report, core.evaluate, time.perf_counter
        for t, m in warm:
            r = decode(m)
            if r is not None and on_report(r, t):
                evaluate(t, WALL0 + t)
        start = next_tick = clock()
        for t, m in steady:
            r = decode(m)
            # The tick is 100 ms of the service's own time (here: of this loop), however many frames that is.
            if (r is not None and on_report(r, t)) or clock() >= next_tick:
                evaluate(t, WALL0 + t)
                next_tick = clock() + 0.1
        return clock() - start

    bank = Bank(0.0)
    for t, r in reports:
        bank.update(r, t)
    evaluate_at = frames[-1][0]
    bank.evaluate(evaluate_at)  # warm the topology cache, as a running service has it

    def evaluate_100() -> None:
        for _ in range(100):
            bank.evaluate(evaluate_at)

    n = len(frames)
    return {
        "workload": shape_name,
        "frames": n,
        "bus_seconds": seconds,
        "decode_frames_per_s": round(n / timed(decode_only, repeats)),
        "bank_update_reports_per_s": round(n / timed(update_only, repeats)),
        "decode_plus_bank_frames_per_s": round(n / timed(pipeline, repeats)),
        "through_core_frames_per_s": round(len(steady) / statistics.median(through_core() for _ in range(repeats))),
        "bank_evaluate_ms": round(timed(evaluate_100, repeats) / 100 * 1000, 3),
        "batteries": len(bank.batteries),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of bus traffic per run (default 60)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    pin()
    results = [measure(shape, args.seconds, args.repeats) | {"name": name} for name, shape in WORKLOADS.items()]
    print(f"ingest benchmark: python {platform.python_version()}, {platform.machine()}, one core, "
          f"median of {args.repeats} runs over {args.seconds:g} s of bus traffic")
    print("| workload | frames | decode frames/s | bank update/s | decode + bank frames/s | through the core "
          "frames/s | vs target | bank.evaluate |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        core = r["through_core_frames_per_s"]
        print(f"| {r['name']} | {r['frames']} | {r['decode_frames_per_s']:,} | {r['bank_update_reports_per_s']:,} | "
              f"{r['decode_plus_bank_frames_per_s']:,} | {core:,} | {core / TARGET_FRAMES_PER_S:.1f}x | "
              f"{r['bank_evaluate_ms']} ms |")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
