"""The virtual battery: OCV curve, the battery's own flags, AliveCounter, charge, heat, balancer."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallbms_bus.link.codec import FrameDecoder, FrameEncoder
from smallbms_bus.reports import BatteryStatus, CellVoltages
from smallbms_bus.sim.battery import (
    BALANCE_CURRENT_A,
    OCV_TABLE,
    THERMAL_TIME_CONSTANT_S,
    VirtualBattery,
    ocv,
    soc_for_ocv,
)

SERIAL = "HQ223400000001"


def battery(units: int = 1, capacity: int = 100, soc: float = 60.0, **kwargs) -> VirtualBattery:
    return VirtualBattery(node=1, units=units, capacity_ah=capacity, serial=SERIAL, soc=soc, **kwargs)


def settle(b: VirtualBattery) -> None:
    """Let the battery's firmware look at its cells once (no time passes, no current)."""
    b.step(0.0, 0.0)


# --- OCV curve ---------------------------------------------------------------------------------

DOCUMENTED_POINTS = [
    (0.0, 2.50), (0.01, 2.80), (0.03, 3.00), (0.05, 3.10), (0.10, 3.20), (0.20, 3.25), (0.40, 3.29),
    (0.60, 3.31), (0.80, 3.33), (0.90, 3.34), (0.95, 3.36), (0.98, 3.42), (0.995, 3.55), (1.00, 3.60),
]


@pytest.mark.parametrize(("soc", "volts"), DOCUMENTED_POINTS)
def test_ocv_hits_documented_points(soc: float, volts: float) -> None:
    assert ocv(soc) == pytest.approx(volts, abs=1e-9)


def test_ocv_is_strictly_increasing_across_the_whole_table() -> None:
    grid = [OCV_TABLE[0][0] + k * 1e-4 for k in range(int((OCV_TABLE[-1][0] - OCV_TABLE[0][0]) / 1e-4) + 1)]
    values = [ocv(s) for s in grid]
    assert all(b > a for a, b in itertools.pairwise(values))


def test_ocv_interpolates_linearly_between_points() -> None:
    assert ocv(0.5) == pytest.approx(3.30)
    assert ocv(0.15) == pytest.approx(3.225)


def test_overcharge_passes_3v75_and_overdischarge_falls_below_2v5() -> None:
    assert ocv(1.0) < 3.75 < ocv(1.01) < ocv(1.05) <= 5.0
    assert 0.0 <= ocv(-0.05) < ocv(-0.01) < 2.50
    assert ocv(5.0) == ocv(1.05) and ocv(-5.0) == ocv(-0.10)  # clamped, never beyond the AFE range


@given(st.floats(min_value=0.0, max_value=4.85))
def test_soc_for_ocv_inverts_ocv(volts: float) -> None:
    assert ocv(soc_for_ocv(volts)) == pytest.approx(volts, abs=1e-9)


# --- construction and reports --------------------------------------------------------------------

@pytest.mark.parametrize(("units", "groups"), [(1, [1]), (2, [1, 5]), (4, [1, 5, 9, 13])])
def test_cell_reports_one_per_four_cells(units: int, groups: list[int]) -> None:
    b = battery(units=units)
    reports = b.cell_reports()
    assert [r.first_cell for r in reports] == groups
    assert all(isinstance(r, CellVoltages) and len(r.voltages) == 4 and r.node == 1 for r in reports)
    assert b.cell_count == 4 * units
    assert b.voltage == pytest.approx(sum(v for r in reports for v in r.voltages), abs=0.01)


def test_info_temps_and_serial_fragments() -> None:
    b = VirtualBattery(node=7, units=2, capacity_ah=200, serial="HQ2234ABCDEFGH", string_index=3,
                       series_index=2, firmware=(4, 5, 6), temperature=20.0)
    info = b.info()
    assert (info.node, info.nominal_units, info.nominal_capacity_ah, info.firmware,
            info.string_index, info.series_index) == (7, 2, 200, (4, 5, 6), 3, 2)
    assert b.serial_fragment(0).chars == "HQ2234A" and b.serial_fragment(1).chars == "BCDEFGH"
    temps = b.temps()
    assert 19.4 <= temps.cell_temp_min <= temps.cell_temp_max <= 20.6
    with pytest.raises(ValueError):
        b.serial_fragment(2)


@pytest.mark.parametrize("kwargs", [
    {"units": 3}, {"serial": "SHORT"}, {"capacity_ah": 0}, {"soc": 101.0}, {"node": 51}, {"node": 0},
])
def test_invalid_construction_is_rejected(kwargs: dict) -> None:
    args = {"node": 1, "units": 1, "capacity_ah": 100, "serial": SERIAL} | kwargs
    with pytest.raises(ValueError):
        VirtualBattery(**args)


def test_same_seed_same_battery_other_seed_other_cells() -> None:
    a, b, c = battery(seed=5), battery(seed=5), battery(seed=6)
    assert [x.capacity_ah for x in a.cells] == [x.capacity_ah for x in b.cells]
    assert [x.capacity_ah for x in a.cells] != [x.capacity_ah for x in c.cells]
    capacities = [x.capacity_ah for x in a.cells]
    assert all(99.0 <= cap <= 101.0 for cap in capacities) and len(set(capacities)) == 4


def test_resistance_scales_inversely_with_capacity_and_rises_in_the_cold() -> None:
    small, large = battery(capacity=100), battery(capacity=300)
    assert small.resistance == pytest.approx(3 * large.resistance, rel=0.1)
    assert 0.004 < small.resistance < 0.008  # a few mOhm for a 12.8 V / 100 Ah battery
    cold = battery(temperature=0.0)
    assert cold.resistance > 1.5 * small.resistance


# --- flags and their hysteresis ------------------------------------------------------------------

def flags_after(b: VirtualBattery, cell: int, volts: float) -> BatteryStatus:
    b.set_cell_voltage(cell, volts)
    settle(b)
    return b.status()


def test_cell_high_voltage_sets_at_3v75_and_clears_at_3v60() -> None:
    b = battery()
    assert not flags_after(b, 0, 3.749).cell_high_voltage
    assert flags_after(b, 0, 3.750).cell_high_voltage
    assert flags_after(b, 0, 3.700).cell_high_voltage  # inside the hysteresis band
    assert flags_after(b, 0, 3.601).cell_high_voltage
    assert not flags_after(b, 0, 3.600).cell_high_voltage
    assert not flags_after(b, 0, 3.749).cell_high_voltage  # back inside the band: stays clear


def test_cell_high_voltage_clears_only_when_every_cell_is_low_enough() -> None:
    b = battery()
    b.set_cell_voltage(1, 3.70)
    assert flags_after(b, 0, 3.76).cell_high_voltage
    assert flags_after(b, 0, 3.50).cell_high_voltage  # cell 2 still at 3.70 V
    assert not flags_after(b, 1, 3.60).cell_high_voltage


def test_cell_low_voltage_sets_at_2v80_and_clears_at_3v20() -> None:
    b = battery()
    status = flags_after(b, 0, 2.801)
    assert not status.cell_low_voltage and status.cell_low_pre_alarm
    assert flags_after(b, 0, 2.800).cell_low_voltage
    assert flags_after(b, 0, 3.100).cell_low_voltage
    assert flags_after(b, 0, 3.199).cell_low_voltage
    status = flags_after(b, 0, 3.200)
    assert not status.cell_low_voltage and not status.cell_low_pre_alarm


def test_cell_low_pre_alarm_sets_at_3v10_and_clears_at_3v20() -> None:
    b = battery()
    assert not flags_after(b, 0, 3.101).cell_low_pre_alarm
    status = flags_after(b, 0, 3.100)
    assert status.cell_low_pre_alarm and not status.cell_low_voltage
    assert flags_after(b, 0, 3.150).cell_low_pre_alarm
    assert flags_after(b, 0, 3.199).cell_low_pre_alarm
    assert not flags_after(b, 0, 3.200).cell_low_pre_alarm
    assert not flags_after(b, 0, 3.199).cell_low_pre_alarm


def test_cell_imbalance_sets_above_100mv_and_clears_at_80mv() -> None:
    b = battery()
    for cell in range(4):
        b.set_cell_voltage(cell, 3.300)
    assert not flags_after(b, 0, 3.400).cell_imbalance  # exactly 100 mV: not above
    assert flags_after(b, 0, 3.401).cell_imbalance
    assert flags_after(b, 0, 3.381).cell_imbalance
    assert not flags_after(b, 0, 3.380).cell_imbalance


def test_injected_faults_are_reported_as_set() -> None:
    b = battery()
    b.hardware_fault = True
    b.firmware_updating = True
    status = b.status()
    assert status.hardware_fault and status.firmware_updating
    assert set(b.active_flags()) == {"HardwareFault", "FirmwareUpdating"}


# --- AliveCounter --------------------------------------------------------------------------------

def test_alive_counter_advances_per_status_and_wraps() -> None:
    b = battery()
    counters = [b.status().alive_counter for _ in range(300)]
    assert counters[:256] == list(range(256))
    assert counters[256:] == list(range(44))


def test_alive_counter_freezes_and_resumes() -> None:
    b = battery()
    for _ in range(10):
        b.status()
    b.alive_frozen = True
    assert {b.status().alive_counter for _ in range(50)} == {10}
    b.alive_frozen = False
    assert [b.status().alive_counter for _ in range(3)] == [10, 11, 12]


def test_other_reports_do_not_advance_the_alive_counter() -> None:
    b = battery()
    b.cell_reports(), b.temps(), b.info(), b.serial_fragment(0)
    assert b.status().alive_counter == 0


# --- charge and heat -----------------------------------------------------------------------------

def test_one_amp_for_one_hour_adds_one_amp_hour_to_every_cell() -> None:
    b = battery(capacity=100, soc=50.0)
    before = [c.charge_ah for c in b.cells]
    soc_before = b.soc
    for _ in range(60):
        b.step(1.0, 60.0)
    assert [c.charge_ah - x for c, x in zip(b.cells, before, strict=True)] == pytest.approx([1.0] * 4)
    assert b.soc - soc_before == pytest.approx(1.0, rel=0.02)  # 1 Ah of 100 Ah (cells differ by +-1 %)


def test_discharge_lowers_charge_and_terminal_voltage_sags_under_load() -> None:
    b = battery(capacity=200, soc=50.0)
    rest, charge = b.voltage, b.cells[0].charge_ah
    b.step(-100.0, 36.0)  # 1 Ah out
    assert b.voltage < rest - 100.0 * b.resistance * 0.9
    assert b.cells[0].charge_ah == pytest.approx(charge - 1.0)


def test_temperature_relaxes_toward_ambient_with_the_time_constant() -> None:
    b = battery(temperature=40.0, ambient=20.0)
    b.step(0.0, THERMAL_TIME_CONSTANT_S)
    assert b.temperature == pytest.approx(20.0 + 20.0 * math.exp(-1.0), abs=1e-6)
    for _ in range(100):
        b.step(0.0, 600.0)
    assert b.temperature == pytest.approx(20.0, abs=0.01)
    b.set_ambient(30.0)
    b.step(0.0, 600.0)
    assert 20.0 < b.temperature < 30.0


def test_current_heats_the_battery_above_ambient() -> None:
    b = battery(capacity=100, soc=20.0, temperature=25.0, ambient=25.0)
    for _ in range(60):
        b.step(100.0, 60.0)  # 1C for an hour: I^2 R = 100^2 * ~6 mOhm = ~60 W
    assert 27.0 < b.temperature < 35.0
    assert b.temps().cell_temp_max > 27.0


# --- balancer ------------------------------------------------------------------------------------

def test_balancer_bleeds_the_high_cells_near_the_top_and_narrows_the_spread() -> None:
    b = battery(capacity=100)
    for cell, volts in enumerate((3.470, 3.500, 3.520, 3.480)):
        b.set_cell_voltage(cell, volts)
    spread_before = max(b.cell_millivolts()) - min(b.cell_millivolts())
    charges = [c.charge_ah for c in b.cells]
    b.step(0.0, 60.0)
    status = b.status()
    assert status.balancing
    assert b.bleeding == (False, True, True, True)  # every cell above the lowest, not the lowest
    assert b.cells[0].charge_ah == pytest.approx(charges[0])
    assert b.cells[2].charge_ah == pytest.approx(charges[2] - BALANCE_CURRENT_A * 60.0 / 3600.0)
    for _ in range(240):
        b.step(0.0, 60.0)
    spread_after = max(b.cell_millivolts()) - min(b.cell_millivolts())
    assert spread_after < spread_before / 4
    assert not b.status().balancing  # done: spread down to the stop level


def test_balancer_stays_off_in_the_middle_of_the_curve() -> None:
    b = battery()
    b.set_cell_voltage(0, 3.300)
    b.set_cell_voltage(1, 3.330)
    b.step(0.0, 60.0)
    assert not b.status().balancing and not any(b.bleeding)


# --- property: abuse never leaves the protocol's ranges -----------------------------------------

ENCODER = FrameEncoder()


@settings(max_examples=40, deadline=None)
@given(
    units=st.sampled_from([1, 2, 4]),
    soc=st.floats(min_value=0.0, max_value=100.0),
    steps=st.lists(st.tuples(st.floats(min_value=-600.0, max_value=600.0),
                             st.floats(min_value=0.0, max_value=3600.0)), min_size=1, max_size=12),
)
def test_random_currents_keep_values_finite_and_frames_valid(units: int, soc: float, steps: list) -> None:
    b = battery(units=units, soc=soc)
    decoder = FrameDecoder(ENCODER.db)
    for current, dt in steps:
        b.step(current, dt)
        assert math.isfinite(b.soc) and math.isfinite(b.temperature) and math.isfinite(b.voltage)
        assert all(0.0 <= v <= 5.0 for v in b.cell_voltages())
        frames = [ENCODER.status(b.status()), ENCODER.temps(b.temps()), ENCODER.info(b.info())]
        frames += [ENCODER.cells(r) for r in b.cell_reports()]
        for frame in frames:
            assert decoder.decode(frame) is not None
    assert decoder.malformed_total == 0
