"""One scenario each: the service and the simulator (forked from a warm interpreter, tests/vcan/forkserver.py)
on vcan0, the simulator's --speed putting each event a few seconds after the bank is learned."""

from __future__ import annotations

import itertools
import time

import pytest

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.reports import BatteryStatus, BatteryTemps, BmsState, CellVoltages
from tests.vcan.rig import CHARGE, LEARN_S, LOAD, PRE_ALARM, REACT_S, TOL_S, current_settles, earliest

pytestmark = pytest.mark.vcan


def test_cell_high_voltage_stops_the_charger_only(rig):
    """ATC-1: overcharge at 60x (a cell passes 3.75 V about 6 s in); charge output off at once, load stays on."""
    r = rig("overcharge", "1s1p-12v100", 60, together=True)
    on = r.wait_relays({LOAD: True, CHARGE: True}, LEARN_S)
    charging = r.wait(lambda: r.first(BatteryStatus, on, lambda s: s.current > 20), 2 + REACT_S, "the charger on")
    high = r.wait(lambda: earliest(
        r.first(BatteryStatus, on, lambda s: s.cell_high_voltage),
        r.first(CellVoltages, on, lambda c: max(v for v in c.voltages if v is not None) >= 3.75)), 30,
        "a cell >= 3.75 V")
    off = r.wait_relays({CHARGE: False}, REACT_S, after=charging)
    assert -TOL_S <= off - high <= REACT_S
    assert r.recorder.relay(LOAD) and not r.recorder.relay(PRE_ALARM)
    stop = r.wait(lambda: r.first(BmsState, charging, lambda s: not s.allowed_to_charge), REACT_S, "ATC false")
    state = r.state_from(stop)
    assert state.alarms & BmsAlarm.CELL_HIGH_VOLTAGE and state.allowed_to_discharge
    current_settles(r, stop)  # the simulated charger obeys BMS_STATE


def test_cold_charge_stops_the_charger_only(rig):
    """ATC-2: batteries cooling in 0 degC air at 100x drop below 5 degC (6-8 s in); charge output off, load on."""
    r = rig("cold-charge", "1s1p-12v100", 100)
    on = r.wait_relays({LOAD: True, CHARGE: True}, LEARN_S)
    charging = r.wait(lambda: r.first(BatteryStatus, on, lambda s: s.current > 20), 2 + REACT_S, "the charger on")
    cold = r.wait(lambda: r.first(BatteryTemps, on, lambda t: t.cell_temp_min < 5.0), 30, "a cell below 5 degC")
    off = r.wait_relays({CHARGE: False}, REACT_S, after=charging)
    assert -TOL_S <= off - cold <= REACT_S
    assert r.recorder.relay(LOAD)
    stop = r.wait(lambda: r.first(BmsState, charging, lambda s: not s.allowed_to_charge), REACT_S, "ATC false")
    state = r.state_from(stop)
    assert state.alarms & BmsAlarm.LOW_TEMPERATURE_CHARGE and state.allowed_to_discharge
    current_settles(r, stop)


COMM_TIMEOUT_S = 2.0


def test_comms_loss_switches_everything_off_and_recovers(rig):
    """COM-1/COM-2: battery 2 of 2 is silent from 60 to 180 simulated s (6-18 s at 10x)."""
    r = rig("comms-loss", "2s1p-12v100", 10, comm_timeout=COMM_TIMEOUT_S)
    on = r.wait_relays({LOAD: True, CHARGE: True}, LEARN_S)

    def gap() -> tuple[float, float] | None:
        times = [at for at, _ in r.recorder.of(BatteryStatus, on, node=2)]
        return next(((a, b) for a, b in itertools.pairwise(times) if b - a > 1.0), None)

    off = r.wait_relays({LOAD: False, CHARGE: False, PRE_ALARM: True}, 20, after=on)
    last = max(at for at, _ in r.recorder.of(BatteryStatus, node=2) if at < off)
    assert COMM_TIMEOUT_S - TOL_S <= off - last <= COMM_TIMEOUT_S + REACT_S
    state = r.bms_state()
    assert state is not None and state.alarms & BmsAlarm.BATTERY_COMMS_LOST
    assert not state.allowed_to_charge and not state.allowed_to_discharge and state.pre_alarm
    _, back = r.wait(gap, 20, "battery 2 sending again")
    again = r.wait_relays({LOAD: True, CHARGE: True, PRE_ALARM: False}, 1 + 2 + REACT_S, after=back)
    assert again - back >= 2.0 - TOL_S  # COM-2: every battery fresh for 2 s before recovery
    r.wait(lambda: (s := r.bms_state()) and not s.alarms & BmsAlarm.BATTERY_COMMS_LOST, REACT_S, "alarm cleared")


def test_pre_alarm_leads_the_undervoltage_disconnect_by_30_s(rig):
    """PRE-1/PRE-3/ATD-1: discharge at 40x; the pre-alarm at about 8 s, undervoltage about 13 s later, and the
    load disconnect 30 s after the pre-alarm went high, not at the undervoltage."""
    r = rig("discharge", "1s1p-12v100", 40, together=True)
    on = r.wait_relays({LOAD: True}, LEARN_S)
    loaded = r.wait(lambda: r.first(BatteryStatus, on, lambda s: s.current < -40), 2 + REACT_S, "the load on")
    pre = r.wait_relays({PRE_ALARM: True, LOAD: True}, 30, after=loaded)
    low = r.wait(lambda: earliest(
        r.first(BatteryStatus, pre, lambda s: s.cell_low_voltage),
        r.first(CellVoltages, pre, lambda c: min(v for v in c.voltages if v is not None) <= 2.80)), 30,
        "a cell <= 2.80 V")
    assert low - pre < 25, "the undervoltage must come inside the lead for this test to prove the lead"
    r.wait(lambda: r.first(BmsState, low + 0.5), REACT_S, "BMS_STATE after the undervoltage")
    during = r.state_from(low + 0.5)
    assert during.allowed_to_discharge and during.pre_alarm  # PRE-4: still allowed, with the pre-alarm
    off = r.wait_relays({LOAD: False}, 30 - (time.monotonic() - pre) + REACT_S, after=pre)
    assert 30.0 - TOL_S <= off - pre <= 30.0 + REACT_S
    assert r.recorder.relay(PRE_ALARM)
    stop = r.wait(lambda: r.first(BmsState, pre, lambda s: not s.allowed_to_discharge), REACT_S, "ATD false")
    assert r.state_from(stop).alarms & BmsAlarm.CELL_LOW_VOLTAGE
    current_settles(r, stop)  # the simulated load obeys BMS_STATE
