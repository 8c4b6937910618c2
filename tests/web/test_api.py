"""The JSON API over real HTTP (issue 16 item 3, docs/api.md): a running service with virtual batteries, its web
server on a free port, an aiohttp client (from chosen loopback addresses), Modbus read-back with pymodbus, the
event log and the state file as committed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import aiohttp
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.settings import SPEC_BY_NAME
from smallbms_bus.modbus.writes import SETTING_TARGETS
from smallbms_bus.web.api import AUTH_FAILURES
from tests.test_durable_writes import on_disk
from tests.test_service import CHARGE, LOAD
from tests.web.rig import PASSWORD, WebRunning, request

API = "/api/v1"


def learned(run: WebRunning) -> None:
    run.wait_web()
    run.wait_for(lambda: run.board.relays[LOAD] and run.board.relays[CHARGE], 15, "bank learned, load and charge on")


def modbus_register(run: WebRunning, address: int) -> int:
    client = ModbusTcpClient("127.0.0.1", port=run.modbus_port, timeout=5, retries=0)
    assert client.connect()
    try:
        return client.read_holding_registers(address, count=1, device_id=1).registers[0]
    finally:
        client.close()


def logged(run: WebRunning, predicate, what: str, timeout: float = 30.0) -> list[dict]:
    """The event log through the API until `predicate(events)` holds: events are saved with the state within a
    few seconds (the persister's event gap), and the API shows the log as saved."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = request("GET", run.url + API + "/events?limit=100")[1]["events"]
        if predicate(events):
            return events
        time.sleep(0.2)
    raise AssertionError(f"no {what} in the event log within {timeout} s: {events}")


def test_reads_are_open_and_say_what_the_bms_knows(tmp_path):
    with WebRunning(tmp_path) as run:
        learned(run)
        status, body = request("GET", run.url + API + "/status")
        assert status == 200
        assert body["started"] and body["mode"] == "on" and body["outputs"]["load_disconnect"] is True
        assert [b["node"] for b in body["batteries"]] == [1, 2]
        assert all(len(b["cells"]) == 4 and all(3.0 < v < 3.6 for v in b["cells"]) for b in body["batteries"])
        assert body["batteries"][0]["serial"] == run.service.decision.bank.batteries[0].serial
        assert body["bank"]["series"] == 2
        limits = run.service.decision.charge  # CVL/CCL/DCL once charge control knows the bank (CHG)
        assert limits.known and body["charge"]["known"] is True
        assert body["charge"]["cvl"] == round(limits.cvl, 2) and body["charge"]["state"] == limits.state.name.lower()
        status, body = request("GET", run.url + API + "/settings")
        assert status == 200
        by_name = {s["name"]: s for s in body["settings"]}
        assert list(by_name) == list(SETTING_TARGETS)
        floor = by_name["discharge_floor"]
        spec = SPEC_BY_NAME["discharge_floor_pct"]
        assert (floor["value"], floor["default"], floor["min"], floor["max"], floor["unit"], floor["step"]) == (
            10.0, spec.default, spec.minimum, spec.maximum, "%", spec.resolution)
        charged = by_name["charged_voltage"]  # per 12.8 V unit in the core, the bank's volts here (2 in series)
        assert (charged["value"], charged["min"], charged["max"]) == (28.0, 26.0, 29.2)
        status, body = request("GET", run.url + API + "/history")
        assert status == 200 and set(body) >= {"deepest_discharge_ah", "charge_cycles", "min_cell_voltage"}
        status, body = request("GET", run.url + API + "/events?limit=3")
        assert status == 200 and len(body["events"]) <= 3
        assert request("GET", run.url + API + "/nothing")[0] == 404
        assert request("GET", run.url + API + "/events?limit=x")[0] == 400


def test_a_setting_written_is_durable_read_back_over_modbus_and_logged_with_who(tmp_path):
    with WebRunning(tmp_path) as run:
        learned(run)
        status, body = request("PUT", run.url + API + "/settings/discharge_floor", {"value": 15}, password=PASSWORD)
        assert status == 200, body
        assert body["setting"]["value"] == 15.0
        assert on_disk(tmp_path / "state.db")["settings"]["discharge_floor_pct"] == 15.0  # on disk when answered
        assert modbus_register(run, 104) == 150  # the native map, scale 0.1
        status, body = request("GET", run.url + API + "/events?limit=20")
        setting = [e for e in body["events"] if e["kind"] == "setting"]
        assert setting and setting[0]["reason"] == "discharge floor 10 % -> 15 % by web 127.0.0.1"
        status, body = request("PUT", run.url + API + "/settings/charged_voltage", {"value": 28.4}, password=PASSWORD)
        assert status == 200 and run.service.core.settings.charged_voltage_per_unit == 14.2


def test_refused_writes_say_why_with_their_status_and_change_nothing(tmp_path):
    with WebRunning(tmp_path) as run:
        learned(run)
        url = run.url + API + "/settings/discharge_floor"
        status, body = request("PUT", url, {"value": 150}, password=PASSWORD)
        assert status == 400 and body["error"] == "discharge_floor = 150 is not allowed: 0..99 %"
        status, body = request("PUT", url, {"value": 30}, password=PASSWORD)  # above the low-SoC warning (20 %)
        assert status == 400 and "low_soc_warning_pct (20 %)" in body["error"]
        assert request("PUT", url, {"value": "15"}, password=PASSWORD)[0] == 400
        assert request("PUT", url, raw=b"{not json", password=PASSWORD)[0] == 400
        assert request("PUT", run.url + API + "/settings/nope", {"value": 1}, password=PASSWORD)[0] == 404
        assert request("POST", run.url + API + "/commands/format-disk", password=PASSWORD)[0] == 404
        assert request("POST", run.url + API + "/mode", {"mode": "maybe"}, password=PASSWORD)[0] == 400
        assert request("POST", run.url + API + "/soc", {"soc": 101}, password=PASSWORD)[0] == 400
        assert run.service.core.settings.discharge_floor_pct == 10.0 and modbus_register(run, 104) == 100
        logged(run, lambda events: any(e["kind"] == "refused" and e["value"] == "out_of_range"
                                       and e["reason"].endswith("by web 127.0.0.1") for e in events), "refusal")


def test_writes_need_the_password_from_an_allowed_address_and_guessing_is_limited(tmp_path):
    with WebRunning(tmp_path) as run:
        learned(run)
        url = run.url + API + "/mode"
        status, body = request("POST", url, {"mode": "off"})
        assert status == 401 and "password" in body["error"]
        assert request("POST", url, {"mode": "off"}, password="wrong password")[0] == 401
        status, body = request("POST", url, {"mode": "off"}, password=PASSWORD, source="127.0.0.2")
        assert status == 403 and "127.0.0.2" in body["error"] and "allow_write_from" in body["error"]
        assert run.service.core.mode_on
        for _ in range(AUTH_FAILURES):  # 127.0.0.3 is allowed: its wrong guesses are counted
            request("POST", url, {"mode": "off"}, password="guess 1234", source="127.0.0.3")
        status, body = request("POST", url, {"mode": "off"}, password=PASSWORD, source="127.0.0.3")
        assert status == 429 and "too many wrong passwords" in body["error"]
        assert run.service.core.mode_on  # nothing changed by any of them
        assert request("GET", run.url + API + "/access", password=PASSWORD)[1]["authenticated"] is True
        status, body = request("POST", url, {"mode": "off"}, password=PASSWORD)  # 127.0.0.1 is not limited
        assert status == 200 and body["mode"] == "off"
        run.wait_for(lambda: not run.board.relays[LOAD] and not run.board.relays[CHARGE], 3, "relays open")
        assert modbus_register(run, 105) == 0
        events = logged(run, lambda events: any(e["kind"] == "refused" and "127.0.0.2" in e["reason"]
                                                for e in events), "the refusal of 127.0.0.2")
        mode = [e for e in events if e["name"] == "MODE" and e["value"] == "off"]
        assert mode and "web 127.0.0.1" in mode[0]["reason"]  # committed with the change: there at once


def test_without_a_password_the_api_is_read_only(tmp_path):
    with WebRunning(tmp_path, password=None) as run:
        learned(run)
        status, body = request("POST", run.url + API + "/commands/sync", password="anything at all")
        assert status == 403 and "read-only" in body["error"]
        assert request("GET", run.url + API + "/access")[1]["password_set"] is False
        assert request("GET", run.url + API + "/status")[0] == 200


def test_commands_and_soc_are_committed_and_logged(tmp_path):
    with WebRunning(tmp_path) as run:
        learned(run)
        status, body = request("POST", run.url + API + "/soc", {"soc": 80}, password=PASSWORD)
        assert status == 200, body
        assert request("GET", run.url + API + "/status")[1]["soc"] == 80.0
        status, body = request("POST", run.url + API + "/commands/sync", password=PASSWORD)
        assert status == 200 and body["done"] == ["command 1 (synchronise SoC)"]
        events = request("GET", run.url + API + "/events?limit=20")[1]["events"]
        names = [e["name"] for e in events]
        assert "SET_SOC" in names and "SYNCHRONISE_SOC" in names
        assert on_disk(tmp_path / "state.db")["monitor"]  # committed with the state
        since = max(e["time"] for e in events)
        newer = request("GET", run.url + API + f"/events?since={since}")[1]["events"]
        assert newer and all(e["time"] >= since for e in newer)


def test_not_possible_now_is_409_and_a_store_that_cannot_commit_is_503(tmp_path):
    with WebRunning(tmp_path, batteries=False) as run:
        run.wait_web()
        status, body = request("POST", run.url + API + "/soc", {"soc": 50}, password=PASSWORD)
        assert status == 409 and "capacity is not known" in body["error"]
        # the write lock, taken between the service's own saves (which hold it for milliseconds)
        blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None, timeout=10)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            status, body = request("PUT", run.url + API + "/settings/discharge_floor", {"value": 15},
                                   password=PASSWORD)
            assert status == 503 and "store cannot commit" in body["error"]
            assert run.service.core.settings.discharge_floor_pct == 10.0  # undone
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


def test_the_stream_delivers_status_at_a_bounded_rate_and_follows_writes(tmp_path):
    with WebRunning(tmp_path) as run:
        learned(run)

        async def listen() -> list[dict]:
            received: list[dict] = []
            async with aiohttp.ClientSession() as session, session.get(run.url + API + "/stream") as answer:
                assert answer.headers["Content-Type"].startswith("text/event-stream")
                started = time.monotonic()
                wrote = False
                async for line in answer.content:
                    if line.startswith(b"data: "):
                        received.append(json.loads(line[6:]))
                    if len(received) == 3 and not wrote:
                        wrote = True
                        async with session.post(run.url + API + "/mode", json={"mode": "off"},
                                                headers={"Authorization": f"Bearer {PASSWORD}"}) as w:
                            assert w.status == 200
                    if (received and received[-1]["mode"] == "off") or time.monotonic() - started > 20:
                        break
                elapsed = time.monotonic() - started
            # at most 2 a second (plus the first at once), whatever the service's 10 decisions a second
            assert len(received) <= 2 * elapsed + 2, (len(received), elapsed)
            return received

        received = asyncio.run(listen())
        assert received[0]["mode"] == "on" and received[-1]["mode"] == "off"
        assert received[-1]["outputs"]["load_disconnect"] is False
