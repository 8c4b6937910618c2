"""The event log is complete: the service's start and stop, every setting change (old -> new, who), mode changes and
commands with who, refused writes with who and why, bounded against a flood. Real service, real Modbus clients and
sockets (a writer that may not write connects from 127.0.0.2), real SQLite file read back after the stop."""

from __future__ import annotations

import re
import socket
import sqlite3
import struct
from pathlib import Path

from pymodbus.client import ModbusTcpClient

from smallbms_bus import __version__
from smallbms_bus.commit import REFUSED_EVENT_WINDOW_S, REFUSED_EVENTS_PER_WINDOW
from smallbms_bus.store import EVENT_FIELDS, EVENT_LOG_SIZE
from tests.ports import free_port, recv_exact
from tests.test_service import LOAD, Running

WHO = "by Modbus 127.0.0.1 unit 1"


def running(tmp_path, extra: str = "") -> tuple[Running, int]:
    port = free_port()
    return Running(tmp_path, extra=f'[modbus]\nhost = "127.0.0.1"\nport = {port}\n{extra}'), port


def events(tmp_path, kind: str | None = None) -> list[dict]:
    """The stored log, oldest first (optionally one kind), read as a `sqlite3 -readonly` shell would."""
    db = sqlite3.connect(f"file:{tmp_path / 'state.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(f"SELECT id, {', '.join(EVENT_FIELDS)} FROM events ORDER BY id").fetchall()
    finally:
        db.close()
    log = [dict(zip(("id", *EVENT_FIELDS), row, strict=True)) for row in rows]
    return [e for e in log if kind is None or e["kind"] == kind]


def client_for(port: int) -> ModbusTcpClient:
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=10, retries=0)
    assert client.connect()
    return client


def raw_write(sock: socket.socket, tid: int, address: int, value: int) -> None:
    sock.sendall(struct.pack(">HHHBBHH", tid, 0, 6, 1, 6, address, value))


def raw_answer(sock: socket.socket) -> bytes:
    _, _, length = struct.unpack(">HHH", recv_exact(sock, 6))
    return recv_exact(sock, length)[1:]


def test_start_and_clean_stop_are_events_with_version_and_configuration(tmp_path):
    with running(tmp_path)[0] as run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        assert run.shutdown() == 0
    service = events(tmp_path, "service")
    assert [(e["name"], e["value"]) for e in service] == [("STARTED", __version__), ("STOPPED", "clean")]
    assert run.config.source in service[0]["reason"] and "state.db" in service[0]["reason"]
    assert "outputs off" in service[1]["reason"]
    assert service[0]["id"] < min(e["id"] for e in events(tmp_path, "state")) < service[1]["id"]


def test_every_setting_change_says_old_new_and_who_through_modbus(tmp_path):
    run, port = running(tmp_path)
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        client = client_for(port)
        try:
            assert not client.write_register(104, 150, device_id=1).isError()  # discharge floor 10 -> 15 %
            assert not client.write_registers(101, [20, 5], device_id=1).isError()  # tail 4 -> 2 %, time 3 -> 5 min
            assert not client.write_register(104, 150, device_id=1).isError()  # the same value: no change, no event
            assert not client.write_register(106, 3050, device_id=1).isError()  # pre-alarm level 3.100 -> 3.050 V
            assert not client.write_register(100, 2840, device_id=1).isError()  # charged 28.40 V on 2 x 12.8 V
        finally:
            client.close()
        assert run.shutdown() == 0
    settings = events(tmp_path, "setting")
    assert [(e["name"], e["value"]) for e in settings] == [
        ("discharge_floor_pct", "15 %"), ("tail_current_pct", "2 %"), ("charged_detection_time_min", "5 min"),
        ("pre_alarm_level_per_cell", "3.05 V"), ("charged_voltage_per_unit", "14.2 V")]
    reasons = [e["reason"] for e in settings]
    assert reasons[0] == f"discharge floor 10 % -> 15 % {WHO}"
    assert reasons[3] == f"pre-alarm level 3.1 V -> 3.05 V {WHO}"
    assert reasons[4] == f"charged voltage 14 V -> 14.2 V per 12.8 V unit {WHO}"


def test_mode_and_every_command_are_events_naming_who(tmp_path):
    run, port = running(tmp_path)
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        client = client_for(port)
        try:
            assert not client.write_register(105, 0, device_id=1).isError()  # mode off
            assert not client.write_register(105, 1, device_id=1).isError()
            assert not client.write_register(104, 150, device_id=1).isError()
            assert not client.write_register(121, 555, device_id=1).isError()  # set SoC 55.5 %
            for command in (1, 2, 3, 4, 5, 6, 5, 7):
                assert not client.write_register(120, command, device_id=1).isError(), command
        finally:
            client.close()
        assert run.shutdown() == 0
    modes = [e for e in events(tmp_path, "state") if e["name"] == "MODE"]
    assert [(e["value"], e["reason"]) for e in modes] == [("on", "start"), ("off", f"Modbus write {WHO}"),
                                                           ("on", f"Modbus write {WHO}")]
    commands = events(tmp_path, "command")
    assert [(e["name"], e["value"]) for e in commands] == [
        ("SET_SOC", "55.5 %"), ("SYNCHRONISE_SOC", "100 %"), ("RESET_HISTORY", "done"), ("RESET_SETTINGS", "done"),
        ("RELEARN_BANK", "2 batteries"), ("FIRMWARE_UPDATE_BEGIN", "done"), ("FIRMWARE_UPDATE_DONE", "done"),
        ("FIRMWARE_UPDATE_BEGIN", "done"), ("FIRMWARE_UPDATE_ABORT", "done")]
    assert all(e["reason"].endswith(WHO) for e in commands)
    assert commands[0]["reason"] == f"set SoC: unknown -> 55.5 % {WHO}"
    assert commands[1]["reason"] == f"synchronise SoC: 55.5 % -> 100 % {WHO}"
    # the reset is one command and a setting event for each setting it changed back
    reset = [e for e in events(tmp_path, "setting") if "reset settings" in e["reason"]]
    assert [(e["name"], e["reason"]) for e in reset] == [
        ("discharge_floor_pct", f"discharge floor 15 % -> 10 % {WHO} (reset settings)")]


def test_refused_writes_are_events_with_who_and_why(tmp_path):
    """Out of range (03), read-only register (02), a writer that may not write (01), not possible yet (06 is
    not reachable once learned: skipped), and a write the store could not commit (04): each an event."""
    run, port = running(tmp_path)
    store = tmp_path / "state.db"
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        client = client_for(port)
        stranger = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        try:
            assert client.write_register(104, 1000, device_id=1).isError()  # 100.0 %: out of range
            assert client.write_register(103, 50, device_id=1).isError()  # warning 5 % below the floor 10 %
            assert client.write_register(2, 1, device_id=1).isError()  # bank voltage: read-only
            raw_write(stranger, 1, 105, 0)  # mode off from a client not in allow_write_from
            assert raw_answer(stranger)[:2] == bytes([0x86, 1])
            blocker = sqlite3.connect(store, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # the store cannot commit until this ends
            try:
                assert client.write_register(104, 150, device_id=1).isError()  # 04 after SQLite's busy timeout
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
        finally:
            stranger.close()
            client.close()
        assert run.shutdown() == 0
    refused = events(tmp_path, "refused")
    assert [(e["name"], e["value"]) for e in refused] == [
        ("discharge_floor", "out_of_range"), ("low_soc_warning", "out_of_range"), ("register 2", "not_writable"),
        ("register 105", "not_allowed"), ("discharge_floor", "store_failed")]
    assert all(e["reason"].endswith(WHO) for e in refused if e["value"] != "not_allowed")
    assert refused[3]["reason"].endswith("by Modbus 127.0.0.2 unit 1")
    assert "100" in refused[0]["reason"] and "discharge_floor_pct" in refused[1]["reason"]
    assert "store" in refused[4]["reason"]
    assert not [e for e in events(tmp_path, "setting")]  # nothing refused is logged as a change


def test_a_flood_of_refused_writes_is_bounded_and_summarised(tmp_path):
    """1,500 refused writes (an attacker not allowed to write, and out-of-range values) leave at most
    REFUSED_EVENTS_PER_WINDOW events one by one and one summary that counts the rest; the log keeps the
    service's own events."""
    run, port = running(tmp_path)
    flood = 1500
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        stranger = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            for start in range(0, flood, 100):  # pipelined, 100 requests at a time
                for i in range(start, start + 100):
                    raw_write(stranger if i % 2 else client, i & 0xFFFF, 104, 1001 + i % 7)
                for i in range(start, start + 100):
                    assert raw_answer(stranger if i % 2 else client)[0] == 0x86
        finally:
            stranger.close()
            client.close()
        assert run.shutdown() == 0
    refused = events(tmp_path, "refused")
    singles = [e for e in refused if e["name"] != "writes"]
    (summary,) = [e for e in refused if e["name"] == "writes"]
    assert len(singles) == REFUSED_EVENTS_PER_WINDOW
    assert summary["value"] == f"{flood - REFUSED_EVENTS_PER_WINDOW} more"
    assert "not_allowed" in summary["reason"] and "out_of_range" in summary["reason"]
    assert "127.0.0.2" in summary["reason"] and "127.0.0.1" in summary["reason"]
    assert len(summary["reason"]) < 400
    names = {(e["kind"], e["name"]) for e in events(tmp_path)}
    assert ("service", "STARTED") in names and ("service", "STOPPED") in names and ("state", "ATC") in names
    assert REFUSED_EVENT_WINDOW_S >= 3600  # at most REFUSED_EVENTS_PER_WINDOW + 1 refused events an hour


def test_a_summary_is_written_when_its_window_ends(tmp_path):
    """The summary of a window is written once the window is over, not only at the stop."""
    run, port = running(tmp_path)
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            for i in range(REFUSED_EVENTS_PER_WINDOW + 5):
                raw_write(client, i, 104, 1001)
                assert raw_answer(client)[0] == 0x86
        finally:
            client.close()
        writes = run.service.writes
        # the service's tick flushes with its clock; this flush is an hour later
        run.loop.call_soon_threadsafe(lambda: writes.flush_refusals(writes.clock() + REFUSED_EVENT_WINDOW_S))
        run.wait_for(lambda: any(e["name"] == "writes" for e in events(tmp_path, "refused")), 15,
                     "the summary saved while the service runs")
        assert run.shutdown() == 0
    (summary,) = [e for e in events(tmp_path, "refused") if e["name"] == "writes"]
    assert summary["value"] == "5 more"


def test_docs_store_md_describes_every_field_and_kind():
    from smallbms_bus.commit import COMMAND_EVENTS, REFUSAL_KINDS

    text = (Path(__file__).resolve().parents[1] / "docs" / "store.md").read_text()
    section = text.split("## The event log", 1)[1].split("\n## ", 1)[0]
    field_table, kind_table = re.findall(r"(?:^\|.*\n)+", section, flags=re.MULTILINE)
    fields = set(re.findall(r"^\| `(\w+)` \|", field_table, flags=re.MULTILINE))
    assert fields == {"id", *EVENT_FIELDS}
    kinds = re.findall(r"^\| `(\w+)` \| (.+?) \|", kind_table, flags=re.MULTILINE)
    assert {kind for kind, _ in kinds} == {
        "state", "alarm", "warning", "service", "setting", "command", "refused"}
    named = " ".join(names for _, names in kinds)
    for name in (*COMMAND_EVENTS.values(), "SET_SOC", "ALARM_RESET", "STARTED", "STOPPED", "PREVIOUS_RUN"):
        assert f"`{name}`" in named, name
    for value in REFUSAL_KINDS.values():
        assert f"`{value}`" in section, value
    assert REFUSED_EVENT_WINDOW_S == 3600 and "window of an hour" in section
    assert f"the first {REFUSED_EVENTS_PER_WINDOW} refused" in section
    assert f"at most {REFUSED_EVENTS_PER_WINDOW + 1} of the\n{EVENT_LOG_SIZE} rows an hour" in section
