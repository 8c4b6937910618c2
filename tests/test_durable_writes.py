"""SET-3 in the running service: a write (setting, mode, command, SoC) is answered only once it is committed
to the store; a write the store cannot commit is refused with exception 04, logged at ERROR and undone,
except "mode off", which stays in effect. Real service, real Modbus client and sockets, real SQLite file;
the store is made to fail by holding its write lock from a second SQLite connection (as a `sqlite3` shell
could), so the commit times out after SQLite's busy timeout."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import struct
import time
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from tests.ports import free_port, recv_exact
from tests.test_service import LOAD, Running

DEVICE_FAILURE = 4


def on_disk(path: Path) -> dict:
    """The state as committed, read through a connection of our own (what a crash right now would leave)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        return {part: json.loads(value) for part, value in db.execute("SELECT part, value FROM state")}
    finally:
        db.close()


def running(tmp_path: Path) -> tuple[Running, int]:
    port = free_port()
    return Running(tmp_path, extra=f'[modbus]\nhost = "127.0.0.1"\nport = {port}\n'), port


def write(client: ModbusTcpClient, address: int, *values: int):
    if len(values) == 1:
        return client.write_register(address, values[0], device_id=1)
    return client.write_registers(address, list(values), device_id=1)


def frame(tid: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, 1) + pdu


def answer(sock: socket.socket) -> tuple[int, bytes]:
    tid, _, length = struct.unpack(">HHH", recv_exact(sock, 6))
    return tid, recv_exact(sock, length)[1:]  # without the unit id


def on_loop(run: Running, fn) -> None:
    done = []
    run.loop.call_soon_threadsafe(lambda: done.append(fn()))
    run.wait_for(lambda: done, 2, "the call on the service's loop")


def test_every_kind_of_write_is_on_disk_when_its_answer_arrives(tmp_path):
    """Each answer is read against the file right away: a crash at that instant would leave exactly this."""
    run, port = running(tmp_path)
    store = tmp_path / "state.db"
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=10, retries=0)
        assert client.connect()
        try:
            for i in range(10):  # settings, alone and together
                floor = 5.0 + i / 10
                assert not write(client, 104, int(floor * 10)).isError()
                assert on_disk(store)["settings"]["discharge_floor_pct"] == floor, f"write {i}"
                assert not write(client, 101, 20 + i, 2 + i % 3, 300 + i, 100 + i).isError()  # 101-104
                assert on_disk(store)["settings"] == {**DEFAULT_SETTINGS.to_dict(), "tail_current_pct": 2.0 + i / 10,
                                                      "charged_detection_time_min": 2 + i % 3,
                                                      "low_soc_warning_pct": 30 + i / 10,
                                                      "discharge_floor_pct": 10 + i / 10}
            assert not write(client, 105, 0).isError()  # mode off
            assert on_disk(store)["mode_on"] is False
            assert not write(client, 105, 1).isError()
            assert on_disk(store)["mode_on"] is True
            assert not write(client, 121, 555).isError()  # set SoC 55.5 % of 100 Ah
            assert on_disk(store)["monitor"]["consumed_ah"] == pytest.approx(44.5, abs=0.01)
            assert not write(client, 120, 1).isError()  # synchronise
            assert on_disk(store)["monitor"]["consumed_ah"] == pytest.approx(0.0, abs=0.01)
            assert not write(client, 120, 3).isError()  # reset settings
            assert on_disk(store)["settings"] == DEFAULT_SETTINGS.to_dict()
            on_loop(run, lambda: setattr(run.service.core.history, "charge_cycles", 7))
            assert not write(client, 120, 2).isError()  # reset history
            assert on_disk(store)["history"]["charge_cycles"] == 0
            assert not write(client, 120, 5).isError()  # firmware update begins
            assert on_disk(store)["timers"]["firmware_update_command"] is True
            assert not write(client, 120, 7).isError()  # aborted
            assert on_disk(store)["timers"]["firmware_update_command"] is False
            assert not write(client, 120, 4).isError()  # re-learn: the same two batteries
            assert len(on_disk(store)["learned_bank"]["batteries"]) == 2
        finally:
            client.close()
        assert run.shutdown() == 0


def test_a_write_in_flight_holds_its_connection_not_the_others(tmp_path):
    """While a write waits for the disk: the writer's pipelined read is answered after the write, in order;
    another client is served meanwhile and already reads the written value (it is in effect: the outputs
    follow it); the tick keeps deciding."""
    run, port = running(tmp_path)
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        writer = socket.create_connection(("127.0.0.1", port), timeout=10)
        other = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
        assert other.connect()
        blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # the store cannot commit until this ends
            writer.sendall(frame(1, struct.pack(">BHH", 6, 104, 123)) + frame(2, struct.pack(">BHH", 3, 104, 1)))
            time.sleep(0.3)
            evaluations = run.service.stats.evaluations
            started = time.monotonic()
            assert other.read_holding_registers(104, count=1, device_id=1).registers == [123]
            assert time.monotonic() - started < 1.0
            writer.settimeout(0.5)
            with pytest.raises(TimeoutError):
                writer.recv(1)  # neither the write nor the read behind it is answered yet
            assert run.service.stats.evaluations >= evaluations + 3  # the BMS kept deciding meanwhile
            blocker.execute("ROLLBACK")
            writer.settimeout(10)
            assert answer(writer) == (1, struct.pack(">BHH", 6, 104, 123))
            assert answer(writer) == (2, struct.pack(">BBH", 3, 2, 123))
            assert on_disk(tmp_path / "state.db")["settings"]["discharge_floor_pct"] == 12.3
        finally:
            blocker.close()
            writer.close()
            other.close()
        assert run.shutdown() == 0


def test_a_write_the_store_cannot_commit_is_04_logged_once_and_undone_but_mode_off_stays(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run, port = running(tmp_path)
    store = tmp_path / "state.db"
    with run:
        run.wait_for(lambda: run.board.relays[LOAD], 10, "load on")
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=15, retries=0)
        assert client.connect()
        blocker = sqlite3.connect(store, isolation_level=None, timeout=0)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            refused = write(client, 104, 150)
            assert refused.isError() and refused.exception_code == DEVICE_FAILURE
            assert client.read_holding_registers(104, count=1, device_id=1).registers == [100]  # undone
            assert run.service.core.settings.discharge_floor_pct == 10.0
            refused = write(client, 105, 0)  # mode off: refused, yet in effect
            assert refused.isError() and refused.exception_code == DEVICE_FAILURE
            run.wait_for(lambda: not run.board.relays[LOAD], 1, "mode off in effect")
            assert client.read_holding_registers(105, count=1, device_id=1).registers == [0]
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            starts = [m for m in errors if m.startswith("store: cannot save")]
            assert len(starts) == 1, errors  # one ERROR when the failures start, not one per attempt
            assert any("mode off is in effect but will not survive a restart" in m for m in errors), errors
            assert on_disk(store)["mode_on"] is True  # nothing reached the disk
            assert run.service.persister.failures >= 2
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert not write(client, 104, 160).isError()  # saving works again: acknowledged, durable
        client.close()
        saved = on_disk(store)
        assert saved["settings"]["discharge_floor_pct"] == 16.0 and saved["mode_on"] is False
        ends = [r for r in caplog.records if r.getMessage().startswith("store: saving works again")]
        assert len(ends) == 1 and ends[0].levelno == logging.ERROR
        assert run.shutdown() == 0
