"""The victim of tests/test_store.py's kill -9 campaign: a BMS core and a Persister as fast as they go.

    python -m tests.store_writer DB LOG SEED     (from the repository root)

It resumes from the store like the service does (a restart: monotonic time starts again at 0, wall
time continues after the last save), then runs a 2S2P rig on a fast clock (1 s of simulated time
per tick, so the 60 s counter interval passes every 60 ticks) with random discharge / charge
currents and frequent persisted changes: settings writes, mode toggles, SoC sets. It appends JSON
lines to LOG with one write() each, so a SIGKILL leaves whole lines (a torn last line is ignored):

- {"k": "start", ...}                       resumed or fresh
- {"k": "change", "settings", "mode_on"}    a persisted change was applied (before its save)
- {"k": "intent", "seq", "digest", ...}     a save is about to happen, with what it writes
- {"k": "commit", "seq"}                    that save returned (it is durable)
- {"k": "beat", "wall", "consumed_ah"}      the live counters every 5 ticks
- {"k": "ready"}                            after the first commit: the test starts its kill timer

The test then checks that the store holds exactly the last committed save, or the one in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from typing import Any

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.store import Persister, Store
from tests.bms.rig import WALL0, FakeBattery

DT = 1.0  # simulated seconds per tick
INTERVAL = 60.0  # the Persister's counter interval, in simulated seconds
BEAT_TICKS = 5


def collect_and_write(persister: Persister, core: BmsCore, now: float, wall: float, force: bool = False,
                      events: Any = ()) -> bool:
    """What the service does after an evaluation, on one thread: `collect`, then `write` what is due."""
    save = persister.collect(core, now, wall, force, events)
    return save is not None and persister.write(save)


def digest(snapshot: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def summary(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The values the test asserts on, besides the digest."""
    return {"settings": snapshot["settings"], "mode_on": snapshot["mode_on"],
            "soc_known": snapshot["monitor"]["soc_known"], "consumed_ah": snapshot["monitor"]["consumed_ah"],
            "cumulative_ah_drawn": snapshot["history"]["cumulative_ah_drawn"],
            "charged_energy_kwh": snapshot["history"]["charged_energy_kwh"]}


def random_settings(rng: random.Random) -> dict[str, float]:
    floor = rng.randint(0, 30)
    return {"charged_voltage_per_unit": round(rng.uniform(13.0, 14.6), 2),
            "tail_current_pct": round(rng.uniform(0.5, 10.0), 1),
            "charged_detection_time_min": float(rng.randint(1, 50)),
            "discharge_floor_pct": float(floor), "low_soc_warning_pct": float(rng.randint(floor, 60))}


def main(db_path: str, log_path: str, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(**record: Any) -> None:
        os.write(fd, (json.dumps(record) + "\n").encode())

    store = Store.open(db_path)
    stored, saved_wall = store.load_state(), store.saved_wall()
    base = WALL0 if saved_wall is None else saved_wall + 1.0  # wall time continues after the last save
    core = BmsCore(0.0, base, discovery_window=1.0) if stored is None else \
        BmsCore.from_snapshot(stored, 0.0, base, discovery_window=1.0)
    log(k="start", restored=stored is not None, saved_wall=saved_wall)
    batteries = [FakeBattery(node=(s - 1) * 2 + p, string=s, series=p) for s in (1, 2) for p in (1, 2)]
    persister = Persister(store, interval=INTERVAL)
    # the newest event the store holds: on a resume it is the previous run's until this run logs one
    newest = store.events(limit=1)
    newest_event = [newest[0]["wall"], newest[0]["name"], newest[0]["value"]] if newest else None
    t, seq, amps = 0.0, 0, -40.0
    ready = False
    while True:
        t += DT
        wall = base + t
        for b in batteries:
            for report in b.reports():
                core.on_report(report, t)
        if core.started and rng.random() < 0.03:  # a persisted change, saved at once by the policy
            what = rng.choice(("settings", "mode", "soc"))
            if what == "settings":
                core.set_settings(**random_settings(rng))
            elif what == "mode":
                core.set_mode(not core.mode_on, reason="campaign")
            else:
                core.set_soc(float(rng.randint(30, 95)))
            log(k="change", what=what, settings=core.settings.to_dict(), mode_on=core.mode_on)
            changed = True
        else:
            changed = False
        if rng.random() < 0.02:
            amps = rng.choice((-60.0, -25.0, 0.0, 30.0))
        for b in batteries:
            b.current = amps / 2
        decision = core.evaluate(t, wall)
        persister.queue(decision.events)
        if decision.events:
            e = decision.events[-1]
            newest_event = [e.wall, e.name, e.value]
        if persister.due(core, t):
            snapshot = core.snapshot(t)
            seq += 1
            log(k="intent", seq=seq, digest=digest(snapshot), wall=wall, newest_event=newest_event,
                **summary(snapshot))
            if not collect_and_write(persister, core, t, wall):
                raise SystemExit(f"the save {seq} failed: {persister.last_error}")
            log(k="commit", seq=seq)
            if not ready:
                log(k="ready")
                ready = True
        elif changed:
            raise SystemExit("a persisted change was not due at once")
        if int(t) % BEAT_TICKS == 0:
            log(k="beat", wall=wall, consumed_ah=core.monitor.consumed_ah, soc_known=core.monitor.soc_known)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
