"""SLCAN transport benchmark: CPU of the link's own thread per frame read, parsed and decoded from a serial port.

    .venv/bin/python benchmarks/slcan.py [--seconds 20] [--repeats 3] [--rate 750] [--per-write 2] [--json out.json]

A second process plays the USB SLCAN adapter: it writes BAT_STATUS lines of 50 batteries into a
pseudo-terminal at `--rate` frames/s (750 = 50 x 12.8 V batteries), `--per-write` lines per write (2: what
`smallbms-bus simulate` through `SlcanHub` gives per read, measured). This process opens the pty's other side
with `smallbms_bus.link.bus.Link` and polls it as the service's bus thread does; the figure is that thread's
CPU time (user + system) per decoded frame, median of `--repeats` runs. Unlike the nominal-load benchmark in
service.py (the whole service, sensitive to how busy the machine is, because a busy machine batches more
frames per read), this isolates the transport. The same script runs against an older checkout with
`PYTHONPATH=<checkout>` (it uses only `Link.open` and `Link.poll`).
A benchmark, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time

from common import write_json

from smallbms_bus.link.bus import BusConfig, Link


def writer(fd: int, rate: float, per_write: int, seconds: float) -> None:
    lines = [f"t1{node:02X}8D430F6FF090101{alive:02X}\r".encode() for alive in range(0, 256, 17)
             for node in range(1, 51)]
    start, sent = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        os.write(fd, b"".join(lines[(sent + k) % len(lines)] for k in range(per_write)))
        sent += per_write
        time.sleep(max(0.0, start + sent / rate - time.monotonic()))


def one_run(seconds: float, rate: float, per_write: int) -> dict:
    master, slave = os.openpty()
    link = Link(BusConfig("slcan", os.ttyname(slave), options={"sleep_after_open": 0}))
    assert link.open(), link.reason
    time.sleep(0.05)
    os.set_blocking(master, False)
    with contextlib.suppress(BlockingIOError):
        os.read(master, 4096)  # the set-up commands
    os.set_blocking(master, True)
    child = subprocess.Popen([sys.executable, __file__, "--writer", str(master), str(rate), str(per_write),
                              str(seconds)], pass_fds=[master])
    got = 0
    cpu0 = time.thread_time()
    while child.poll() is None:
        got += len(link.poll(0.05))
    for _ in range(10):  # what is still in the port
        got += len(link.poll(0.02))
    cpu = time.thread_time() - cpu0
    link.close()
    os.close(master)
    os.close(slave)
    return {"frames": got, "cpu_s": round(cpu, 3), "us_per_frame": round(1e6 * cpu / max(got, 1), 1),
            "percent_of_one_core": round(100 * cpu / seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=750.0, help="frames per second")
    parser.add_argument("--per-write", type=int, default=2, help="lines per write of the adapter")
    parser.add_argument("--json")
    parser.add_argument("--writer", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        fd, rate, per_write, seconds = args.writer
        writer(int(fd), float(rate), int(per_write), float(seconds))
        return 0
    runs = [one_run(args.seconds, args.rate, args.per_write) for _ in range(args.repeats)]
    per_frame = statistics.median(r["us_per_frame"] for r in runs)
    percent = statistics.median(r["percent_of_one_core"] for r in runs)
    workload = (f"{args.rate:g} frames/s of BAT_STATUS lines, {args.per_write} per write, from another process into "
                f"a pty; Link.poll as the bus thread, {args.seconds:g} s x {args.repeats}")
    print(f"SLCAN transport (python {platform.python_version()}, {platform.machine()}): {per_frame} us per frame, "
          f"{percent} % of one core (median of {args.repeats}; runs {[r['us_per_frame'] for r in runs]}); {workload}")
    write_json(args.json, {"workload": workload, "us_per_frame": per_frame, "percent_of_one_core": percent,
                           "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
