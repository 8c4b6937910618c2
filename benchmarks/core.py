"""Core benchmark: one full BMS evaluation (bank + rules + monitor + history) per bank size.

    .venv/bin/python benchmarks/core.py [--repeats 7] [--json out.json]

For each bank the core first starts (bank learned, all fresh), then two figures are measured, each
the median of `repeats` runs of 200 evaluations on one pinned core:
- "all cells new": before every evaluation every battery gets new BAT_STATUS and cell frames (what
  a 100 ms tick sees at worst: cell summaries are recomputed for every battery);
- "status only": only BAT_STATUS changed (cell frames come every 500 ms, so most ticks look like this).
Reports are fed outside the timed region. 50 x 51.2 V (800 cells) exceeds the manual's limit of 25
batteries of 51.2 V: the core evaluates it fully and raises BANK_CONFIGURATION, which is the point
of the size (the issue's 800-cell target). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from common import pin, write_json

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, SerialFragment

TARGET_MS = 0.5
BANKS = {"50 x 51.2 V (800 cells)": (50, 4), "25 x 51.2 V (400 cells)": (25, 4), "50 x 12.8 V (200 cells)": (50, 1)}
FLAGS = dict(cell_high_voltage=False, cell_low_voltage=False, cell_low_pre_alarm=False, balancing=False,
             cell_imbalance=False, hardware_fault=False, firmware_updating=False)


def feed(core: BmsCore, strings: int, units: int, now: float, alive: int, *, cells: bool, identity: bool) -> None:
    for node in range(1, strings + 1):
        if identity:
            core.on_report(BatteryInfo(node, units, 100, (1, 0, 0), node, 1), now)
            serial = f"BENCH{node:09d}"
            core.on_report(SerialFragment(node, 0, serial[:7]), now)
            core.on_report(SerialFragment(node, 1, serial[7:]), now)
            core.on_report(BatteryTemps(node, 20.0, 22.0), now)
        if cells:
            for group in range(units):
                base = 3.300 + (alive % 7) * 0.001
                core.on_report(CellVoltages(node, 4 * group + 1, (base, base + 0.002, base + 0.001, base)), now)
        core.on_report(BatteryStatus(node, 13.2 * units, -5.0, 21.0, **FLAGS, alive_counter=alive % 256), now)


def measure(strings: int, units: int, repeats: int) -> dict:
    core = BmsCore(0.0, 1.79e9, discovery_window=0.5)
    t, alive = 0.0, 0
    for _ in range(1000):  # start the core: learn the bank (discovery 0.5 s), everything fresh
        t, alive = round(t + 0.1, 3), alive + 1
        feed(core, strings, units, t, alive, cells=True, identity=True)
        if t > 1.0 and core.evaluate(t, 1.79e9 + t).started:
            break
    results = {}
    for label, cells in (("all_cells_new_ms", True), ("status_only_ms", False)):
        samples = []
        for _ in range(repeats):
            elapsed = 0.0
            for _ in range(200):
                t, alive = round(t + 0.1, 3), alive + 1
                if cells or alive % 5 == 0:  # keep the cells fresh in the status-only run too
                    feed(core, strings, units, t, alive, cells=True, identity=alive % 10 == 0)
                else:
                    feed(core, strings, units, t, alive, cells=False, identity=alive % 10 == 0)
                if not cells and alive % 5 == 0:
                    continue  # time only the evaluations that saw status frames alone
                start = time.perf_counter()
                core.evaluate(t, 1.79e9 + t)
                elapsed += time.perf_counter() - start
            samples.append(elapsed / (200 if cells else 160) * 1000)
        results[label] = round(statistics.median(samples), 3)
    d = core.evaluate(t, 1.79e9 + t)
    results["started"] = d.started
    results["alarms"] = [a.name for a in type(d.alarms) if a in d.alarms]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    pin()
    print(f"core benchmark: python {platform.python_version()}, {platform.machine()}, one core, "
          f"median of {args.repeats} x 200 evaluations")
    print("| bank | all cells new | status only | evaluations/s (all cells new) | vs 0.5 ms target | alarms |")
    print("|---|---|---|---|---|---|")
    out = []
    for name, (strings, units) in BANKS.items():
        r = measure(strings, units, args.repeats) | {"bank": name}
        out.append(r)
        print(f"| {name} | {r['all_cells_new_ms']} ms | {r['status_only_ms']} ms | "
              f"{1000 / r['all_cells_new_ms']:,.0f} | {TARGET_MS / r['all_cells_new_ms']:.2f}x | "
              f"{', '.join(r['alarms']) or 'none'} |")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
