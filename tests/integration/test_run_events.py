"""The event log across real process lifetimes: `smallbms-bus run` started, killed with SIGKILL, started again and
stopped with SIGTERM. The log says each start, the clean stop and how, and that the killed run left no stop."""

from __future__ import annotations

import signal
import sqlite3

from smallbms_bus import __version__
from smallbms_bus.store import EVENT_FIELDS
from tests.integration.test_run_process import LOAD, rig, start, wait_for  # noqa: F401 (rig is a fixture)


def service_events(store) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = db.execute(f"SELECT {', '.join(EVENT_FIELDS)} FROM events WHERE kind = 'service' ORDER BY id").fetchall()
    finally:
        db.close()
    return [(row[2], row[4], row[5]) for row in rows]  # name, value, reason


def test_starts_a_kill_9_and_a_clean_stop_are_in_the_log(rig):  # noqa: F811
    config, module, store = rig
    service = start(config)
    try:
        wait_for(lambda: module.relays[LOAD], 20, "load relay on", service)
        wait_for(lambda: [e[0] for e in service_events(store)] == ["STARTED"], 10, "STARTED saved", service)
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait(timeout=10)
    assert module.relays[LOAD]  # SIGKILL: the relay module holds what it was last told
    service = start(config)
    try:
        wait_for(lambda: not module.relays[LOAD], 20, "outputs off at the restart (OUT-4)", service)
        wait_for(lambda: module.relays[LOAD], 20, "load relay on after the restart", service)
        service.send_signal(signal.SIGTERM)
        _, err = service.communicate(timeout=20)
    finally:
        if service.poll() is None:
            service.kill()
    assert service.returncode == 0, err
    logged = service_events(store)
    assert [(name, value) for name, value, _ in logged] == [
        ("STARTED", __version__), ("PREVIOUS_RUN", "no stop record"), ("STARTED", __version__),
        ("STOPPED", "clean")]
    assert str(config) in logged[0][2]
    assert "recorded no stop: it was killed, lost power or crashed" in logged[1][2]
    assert logged[3][2] == "stopped (SIGTERM): outputs off"
