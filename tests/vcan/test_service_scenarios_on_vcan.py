"""One scenario each: the service and the simulator (forked from a warm interpreter, tests/vcan/forkserver.py)
on vcan0, the simulator's --speed putting each event a few seconds after the bank is learned.

Each rule is asserted between the frames (their kernel timestamps) and the decisions of the service's core (its
event log), tightly; the relays are checked to follow those decisions within the machine's scheduling (see
rig.py)."""

from __future__ import annotations

import itertools

import pytest

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.reports import BatteryStatus, BatteryTemps, BmsState, CellVoltages
from tests.vcan.rig import (
    CHARGE,
    CLOCK_TOL_S,
    LOAD,
    PRE_ALARM,
    REACT_S,
    WAIT_S,
    current_settles,
    earliest,
    figures,
    follows,
)

pytestmark = [pytest.mark.vcan, pytest.mark.timeout(900)]


def test_cell_high_voltage_stops_the_charger_only(rig):
    """ATC-1: overcharge at 60x (a cell passes 3.75 V about 6 s in); charge output off at once, load stays on."""
    r = rig("overcharge", "1s1p-12v100", 60, together=True)
    on = r.wait_relays({LOAD: True, CHARGE: True})
    charging = r.wait(lambda: r.first(BatteryStatus, on, lambda s: s.current > 20), WAIT_S, "the charger on")
    high = r.wait(lambda: earliest(
        r.first(BatteryStatus, on, lambda s: s.cell_high_voltage),
        r.first(CellVoltages, on, lambda c: max(v for v in c.voltages if v is not None) >= 3.75)), WAIT_S,
        "a cell >= 3.75 V")
    raised = r.event("CELL_HIGH_VOLTAGE", "raised", after=on)
    assert -CLOCK_TOL_S <= raised.wall - high <= REACT_S, raised  # decided on that frame, not before it was sent
    stopped = r.event("ATC", "no", after=on)
    assert stopped.now == raised.now  # the same decision
    off = r.wait_relays({CHARGE: False}, after=charging)
    follows(off, stopped, "charge output off")
    assert r.recorder.relay(LOAD) and not r.recorder.relay(PRE_ALARM)
    assert not [e for e in r.events() if e.name == "ATD" and e.wall >= on]  # discharge stays allowed
    stop = r.wait(lambda: r.first(BmsState, charging, lambda s: not s.allowed_to_charge), WAIT_S, "ATC false")
    assert stop >= stopped.wall - CLOCK_TOL_S
    state = r.state_from(stop)
    assert state.alarms & BmsAlarm.CELL_HIGH_VOLTAGE and state.allowed_to_discharge
    current_settles(r, stop)  # the simulated charger obeys BMS_STATE
    figures("ATC-1", decided_after_frame_s=raised.wall - high, relay_after_decision_s=off - stopped.wall)


def test_cold_charge_stops_the_charger_only(rig):
    """ATC-2: batteries cooling in 0 degC air at 100x drop below 5 degC (6-8 s in); charge output off, load on."""
    r = rig("cold-charge", "1s1p-12v100", 100)
    on = r.wait_relays({LOAD: True, CHARGE: True})
    charging = r.wait(lambda: r.first(BatteryStatus, on, lambda s: s.current > 20), WAIT_S, "the charger on")
    cold = r.wait(lambda: r.first(BatteryTemps, on, lambda t: t.cell_temp_min < 5.0), WAIT_S, "a cell below 5 degC")
    raised = r.event("LOW_TEMPERATURE_CHARGE", "raised", after=on)
    assert -CLOCK_TOL_S <= raised.wall - cold <= REACT_S, raised
    stopped = r.event("ATC", "no", after=on)
    assert stopped.now == raised.now
    off = r.wait_relays({CHARGE: False}, after=charging)
    follows(off, stopped, "charge output off")
    assert r.recorder.relay(LOAD)
    stop = r.wait(lambda: r.first(BmsState, charging, lambda s: not s.allowed_to_charge), WAIT_S, "ATC false")
    state = r.state_from(stop)
    assert state.alarms & BmsAlarm.LOW_TEMPERATURE_CHARGE and state.allowed_to_discharge
    current_settles(r, stop)
    figures("ATC-2", decided_after_frame_s=raised.wall - cold, relay_after_decision_s=off - stopped.wall)


COMM_TIMEOUT_S = 2.0


def test_comms_loss_switches_everything_off_and_recovers(rig):
    """COM-1/COM-2: battery 2 of 2 is silent from 60 to 180 simulated s (12-36 s at 5x: the silence starts well
    after the bank can be learned, even on a slow machine)."""
    r = rig("comms-loss", "2s1p-12v100", 5, comm_timeout=COMM_TIMEOUT_S)
    on = r.wait_relays({LOAD: True, CHARGE: True})

    def gap() -> tuple[float, float] | None:
        times = [at for at, _ in r.recorder.of(BatteryStatus, on, node=2)]
        return next(((a, b) for a, b in itertools.pairwise(times) if b - a > 1.0), None)

    last, back = r.wait(gap, WAIT_S, "battery 2 silent and sending again")
    assert back - last > 10 * COMM_TIMEOUT_S  # the scenario's silence, not a hiccup
    lost = r.event("BATTERY_COMMS_LOST", "raised", after=on)
    # COM-1: stale once comm_timeout has passed since its last BAT_STATUS (the service hears it at the earliest
    # when it is sent), not before.
    assert COMM_TIMEOUT_S - CLOCK_TOL_S <= lost.wall - last <= COMM_TIMEOUT_S + REACT_S, lost
    off = r.wait_relays({LOAD: False, CHARGE: False, PRE_ALARM: True}, after=on)
    follows(off, lost, "load and charge off, pre-alarm on")
    state = r.state_from(lost.wall)
    assert state.alarms & BmsAlarm.BATTERY_COMMS_LOST
    assert not state.allowed_to_charge and not state.allowed_to_discharge and state.pre_alarm
    # COM-2: back only once every battery has been fresh for 2 s (its cells and temperatures too: they come
    # every 0.5 and 1 s).
    cleared = r.event("BATTERY_COMMS_LOST", "cleared", after=back)
    assert 2.0 - CLOCK_TOL_S <= cleared.wall - back <= 2.0 + 1.0 + REACT_S, cleared
    again = r.wait_relays({LOAD: True, CHARGE: True, PRE_ALARM: False}, after=back)
    follows(again, cleared, "outputs back on")
    figures("COM-1/2", lost_after_last_frame_s=lost.wall - last, off_after_decision_s=off - lost.wall,
            cleared_after_first_frame_s=cleared.wall - back, on_after_decision_s=again - cleared.wall)


def test_pre_alarm_leads_the_undervoltage_disconnect_by_30_s(rig):
    """PRE-1/PRE-3/ATD-1: discharge at 40x; the pre-alarm at about 8 s, undervoltage about 13 s later, and the
    load disconnect 30 s after the pre-alarm went high, not at the undervoltage."""
    r = rig("discharge", "1s1p-12v100", 40, together=True)
    on = r.wait_relays({LOAD: True})
    loaded = r.wait(lambda: r.first(BatteryStatus, on, lambda s: s.current < -40), WAIT_S, "the load on")
    pre = r.event("PRE_ALARM", "on", after=loaded)
    low = r.wait(lambda: earliest(
        r.first(BatteryStatus, pre.wall, lambda s: s.cell_low_voltage),
        r.first(CellVoltages, pre.wall, lambda c: min(v for v in c.voltages if v is not None) <= 2.80)), WAIT_S,
        "a cell <= 2.80 V")
    assert low - pre.wall < 25, "the undervoltage must come inside the lead for this test to prove the lead"
    cut = r.event("ATD", "no", after=pre.wall)
    # PRE-3, on the core's own clock: the disconnect 30 s after the pre-alarm went high (not at the undervoltage),
    # at the first tick (100 ms) from then, give or take the machine's scheduling.
    assert 30.0 <= cut.now - pre.now <= 30.0 + 0.1 + REACT_S, (pre, cut)
    assert r.event("CELL_LOW_VOLTAGE", "raised", after=pre.wall).now == cut.now
    # PRE-4: from the undervoltage to the disconnect, discharge is still allowed, with the pre-alarm.
    during = [s for _, s in r.recorder.of(BmsState, low, before=cut.wall)]
    assert during and all(s.allowed_to_discharge and s.pre_alarm for s in during)
    pre_on = r.wait_relays({PRE_ALARM: True, LOAD: True}, after=loaded)
    follows(pre_on, pre, "pre-alarm output on")
    load_off = r.wait_relays({LOAD: False}, after=pre.wall)
    follows(load_off, cut, "load output off")
    assert r.recorder.relay(PRE_ALARM)
    stop = r.wait(lambda: r.first(BmsState, pre.wall, lambda s: not s.allowed_to_discharge), WAIT_S, "ATD false")
    assert r.state_from(stop).alarms & BmsAlarm.CELL_LOW_VOLTAGE
    current_settles(r, stop)  # the simulated load obeys BMS_STATE
    figures("PRE-3", lead_s=cut.now - pre.now, undervoltage_after_pre_alarm_s=low - pre.wall,
            pre_relay_after_decision_s=pre_on - pre.wall, load_relay_after_decision_s=load_off - cut.wall)
