"""Battery monitor (MON-1..7) on an injected clock."""

from __future__ import annotations

import math

import pytest

from smallbms_bus.bms.alarms import BmsWarning
from smallbms_bus.bms.monitor import BatteryMonitor, CurrentLimits, pulse_limits
from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from tests.bms.rig import Rig

S = DEFAULT_SETTINGS


def run(monitor: BatteryMonitor, seconds: float, *, volts: float = 26.0, amps: float, capacity: float = 200.0,
        series_units: int = 2, start: float = 0.0, dt: float = 1.0):
    t = start
    reading = monitor.step(t, volts, amps, capacity, series_units, S)
    while t < start + seconds - 1e-9:
        t = round(t + dt, 6)
        reading = monitor.step(t, volts, amps, capacity, series_units, S)
    return reading, t


def test_coulomb_counting_with_efficiency_and_peukert():
    m = BatteryMonitor()
    m.set_soc(100.0, 200.0)
    r, _ = run(m, 3600, amps=-10.0)  # I20 = 10 A: Peukert factor 1
    assert r.consumed_ah == pytest.approx(10.0) and r.soc == pytest.approx(95.0)
    r, _ = run(m, 3600, amps=-40.0, start=3600)  # 4 x I20: 40 Ah x 4^0.05
    assert r.consumed_ah == pytest.approx(10.0 + 40.0 * 4 ** 0.05)
    r, _ = run(m, 3600, amps=20.0, start=7200)  # charging at 99 %
    assert r.consumed_ah == pytest.approx(10.0 + 40.0 * 4 ** 0.05 - 20.0 * 0.99)


def test_currents_below_0_1_a_are_zero_and_gaps_are_not_integrated():
    m = BatteryMonitor()
    m.set_soc(50.0, 200.0)
    r, t = run(m, 3600, amps=-0.09)
    assert r.soc == 50.0
    m.step(t + 11.0, 26.0, -100.0, 200.0, 2, S)  # 11 s since the last step: not integrated
    assert m.soc(200.0) == 50.0
    m.step(t + 12.0, 26.0, None, 200.0, 2, S)  # no trustworthy current
    assert m.soc(200.0) == 50.0


def test_soc_is_unknown_until_synchronised_or_set_but_consumed_ah_counts():
    m = BatteryMonitor()
    r, _ = run(m, 3600, amps=-10.0)
    assert r.soc is None and r.time_remaining_s is None and r.consumed_ah == pytest.approx(10.0)
    m.set_soc(80.0, 200.0)
    assert m.soc(200.0) == 80.0 and m.consumed_ah == pytest.approx(40.0)
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        m.set_soc(101.0, 200.0)


@pytest.mark.parametrize(("volts", "amps", "syncs"), [
    (28.0, 7.9, True),  # at the charged voltage (2 x 14.0 V), below the tail current (4 % of 200 Ah = 8 A)
    (27.99, 7.9, False),
    (28.4, 8.0, False),  # at the tail current: not below it
    (28.4, -3.0, True),  # a load on a full bank at float still counts
])
def test_synchronisation_levels(volts, amps, syncs):
    m = BatteryMonitor()
    run(m, 181, volts=volts, amps=amps)
    assert m.soc_known is syncs  # nothing but a synchronisation makes it known here


def test_synchronisation_needs_the_detection_time_continuously_and_fires_once():
    m = BatteryMonitor()
    r, t = run(m, 179, volts=28.2, amps=5.0)
    assert r.soc is None and r.charged_condition_s == pytest.approx(179)
    r = m.step(t + 1, 28.2, 5.0, 200.0, 2, S)  # 180 s
    assert r.synchronised and r.soc == 100.0 and r.consumed_ah == 0.0
    r, t = run(m, 600, volts=28.2, amps=5.0, start=t + 1)
    assert not r.synchronised  # still the same episode
    m.step(t + 1, 27.0, 5.0, 200.0, 2, S)  # the condition breaks ...
    r, _ = run(m, 180, volts=28.2, amps=5.0, start=t + 2)
    assert r.synchronised  # ... and a new episode can synchronise again


def test_time_remaining_uses_the_3_minute_average_to_the_floor():
    m = BatteryMonitor()
    m.set_soc(60.0, 200.0)
    r, t = run(m, 600, amps=-20.0)
    soc = r.soc
    assert r.average_current == pytest.approx(-20.0)
    assert r.time_remaining_s == pytest.approx((soc - 10.0) / 100 * 200.0 / 20.0 * 3600)
    r, t = run(m, 90, amps=-40.0, start=t)  # half the window at 40 A: average 30 A
    assert r.average_current == pytest.approx(-30.0, abs=0.3)
    r, t = run(m, 180, amps=0.0, start=t)
    assert math.isinf(r.time_remaining_s)
    m.set_soc(10.0, 200.0)
    r, _ = run(m, 5, amps=-20.0, start=t)
    assert r.time_remaining_s == 0.0


def test_pulse_limits_follow_the_manual_table():
    assert pulse_limits(1, 150) == (300, 225) and pulse_limits(2, 300) == (600, 450)
    assert pulse_limits(1, 120) == (240.0, 180.0)  # not in the table: 2C / 1.5C


def test_current_warning_after_60_s_above_1c_or_10_s_above_pulse():
    limits = CurrentLimits()
    for t in range(60):
        assert limits.step(float(t), [(1, 1, 100, -150.0)]) == ([], [])  # above 1C, below the 200 A pulse
    assert limits.step(60.0, [(1, 1, 100, -150.0)]) == ([], [1])
    assert limits.step(61.0, [(1, 1, 100, -100.0)]) == ([], [])  # back at 1C: cleared at once
    for t in range(10):
        assert limits.step(100.0 + t, [(1, 1, 150, 230.0)]) == ([], [])  # 12.8/150 pulse charge is 225 A
    assert limits.step(110.0, [(1, 1, 150, 230.0)]) == ([1], [])


def test_current_warnings_reach_the_decision():
    rig = Rig()
    rig.start()
    rig.set_current(-201.0)
    rig.tick()  # the pulse timer starts here
    d = rig.run(10.0)
    assert BmsWarning.HIGH_DISCHARGE_CURRENT in d.warnings and "battery 1" in d.reasons["HIGH_DISCHARGE_CURRENT"]
    rig.set_current(90.0)
    assert BmsWarning.HIGH_DISCHARGE_CURRENT not in rig.tick().warnings


def test_synchronise_command_and_set_soc_need_a_known_capacity():
    rig = Rig()
    with pytest.raises(ValueError, match="capacity is not known"):
        rig.core.set_soc(50)
    rig.start()
    rig.core.synchronise_soc()
    d = rig.tick()
    assert d.soc == 100.0 and BmsWarning.SOC_UNKNOWN not in d.warnings and d.history.synchronisations == 0
