"""SunSpec as a SunSpec client sees it: pysunspec2, unmodified, scans and reads the running server."""

from __future__ import annotations

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
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
    running.tick(0.5)
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
    assert [c.CellV.cvalue for c in cells[:4]] == [3.3] * 4
    assert cells[4].CellV.cvalue is None  # a 12.8 V battery has 4 cells; the other groups are unimplemented


def test_alarms_reach_evt1_and_charge_limits_drop_to_zero(device):
    running, d = device
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
