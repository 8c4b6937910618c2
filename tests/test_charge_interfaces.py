"""Charge control (CHG) says the same on every interface: the demo's readout, `smallbms-bus status` (a real
subprocess, text and JSON), native block F, the GX unit's 305-308, SunSpec 802 and the metrics, for the same
decision of a core behind a real Modbus server (tests/modbus/harness.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from smallbms_bus.readout import format_decision
from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer, u32
from tests.test_one_truth import metrics_of

GX = 225


def status(port: int, *extra: str) -> str:
    result = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "status", "--port", str(port), *extra],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def read(running: RunningServer, address: int, count: int, unit: int) -> list[int]:
    client = running.client()
    try:
        reply = client.read_holding_registers(address, count=count, device_id=unit)
        assert not reply.isError(), reply
        return reply.registers
    finally:
        client.close()


@pytest.fixture
def server():
    running = RunningServer(Rig(2, 2))  # 2S2P 12.8 V 100 Ah: rating 200 A, CVL 28.40 V, DVL 22.40 V
    try:
        yield running
    finally:
        running.close()


def test_the_limits_read_the_same_everywhere(server):
    for b in server.rig.batteries:
        b.temps = (7.5, 21.0)  # CHG-3: half the charge current
    server.rig.battery(2).cells[1] = 3.05  # CHG-4: low-cell factor 0.2 + 0.8 x (3.05 - 2.90) / 0.25 = 0.68
    server.tick(12.0)
    d = server.on_loop(lambda: server.rig.last)
    c = d.charge
    assert (c.cvl, c.ccl, c.dcl, c.dvl) == (28.4, 100.0, 136.0, 22.4)
    line = "absorption  CVL 28.40 V  CCL 100.0 A  DCL 136.0 A  DVL 22.40 V"
    assert f"charge   {line}" in format_decision(d).splitlines()
    assert f"charge control     {line}" in status(server.port).splitlines()
    values = json.loads(status(server.port, "--json"))
    assert (values["charge_voltage_limit"], values["charge_current_limit"], values["discharge_current_limit"],
            values["discharge_voltage_limit"], values["charge_state"]) == (28.4, 100.0, 136.0, 22.4, 0)
    block = read(server, 300, 10, 1)
    assert block[:2] == [2840, 2240] and u32(block, 2) == 1000 and u32(block, 4) == 1360 and block[6] == 0
    assert read(server, 305, 4, GX) == [284, 224, 1000, 1360]
    device = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=server.port, timeout=5)
    try:
        device.scan()
        battery = device.models[802][0]
        assert (battery.VMax.cvalue, battery.AChaMax.cvalue, battery.ADisChaMax.cvalue, battery.VMin.cvalue) == \
            (28.4, 100.0, 136.0, 22.4)
    finally:
        device.close()
    scrape = metrics_of(d)
    assert scrape.value("smallbms_charge_voltage_limit_volts") == 28.4
    assert scrape.value("smallbms_charge_current_limit_amperes") == 100.0
    assert scrape.value("smallbms_discharge_current_limit_amperes") == 136.0
    assert scrape.value("smallbms_discharge_voltage_limit_volts") == 22.4
    assert scrape.value("smallbms_charge_current_rating_amperes") == 200.0
    assert scrape.value("smallbms_charge_state", state="absorption") == 1.0
    assert scrape.value("smallbms_charge_state", state="float") == 0.0
    assert scrape.value("smallbms_charge_limits_known") == 1.0
    assert scrape.value("smallbms_charge_cell_voltage_limiting") == 0.0


def test_cell_voltage_limiting_is_said_everywhere(server):
    server.tick(12.0)
    server.on_loop(server.rig.battery(1).cells.__setitem__, 0, 3.56)
    server.tick(0.3)
    d = server.on_loop(lambda: server.rig.last)
    assert d.charge.cell_limiting and d.atc
    assert "(CVL held down: a cell reached 3.55 V)" in format_decision(d)
    assert "(CVL held down: a cell reached 3.55 V)" in status(server.port)
    assert read(server, 307, 1, 1) == [1]
    assert metrics_of(d).value("smallbms_charge_cell_voltage_limiting") == 1.0
    assert read(server, 305, 1, GX) == [round(d.charge.cvl * 10)]
    assert d.charge.cvl == pytest.approx(d.bank.aggregates.voltage - 0.2)  # the whole 0.1 V per unit


def test_before_the_bank_is_proven_every_interface_says_not_known():
    running = RunningServer(Rig(2, 2, discovery_window=10.0), start=False)
    try:
        running.tick(1.0)
        d = running.on_loop(lambda: running.rig.last)
        assert not d.started and not d.charge.known
        said = "absorption, limits not known yet (the bank is not proven): charge 0 A, discharge 0 A"
        assert f"charge   {said}" in format_decision(d).splitlines()
        assert f"charge control     {said}" in status(running.port).splitlines()
        values = json.loads(status(running.port, "--json"))
        assert values["charge_voltage_limit"] is None and values["charge_current_limit"] == 0.0
        scrape = metrics_of(d)
        assert scrape.value("smallbms_charge_limits_known") == 0.0
        assert scrape.value("smallbms_charge_current_limit_amperes") == 0.0
        assert not scrape.series("smallbms_charge_voltage_limit_volts")  # unknown: absent, not 0
    finally:
        running.close()


def test_inverter_silent_reads_where_our_warnings_read_and_raises_no_battery_alarm(server):
    """docs/inverter.md "Keep-alive": bit 9 of the native warnings (21) and of SunSpec's EvtVnd2; neither SunSpec's
    standard Evt1 nor the GX unit's /Alarms/* (267-279, 320-329), which describe the battery, not the inverter."""
    def sunspec_events() -> tuple[int, int]:
        device = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=server.port, timeout=5)
        try:
            device.scan()
            battery = device.models[802][0]
            return battery.Evt1.cvalue, battery.EvtVnd2.cvalue
        finally:
            device.close()

    server.tick(12.0)
    quiet_gx, (quiet_evt1, quiet_vnd2) = (read(server, 267, 13, GX), read(server, 320, 10, GX)), sunspec_events()
    assert not read(server, 21, 1, 1)[0] & (1 << 9) and not quiet_vnd2 & (1 << 9)
    server.on_loop(server.rig.core.set_inverter_silent, "no keep-alive for 10 s")
    server.tick(0.2)
    assert server.on_loop(lambda: server.rig.last).reasons["INVERTER_SILENT"] == "no keep-alive for 10 s"
    assert read(server, 21, 1, 1)[0] & (1 << 9)
    assert (read(server, 267, 13, GX), read(server, 320, 10, GX)) == quiet_gx
    evt1, vnd2 = sunspec_events()
    assert vnd2 == quiet_vnd2 | (1 << 9) and evt1 == quiet_evt1
    assert metrics_of(server.on_loop(lambda: server.rig.last)).value("smallbms_warning", warning="inverter_silent") == 1
