"""MQTT benchmark: the cost of building the retained MQTT state of one decision, and the event loop's part.

    .venv/bin/python benchmarks/mqtt.py [--repeats 7] [--json out.json]

`MqttFrontEnd.messages` runs on the client's publisher thread at most once per `[mqtt] publish_period`
(default 2 s), or within 0.5 s of an alarm/output change: every topic's JSON (bank, state, outputs, alarms,
history, settings, charge, one per battery with its cells) plus the discovery messages (cached until the
batteries change). What the event loop itself does is `MqttFrontEnd.tick`: a comparison and a hand-over
(`loop_tick_us`). Median of `repeats` runs of 50 builds (10000 ticks) per bank, on one pinned core. A
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from common import pin, write_json
from core import BANKS, feed

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.config import parse_config
from smallbms_bus.mqtt import MqttFrontEnd

TARGET_MS = 100.0  # 5 % of one core at the default 2 s period, on the publisher thread


async def _never(*_: object) -> None:  # the write path is not exercised here
    raise AssertionError


def measure(strings: int, units: int, repeats: int) -> dict:
    core = BmsCore(0.0, 1.79e9, discovery_window=0.5)
    t, alive = 0.0, 0
    for _ in range(1000):
        t, alive = round(t + 0.1, 3), alive + 1
        feed(core, strings, units, t, alive, cells=True, identity=True)
        if t > 1.0 and core.evaluate(t, 1.79e9 + t).started:
            break
    section = parse_config('[mqtt]\nhost = "127.0.0.1"\nsite = "bench"\ncommands = true\n')["mqtt"]
    front = MqttFrontEnd(section, _never, lambda *_: None)
    decision = core.evaluate(t, 1.79e9 + t)
    messages = front.messages(decision, core.settings)  # fills the discovery cache, as the first tick does
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(50):
            front.messages(decision, core.settings)
        samples.append((time.perf_counter() - start) / 50 * 1000)
    ticks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(10000):
            front.tick(float(i), decision, core.settings)  # every call due (the period is 2 s of this clock)
        ticks.append((time.perf_counter() - start) / 10000 * 1e6)
    return {"build_ms": round(statistics.median(samples), 3), "loop_tick_us": round(statistics.median(ticks), 2),
            "topics": len(messages),
            "bytes": sum(len(p) for p in messages.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    pin()
    results = {}
    for label, (strings, units) in BANKS.items():
        results[label] = r = measure(strings, units, args.repeats)
        print(f"{label:28s} build {r['build_ms']:7.3f} ms (publisher thread, target < {TARGET_MS:g} ms), "
              f"loop tick {r['loop_tick_us']:.2f} us; {r['topics']} topics, {r['bytes']} bytes")
    write_json(args.json, results, target_ms=TARGET_MS, python=platform.python_version())
    return 0


if __name__ == "__main__":
    sys.exit(main())
