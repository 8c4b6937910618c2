"""Every bank the manual allows (up to 50 batteries at 12/24 V, 25 at 48 V) reads right on every map.

A value that does not fit its register's type is clamped to the type's limit (as Victron's dbus_modbustcp
does), never 0 and never the not-available marker; SunSpec's scale factors are chosen from the bank so
every value the bank can carry fits. Real server, pymodbus and an unmodified pysunspec2 client.
"""

from __future__ import annotations

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from smallbms_bus.modbus.regmap import Register, encode
from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer, s32, signed, u32

GX = 225

# (series, parallel, 12.8 V units per battery, Ah per battery): the largest banks of each voltage, and one that fits
BANKS = {
    "12V_1s50p_300Ah": (1, 50, 1, 300),
    "24V_2s25p_300Ah": (2, 25, 1, 300),
    "24V_1s50p_25.6V_300Ah": (1, 50, 2, 300),
    "48V_1s25p_51.2V_100Ah": (1, 25, 4, 100),
    "48V_4s6p_300Ah": (4, 6, 1, 300),
    "12V_1s50p_100Ah": (1, 50, 1, 100),
}


@pytest.fixture(params=sorted(BANKS), ids=str)
def bank(request):
    series, parallel, units, capacity = BANKS[request.param]
    running = RunningServer(Rig(series=series, parallel=parallel, units=units, capacity=capacity))
    yield running, series, parallel, units, capacity
    running.close()


def clamp_u16(value: float) -> int:
    """What Victron's converter answers for a uint16: qBound(0, v, 65535 - 1)."""
    return max(0, min(round(value), 0xFFFE))


def clamp_s16(value: float) -> int:
    return max(-0x8000, min(round(value), 0x7FFE))


@pytest.mark.parametrize(("kind", "value", "scale", "missing", "word"), [
    ("uint16", 150_000.0, 0.1, "zero", [0xFFFE]),  # GX 309 capacity of 15000 Ah: clamped, not 0
    ("uint16", -5.0, 1.0, "zero", [0]),
    ("int16", -12_000.0, 0.1, "zero", [0x8000]),  # GX 261 current: Victron's int16 minimum
    ("int16", 12_000.0, 0.1, "zero", [0x7FFE]),
    ("uint16", 7000.0, 1.0, "sentinel", [7000]),
    ("uint16", 70_000.0, 1.0, "sentinel", [0xFFFE]),  # never 0xFFFF, which reads "not available"
    ("int16", -40_000.0, 1.0, "sentinel", [0x8001]),  # never 0x8000
    ("int16", 40_000.0, 1.0, "sentinel", [0x7FFF]),
    ("uint32", 5e9, 1.0, "sentinel", [0xFFFF, 0xFFFE]),
    ("int32", -5e9, 1.0, "sentinel", [0x8000, 0x0001]),
])
def test_a_value_that_does_not_fit_is_clamped_to_the_types_limit(kind, value, scale, missing, word):
    reg = Register(0, "r", kind, 2 if "32" in kind else 1, scale=scale)
    assert encode(reg, value, missing) == word


def test_large_banks_read_their_limits_on_the_gx_unit_and_clamp_where_uint16_ends(bank):
    running, series, parallel, units, capacity = bank
    bank_ah = parallel * capacity
    amps = -0.8 * bank_ah  # a 0.8C discharge
    running.on_loop(running.rig.core.set_soc, 80.0)
    running.on_loop(running.rig.set_current, amps)
    running.tick(60.0)
    d = running.rig.last
    assert d.atc and d.atd
    client = running.client()
    try:
        low = client.read_holding_registers(256, count=76, device_id=GX).registers
        at = lambda a: low[a - 256]  # noqa: E731
        power = d.bank.aggregates.power
        assert s32(low, 0) == round(power)  # int32: fits every bank
        assert signed(at(258)) == clamp_s16(power)
        assert signed(at(261)) == clamp_s16(amps * 10)
        assert at(265) == clamp_u16(d.consumed_ah * 10)
        assert u32(low, 330 - 256) == round(d.consumed_ah)
        assert at(307) == clamp_u16(bank_ah * 10)  # 1C while allowed; never 0 while 1297 says allowed
        assert at(308) == clamp_u16(bank_ah * 10)
        assert at(309) == clamp_u16(bank_ah * 10)
        assert at(307) > 0 and at(308) > 0 and at(309) > 0
        assert client.read_holding_registers(1297, count=2, device_id=GX).registers == [1, 1]
        native = client.read_holding_registers(0, count=40, device_id=1).registers
        assert native[30] == bank_ah  # capacity, uint16 Ah: fits every bank
        assert s32(native, 4) == round(amps * 100) and s32(native, 6) == round(power)
        assert native[26:30] == [series * parallel, 4 * units * series * parallel, series, parallel]
    finally:
        client.close()


def test_large_banks_read_their_true_limits_through_pysunspec2(bank):
    running, series, parallel, units, capacity = bank
    bank_ah = parallel * capacity
    amps = 0.8 * bank_ah  # charging at 0.8C
    running.on_loop(running.rig.set_current, amps)
    running.tick(10.0)  # CHG-7: the limits rise from 0 to 1C over 10 s after the start
    d = running.rig.last
    device = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=running.port, timeout=5)
    try:
        device.scan()
        battery = device.models[802][0]
        nominal = 12.8 * units * series
        assert battery.AHRtg.cvalue == bank_ah
        assert battery.WHRtg.cvalue == pytest.approx(bank_ah * nominal, rel=1e-3)
        assert battery.WChaRteMax.cvalue == pytest.approx(bank_ah * nominal, rel=1e-3)
        assert battery.AChaMax.cvalue == bank_ah and battery.ADisChaMax.cvalue == bank_ah
        assert battery.A.cvalue == pytest.approx(amps, rel=1e-3, abs=0.1)
        assert battery.W.cvalue == pytest.approx(d.bank.aggregates.power, rel=2e-3, abs=10)
        assert battery.V.cvalue == pytest.approx(d.bank.aggregates.voltage, abs=0.01)
        assert len(device.models[805]) == series * parallel
    finally:
        device.close()
