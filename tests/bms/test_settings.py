"""SET-1, SET-2: the settings of BEHAVIOUR.md's table, their ranges and cross-checks, defined once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from smallbms_bus.bms.core import BmsCore
from smallbms_bus.bms.settings import DEFAULT_SETTINGS, SPEC_BY_NAME, SPECS, SettingError, Settings
from smallbms_bus.store import Store
from tests.bms.rig import WALL0, Rig

DATA = Path(__file__).resolve().parents[1] / "data"


def test_defaults_match_behaviour_md():
    assert {s.name: s.default for s in SPECS} == {
        "charged_voltage_per_unit": 14.0, "tail_current_pct": 4.0, "charged_detection_time_min": 3.0,
        "low_soc_warning_pct": 20.0, "discharge_floor_pct": 10.0, "pre_alarm_level_per_cell": 3.10,
        "absorption_voltage_per_unit": 14.2, "float_voltage_per_unit": 13.5, "absorption_time_min": 120.0,
        "rebulk_soc_pct": 90.0, "dcl_zero_at_pre_alarm": 0.0}
    assert {k: v for k, v in DEFAULT_SETTINGS.to_dict().items() if k in SPEC_BY_NAME} == {
        s.name: s.default for s in SPECS}
    assert DEFAULT_SETTINGS.charged_detection_time_s == 180.0


def test_ranges_match_behaviour_md():
    assert {s.name: (s.minimum, s.maximum, s.resolution) for s in SPECS} == {
        "charged_voltage_per_unit": (13.0, 14.6, 0.01), "tail_current_pct": (0.5, 10.0, 0.1),
        "charged_detection_time_min": (1.0, 50.0, 1.0), "low_soc_warning_pct": (0.0, 99.0, 0.1),
        "discharge_floor_pct": (0.0, 99.0, 0.1), "pre_alarm_level_per_cell": (2.85, 3.15, 0.001),
        "absorption_voltage_per_unit": (13.8, 14.4, 0.01), "float_voltage_per_unit": (13.3, 13.8, 0.01),
        "absorption_time_min": (10.0, 480.0, 1.0), "rebulk_soc_pct": (50.0, 99.0, 0.1),
        "dcl_zero_at_pre_alarm": (0.0, 1.0, 1.0)}


def test_float_voltage_must_stay_below_absorption():
    with pytest.raises(SettingError, match=r"float_voltage_per_unit = 13.8 .*< absorption_voltage_per_unit"):
        DEFAULT_SETTINGS.replace_checked(absorption_voltage_per_unit=13.8, float_voltage_per_unit=13.8)
    with pytest.raises(SettingError, match=r"absorption_voltage_per_unit = 13.8 .*> float_voltage_per_unit"):
        DEFAULT_SETTINGS.replace_checked(float_voltage_per_unit=13.8).replace_checked(absorption_voltage_per_unit=13.8)
    both = DEFAULT_SETTINGS.replace_checked(absorption_voltage_per_unit=13.9, float_voltage_per_unit=13.8)
    assert (both.absorption_voltage_per_unit, both.float_voltage_per_unit) == (13.9, 13.8)


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0])
def test_dcl_zero_at_pre_alarm_is_off_or_on(bad):
    assert DEFAULT_SETTINGS.replace_checked(dcl_zero_at_pre_alarm=1).dcl_zero_at_pre_alarm == 1.0
    with pytest.raises(SettingError, match="dcl_zero_at_pre_alarm"):
        DEFAULT_SETTINGS.replace_checked(dcl_zero_at_pre_alarm=bad)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_each_range_edge(spec):
    other = {"discharge_floor_pct": {"low_soc_warning_pct": 99.0}, "low_soc_warning_pct": {"discharge_floor_pct": 0.0},
             "float_voltage_per_unit": {"absorption_voltage_per_unit": 14.4},
             "absorption_voltage_per_unit": {"float_voltage_per_unit": 13.3}}.get(spec.name, {})
    base = DEFAULT_SETTINGS.replace_checked(**other) if other else DEFAULT_SETTINGS
    assert getattr(base.replace_checked(**{spec.name: spec.minimum}), spec.name) == spec.minimum
    assert getattr(base.replace_checked(**{spec.name: spec.maximum}), spec.name) == spec.maximum
    for bad in (spec.minimum - spec.resolution, spec.maximum + spec.resolution, float("nan"), "12", None, True):
        with pytest.raises(SettingError) as info:
            base.replace_checked(**{spec.name: bad})
        assert info.value.name == spec.name and spec.name in str(info.value)


def test_cross_check_names_the_key_that_was_written():
    with pytest.raises(SettingError, match=r"discharge_floor_pct = 30 .*<= low_soc_warning_pct \(20 %\)"):
        DEFAULT_SETTINGS.replace_checked(discharge_floor_pct=30)
    with pytest.raises(SettingError, match=r"low_soc_warning_pct = 5.0 .*>= discharge_floor_pct \(10 %\)"):
        DEFAULT_SETTINGS.replace_checked(low_soc_warning_pct=5)
    both = DEFAULT_SETTINGS.replace_checked(discharge_floor_pct=30, low_soc_warning_pct=40)
    assert (both.discharge_floor_pct, both.low_soc_warning_pct) == (30.0, 40.0)


def test_unknown_setting_is_refused():
    with pytest.raises(SettingError, match="one of charged_voltage_per_unit"):
        DEFAULT_SETTINGS.replace_checked(bulk_voltage=14.4)
    with pytest.raises(SettingError, match="absorption"):
        Settings.from_dict({"absorption": 1})


def test_settings_saved_before_the_new_ones_existed_load_with_their_defaults():
    """A store of an earlier version has five settings: the others take their defaults."""
    old = {"charged_voltage_per_unit": 14.1, "tail_current_pct": 3.0, "charged_detection_time_min": 4.0,
           "low_soc_warning_pct": 25.0, "discharge_floor_pct": 12.0}
    loaded = Settings.from_dict(old)
    assert {k: getattr(loaded, k) for k in old} == old
    assert all(getattr(loaded, s.name) == s.default for s in SPECS if s.name not in old)


def test_refused_write_changes_nothing_in_the_core():
    rig = Rig()
    before = rig.core.settings
    revision = rig.core.state_revision
    with pytest.raises(SettingError):
        rig.core.set_settings(tail_current_pct=4.5, discharge_floor_pct=150)  # one good, one bad: whole refused
    assert rig.core.settings is before and rig.core.state_revision == revision


def test_reset_to_defaults_restores_every_setting_of_the_table():
    rig = Rig()
    rig.start()
    changed = {spec.name: spec.maximum for spec in SPECS} | {"discharge_floor_pct": 20.0,
                                                             "float_voltage_per_unit": 13.6}
    rig.core.set_settings(**changed)
    assert all(getattr(rig.core.settings, name) != spec.default for name, spec in SPEC_BY_NAME.items())
    rig.core.set_mode(False)
    rig.core.set_soc(55)
    rig.core.reset_settings()
    assert {spec.name: getattr(rig.core.settings, spec.name) for spec in SPECS} == {s.name: s.default for s in SPECS}
    assert rig.core.settings == DEFAULT_SETTINGS
    assert rig.core.mode_on is False and rig.tick().soc == pytest.approx(55)  # mode and SoC untouched


def test_settings_round_trip_through_json():
    s = DEFAULT_SETTINGS.replace_checked(charged_voltage_per_unit=14.25, discharge_floor_pct=0)
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_a_store_written_before_the_new_settings_loads_them_at_their_defaults(tmp_path):
    """tests/data/store_bad9f9c_five_settings.db was written by smallbms-bus at commit bad9f9c (five settings,
    no pre-alarm level): a 2S bank with the five settings changed and SoC set to 66 %. It opens, keeps what
    it holds and gives every newer setting its default; the next save writes them all."""
    path = tmp_path / "state.db"
    shutil.copy(DATA / "store_bad9f9c_five_settings.db", path)
    with Store.open(path) as store:
        data = store.load_state()
        assert data is not None and set(data["settings"]) == {
            "charged_voltage_per_unit", "tail_current_pct", "charged_detection_time_min", "low_soc_warning_pct",
            "discharge_floor_pct"}
        core = BmsCore.from_snapshot(data, 0.0, WALL0)
        s = core.settings
        assert (s.charged_voltage_per_unit, s.tail_current_pct, s.charged_detection_time_min,
                s.low_soc_warning_pct, s.discharge_floor_pct) == (14.1, 3.0, 4.0, 25.0, 12.0)
        assert all(getattr(s, spec.name) == spec.default for spec in SPECS[5:])
        assert core.monitor.soc_known and core.monitor.consumed_ah == pytest.approx(0.34 * 100)  # SoC 66 % kept
        store.save_state(core.snapshot(0.0), WALL0)
    with Store.open(path) as store:
        saved = store.load_state()
    assert saved is not None and set(saved["settings"]) >= {spec.name for spec in SPECS}
    assert Settings.from_dict(saved["settings"]) == s
