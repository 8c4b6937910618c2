"""Demo speed benchmark: CPU of one `smallbms-bus demo` process at a speed, for a bank (docs/simulator.md "Demo speed").

    .venv/bin/python benchmarks/demo_speed.py 2s2p-12v100:1 2s2p-12v100:20 2s2p-12v100:50 max-chain:2 [--seconds 20]

Each BANK:SPEED runs `smallbms-bus demo` (service and simulator in one process on one simulation clock) for
`--seconds` real seconds, `steady` scenario, no readouts, metrics and Modbus off, with the demo's speed cap
lifted so speeds beyond it can be measured. Reported: the process's CPU time (user + system, from wait4) per
wall second as a share of one core, the frames per real second the bank sends at that speed, and the speed
the simulation clock achieved (below the asked speed when its governor had to wait for a lagging part).
A benchmark, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from smallbms_bus.demo import frames_per_second
from smallbms_bus.sim.bank import BankShape

LIFT_CAP = ("import sys, smallbms_bus.demo as d; d.MAX_SPEED = d.FRAME_BUDGET = 1e12; "
            "from smallbms_bus.cli import main; sys.exit(main())")


def measure(bank: str, speed: float, seconds: float) -> str:
    args = [sys.executable, "-c", LIFT_CAP, "--log-level", "WARNING", "demo", "--bank", bank, "--scenario", "steady",
            "--speed", str(speed), "--duration", str(speed * seconds), "--every", "1e6", "--metrics-port", "0",
            "--modbus-port", "0"]
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    out = process.stdout.read()  # to EOF: the process is ending
    _, status, usage = os.wait4(process.pid, 0)  # reaped here (not by Popen) to get its rusage
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    cpu = usage.ru_utime + usage.ru_stime
    achieved = re.search(r"achieved ([\d.]+)", out)
    frames = speed * frames_per_second(BankShape.parse(bank))
    return (f"{bank:14} speed {speed:>5g}: {frames:6.0f} frames/s, CPU {100 * cpu / wall:5.1f} % of one core, "
            f"achieved {achieved[1] if achieved else '?'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="BANK:SPEED")
    parser.add_argument("--seconds", type=float, default=20.0, help="real seconds per run (default 20)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for run in args.runs:
        bank, _, speed = run.rpartition(":")
        print(measure(bank, float(speed), args.seconds), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
