"""Which reports make the service decide at once (BmsCore.on_report's answer) and which wait for the tick."""

from __future__ import annotations

import dataclasses

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, SerialFragment
from tests.bms.rig import WALL0

FINE = BatteryStatus(1, 13.2, 0.0, 21.0, False, False, False, False, False, False, False, 0)


def test_a_report_is_prompt_when_it_crosses_a_protective_threshold_either_way():
    core = BmsCore(0.0, WALL0)
    assert core.on_report(FINE, 0.0)  # first status of a battery: new
    assert not core.on_report(dataclasses.replace(FINE, voltage=13.3, current=-5.0, alive_counter=1), 0.1)
    high = dataclasses.replace(FINE, cell_high_voltage=True, alive_counter=2)
    assert core.on_report(high, 0.2)
    assert not core.on_report(dataclasses.replace(high, alive_counter=3), 0.3)  # still high: nothing new
    assert core.on_report(dataclasses.replace(FINE, alive_counter=4), 0.4)  # cleared: prompt as well
    for flag in ("cell_low_voltage", "cell_low_pre_alarm", "hardware_fault", "firmware_updating", "cell_imbalance"):
        assert core.on_report(dataclasses.replace(FINE, **{flag: True}), 0.5), flag
        assert core.on_report(FINE, 0.6), flag
    assert core.on_report(dataclasses.replace(FINE, temperature=51.0), 0.7)  # too hot to charge


def test_cell_and_temperature_frames_are_prompt_at_the_thresholds_of_evaluate():
    core = BmsCore(0.0, WALL0)
    assert core.on_report(CellVoltages(1, 1, (3.30, 3.30, 3.30, 3.30)), 0.0)
    assert not core.on_report(CellVoltages(1, 1, (3.31, 3.29, 3.35, 3.30)), 0.5)
    assert core.on_report(CellVoltages(1, 1, (3.75, 3.30, 3.30, 3.30)), 1.0)  # CELL_HIGH_SET_V
    assert core.on_report(CellVoltages(1, 1, (3.30, 3.30, 3.10, 3.30)), 1.5)  # the pre-alarm level (default 3.10 V)
    assert core.on_report(CellVoltages(1, 1, (3.30, 2.80, 3.10, 3.30)), 2.0)  # CELL_LOW_SET_V
    assert core.on_report(CellVoltages(1, 5, (3.30, 3.30, 3.30, 3.30)), 2.0)  # another group: its own
    assert core.on_report(BatteryTemps(1, 20.0, 21.0), 0.0)
    assert not core.on_report(BatteryTemps(1, 20.5, 22.0), 1.0)
    assert core.on_report(BatteryTemps(1, 4.9, 22.0), 2.0)  # below 5 degC: no charging


def test_cell_frames_are_prompt_at_the_pre_alarm_level_that_is_set():
    """The immediate evaluation follows the adjusted pre-alarm level (PRE-1), not the default."""
    core = BmsCore(0.0, WALL0)
    core.set_settings(pre_alarm_level_per_cell=3.15)
    assert core.on_report(CellVoltages(1, 1, (3.30, 3.30, 3.30, 3.30)), 0.0)
    assert core.on_report(CellVoltages(1, 1, (3.30, 3.30, 3.14, 3.30)), 0.5)  # <= 3.15: pre-alarm now
    assert not core.on_report(CellVoltages(1, 1, (3.30, 3.30, 3.12, 3.30)), 1.0)  # still under: nothing new
    core.set_settings(pre_alarm_level_per_cell=2.9)
    assert core.on_report(CellVoltages(1, 1, (3.30, 3.30, 3.12, 3.30)), 1.5)  # the level moved: its side changed
    assert not core.on_report(CellVoltages(1, 1, (3.30, 3.30, 3.05, 3.30)), 2.0)


def test_identity_frames_are_prompt_only_when_they_change():
    core = BmsCore(0.0, WALL0)
    info = BatteryInfo(1, 1, 100, (1, 2, 3), 1, 1)
    assert core.on_report(info, 0.0)
    assert not core.on_report(info, 1.0)
    assert core.on_report(dataclasses.replace(info, series_index=2), 2.0)
    assert core.on_report(SerialFragment(1, 0, "HQ00000"), 0.0)
    assert core.on_report(SerialFragment(1, 1, "0000001"), 0.0)
    assert not core.on_report(SerialFragment(1, 0, "HQ00000"), 1.0)
