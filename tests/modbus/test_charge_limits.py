"""Charge control (CHG) on every Modbus map: the GX unit's 305-308 with 1297/1298, SunSpec 802 through an
unmodified pysunspec2, the native block F, and Debian's mbpoll; all equal to the core's Decision.charge.

The bank is the largest the manual allows with 300 Ah batteries: 50 of 12.8 V 300 Ah, 2 in series, 25 strings
(25.6 V, 7500 Ah: CCL and DCL up to 7500 A)."""

from __future__ import annotations

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from smallbms_bus.bms.charge import ChargeLimits
from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer, u32
from tests.modbus.test_mbpoll import MBPOLL, mbpoll, words

GX = 225
STRINGS, SERIES, AH = 25, 2, 300
RATING = STRINGS * AH  # 1C: 7500 A
UINT16_LIMIT = 0xFFFE  # where Victron's converter clamps a uint16 (65534, never 0xFFFF)


@pytest.fixture(scope="module")
def bank():
    running = RunningServer(Rig(series=SERIES, parallel=STRINGS, capacity=AH))
    for b in running.rig.batteries:
        b.temps = (7.5, 21.0)  # CHG-3: half the charge current at 7.5 °C
    running.tick(12.0)  # CHG-7: 10 s to rise to the target
    yield running
    running.close()


def gx(running: RunningServer, address: int, count: int) -> list[int]:
    client = running.client()
    try:
        reply = client.read_holding_registers(address, count=count, device_id=GX)
        assert not reply.isError(), reply
        return reply.registers
    finally:
        client.close()


def native(running: RunningServer) -> list[int]:
    client = running.client()
    try:
        return client.read_holding_registers(300, count=10, device_id=1).registers
    finally:
        client.close()


def charge(running: RunningServer) -> ChargeLimits:
    return running.on_loop(lambda: running.rig.last.charge)


def test_a_50_x_300_ah_bank_reads_its_limits_on_the_gx_unit(bank):
    c = charge(bank)
    assert c.known and c.rating == RATING
    assert c.ccl == pytest.approx(RATING * 0.5) and c.dcl == pytest.approx(RATING)
    assert c.cvl == pytest.approx(28.4) and c.dvl == pytest.approx(22.4)
    assert gx(bank, 305, 4) == [284, 224, 37500, UINT16_LIMIT]  # DCL 7500 A does not fit uint16 x 10: clamped
    assert gx(bank, 1297, 2) == [1, 1]


def test_a_50_x_300_ah_bank_reads_its_true_limits_through_pysunspec2(bank):
    c = charge(bank)
    device = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=bank.port, timeout=10)
    try:
        device.scan()
        battery = device.models[802][0]
        assert battery.AChaMax.cvalue == pytest.approx(c.ccl) == RATING * 0.5
        assert battery.ADisChaMax.cvalue == pytest.approx(c.dcl) == RATING
        assert battery.VMax.cvalue == pytest.approx(c.cvl) and battery.VMin.cvalue == pytest.approx(c.dvl)
    finally:
        device.close()


def test_native_block_f_holds_the_limits_and_the_charge_state(bank):
    block = native(bank)
    assert block[0:2] == [2840, 2240]  # CVL, DVL in 0.01 V
    assert u32(block, 2) == 37500 and u32(block, 4) == 75000  # CCL, DCL in 0.1 A: a 7500 A bank fits
    assert block[6:8] == [0, 0]  # absorption, no cell limiting
    assert u32(block, 8) == RATING * 10


@pytest.mark.skipif(MBPOLL is None, reason="mbpoll is not installed (tests/run installs it as root)")
def test_mbpoll_reads_the_same_limits(bank):
    assert words(mbpoll(bank.port, GX, 305, count=4)) == {305: 284, 306: 224, 307: 37500, 308: UINT16_LIMIT}
    assert words(mbpoll(bank.port, 1, 300, count=2)) == {300: 2840, 301: 2240}


def test_without_atc_1297_and_307_are_both_0_and_cvl_comes_down_to_the_bank_voltage():
    running = RunningServer(Rig(series=2, parallel=2))
    try:
        running.tick(12.0)
        assert gx(running, 1297, 2) == [1, 1] and gx(running, 307, 2) == [2000, 2000]
        running.on_loop(running.rig.battery(3).flags.__setitem__, "cell_high_voltage", True)
        running.tick(0.2)
        d = running.on_loop(lambda: running.rig.last)
        assert not d.atc and d.charge.ccl == 0.0
        assert gx(running, 1297, 2) == [0, 1] and gx(running, 307, 2) == [0, 2000]
        assert gx(running, 305, 1) == [round(d.bank.aggregates.voltage * 10)]  # CHG-5: at most the bank voltage
        assert native(running)[0] == round(d.bank.aggregates.voltage * 100)
    finally:
        running.close()


def test_before_the_bank_is_known_every_limit_reads_0_or_not_available():
    running = RunningServer(Rig(series=2, parallel=2, discovery_window=10.0), start=False)
    try:
        running.tick(1.0)  # every battery heard, but the bank is still being discovered: not started
        assert not running.on_loop(lambda: running.rig.last.started)
        assert gx(running, 305, 4) == [0, 0, 0, 0]  # the GX's "none", and 0 A: nothing is allowed (CHG-6)
        assert gx(running, 1297, 2) == [0, 0]
        block = native(running)
        assert block[0:2] == [0xFFFF, 0xFFFF] and u32(block, 2) == 0 and u32(block, 4) == 0
        assert u32(block, 8) == 0xFFFFFFFF
    finally:
        running.close()
