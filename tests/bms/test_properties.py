"""Property tests (hypothesis) of the battery monitor and the core."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.bms.monitor import BatteryMonitor
from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from tests.bms.rig import Rig

currents = st.floats(min_value=-600, max_value=600, allow_nan=False)


@given(start=st.floats(0, 100), steps=st.lists(st.tuples(currents, st.floats(0.01, 10.0)), max_size=200))
def test_soc_stays_within_0_and_100(start, steps):
    m = BatteryMonitor()
    m.set_soc(start, 200.0)
    t = 0.0
    m.step(t, 26.0, 0.0, 200.0, 2, DEFAULT_SETTINGS)
    for amps, dt in steps:
        t += dt
        r = m.step(t, 26.0, amps, 200.0, 2, DEFAULT_SETTINGS)
        assert 0.0 <= r.soc <= 100.0 and r.consumed_ah >= 0.0


@given(start=st.floats(0, 100), dts=st.lists(st.floats(0.01, 10.0), max_size=100),
       small=st.floats(-0.0999, 0.0999))
def test_soc_never_moves_with_zero_current(start, dts, small):
    m = BatteryMonitor()
    m.set_soc(start, 200.0)
    before = m.consumed_ah
    t = 0.0
    for dt in dts:
        t += dt
        m.step(t, 26.0, small, 200.0, 2, DEFAULT_SETTINGS)
    assert m.consumed_ah == before


@settings(deadline=None)  # up to 7200 steps: the 200 ms default deadline trips on a loaded CI machine
@given(start=st.floats(20, 80), amps=st.floats(0.1, 50), seconds=st.integers(1, 3600))
def test_charge_then_equal_discharge_returns_soc_at_100_percent_efficiency(start, amps, seconds):
    assume(start + amps * seconds / 3600 / 200.0 * 100 < 100)  # a charge past 100 % is clamped there: not returned
    m = BatteryMonitor(charge_efficiency=1.0, peukert=1.0)
    m.set_soc(start, 200.0)
    t = 0.0
    m.step(t, 26.0, amps, 200.0, 2, DEFAULT_SETTINGS)
    for direction in (amps, -amps):
        for _ in range(seconds):
            t += 1.0
            m.step(t, 26.0, direction, 200.0, 2, DEFAULT_SETTINGS)
    assert abs(m.soc(200.0) - start) < 1e-6


FORBIDS_CHARGE = (BmsAlarm.CELL_HIGH_VOLTAGE | BmsAlarm.LOW_TEMPERATURE_CHARGE | BmsAlarm.HIGH_TEMPERATURE_CHARGE
                  | BmsAlarm.BATTERY_COMMS_LOST | BmsAlarm.BANK_CONFIGURATION | BmsAlarm.BATTERY_FAULT)
FORBIDS_DISCHARGE = (BmsAlarm.CELL_LOW_VOLTAGE | BmsAlarm.LOW_SOC | BmsAlarm.BATTERY_COMMS_LOST
                     | BmsAlarm.BANK_CONFIGURATION | BmsAlarm.BATTERY_FAULT | BmsAlarm.FIRMWARE_UPDATE_FAILED)

actions = st.one_of(
    st.tuples(st.just("cell"), st.integers(1, 4), st.integers(0, 3), st.one_of(st.none(), st.floats(2.5, 3.9))),
    st.tuples(st.just("flag"), st.integers(1, 4), st.sampled_from(
        ["cell_high_voltage", "cell_low_voltage", "cell_low_pre_alarm", "balancing", "cell_imbalance",
         "hardware_fault", "firmware_updating"]), st.booleans()),
    st.tuples(st.just("temps"), st.integers(1, 4), st.floats(-30, 60), st.floats(0, 10)),
    st.tuples(st.just("current"), st.floats(-500, 500)),
    st.tuples(st.just("silent"), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("frozen"), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("mode"), st.booleans()),
    st.tuples(st.just("remote"), st.booleans()),
    st.tuples(st.just("link"), st.booleans()),
    st.tuples(st.just("relay"), st.booleans()),
    st.tuples(st.just("fw"), st.sampled_from(["start", "complete", "abort"])),
    st.tuples(st.just("soc"), st.floats(0, 100)),
    st.tuples(st.just("sync")),
    st.tuples(st.just("relearn")),
    st.tuples(st.just("reset_history")),
    st.tuples(st.just("wait"), st.floats(0.1, 40)),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(actions, max_size=40))
def test_random_event_sequences_never_raise_and_outputs_obey_the_alarms(steps):
    rig = Rig(2, 2)
    rig.start()
    for step in steps:
        kind, *args = step
        if kind == "cell":
            rig.battery(args[0]).cells[args[1]] = None if args[2] is None else round(args[2], 3)
        elif kind == "flag":
            rig.battery(args[0]).flags[args[1]] = args[2]
        elif kind == "temps":
            rig.battery(args[0]).temps = (round(args[1], 1), round(args[1] + args[2], 1))
        elif kind == "current":
            rig.set_current(args[0])
        elif kind in ("silent", "frozen"):
            setattr(rig.battery(args[0]), "silent" if kind == "silent" else "alive_frozen", args[1])
        elif kind == "mode":
            rig.core.set_mode(args[0])
        elif kind == "remote":
            rig.core.set_remote(args[0])
        elif kind == "link":
            rig.core.set_link(args[0], "test")
        elif kind == "relay":
            rig.core.set_relay_fault("test" if args[0] else None)
        elif kind == "fw":
            rig.core.firmware_update(args[0])
        elif kind == "soc":
            rig.core.set_soc(args[0])
        elif kind == "sync":
            rig.core.synchronise_soc()
        elif kind == "relearn":
            rig.core.relearn_bank(rig.t)
        elif kind == "reset_history":
            rig.core.reset_history()
        seconds = args[0] if kind == "wait" else 0.1
        d = rig.run(seconds, dt=0.5 if seconds > 1 else 0.1)
        assert not (d.outputs.charge_disconnect and d.alarms & FORBIDS_CHARGE)
        assert not (d.outputs.load_disconnect and d.alarms & FORBIDS_DISCHARGE)
        assert not (d.outputs.charge_disconnect and d.firmware_update)
        assert not ((d.outputs.load_disconnect or d.outputs.charge_disconnect) and not (d.mode_on and d.remote_on))
        assert d.outputs.pre_alarm == d.pre_alarm
        if d.soc is not None:
            assert 0.0 <= d.soc <= 100.0
