"""SET-1, SET-2: the five settings, their ranges and cross-check, defined once."""

from __future__ import annotations

import json

import pytest

from smallbms_bus.bms.settings import DEFAULT_SETTINGS, SPECS, SettingError, Settings
from tests.bms.rig import Rig


def test_defaults_match_behaviour_md():
    assert DEFAULT_SETTINGS.to_dict() == {"charged_voltage_per_unit": 14.0, "tail_current_pct": 4.0,
                                          "charged_detection_time_min": 3.0, "low_soc_warning_pct": 20.0,
                                          "discharge_floor_pct": 10.0}
    assert DEFAULT_SETTINGS.charged_detection_time_s == 180.0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_each_range_edge(spec):
    other = {"low_soc_warning_pct": 99.0} if spec.name == "discharge_floor_pct" else {}
    base = DEFAULT_SETTINGS.replace_checked(**other) if other else DEFAULT_SETTINGS
    floor = {"discharge_floor_pct": 0.0} if spec.name == "low_soc_warning_pct" else {}
    base = base.replace_checked(**floor) if floor else base
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


def test_refused_write_changes_nothing_in_the_core():
    rig = Rig()
    before = rig.core.settings
    revision = rig.core.state_revision
    with pytest.raises(SettingError):
        rig.core.set_settings(tail_current_pct=4.5, discharge_floor_pct=150)  # one good, one bad: whole refused
    assert rig.core.settings is before and rig.core.state_revision == revision


def test_reset_to_defaults_restores_exactly_the_five_settings():
    rig = Rig()
    rig.start()
    rig.core.set_settings(charged_voltage_per_unit=14.2, tail_current_pct=2, charged_detection_time_min=5,
                          low_soc_warning_pct=30, discharge_floor_pct=20)
    rig.core.set_mode(False)
    rig.core.set_soc(55)
    rig.core.reset_settings()
    assert rig.core.settings == DEFAULT_SETTINGS
    assert rig.core.mode_on is False and rig.tick().soc == pytest.approx(55)  # mode and SoC untouched


def test_settings_round_trip_through_json():
    s = DEFAULT_SETTINGS.replace_checked(charged_voltage_per_unit=14.25, discharge_floor_pct=0)
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
