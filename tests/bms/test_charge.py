"""Charge control (CHG-1..7): the rules on an injected clock, pure (`ChargeControl`) and through the core (`Rig`)."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from smallbms_bus.bms.charge import (
    NO_CHARGE_LIMITS,
    ChargeControl,
    ChargeInputs,
    ChargeLimits,
    ChargeState,
    charge_cell_factor,
    discharge_cell_factor,
    temperature_factor,
)
from smallbms_bus.bms.core import BmsCore
from smallbms_bus.bms.settings import DEFAULT_SETTINGS
from tests.bms.rig import WALL0, Rig

DAY = 24 * 3600.0
# A 48 V bank: 4 x 12.8 V units in series, 2 strings of 100 Ah batteries -> rating 200 A, DVL 44.8 V,
# absorption 56.8 V (window from 56.6 V), float 54.0 V.
HEALTHY = ChargeInputs(now=0.0, series_units=4, strings=2, capacity_ah=100, voltage=53.0, max_cell=3.35,
                       min_cell=3.30, min_temperature=20.0, max_temperature=21.0, soc=80.0, atc=True, atd=True,
                       pre_alarm=False, trusted=True, not_fully_charged=False)


class Clock:
    """A ChargeControl stepped on an injected clock, 1 s per step unless told."""

    def __init__(self, settings=DEFAULT_SETTINGS, control: ChargeControl | None = None) -> None:
        self.control = control or ChargeControl()
        self.settings = settings
        self.t = 0.0

    def step(self, dt: float = 1.0, **changes) -> ChargeLimits:
        self.t += dt
        return self.control.step(replace(HEALTHY, now=self.t, **changes), self.settings)

    def run(self, seconds: float, dt: float = 1.0, **changes) -> ChargeLimits:
        limits = self.step(0.0, **changes)
        for _ in range(round(seconds / dt)):
            limits = self.step(dt, **changes)
        return limits


def settled(**changes) -> ChargeLimits:
    """The limits once the smooth rise (CHG-7) has had time to reach its target."""
    return Clock().run(30, **changes)


# -- CHG-1 charge state ---------------------------------------------------------------------------------
def test_chg1_absorption_until_the_voltage_held_the_absorption_time_then_float():
    clock = Clock()
    assert clock.step(voltage=56.6, soc=95.0).state is ChargeState.ABSORPTION  # 56.8 V - 0.05 x 4: at the edge
    limits = clock.run(120 * 60 - 1, voltage=56.6, soc=95.0)  # the timer started at the first step: 1 s short
    assert limits.state is ChargeState.ABSORPTION and limits.cvl == pytest.approx(56.8)
    limits = clock.step(voltage=56.6, soc=95.0)
    assert limits.state is ChargeState.FLOAT and limits.cvl == pytest.approx(54.0)


def test_chg1_a_voltage_below_the_window_restarts_the_absorption_time():
    clock = Clock()
    clock.run(100 * 60, voltage=56.7, soc=95.0)
    clock.step(voltage=56.59, soc=95.0)  # just below 56.6 V: the absorption starts over
    assert clock.run(100 * 60, voltage=56.7, soc=95.0).state is ChargeState.ABSORPTION
    assert clock.run(20 * 60 + 1, voltage=56.7, soc=95.0).state is ChargeState.FLOAT


def test_chg1_the_absorption_time_also_counts_while_the_cell_voltage_limiting_holds_cvl_down():
    """An imbalanced bank: one cell at its limit keeps the bank voltage far below the window."""
    clock = Clock()
    clock.run(120 * 60 - 1, voltage=54.0, max_cell=3.53, soc=95.0)
    assert clock.control.absorption_s == 0.0  # not limiting (never reached 3.55 V): not counted
    clock.step(voltage=54.0, max_cell=3.55, soc=95.0)
    assert clock.run(120 * 60 - 2, voltage=54.0, max_cell=3.52, soc=95.0).state is ChargeState.ABSORPTION
    assert clock.step(voltage=54.0, max_cell=3.52, soc=95.0).state is ChargeState.FLOAT


def test_chg1_untrusted_data_pauses_the_absorption_time():
    clock = Clock()
    clock.run(100 * 60, voltage=56.7, soc=95.0)
    clock.run(3600, voltage=56.7, soc=95.0, trusted=False)  # not counted, not reset
    assert clock.control.absorption_s == pytest.approx(100 * 60)
    assert clock.run(20 * 60 + 1, voltage=56.7, soc=95.0).state is ChargeState.FLOAT


def to_float(clock: Clock) -> None:
    clock.run(120 * 60 + 1, voltage=56.7, soc=99.0)
    assert clock.control.state is ChargeState.FLOAT


@pytest.mark.parametrize(("change", "back"), [
    ({"soc": 90.1}, False), ({"soc": 90.0}, True),  # re-bulk SoC 90 %: at it, not above it
    ({"soc": None}, True),
    ({"not_fully_charged": True}, True),
])
def test_chg1_float_goes_back_to_absorption_at_the_rebulk_conditions(change, back):
    clock = Clock()
    to_float(clock)
    limits = clock.step(voltage=54.0, **({"soc": 99.0} | change))
    assert limits.state is (ChargeState.ABSORPTION if back else ChargeState.FLOAT)
    assert limits.cvl == pytest.approx(56.8 if back else 54.0)
    if back:  # and the absorption time starts from 0
        assert clock.control.absorption_s == 0.0


def test_chg1_float_waits_while_a_rebulk_condition_holds_so_the_state_does_not_flap():
    clock = Clock()
    clock.run(120 * 60 + 1, voltage=56.7, soc=None)  # absorption done, but the SoC is not known
    assert clock.run(600, voltage=56.7, soc=None).state is ChargeState.ABSORPTION
    assert clock.step(voltage=56.7, soc=100.0).state is ChargeState.FLOAT  # known (synchronised): float at once


def test_chg1_the_charge_state_and_its_timer_round_trip():
    clock = Clock()
    clock.run(50 * 60, voltage=56.7, soc=95.0)
    restored = ChargeControl.from_dict(json.loads(json.dumps(clock.control.to_dict())))
    assert restored.absorption_s == pytest.approx(50 * 60) and restored.state is ChargeState.ABSORPTION
    to_float(clock)
    assert ChargeControl.from_dict(clock.control.to_dict()).state is ChargeState.FLOAT
    assert ChargeControl.from_dict(None).state is ChargeState.ABSORPTION  # a store from before charge control


def rig_in_float() -> Rig:
    """A 12.8 V x 4 bank that the core took through absorption (10 min, the shortest) into float."""
    rig = Rig(units=4, discovery_window=1.0)
    rig.core.set_settings(absorption_time_min=10)
    rig.start()
    rig.core.set_soc(95.0)
    rig.set_cells(3.45)  # 55.2 V, below the window (56.6 V)
    assert rig.run(60, dt=1.0).charge.state is ChargeState.ABSORPTION
    rig.set_cells(3.54)  # 56.64 V: in the window
    rig.run(10 * 60 + 5, dt=1.0)
    assert rig.last.charge.state is ChargeState.FLOAT
    return rig


def test_chg1_no_full_charge_for_30_days_goes_back_to_absorption():
    rig = rig_in_float()
    rig.set_cells(3.35)
    now_wall = WALL0 + rig.t + 1.0  # the next tick's wall clock
    rig.core.history.last_full_charge_wall = now_wall - 30 * DAY  # exactly 30 days: not more
    assert rig.tick(1.0).charge.state is ChargeState.FLOAT
    rig.core.history.last_full_charge_wall -= 2.0
    d = rig.tick(1.0)
    assert d.charge.state is ChargeState.ABSORPTION and d.charge.cvl == pytest.approx(56.8)
    assert "NOT_FULLY_CHARGED_30_DAYS" in d.reasons  # the same 30 days as the warning


def test_chg1_a_restart_keeps_float():
    rig = rig_in_float()
    revision = rig.core.state_revision
    snap = json.loads(json.dumps(rig.core.snapshot(rig.t)))
    assert snap["charge"]["state"] == "float" and revision > 0

    again = Rig(units=4, discovery_window=1.0)
    again.core = BmsCore.from_snapshot(snap, again.t, WALL0, discovery_window=1.0)
    again.set_cells(3.40)
    d = again.start()
    assert d.charge.state is ChargeState.FLOAT and d.charge.cvl == pytest.approx(54.0)


# -- CHG-2 cell-voltage limiting ------------------------------------------------------------------------
def test_chg2_cvl_is_lowered_from_3_55_v_and_rises_again_at_3_50_v():
    clock = Clock()
    assert clock.step(voltage=56.0, max_cell=3.549).cvl == pytest.approx(56.8)  # below 3.55 V: not limited
    limits = clock.step(voltage=56.0, max_cell=3.55)
    assert limits.cell_limiting and limits.cvl == pytest.approx(56.0 - 0.4)  # the full 0.1 V per unit
    limits = clock.step(voltage=55.8, max_cell=3.52)  # converging: held down, less
    assert limits.cell_limiting and limits.cvl == pytest.approx(55.8 - 0.4 * 0.4)
    limits = clock.step(voltage=55.7, max_cell=3.501)
    assert limits.cell_limiting and limits.cvl < 55.7
    limits = clock.step(voltage=55.7, max_cell=3.50)
    assert not limits.cell_limiting and limits.cvl == pytest.approx(56.8)


def test_chg2_cvl_is_never_below_the_bank_voltage_minus_0_1_v_per_unit():
    for cell in (3.55, 3.60, 3.70, 3.80):
        limits = Clock().step(voltage=56.0, max_cell=cell)
        assert limits.cvl == pytest.approx(56.0 - 0.4)


def test_chg2_only_lowers_cvl():
    """A bank far below the absorption voltage (a cell high by imbalance) keeps CVL at the absorption voltage."""
    assert Clock().step(voltage=53.0, max_cell=3.60).cvl == pytest.approx(52.6)
    assert Clock().step(voltage=58.0, max_cell=3.55).cvl == pytest.approx(56.8)


# -- CHG-3 CCL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("low", "high", "factor"), [
    (4.9, 20.0, 0.0), (5.0, 20.0, 0.0), (7.5, 20.0, 0.5), (10.0, 20.0, 1.0), (20.0, 45.0, 1.0),
    (20.0, 47.5, 0.5), (20.0, 50.0, 0.0), (20.0, 51.0, 0.0), (None, 20.0, 0.0), (8.0, 48.0, 0.4),
])
def test_chg3_temperature_factor(low, high, factor):
    assert temperature_factor(low, high) == pytest.approx(factor)


@pytest.mark.parametrize(("cell", "factor"), [
    (3.30, 1.0), (3.45, 1.0), (3.50, 0.525), (3.55, 0.05), (3.60, 0.05), (None, 0.0)])
def test_chg3_cell_factor(cell, factor):
    assert charge_cell_factor(cell) == pytest.approx(factor)


def test_chg3_ccl_is_strings_x_the_model_rating_x_the_factors():
    assert settled().ccl == pytest.approx(200.0)  # 2 strings x 100 A (1C, manual 4.1)
    assert settled(min_temperature=7.5, max_cell=3.50).ccl == pytest.approx(200.0 * 0.5 * 0.525, abs=0.05)
    assert settled(capacity_ah=300, strings=50).ccl == pytest.approx(15000.0)  # 50 x 12.8/300
    assert settled(atc=False).ccl == 0.0
    assert settled(max_cell=None).ccl == 0.0


# -- CHG-4 DCL ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cell", "factor"), [
    (3.30, 1.0), (3.15, 1.0), (3.025, 0.6), (2.90, 0.2), (2.80, 0.2), (None, 0.0)])
def test_chg4_low_cell_factor(cell, factor):
    assert discharge_cell_factor(cell) == pytest.approx(factor)


def test_chg4_dcl_is_strings_x_the_model_rating_x_the_low_cell_factor():
    assert settled().dcl == pytest.approx(200.0)
    assert settled(min_cell=3.025).dcl == pytest.approx(120.0)
    assert settled(min_cell=3.0, min_temperature=-5.0).dcl == pytest.approx(200.0 * 0.52)  # no temperature factor
    assert settled(atd=False).dcl == 0.0


def test_chg4_dcl_zero_at_pre_alarm_only_when_the_setting_is_on():
    assert settled(pre_alarm=True).dcl == pytest.approx(200.0)
    clock = Clock(DEFAULT_SETTINGS.replace_checked(dcl_zero_at_pre_alarm=1))
    assert clock.run(30, pre_alarm=True).dcl == 0.0
    assert clock.run(30, pre_alarm=False).dcl == pytest.approx(200.0)


# -- CHG-5 CVL and DVL ----------------------------------------------------------------------------------
def test_chg5_dvl_is_2_80_v_per_cell_and_cvl_never_below_it():
    limits = settled()
    assert limits.dvl == pytest.approx(44.8) and limits.cvl == pytest.approx(56.8)
    assert settled(series_units=1).dvl == pytest.approx(11.2)
    assert Clock().step(voltage=44.0, max_cell=3.60).cvl == pytest.approx(44.8)  # cell limiting stops at DVL
    assert Clock().step(voltage=40.0, atc=False).cvl == pytest.approx(44.8)


def test_chg5_without_atc_cvl_is_at_most_the_bank_voltage():
    assert Clock().step(voltage=53.1, atc=False).cvl == pytest.approx(53.1)
    assert Clock().step(voltage=57.0, atc=False).cvl == pytest.approx(56.8)
    assert Clock().step(voltage=None, atc=False).cvl == pytest.approx(44.8)  # unknown voltage: as low as allowed
    for limits in (settled(), settled(atc=False), settled(voltage=None, atc=False, atd=False)):
        assert limits.cvl > 0 and limits.cvl >= limits.dvl


# -- CHG-6 fail-safe ------------------------------------------------------------------------------------
def test_chg6_an_unknown_bank_allows_nothing():
    assert Clock().run(30, series_units=None) == NO_CHARGE_LIMITS
    assert Clock().run(30, capacity_ah=None) == NO_CHARGE_LIMITS  # mixed models
    assert Clock().run(30, strings=0) == NO_CHARGE_LIMITS
    assert Clock().run(30, started=False) == NO_CHARGE_LIMITS  # a partly heard bank is not a size to trust


def test_chg6_before_the_start_the_limits_are_unknown_but_the_persisted_state_is_shown():
    clock = Clock()
    to_float(clock)
    limits = clock.run(30, started=False, voltage=54.0, soc=99.0)
    assert not limits.known and limits.state is ChargeState.FLOAT and limits.ccl == limits.cvl == 0.0


def test_chg6_not_started_comms_loss_and_bank_fault_zero_both_currents():
    rig = Rig(2, 2, units=1, capacity=200)
    d = rig.tick()
    assert not d.started and d.charge == NO_CHARGE_LIMITS
    rig.start()
    d = rig.run(15)
    assert d.charge.known and d.charge.ccl == pytest.approx(400.0) and d.charge.dcl == pytest.approx(400.0)
    assert d.charge.cvl == pytest.approx(28.4) and d.charge.dvl == pytest.approx(22.4)

    rig.battery(3).silent = True  # comms loss: the first decision that sees it has both at 0
    for _ in range(100):
        d = rig.tick()
        if d.charge.ccl == 0.0 or d.charge.dcl == 0.0:
            break
    assert not d.atc and not d.atd and d.charge.ccl == 0.0 and d.charge.dcl == 0.0
    assert d.charge.known and d.charge.cvl >= d.charge.dvl > 0  # still sent, so the inverter knows

    rig.battery(3).silent = False
    rig.run(15)
    assert rig.last.charge.ccl == pytest.approx(400.0)
    rig.battery(4).capacity = 100  # a battery that is not the learned one: BANK_CONFIGURATION
    d = rig.run(2)
    assert not d.atc and not d.atd and d.charge.ccl == 0.0 and d.charge.dcl == 0.0


def test_chg6_ccl_is_zero_in_the_decision_that_turns_atc_off():
    rig = Rig(units=4)
    rig.start()
    rig.run(15)
    rig.battery(1).temps = (4.0, 20.0)  # ATC-2
    d = rig.tick()
    assert not d.atc and d.charge.ccl == 0.0 and d.charge.dcl == pytest.approx(100.0)


# -- CHG-7 smooth rise ----------------------------------------------------------------------------------
def test_chg7_limits_rise_by_10_percent_of_the_rating_per_second_and_drop_at_once():
    clock = Clock()
    assert clock.step(0.0).ccl == 0.0  # the first evaluation: from 0
    assert clock.step(1.0).ccl == pytest.approx(20.0)  # 10 % of 200 A
    assert clock.step(0.5).dcl == pytest.approx(30.0)
    assert clock.run(8).ccl == pytest.approx(190.0)  # 9.5 s
    limits = clock.step(0.5)
    assert limits.ccl == pytest.approx(200.0) and limits.dcl == pytest.approx(200.0)
    limits = clock.step(0.1, max_cell=3.55, min_cell=2.90)  # at once
    assert limits.ccl == pytest.approx(10.0) and limits.dcl == pytest.approx(40.0)
    limits = clock.step(1.0)
    assert limits.ccl == pytest.approx(30.0) and limits.dcl == pytest.approx(60.0)


def test_chg7_after_atc_returns_ccl_ramps_from_zero():
    rig = Rig(units=4)
    rig.start()
    rig.run(15)
    rig.battery(1).temps = (4.0, 20.0)
    rig.run(2)
    rig.battery(1).temps = (20.0, 21.0)  # ATC-2 clears at 6 °C
    for _ in range(50):
        if rig.tick().atc:
            break
    samples = [rig.tick().charge.ccl for _ in range(10)]  # 1 s at 0.1 s a tick
    assert all(b - a <= 10.0 * 0.1 + 0.1 for a, b in itertools.pairwise(samples))
    assert samples[-1] <= 10.0 * 1.1 + 0.1 and samples[-1] > 0
