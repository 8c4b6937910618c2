"""MON-6: a command (set SoC, synchronise) moves SoC and consumed Ah only; no history counter changes because
of it. Every command, alone and in pairs, from three starting points, against every counter of the history."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict

import pytest

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.bms.history import History
from tests.bms.rig import Rig

# Every counter the history shows (HIS, plus the GX's last discharge); the trackers behind them are not counters.
COUNTERS = ("deepest_discharge_ah", "last_discharge_ah", "cumulative_ah_drawn", "discharged_energy_kwh",
            "charged_energy_kwh", "synchronisations", "charge_cycles", "full_discharges", "last_full_charge_wall",
            "serials_at_full_charge", "min_bank_voltage", "max_bank_voltage", "min_cell_voltage", "max_cell_voltage",
            "min_battery_temperature", "max_battery_temperature")
COMMANDS: dict[str, Callable[[BmsCore], None]] = {
    "set 0 %": lambda core: core.set_soc(0.0),
    "set 5 %": lambda core: core.set_soc(5.0),
    "set 50 %": lambda core: core.set_soc(50.0),
    "set 80 %": lambda core: core.set_soc(80.0),
    "set 95 %": lambda core: core.set_soc(95.0),
    "set 100 %": lambda core: core.set_soc(100.0),
    "synchronise": lambda core: core.synchronise_soc(),
}


def counters(history: History) -> dict[str, object]:
    values = asdict(history)
    assert set(COUNTERS) <= set(values), "a counter of this test is not in History"
    return {k: values[k] for k in COUNTERS}


def unknown_after_a_discharge() -> Rig:
    """First start: SoC unknown, 2 Ah drawn."""
    rig = Rig(2, 2)  # 200 Ah
    rig.start()
    rig.set_current(-40.0)
    rig.run(180, dt=1.0)
    rig.set_current(0.0)
    rig.run(2, dt=1.0)
    return rig


def full_after_a_synchronisation() -> Rig:
    """SoC 100 % from a measured synchronisation (MON-2), then 5 Ah drawn: SoC 97.5 %, no cycle armed."""
    rig = Rig(2, 2)
    rig.start()
    rig.set_cells(3.55)  # 28.4 V >= 28.0 V charged voltage
    rig.set_current(3.0)  # below the 8 A tail current
    rig.run(185, dt=1.0)
    assert rig.last.history.synchronisations == 1 and rig.last.soc == 100.0
    rig.set_cells(3.30)
    rig.set_current(-50.0)
    rig.run(360, dt=1.0)
    rig.set_current(0.0)
    rig.run(2, dt=1.0)
    return rig


def armed_at_60_percent() -> Rig:
    """Set to 70 %, then a measured discharge to ~60 %: a cycle is armed by measurement (below 65 %)."""
    rig = Rig(2, 2)
    rig.start()
    rig.core.set_soc(70.0)
    rig.set_current(-100.0)
    rig.run(720, dt=1.0)
    rig.set_current(0.0)
    d = rig.run(2, dt=1.0)
    assert d.soc < 65.0 and rig.core.history.cycle_armed
    return rig


STARTS = {"unknown": unknown_after_a_discharge, "synchronised": full_after_a_synchronisation,
          "armed": armed_at_60_percent}
_prepared: dict[str, dict] = {}


def prepared(start: str) -> Rig:
    """A fresh rig in the given state (built once, then restored from its snapshot: same core, same counters)."""
    if start not in _prepared:
        rig = STARTS[start]()
        _prepared[start] = {"snapshot": rig.core.snapshot(rig.t), "t": rig.t,
                            "batteries": [(b.cells[:], b.current) for b in rig.batteries]}
    saved = _prepared[start]
    rig = Rig(2, 2)
    rig.t = saved["t"]
    rig.core = BmsCore.from_snapshot(saved["snapshot"], rig.t, 1_790_000_000.0 + rig.t, discovery_window=1.0)
    for battery, (cells, current) in zip(rig.batteries, saved["batteries"], strict=True):
        battery.cells, battery.current = cells, current
    rig.start()
    return rig


def test_the_seen_case_set_80_then_synchronise_leaves_the_deepest_discharge_at_what_was_drawn():
    """Seen: set SoC 80 %, then synchronise: deepest discharge 40.2 Ah although under 1 Ah was drawn."""
    rig = Rig(2, 2)  # 200 Ah
    rig.start()
    rig.set_current(-10.0)
    rig.run(60, dt=1.0)  # 0.17 Ah
    rig.core.set_soc(80.0)
    rig.run(30, dt=1.0)
    rig.set_current(0.0)
    rig.core.synchronise_soc()
    d = rig.run(5, dt=1.0)
    drawn = d.history.cumulative_ah_drawn
    assert 0.2 < drawn < 1.0
    assert d.history.deepest_discharge_ah <= drawn * 1.01  # Peukert at 0.05C weighs a little less than 1
    assert d.history.last_discharge_ah <= drawn * 1.01
    assert d.soc == 100.0 and d.consumed_ah == 0.0  # what the commands are for


@pytest.mark.parametrize("start", sorted(STARTS))
@pytest.mark.parametrize(("first", "second"), [(c, None) for c in COMMANDS]
                         + list(itertools.permutations(COMMANDS, 2)))
def test_no_command_changes_a_history_counter(start, first, second):
    rig = prepared(start)
    before = counters(rig.core.history)
    COMMANDS[first](rig.core)
    rig.run(2, dt=1.0)
    if second is not None:
        COMMANDS[second](rig.core)
        rig.run(2, dt=1.0)
    after = counters(rig.last.history)
    assert after == before, {k: (before[k], after[k]) for k in COUNTERS if before[k] != after[k]}


@pytest.mark.parametrize("start", sorted(STARTS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_after_a_command_the_depth_grows_by_what_is_measured_only(start, command):
    rig = prepared(start)
    before = rig.core.history.deepest_discharge_ah, rig.core.history.last_discharge_ah
    depth_before = rig.core.history.discharge_depth_ah
    COMMANDS[command](rig.core)
    rig.run(1, dt=1.0)
    rig.set_current(-20.0)  # 0.1C: Peukert weight 2^0.05
    d = rig.run(180, dt=1.0)
    measured = 20.0 * 180 / 3600 * 2 ** 0.05
    assert d.history.deepest_discharge_ah == pytest.approx(max(before[0], depth_before + measured), abs=0.02)
    assert d.history.last_discharge_ah == pytest.approx(max(before[1], depth_before + measured), abs=0.02)


def test_a_cycle_armed_by_measurement_counts_once_a_measured_charge_crosses_90():
    rig = prepared("armed")
    rig.core.set_soc(50.0)  # the installer corrects the SoC: the measured drop below 65 % still stands
    rig.set_current(100.0)
    d = rig.run(1000, dt=1.0)  # +27.5 Ah x 0.99: from 50 % to ~63.6 %
    assert d.history.charge_cycles == 0
    d = rig.run(3600, dt=1.0)
    assert d.soc > 90.0 and d.history.charge_cycles == 1


def test_a_drop_below_65_made_by_a_command_arms_no_cycle():
    rig = prepared("synchronised")
    rig.core.set_soc(50.0)
    rig.set_current(100.0)
    d = rig.run(3600, dt=1.0)
    assert d.soc > 90.0 and d.history.charge_cycles == 0


def test_a_measured_discharge_to_0_is_a_full_discharge_whatever_the_start_point_the_command_set():
    rig = prepared("synchronised")
    rig.core.set_soc(5.0)
    rig.set_current(-100.0)
    d = rig.run(600, dt=1.0)
    assert d.soc == 0.0 and d.history.full_discharges == 1
