"""The SQLite store: real files in tmp_path, real SQLite, a real core; and a kill -9 campaign."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest

from smallbms_bus.bms.core import BmsCore, Event
from smallbms_bus.store import APPLICATION_ID, EVENT_LOG_SIZE, SCHEMA_0, SCHEMA_VERSION, Persister, Store, StoreError
from tests.bms.rig import WALL0, Rig
from tests.store_writer import DT, INTERVAL, collect_and_write, digest

ROOT = Path(__file__).resolve().parents[1]


def busy_rig() -> Rig:
    rig = Rig(2, 2)
    rig.start()
    rig.core.set_settings(charged_voltage_per_unit=14.2, discharge_floor_pct=15, low_soc_warning_pct=25)
    rig.core.set_mode(False)
    rig.core.set_soc(72.5)
    rig.set_current(-30.0)
    rig.run(120)
    rig.battery(1).cells[0] = 3.05  # a pre-alarm timer running
    rig.run(5)
    return rig


def raw(path: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql, params).fetchall()


def make_event(i: int) -> Event:
    return Event(WALL0 + i, float(i), f"E{i}", "state", "on", f"reason {i}")


# -- state -------------------------------------------------------------------------------------
def test_round_trip_of_a_real_core_snapshot(tmp_path):
    rig = busy_rig()
    snap = rig.core.snapshot(rig.t)
    path = tmp_path / "deep" / "dir" / "state.db"  # directories are created
    with Store.open(path) as store:
        assert store.load_state() is None and store.saved_wall() is None
        store.save_state(snap, WALL0 + rig.t)
    with Store.open(path, create=False) as store:
        loaded = store.load_state()
        assert store.saved_wall() == WALL0 + rig.t
    assert loaded == json.loads(json.dumps(snap))
    assert loaded["mode_on"] is False and loaded["settings"]["charged_voltage_per_unit"] == 14.2
    assert loaded["timers"]["pre_alarm_elapsed_s"] == pytest.approx(5.0, abs=0.11)
    restored = BmsCore.from_snapshot(loaded, rig.t, WALL0 + rig.t)
    assert restored.snapshot(rig.t) == snap
    assert restored.monitor.soc(200) == pytest.approx(rig.last.soc)


def test_a_save_rewrites_only_the_parts_that_changed(tmp_path):
    rig = busy_rig()
    with Store.open(tmp_path / "s.db") as store:
        store.save_state(rig.core.snapshot(rig.t), 1000.0)
        rig.run(30)  # counters move; settings, mode and the learned bank do not
        store.save_state(rig.core.snapshot(rig.t), 1030.0)
        walls = dict(raw(store.path, "SELECT part, saved_wall FROM state"))
        assert walls["monitor"] == walls["history"] == 1030.0
        assert walls["settings"] == walls["mode_on"] == walls["learned_bank"] == 1000.0
        assert store.saved_wall() == 1030.0
        store.save_state(rig.core.snapshot(rig.t), 1090.0)  # nothing changed: the time of the save still moves
        assert store.saved_wall() == 1090.0
        assert store.load_state() == json.loads(json.dumps(rig.core.snapshot(rig.t)))
        store.save_state({"version": 1, "settings": {}}, 1100.0)  # a part a snapshot no longer has goes
        assert store.load_state() == {"version": 1, "settings": {}}


def test_wal_and_synchronous_full_are_in_effect(tmp_path):
    path = tmp_path / "s.db"
    with Store.open(path) as store:
        assert store.pragma("journal_mode") == "wal"
        assert store.pragma("synchronous") == 2  # FULL
        assert store.pragma("user_version") == SCHEMA_VERSION
        assert store.pragma("application_id") == APPLICATION_ID
        store.save_state({"version": 1}, 1.0)
        assert (tmp_path / "s.db-wal").exists()
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]  # persistent in the file
    assert raw(path, "SELECT value FROM meta WHERE key = 'created_by'") != []


# -- events ------------------------------------------------------------------------------------
def test_event_log_is_bounded_at_1000_and_newest_first(tmp_path):
    path = tmp_path / "s.db"
    with Store.open(path) as store:
        store.append_events([make_event(i) for i in range(600)])
        store.append_events([])  # no transaction for nothing
        dicts = [{"wall": WALL0 + i, "now": float(i), "name": f"E{i}", "kind": "alarm", "value": "raised",
                  "reason": f"reason {i}"} for i in range(600, 1050)]
        store.append_events(dicts)
        store.save_state({"version": 1}, WALL0, events=[make_event(i) for i in range(1050, 1100)])
        assert store.event_count() == EVENT_LOG_SIZE
    with Store.open(path) as store:
        newest = store.events()
        everything = store.events(limit=None)
    assert len(newest) == 100 and len(everything) == 1000
    assert [e["name"] for e in everything] == [f"E{i}" for i in range(1099, 99, -1)]
    assert newest[0] | {"id": 0} == {"id": 0, "wall": WALL0 + 1099, "now": 1099.0, "name": "E1099", "kind": "state",
                                     "value": "on", "reason": "reason 1099"}
    assert everything[100]["name"] == "E999" and everything[100]["kind"] == "alarm"


# -- refusing and migrating ----------------------------------------------------------------------
def test_a_store_from_a_newer_schema_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "s.db"
    with Store.open(path) as store:
        store.save_state({"version": 1, "mode_on": False}, 5.0)
    raw_db = sqlite3.connect(path)
    raw_db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw_db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError) as info:
        Store.open(path)
    message = str(info.value)
    assert str(path) in message
    assert f"written by a newer smallbms-bus (schema {SCHEMA_VERSION + 1}, this build reads {SCHEMA_VERSION})" \
        in message
    assert "upgrade smallbms-bus" in message and "aside" in message
    assert path.read_bytes() == before


def write_schema_0(path: Path, snapshot: dict | str, events: list[dict], saved_wall: float = 1234.5) -> None:
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(SCHEMA_0)
        db.executemany("INSERT INTO kv VALUES (?, ?)", [
            ("snapshot", snapshot if isinstance(snapshot, str) else json.dumps(snapshot)),
            ("saved_wall", repr(saved_wall)), ("events", json.dumps(events))])


def test_a_schema_0_store_is_migrated_with_its_data(tmp_path):
    rig = busy_rig()
    snap = rig.core.snapshot(rig.t)
    events = [{"wall": WALL0 + i, "now": float(i), "name": "MODE", "kind": "state", "value": "off" if i % 2 else "on",
               "reason": f"old {i}"} for i in range(1200)]
    path = tmp_path / "s.db"
    write_schema_0(path, snap, events)
    assert raw(path, "PRAGMA user_version") == [(0,)]
    with Store.open(path) as store:
        assert store.pragma("user_version") == SCHEMA_VERSION and store.pragma("journal_mode") == "wal"
        loaded = store.load_state()
        assert store.saved_wall() == 1234.5
        migrated = store.events(limit=None)
    assert loaded == json.loads(json.dumps(snap))
    assert BmsCore.from_snapshot(loaded, rig.t, WALL0 + rig.t).snapshot(rig.t) == snap
    assert len(migrated) == EVENT_LOG_SIZE
    assert migrated[0]["reason"] == "old 1199" and migrated[-1]["reason"] == "old 200"
    tables = {r[0] for r in raw(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"meta", "state", "events"}
    assert dict(raw(path, "SELECT key, value FROM meta"))["migrated_from"] == "0"


def test_a_failed_migration_changes_nothing(tmp_path):
    path = tmp_path / "s.db"
    write_schema_0(path, "{not json", [])
    with pytest.raises(StoreError, match="cannot migrate the schema 0 store"):
        Store.open(path)
    assert raw(path, "PRAGMA user_version") == [(0,)]
    assert raw(path, "SELECT value FROM kv WHERE key = 'snapshot'") == [("{not json",)]
    assert {r[0] for r in raw(path, "SELECT name FROM sqlite_master WHERE type = 'table'")} == {"kv"}


def test_a_garbage_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "state.db"
    garbage = b"this is not a database, it is someone's notes\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(StoreError) as info:
        Store.open(path)
    assert str(path) in str(info.value) and "not a usable SQLite database" in str(info.value)
    assert path.read_bytes() == garbage


def test_a_corrupt_store_is_refused(tmp_path):
    path = tmp_path / "state.db"
    with Store.open(path) as store:
        store.append_events([make_event(i) for i in range(1000)])  # several pages of events
    size = path.stat().st_size
    page = raw(path, "PRAGMA page_size")[0][0]
    assert size >= 4 * page
    with path.open("r+b") as f:  # scribble over a b-tree page header in the middle of the file
        f.seek((size // page // 2) * page)
        f.write(b"\xff" * 64)
    with pytest.raises(StoreError) as info:
        Store.open(path)
    assert str(path) in str(info.value) and ("corrupt" in str(info.value) or "malformed" in str(info.value))


def test_someone_elses_database_is_not_touched(tmp_path):
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE recipes (name TEXT)")
    kv = tmp_path / "kv.db"
    with closing(sqlite3.connect(kv)) as db, db:
        db.execute(SCHEMA_0)
        db.execute("INSERT INTO kv VALUES ('theme', 'dark')")
    for p in (path, kv):
        before = p.read_bytes()
        with pytest.raises(StoreError, match="not a smallbms-bus store"):
            Store.open(p)
        assert p.read_bytes() == before


def test_a_missing_store_is_created_only_when_asked(tmp_path):
    with pytest.raises(StoreError, match="no store there"):
        Store.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


# -- the write policy ----------------------------------------------------------------------------
def test_persister_writes_on_change_at_once_counters_every_interval_and_on_force(tmp_path):
    rig = Rig(2, 2)
    rig.start()
    core = rig.core
    store = Store.open(tmp_path / "s.db")
    p = Persister(store, interval=60.0)
    assert collect_and_write(p, core, 0.0, WALL0)  # the first call writes a baseline
    assert [collect_and_write(p, core, t, WALL0 + t) for t in (1.0, 30.0, 59.9)] == [False] * 3
    core.monitor.consumed_ah = 12.5  # a counter moved: no revision change, waits for the interval
    assert not collect_and_write(p, core, 59.99, WALL0 + 59.99)
    assert store.load_state()["monitor"]["consumed_ah"] == 0.0
    assert collect_and_write(p, core, 60.0, WALL0 + 60.0)
    assert store.load_state()["monitor"]["consumed_ah"] == 12.5 and store.saved_wall() == WALL0 + 60.0

    core.set_mode(False)  # written on change, at once
    assert collect_and_write(p, core, 61.0, WALL0 + 61.0) and store.load_state()["mode_on"] is False
    core.set_settings(tail_current_pct=2.5)
    assert collect_and_write(p, core, 61.1, WALL0 + 61.1) and store.load_state()["settings"]["tail_current_pct"] == 2.5
    core.set_soc(40.0)
    assert collect_and_write(p, core, 61.2, WALL0 + 61.2) and store.load_state()["monitor"]["consumed_ah"] == 120.0
    assert not collect_and_write(p, core, 61.3, WALL0 + 61.3)  # the interval restarts at each write
    assert not collect_and_write(p, core, 121.1, WALL0 + 121.1)
    assert collect_and_write(p, core, 121.2, WALL0 + 121.2)

    assert collect_and_write(p, core, 121.3, WALL0 + 121.3, force=True)  # shutdown
    # events are held for at most event_gap (5 s) after the last write, then written with the state
    assert not collect_and_write(p, core, 122.0, WALL0 + 122.0, events=[make_event(1)])
    assert p.pending_events == 1 and store.event_count() == 0
    assert not collect_and_write(p, core, 126.0, WALL0 + 126.0, events=[make_event(2)])
    assert collect_and_write(p, core, 126.3, WALL0 + 126.3)
    assert [e["name"] for e in store.events()] == ["E2", "E1"] and p.pending_events == 0
    assert p.writes == 8 and p.failures == 0

    store.close()  # a store that fails (here: closed) does not raise; retried after `retry` s
    core.set_mode(True)
    assert not collect_and_write(p, core, 130.0, WALL0 + 130.0, events=[make_event(3)])
    assert p.failures == 1 and str(store.path) in (p.last_error or "")
    assert not p.due(core, 139.9) and p.due(core, 140.0)
    p.store = Store.open(tmp_path / "s.db")  # e.g. the card came back
    assert collect_and_write(p, core, 140.0, WALL0 + 140.0)
    assert p.store.load_state()["mode_on"] is True and p.store.events(limit=1)[0]["name"] == "E3"
    p.store.close()


def test_collect_on_the_core_thread_write_on_the_store_thread(tmp_path):
    rig = Rig(2, 2)
    rig.start()
    core = rig.core
    with Store.open(tmp_path / "s.db") as store:
        p = Persister(store)
        save = p.collect(core, 0.0, WALL0, events=[make_event(1)])
        assert save is not None and save.snapshot["mode_on"] is True
        assert p.collect(core, 0.5, WALL0 + 0.5) is None  # in flight: counted as written
        core.set_mode(False)  # a change after the snapshot was taken ...
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(p.write, save).result()
        assert store.load_state()["mode_on"] is True and store.events()[0]["name"] == "E1"
        assert p.due(core, 1.0)  # ... is still due, and saved by the next collect
        assert collect_and_write(p, core, 1.0, WALL0 + 1.0) and store.load_state()["mode_on"] is False
    # a failed write puts its events back and leaves the state due after the retry delay
    save = p.collect(core, 2.0, WALL0 + 2.0, force=True, events=[make_event(2)])
    assert save is not None and not p.write(save) and p.failures == 1
    assert p.pending_events == 1 and not p.due(core, 11.9) and p.due(core, 12.0)


def test_a_real_run_writes_rarely(tmp_path):
    """A steady 20 minutes, evaluated every 0.5 s: one write a minute, plus the start and its events."""
    rig = Rig(2, 2)
    rig.set_current(-20.0)
    with Store.open(tmp_path / "s.db") as store:
        p = Persister(store)
        while rig.t < 1200.0:
            d = rig.tick(0.5)
            collect_and_write(p, rig.core, rig.t, WALL0 + rig.t, events=d.events)
        assert 20 <= p.writes <= 23, p.writes
        behind = rig.core.monitor.consumed_ah - store.load_state()["monitor"]["consumed_ah"]
        assert 0.0 <= behind <= 20.0 * 60.0 / 3600.0 * 1.1  # at most one interval of 20 A (Peukert-weighted)


# -- kill -9 campaign ----------------------------------------------------------------------------
def read_log(path: Path) -> list[dict]:
    lines, text = [], path.read_text().splitlines()
    for i, line in enumerate(text):
        try:
            lines.append(json.loads(line))
        except ValueError:  # a write torn by the kill: only ever the last line
            assert i == len(text) - 1, line
    return lines


def check_after_kill(db: Path, log: list[dict], cycle: str) -> float:
    """Everything a kill -9 must not break; returns the store's saved_wall."""
    assert raw(db, "PRAGMA integrity_check") == [("ok",)], cycle
    commits = {r["seq"] for r in log if r["k"] == "commit"}
    intents = [r for r in log if r["k"] == "intent"]
    committed = [r for r in intents if r["seq"] in commits][-1]
    in_flight = intents[-1] if intents[-1]["seq"] not in commits else None
    with Store.open(db) as store:
        snap = store.load_state()
        saved_wall = store.saved_wall()
        events = store.events(limit=None)
    assert snap is not None, cycle
    # the store holds exactly the last committed save, or the one the kill interrupted
    held = {r["digest"]: r for r in (committed, in_flight) if r is not None}.get(digest(snap))
    assert held is not None, f"{cycle}: the store holds neither save {committed['seq']} nor the one in flight"
    assert saved_wall == held["wall"], cycle
    assert snap["settings"] == held["settings"] and snap["mode_on"] == held["mode_on"], cycle
    assert snap["monitor"]["consumed_ah"] == held["consumed_ah"], cycle
    assert snap["history"]["cumulative_ah_drawn"] == held["cumulative_ah_drawn"], cycle
    assert BmsCore.from_snapshot(snap, 0.0, saved_wall).settings.to_dict() == snap["settings"]
    # settings and mode: the last change that was followed by a commit is what the store holds
    kinds = [r["k"] for r in log]
    changes = [i for i, k in enumerate(kinds) if k == "change"]
    if changes and "commit" in kinds[changes[-1]:]:
        change = log[changes[-1]]
        assert (snap["settings"], snap["mode_on"]) == (change["settings"], change["mode_on"]), cycle
    # counters: at most one interval behind the live values (the last heartbeat before the kill)
    beats = [r for r in log if r["k"] == "beat"]
    if beats and beats[-1]["wall"] > held["wall"]:
        beat = beats[-1]
        assert beat["wall"] - saved_wall <= INTERVAL + DT, cycle
        assert abs(beat["consumed_ah"] - snap["monitor"]["consumed_ah"]) / 200.0 * 100.0 <= 1.0, cycle  # SoC in 1 %
    # events went in with the state: the newest is the save's, and the newest MODE event agrees
    assert len(events) <= EVENT_LOG_SIZE
    assert [events[0]["wall"], events[0]["name"], events[0]["value"]] == held["newest_event"], cycle
    mode_event = next(e for e in events if e["name"] == "MODE")
    assert mode_event["value"] == ("on" if snap["mode_on"] else "off"), cycle
    return saved_wall


def test_kill_9_at_random_moments_never_loses_a_commit(tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    db = tmp_path / "state.db"
    kills = 0
    last_wall = 0.0
    while kills < 22:
        cycle = f"seed {seed}, kill {kills + 1}"
        log_path, err_path = tmp_path / f"log{kills}.jsonl", tmp_path / f"err{kills}.txt"
        with err_path.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "tests.store_writer", str(db), str(log_path),
                                     str(rng.randrange(2**31))], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            # The kill comes at a random moment once the writer has committed 5 saves (counted in its log, not
            # guessed from the time: under load a save takes longer); the deadline only bounds a hang.
            deadline = time.monotonic() + 60.0
            while (log_path.read_text() if log_path.exists() else "").count('"k": "commit"') < 5:
                assert proc.poll() is None, f"{cycle}: the writer exited: {err_path.read_text()}"
                assert time.monotonic() < deadline, f"{cycle}: the writer did not commit 5 saves within 60 s"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.45))
            assert proc.poll() is None, f"{cycle}: the writer exited: {err_path.read_text()}"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        log = read_log(log_path)
        start = log[0]
        assert start["k"] == "start" and start["restored"] == (kills > 1), cycle
        if kills > 1:  # the writer resumed from exactly what the previous check found
            assert start["saved_wall"] == last_wall, cycle
        saves = sum(r["k"] == "commit" for r in log)
        assert saves >= 5, f"{cycle}: only {saves} saves before the kill"
        wall = check_after_kill(db, log, cycle)
        assert wall >= last_wall, cycle
        last_wall = wall
    assert kills >= 20
