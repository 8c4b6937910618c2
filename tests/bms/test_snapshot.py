"""The state snapshot the service persists: round-trips exactly, timers included."""

from __future__ import annotations

import json

import pytest

from smallbms_bus.bank import PROTECTIVE_MEMORY_S
from smallbms_bus.bms.alarms import BmsAlarm
from smallbms_bus.bms.core import BmsCore
from tests.bms.rig import WALL0, Rig


def busy_rig() -> Rig:
    rig = Rig(2, 2)
    rig.start()
    rig.core.set_settings(charged_voltage_per_unit=14.2, discharge_floor_pct=15, low_soc_warning_pct=25)
    rig.core.set_soc(72.5)
    rig.core.set_mode(False)
    rig.set_current(-30.0)
    rig.run(30)
    rig.core.firmware_update("start")
    rig.battery(1).cells[0] = 3.05  # pre-alarm running
    rig.run(12)
    return rig


def test_snapshot_round_trips_exactly_through_json():
    rig = busy_rig()
    snap = rig.core.snapshot(rig.t)
    restored = BmsCore.from_snapshot(json.loads(json.dumps(snap)), rig.t, WALL0 + rig.t)
    assert restored.snapshot(rig.t) == snap
    assert snap["timers"]["firmware_update_elapsed_s"] == pytest.approx(12.0, abs=0.11)
    assert snap["timers"]["pre_alarm_elapsed_s"] == pytest.approx(11.9, abs=0.11)
    assert snap["learned_bank"]["batteries"][3]["serial"] == "HQ000000000004"


def test_restored_core_continues_where_it_stopped():
    rig = busy_rig()
    snap = rig.core.snapshot(rig.t)
    later = Rig(2, 2)  # a restart: a new monotonic clock that starts at 0
    later.core = BmsCore.from_snapshot(snap, 0.0, WALL0 + 1000.0, discovery_window=1.0)
    later.batteries = rig.batteries
    d = later.start()
    assert d.mode_on is False and d.soc == pytest.approx(rig.last.soc, abs=0.01)
    assert later.core.settings == rig.core.settings and later.core.bank.learned == rig.core.bank.learned
    # the firmware update started 12 s before the restart fails 120 s after it started, not 120 s after restart
    d = later.run(120 - 12 - later.t + 0.1)
    assert BmsAlarm.FIRMWARE_UPDATE_FAILED in d.alarms


def test_snapshot_version_is_checked():
    snap = busy_rig().core.snapshot(0.0)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        BmsCore.from_snapshot(snap | {"version": 99}, 0.0, WALL0)


def test_a_restart_inside_a_hysteresis_band_keeps_the_latch():
    rig = Rig()
    rig.start()
    rig.battery(1).cells[0] = 3.76
    assert BmsAlarm.CELL_HIGH_VOLTAGE in rig.tick().alarms
    rig.battery(1).cells[0] = 3.70  # inside 3.60..3.75: still latched
    assert not rig.tick().atc
    later = Rig()
    later.core = BmsCore.from_snapshot(rig.core.snapshot(rig.t), 0.0, WALL0 + 500.0, discovery_window=1.0)
    later.batteries = rig.batteries
    d = later.start()
    assert not d.atc and BmsAlarm.CELL_HIGH_VOLTAGE in d.alarms
    rig.battery(1).cells[0] = 3.60
    assert later.run(PROTECTIVE_MEMORY_S).atc  # once the 3.70 V frames are older than the protective memory


@pytest.mark.parametrize(("command", "parts"), [
    (lambda core, t: core.set_settings(discharge_floor_pct=5, low_soc_warning_pct=6), ("settings",)),
    (lambda core, t: core.reset_settings(), ("settings",)),
    (lambda core, t: core.set_mode(True), ("mode_on",)),
    (lambda core, t: core.set_soc(12.0), ("monitor",)),
    (lambda core, t: core.synchronise_soc(), ("monitor",)),
    (lambda core, t: core.reset_history(), ("history",)),
    (lambda core, t: core.relearn_bank(t), ("learned_bank",)),
    (lambda core, t: core.firmware_update("abort"), ("timers",)),
])
def test_restore_parts_undoes_a_command_exactly(command, parts):
    """SET-3: what a write changed is put back when the store cannot commit it; the rest is not touched."""
    rig = busy_rig()
    before = rig.core.snapshot(rig.t)
    revision = rig.core.state_revision
    command(rig.core, rig.t)
    if parts == ("learned_bank",):
        rig.core.bank.learned = None  # relearning the same batteries changes nothing: make the undo visible
    assert {p: rig.core.snapshot(rig.t)[p] for p in parts} != {p: before[p] for p in parts}
    rig.core.restore_parts({p: before[p] for p in parts}, rig.t, "undone")
    assert rig.core.snapshot(rig.t) == before
    assert rig.core.state_revision > revision  # the undo is saved too, once the store works again
    rig.run(1)  # and the core keeps deciding from it
    assert rig.core.mode_on is False and rig.core.settings.discharge_floor_pct == 15
