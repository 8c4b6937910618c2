"""Every scenario reaches its documented condition inside its documented window of simulated time.

Each test drives a `Simulator` with a fake clock (no sleeping), feeds it the BMS_STATE of a BMS
that allows charge and discharge (a real BMS does until the condition under test), and judges only
what a BMS would see: the frames the simulator emits, decoded with the project's FrameDecoder.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smallbms_bus.link.codec import FrameDecoder, FrameEncoder
from smallbms_bus.reports import BatteryStatus, BatteryTemps, BmsState, CellVoltages, Report
from smallbms_bus.sim.runner import Simulator
from smallbms_bus.sim.scenarios import FAULT_AT, FAULT_CLEARED_AT, SCENARIOS, Expectation, Scenario, get_scenario

ALLOW_ALL = BmsState(allowed_to_charge=True, allowed_to_discharge=True, pre_alarm=False, mode_on=True,
                     remote_on=True, firmware_update=False, state_of_charge=None, alarms=0, warnings=0,
                     battery_count=4, alive_counter=0)


@dataclass
class Watched:
    """What a BMS saw: (time, report) for every frame, by kind."""

    sim: Simulator
    reports: list[tuple[float, Report]] = field(default_factory=list)

    def of(self, kind: type, node: int | None = None) -> list[tuple[float, Report]]:
        return [(t, r) for t, r in self.reports
                if isinstance(r, kind) and (node is None or getattr(r, "node", None) == node)]

    def first(self, kind: type, predicate: Callable[[Report], bool]) -> float | None:
        return next((t for t, r in self.of(kind) if predicate(r)), None)


def watch(encoder: FrameEncoder, scenario: str, until: float, dt: float, bank: str = "2s2p-12v100",
          seed: int = 0) -> Watched:
    sim = Simulator.from_scenario(scenario, bank, seed=seed, encoder=encoder)
    decoder = FrameDecoder(encoder.db)
    bms_frame = encoder.bms_state(ALLOW_ALL)
    watched = Watched(sim)
    steps = round(until / dt)
    for k in range(steps + 1):
        now = k * dt
        sim.on_frame(bms_frame, now)
        watched.reports += [(now, decoder.decode(frame)) for frame in sim.step(now)]
    assert decoder.malformed_total == 0
    return watched


def within(t: float | None, expectation: Expectation) -> bool:
    return t is not None and expectation.after <= t <= expectation.by


def min_cell(r: Report) -> float:
    assert isinstance(r, CellVoltages)
    return min(v for v in r.voltages if v is not None)


def max_cell(r: Report) -> float:
    assert isinstance(r, CellVoltages)
    return max(v for v in r.voltages if v is not None)


def test_every_scenario_is_documented(encoder: FrameEncoder) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "simulator.md").read_text(encoding="utf-8")
    for name, scenario in SCENARIOS.items():
        assert isinstance(scenario, Scenario) and scenario.expect
        assert f"`{name}`" in doc
    with pytest.raises(ValueError, match="unknown scenario"):
        get_scenario("nope")


def test_steady_stays_healthy_for_an_hour(encoder: FrameEncoder) -> None:
    w = watch(encoder, "steady", until=3600.0, dt=5.0)
    statuses = [r for _, r in w.of(BatteryStatus)]
    assert statuses and not any(
        r.cell_high_voltage or r.cell_low_voltage or r.cell_low_pre_alarm or r.balancing or r.cell_imbalance
        or r.hardware_fault or r.firmware_updating for r in statuses)
    cells = [v for _, r in w.of(CellVoltages) for v in r.voltages]
    assert min(cells) >= 3.25 and max(cells) <= 3.40
    assert 60.5 < w.sim.bank.soc_range()[0] < 62.0  # ~ +1 %/h
    assert {t for t, r in w.of(BatteryStatus)} >= {0.0, 3600.0}  # frames for the whole hour


@pytest.mark.parametrize(("bank", "seed"), [("2s2p-12v100", 0), ("1s4p-48v100", 3)])
def test_discharge_reaches_pre_alarm_then_low_voltage(encoder: FrameEncoder, bank: str, seed: int) -> None:
    pre_alarm, low_voltage = SCENARIOS["discharge"].expect
    w = watch(encoder, "discharge", until=low_voltage.by, dt=1.0, bank=bank, seed=seed)
    flag_pre = w.first(BatteryStatus, lambda r: r.cell_low_pre_alarm)
    cell_pre = w.first(CellVoltages, lambda r: min_cell(r) <= 3.10)
    flag_low = w.first(BatteryStatus, lambda r: r.cell_low_voltage)
    cell_low = w.first(CellVoltages, lambda r: min_cell(r) <= 2.80)
    assert within(flag_pre, pre_alarm) and within(cell_pre, pre_alarm), (flag_pre, cell_pre)
    assert within(flag_low, low_voltage) and within(cell_low, low_voltage), (flag_low, cell_low)
    assert all(r.current < -45.0 for t, r in w.of(BatteryStatus) if 5.0 <= t <= cell_low)  # 0.5C all along


@pytest.mark.parametrize(("bank", "seed"), [("2s2p-12v100", 0), ("2s2p-12v100", 2), ("1s1p-12v100", 1),
                                          ("1s4p-48v100", 3)])
def test_heavy_load_reaches_low_voltage_before_the_pre_alarm_is_30_s_old(encoder: FrameEncoder, bank: str,
                                                                          seed: int) -> None:
    pre_alarm, low_voltage = SCENARIOS["heavy-load"].expect
    w = watch(encoder, "heavy-load", until=60.0, dt=0.1, bank=bank, seed=seed)
    flag_pre = w.first(BatteryStatus, lambda r: r.cell_low_pre_alarm)
    cell_pre = w.first(CellVoltages, lambda r: min_cell(r) <= 3.10)
    flag_low = w.first(BatteryStatus, lambda r: r.cell_low_voltage)
    cell_low = w.first(CellVoltages, lambda r: min_cell(r) <= 2.80)
    assert within(flag_pre, pre_alarm) and within(cell_pre, pre_alarm), (flag_pre, cell_pre)
    assert within(flag_low, low_voltage) and within(cell_low, low_voltage), (flag_low, cell_low)
    capacity = w.sim.bank.shape.capacity_total_ah
    assert all(r.current < -0.9 * 2.0 * capacity / w.sim.bank.shape.parallel
               for t, r in w.of(BatteryStatus) if 0.5 <= t <= 60.0)  # 2C all along (per string)


def test_overcharge_drives_a_cell_past_3v75(encoder: FrameEncoder) -> None:
    (high,) = SCENARIOS["overcharge"].expect
    w = watch(encoder, "overcharge", until=high.by, dt=1.0)
    flag = w.first(BatteryStatus, lambda r: r.cell_high_voltage)
    cell = w.first(CellVoltages, lambda r: max_cell(r) >= 3.75)
    assert within(flag, high) and within(cell, high), (flag, cell)


def test_cold_charge_cools_below_5_degrees_while_charging(encoder: FrameEncoder) -> None:
    (cold,) = SCENARIOS["cold-charge"].expect
    w = watch(encoder, "cold-charge", until=cold.by, dt=1.0)
    t = w.first(BatteryTemps, lambda r: r.cell_temp_min < 5.0)
    assert within(t, cold), t
    charging = [r.current for tt, r in w.of(BatteryStatus) if tt >= 10.0 and tt <= t]
    assert min(charging) > 20.0  # 0.3C of 100 Ah per string, all along


def test_solar_day_charges_with_the_sun_and_synchronises(encoder: FrameEncoder) -> None:
    balancing, charged, _all_day = SCENARIOS["solar-day"].expect
    w = watch(encoder, "solar-day", until=86400.0, dt=60.0, bank="1s1p-12v100")
    statuses = w.of(BatteryStatus)
    assert within(w.first(BatteryStatus, lambda r: r.balancing), balancing)

    # MON-2: >= 14.0 V per unit and current < 4 % of capacity, held for the 3 min detection time.
    def is_charged(r: BatteryStatus) -> bool:
        return r.voltage >= 14.0 and r.current < 4.0

    held_since = None
    synchronised = None
    for t, r in statuses:
        held_since = (held_since if held_since is not None else t) if is_charged(r) else None
        if held_since is not None and t - held_since >= 180.0:
            synchronised = held_since
            break
    assert within(synchronised, charged), synchronised
    assert not any(r.cell_high_voltage for _, r in statuses)
    assert all(r.current <= 0.0 for t, r in statuses if t > 50400.0 + 60.0)  # night: the load only
    morning = [r.current for t, r in statuses if 3600.0 <= t <= 10800.0]
    assert morning == sorted(morning)  # the sun rises: more current every minute


def test_comms_loss_silences_the_last_battery_then_it_returns(encoder: FrameEncoder) -> None:
    last_frame, _, back = SCENARIOS["comms-loss"].expect
    w = watch(encoder, "comms-loss", until=back.by + 1.0, dt=0.1)
    node = len(w.sim.bank.batteries)
    times = [t for t, r in w.reports if r.node == node]
    silent = [t for t in times if FAULT_AT <= t < FAULT_CLEARED_AT]
    assert silent == []
    before = [t for t, r in w.of(BatteryStatus, node) if t < FAULT_AT]
    assert last_frame.by - 0.2 <= max(before) < last_frame.by
    kinds_back = {type(r).__name__ for t, r in w.reports if r.node == node and within(t, back)}
    assert kinds_back == {"BatteryStatus", "CellVoltages", "BatteryTemps", "BatteryInfo", "SerialFragment"}
    others = [t for t, r in w.of(BatteryStatus) if r.node != node and FAULT_AT <= t < FAULT_CLEARED_AT]
    assert len(others) == pytest.approx((node - 1) * 10 * (FAULT_CLEARED_AT - FAULT_AT), abs=node)


def test_alive_freeze_keeps_frames_but_not_the_counter(encoder: FrameEncoder) -> None:
    frozen, _, resumed = SCENARIOS["alive-freeze"].expect
    w = watch(encoder, "alive-freeze", until=resumed.by + 1.0, dt=0.1)
    node = len(w.sim.bank.batteries)
    counters = [(t, r.alive_counter) for t, r in w.of(BatteryStatus, node)]
    during = [c for t, c in counters if FAULT_AT <= t < FAULT_CLEARED_AT]
    before = [c for t, c in counters if t < FAULT_AT]
    after = [c for t, c in counters if t >= FAULT_CLEARED_AT]
    assert len(set(during)) == 1 and len(during) == pytest.approx(10 * (FAULT_CLEARED_AT - FAULT_AT), abs=2)
    assert all((b - a) % 256 == 1 for a, b in itertools.pairwise(before))
    assert during[0] == (before[-1] + 1) % 256
    assert after[0] == during[0] and all((b - a) % 256 == 1 for a, b in itertools.pairwise(after))
    assert within(next(t for t, c in counters if t >= FAULT_CLEARED_AT), resumed)
    assert within(next(t for t, c in counters if t >= FAULT_AT), frozen)


def test_firmware_update_flag_for_150_seconds(encoder: FrameEncoder) -> None:
    starts, _, ends = SCENARIOS["firmware-update"].expect
    w = watch(encoder, "firmware-update", until=ends.by + 1.0, dt=0.1)
    node = len(w.sim.bank.batteries)
    flagged = [t for t, r in w.of(BatteryStatus, node) if r.firmware_updating]
    assert within(flagged[0], starts)
    cleared = next(t for t, r in w.of(BatteryStatus, node) if t > flagged[0] and not r.firmware_updating)
    assert within(cleared, ends)
    assert flagged[-1] < cleared and cleared - flagged[0] == pytest.approx(150.0, abs=0.5)
    assert not any(r.firmware_updating for _, r in w.of(BatteryStatus) if r.node != node)


def test_hardware_fault_appears_and_stays(encoder: FrameEncoder) -> None:
    (fault,) = SCENARIOS["hardware-fault"].expect
    w = watch(encoder, "hardware-fault", until=120.0, dt=0.1)
    node = len(w.sim.bank.batteries)
    statuses = w.of(BatteryStatus, node)
    first = next(t for t, r in statuses if r.hardware_fault)
    assert within(first, fault)
    assert all(r.hardware_fault for t, r in statuses if t >= first)
    assert not any(r.hardware_fault for _, r in w.of(BatteryStatus) if r.node != node)


def test_fault_scenarios_target_the_last_battery_of_any_bank(encoder: FrameEncoder) -> None:
    sim = Simulator.from_scenario("hardware-fault", "1s1p-12v100", encoder=encoder)
    sim.step(0.0)
    sim.step(FAULT_AT)
    assert sim.bank.battery(1).hardware_fault
