"""SunSpec as a SunSpec client sees it: pysunspec2, unmodified, scans and reads the running server."""

from __future__ import annotations

import ipaddress
import re

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP
from sunspec2.modbus.modbus import ModbusClientException

from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.modbus.server import ModbusOptions
from tests.bms.rig import Rig
from tests.modbus.harness import RunningServer


@pytest.fixture
def device():
    running = RunningServer(Rig(series=2, parallel=2))
    d = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=running.port, timeout=3)
    yield running, d
    d.close()
    running.close()


def test_pysunspec2_discovers_model_1_802_and_one_805_per_battery(device):
    running, d = device
    running.on_loop(running.rig.set_current, 30.0)
    running.tick(10.0)  # CHG-7: the limits rise from 0 to 1C over 10 s after the start
    d.scan()
    assert sorted(k for k in d.models if isinstance(k, int)) == [1, 802, 805]
    assert len(d.models[805]) == 4
    common = d.models[1][0]
    assert common.Mn.cvalue == "smallbms-bus" and common.Vr.cvalue
    battery = d.models[802][0]
    decision = running.rig.last
    assert battery.AHRtg.cvalue == 200
    assert battery.V.cvalue == pytest.approx(decision.bank.aggregates.voltage, abs=0.01)
    assert battery.A.cvalue == pytest.approx(30.0, abs=0.1)  # positive = charging
    assert battery.SoC.cvalue is None  # unknown at a first start: "not implemented"
    assert battery.ChaSt.cvalue == 4  # charging
    assert battery.State.cvalue == 3  # connected
    assert battery.Typ.cvalue == 4  # lithium-ion
    assert battery.CellVMax.cvalue == pytest.approx(3.3)
    assert battery.AChaMax.cvalue == 200 and battery.ADisChaMax.cvalue == 200  # 1C while allowed
    modules = d.models[805]
    assert [m.ModIdx.cvalue for m in modules] == [1, 2, 1, 2]
    assert [m.StrIdx.cvalue for m in modules] == [1, 1, 2, 2]
    first = modules[0]
    assert first.NCell.cvalue == 4 and first.SN.cvalue == running.rig.battery(1).serial
    assert first.V.cvalue == pytest.approx(13.2)
    cells = first.groups["lithium-ion-module-cell"]
    assert [c.CellV.cvalue for c in cells] == [3.3] * 4  # a 12.8 V battery has 4 cells: 4 cell groups


@pytest.mark.parametrize("units", [1, 2, 4], ids=["12.8V", "25.6V", "51.2V"])
def test_each_805_has_one_cell_group_per_cell_of_its_battery_and_cell_temperatures(units):
    running = RunningServer(Rig(series=1, parallel=2, units=units))
    d = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=running.port, timeout=3)
    try:
        running.on_loop(running.rig.battery(2).__setattr__, "temps", (18.0, 24.0))
        running.on_loop(running.rig.battery(2).cells.__setitem__, 4 * units - 1, 3.25)
        running.tick(0.5)
        d.scan()
        modules = d.models[805]
        assert len(modules) == 2
        for module, low, high in zip(modules, (20.0, 18.0), (21.0, 24.0), strict=True):
            cells = module.groups["lithium-ion-module-cell"]
            assert module.NCell.cvalue == 4 * units == len(cells)
            assert module.L.cvalue == 42 + 4 * 4 * units
            assert (module.CellTmpMin.cvalue, module.CellTmpMax.cvalue) == (low, high)
            assert module.CellTmpAvg.cvalue == pytest.approx((low + high) / 2)  # mandatory: no longer unimplemented
            assert [c.CellTmp.cvalue for c in cells] == [pytest.approx((low + high) / 2)] * (4 * units)
        assert [c.CellV.cvalue for c in modules[1].groups["lithium-ion-module-cell"]][-1] == 3.25
        assert modules[1].CellVMinCell.cvalue == 4 * units
    finally:
        d.close()
        running.close()


def test_alarms_reach_evt1_and_charge_limits_drop_to_zero(device):
    running, d = device
    running.tick(10.0)  # CHG-7: the limits rise from 0 to 1C over 10 s after the start
    running.on_loop(running.rig.battery(2).flags.__setitem__, "cell_high_voltage", True)
    running.tick(0.5)
    assert BmsAlarm.CELL_HIGH_VOLTAGE in running.rig.last.alarms
    d.scan()
    battery = d.models[802][0]
    assert battery.Evt1.cvalue & (1 << 9)  # OVER_VOLT_ALARM
    assert battery.EvtVnd1.cvalue == int(running.rig.last.alarms)
    assert battery.EvtVnd2.cvalue == int(running.rig.last.warnings)
    assert bool(battery.Evt1.cvalue & (1 << 26)) == bool(running.rig.last.warnings & BmsWarning.SOC_UNKNOWN)
    assert battery.AChaMax.cvalue == 0  # not allowed to charge: an inverter must stop charging
    assert battery.ADisChaMax.cvalue == 200
    assert battery.State.cvalue == 99


# -- the SunSpec write points: the same write path and permissions as the native map -------------------------
def refused(point) -> int:
    with pytest.raises(ModbusClientException) as info:
        point.write()
    return int(re.search(r"exception:? (\d+)", str(info.value)).group(1))  # type: ignore[union-attr]


def test_setop_and_setinvstate_switch_mode_both_disconnects_follow(device):
    running, d = device
    d.scan()
    battery = d.models[802][0]
    for point, off, on in ((battery.SetOp, 2, 1), (battery.SetInvState, 1, 3), (battery.SetInvState, 2, 3)):
        point.value = off
        point.write()
        decision = running.rig.last
        assert not running.rig.core.mode_on
        assert not decision.outputs.load_disconnect and not decision.outputs.charge_disconnect
        battery.read()
        assert (battery.SetOp.value, battery.SetInvState.value, battery.State.value) == (2, 1, 4)  # standby
        point.value = on
        point.write()
        assert running.rig.core.mode_on and running.rig.last.outputs.load_disconnect
        battery.read()
        assert (battery.SetOp.value, battery.SetInvState.value) == (1, 3)
    for point, bad in ((battery.SetOp, 0), (battery.SetOp, 3), (battery.SetInvState, 0), (battery.SetInvState, 4)):
        point.value = bad
        assert refused(point) == 3
    assert running.rig.core.mode_on


def test_socrsvmin_is_the_discharge_floor_checked_like_register_104(device):
    running, d = device
    d.scan()
    battery = d.models[802][0]
    assert battery.SoCRsvMin.cvalue == 10.0
    battery.SoCRsvMin.cvalue = 15.5
    battery.SoCRsvMin.write()
    assert running.rig.core.settings.discharge_floor_pct == 15.5
    battery.SoCRsvMin.cvalue = 25.0  # above the low-SoC warning level (20 %): the core's cross-check
    assert refused(battery.SoCRsvMin) == 3
    battery.SoCRsvMin.cvalue = 99.9
    assert refused(battery.SoCRsvMin) == 3
    assert running.rig.core.settings.discharge_floor_pct == 15.5
    battery.read()
    assert battery.SoCRsvMin.cvalue == 15.5


def test_ctrlhb_is_stored_and_read_back_without_a_store_commit(device):
    running, d = device
    d.scan()
    battery = d.models[802][0]
    committed = running.writes.committed
    for beat in (1, 2, 3, 65534):
        battery.CtrlHb.value = beat
        battery.CtrlHb.write()
        battery.read()
        assert battery.CtrlHb.value == beat
    assert running.writes.committed == committed  # a heartbeat every second must not wear the SD card


def test_almrst_aborts_a_failed_firmware_update_but_never_a_protective_latch(device):
    running, d = device
    d.scan()
    battery = d.models[802][0]
    battery.AlmRst.value = 1
    battery.AlmRst.write()  # nothing latched: accepted, nothing changes
    assert running.rig.last.atd and running.rig.last.atc
    running.on_loop(running.rig.core.firmware_update, "start")
    running.tick(121.0)
    assert BmsAlarm.FIRMWARE_UPDATE_FAILED in running.rig.last.alarms and not running.rig.last.atd
    running.on_loop(running.rig.battery(2).flags.__setitem__, "cell_high_voltage", True)
    running.tick(0.5)
    running.on_loop(running.rig.battery(2).flags.__setitem__, "cell_high_voltage", False)
    running.on_loop(running.rig.battery(2).cells.__setitem__, 0, 3.70)  # inside ATC-1's band: the latch holds
    running.tick(3.0)
    assert BmsAlarm.CELL_HIGH_VOLTAGE in running.rig.last.alarms
    battery.AlmRst.value = 1
    battery.AlmRst.write()
    d_after = running.rig.last
    assert BmsAlarm.FIRMWARE_UPDATE_FAILED not in d_after.alarms and d_after.atd and d_after.outputs.load_disconnect
    assert BmsAlarm.CELL_HIGH_VOLTAGE in d_after.alarms and not d_after.atc  # protective: only its own rule clears it
    battery.read()
    assert battery.AlmRst.value == 0
    battery.AlmRst.value = 2
    assert refused(battery.AlmRst) == 3


def test_sunspec_writes_need_the_same_permission_as_the_native_map():
    options = ModbusOptions(port=0, allow_write_from=(ipaddress.ip_network("10.0.0.0/8"),))
    running = RunningServer(Rig(series=2), options)
    d = SunSpecModbusClientDeviceTCP(slave_id=1, ipaddr="127.0.0.1", ipport=running.port, timeout=3)
    try:
        d.scan()
        battery = d.models[802][0]
        for point, value in ((battery.SetOp, 2), (battery.SetInvState, 1), (battery.SoCRsvMin, 150),
                             (battery.AlmRst, 1), (battery.CtrlHb, 5)):
            point.value = value
            assert refused(point) == 1
        assert running.rig.core.mode_on and running.rig.core.settings.discharge_floor_pct == 10.0
    finally:
        d.close()
        running.close()
