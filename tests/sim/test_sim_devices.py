"""Charger and load: they obey BMS_STATE, stop when it goes missing for 1 s, and charge CC/CV."""

from __future__ import annotations

import pytest

from smallbms_bus.reports import BmsState
from smallbms_bus.sim.devices import BMS_STATE_TIMEOUT_S, Charger, Devices, Load, SolarProfile, parse_controls


def bms_state(charge: bool = True, discharge: bool = True) -> BmsState:
    return BmsState(allowed_to_charge=charge, allowed_to_discharge=discharge, pre_alarm=False, mode_on=True,
                    remote_on=True, firmware_update=False, state_of_charge=None, alarms=0, warnings=0,
                    battery_count=4, alive_counter=0)


def devices(**kwargs) -> Devices:
    return Devices.for_bank(units_in_series=2, capacity_ah=200, charge_c=0.3, load_c=0.1, **kwargs)


LOW_VOLTAGE = 26.0  # well below the 28.4 V absorption of a 2-unit bank: the charger is in CC


def test_sizes_follow_the_bank() -> None:
    d = devices()
    assert d.charger.max_current == pytest.approx(60.0)
    assert d.charger.absorption_voltage == pytest.approx(28.4)
    assert d.load.current_a == pytest.approx(20.0)


def test_nothing_runs_before_the_first_bms_state() -> None:
    d = devices()
    assert d.net_current(LOW_VOLTAGE, now=0.0) == 0.0
    assert not d.charger.running(0.0) and not d.load.running(0.0)


@pytest.mark.parametrize(("charge", "discharge", "expected"), [
    (True, True, 60.0 - 20.0),
    (True, False, 60.0),
    (False, True, -20.0),
    (False, False, 0.0),
])
def test_devices_follow_the_allowed_bits(charge: bool, discharge: bool, expected: float) -> None:
    d = devices()
    d.on_bms_state(bms_state(charge, discharge), now=10.0)
    assert d.net_current(LOW_VOLTAGE, now=10.05) == pytest.approx(expected)


def test_both_stop_one_second_after_bms_state_goes_missing() -> None:
    d = devices()
    d.on_bms_state(bms_state(), now=100.0)
    assert d.charger.running(100.999) and d.load.running(100.999)
    assert not d.charger.running(100.0 + BMS_STATE_TIMEOUT_S) and not d.load.running(101.0)
    assert d.net_current(LOW_VOLTAGE, now=101.0) == 0.0
    d.on_bms_state(bms_state(), now=105.0)  # the BMS is back
    assert d.net_current(LOW_VOLTAGE, now=105.1) == pytest.approx(40.0)


def test_a_new_state_that_forbids_stops_at_once() -> None:
    d = devices()
    d.on_bms_state(bms_state(), now=0.0)
    d.on_bms_state(bms_state(charge=False, discharge=False), now=0.1)
    assert d.net_current(LOW_VOLTAGE, now=0.1) == 0.0


def test_ignore_bms_runs_regardless() -> None:
    d = devices(ignore_bms=True)
    assert d.net_current(LOW_VOLTAGE, now=0.0) == pytest.approx(40.0)
    d.on_bms_state(bms_state(charge=False, discharge=False), now=1.0)
    assert d.net_current(LOW_VOLTAGE, now=1.5) == pytest.approx(40.0)


def test_charger_cc_then_cv_taper_to_the_absorption_voltage() -> None:
    charger = Charger(max_current=50.0, absorption_voltage=14.2, cv_band=0.1, ignore_bms=True)
    assert charger.current(13.0, now=0.0) == pytest.approx(50.0)
    assert charger.current(14.1, now=0.0) == pytest.approx(50.0)
    assert charger.current(14.15, now=0.0) == pytest.approx(25.0)
    assert charger.current(14.2, now=0.0) == 0.0
    assert charger.current(15.0, now=0.0) == 0.0  # never sinks current


def test_disabled_devices_stay_off_even_when_allowed() -> None:
    d = devices(ignore_bms=True)
    d.charger.enabled = False
    d.load.enabled = False
    assert d.net_current(LOW_VOLTAGE, now=0.0) == 0.0


def test_load_is_constant_current() -> None:
    load = Load(current_a=12.5, ignore_bms=True)
    assert load.current(now=0.0) == 12.5


def test_solar_profile_follows_the_daylight() -> None:
    sun = SolarProfile(sunrise_h=6.0, sunset_h=20.0, start_hour=0.0)
    hours = [sun.fraction(h * 3600.0) for h in range(25)]
    assert hours[0] == hours[5] == hours[6] == hours[20] == hours[23] == 0.0
    assert hours[13] == pytest.approx(1.0)
    assert hours[7] < hours[9] < hours[11] < hours[13] and hours[13] > hours[16] > hours[19] > 0.0
    assert sun.fraction(24 * 3600.0 + 13 * 3600.0) == pytest.approx(1.0)  # the next day


def test_solar_charger_current_uses_simulated_time_not_the_bms_clock() -> None:
    charger = Charger(max_current=40.0, absorption_voltage=14.2, solar=SolarProfile(start_hour=6.0))
    charger.bms.update(bms_state(), now=0.0)
    noon = 7 * 3600.0  # 13:00 of the simulated day
    assert charger.current(13.0, now=0.5, sim_time=noon) == pytest.approx(40.0)
    assert charger.current(13.0, now=0.5, sim_time=15 * 3600.0) == 0.0  # 21:00


# --- wiring: relays, BMS_STATE or both (issue 13 item 2) -------------------------------------------------------

class Relays:
    """Two relay contacts as a board holds them."""

    def __init__(self) -> None:
        self.charge: bool | None = None
        self.load: bool | None = None


def wired(control: str, **kwargs) -> tuple[Devices, Relays]:
    d, relays = devices(**kwargs), Relays()
    d.wire(control, control, charge_relay=lambda: relays.charge, load_relay=lambda: relays.load)
    return d, relays


def test_relay_wired_devices_follow_their_relay_and_ignore_bms_state() -> None:
    """The charge relay switches the charger's remote input, the load relay the load: mode off (both open)
    stops both, whatever BMS_STATE says."""
    d, relays = wired("relays")
    assert d.net_current(LOW_VOLTAGE, now=0.0) == 0.0  # contacts not read yet: open
    assert d.charger.stopped_by(0.0) == "charge relay not read yet"
    relays.charge = relays.load = True
    assert d.net_current(LOW_VOLTAGE, now=0.0) == pytest.approx(40.0)  # no BMS_STATE needed
    d.on_bms_state(bms_state(charge=False, discharge=False), now=1.0)
    assert d.net_current(LOW_VOLTAGE, now=1.0) == pytest.approx(40.0)  # not a CAN device: BMS_STATE unseen
    relays.charge = False  # charge disconnect open
    assert d.net_current(LOW_VOLTAGE, now=5.0) == pytest.approx(-20.0)
    assert d.charger.stopped_by(5.0) == "charge relay open" and d.load.stopped_by(5.0) is None
    relays.load = False
    assert d.net_current(LOW_VOLTAGE, now=5.0) == 0.0 and d.load.stopped_by(5.0) == "load relay open"


def test_both_needs_the_relay_closed_and_bms_state_allowing() -> None:
    d, relays = wired("both")
    relays.charge = relays.load = True
    assert d.net_current(LOW_VOLTAGE, now=0.0) == 0.0 and d.load.stopped_by(0.0) == "no BMS_STATE yet"
    d.on_bms_state(bms_state(charge=True, discharge=False), now=1.0)
    assert d.net_current(LOW_VOLTAGE, now=1.0) == pytest.approx(60.0)
    assert d.load.stopped_by(1.0) == "BMS_STATE forbids"
    relays.charge = False
    assert d.net_current(LOW_VOLTAGE, now=1.0) == 0.0
    assert d.charger.stopped_by(2.5) == "charge relay open"
    relays.charge = True
    assert d.charger.stopped_by(2.5) == "BMS_STATE missing for 1 s"


def test_bms_state_devices_do_not_see_the_relays() -> None:
    """A CAN charger follows AllowedToCharge only: opening its (unwired) relay changes nothing."""
    d, relays = devices(), Relays()
    d.wire("bms-state", "relays", charge_relay=lambda: relays.charge, load_relay=lambda: relays.load)
    relays.charge, relays.load = False, True
    d.on_bms_state(bms_state(), now=0.0)
    assert d.net_current(LOW_VOLTAGE, now=0.1) == pytest.approx(40.0)


def test_ignore_bms_ignores_the_relays_too() -> None:
    d, relays = wired("both", ignore_bms=True)
    relays.charge = relays.load = False
    assert d.net_current(LOW_VOLTAGE, now=0.0) == pytest.approx(40.0)


def test_wiring_needs_a_relay_and_a_known_control() -> None:
    d = devices()
    with pytest.raises(ValueError, match="charger: control 'relays' needs a relay"):
        d.wire("relays", "bms-state")
    with pytest.raises(ValueError, match="load: control 'relay'"):
        d.wire("bms-state", "relay")  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    ("relays", ("relays", "relays")), ("both", ("both", "both")), ("bms-state", ("bms-state", "bms-state")),
    ("charger=bms-state,load=relays", ("bms-state", "relays")), (" load=both , charger=relays ", ("relays", "both")),
])
def test_controls_parse(text: str, expected: tuple[str, str]) -> None:
    assert parse_controls(text) == expected


@pytest.mark.parametrize("text", ["", "relay", "charger=relays", "charger=relays,charger=both",
                                  "inverter=relays,load=both", "charger=relays,load=bms"])
def test_bad_controls_are_refused_with_the_choices(text: str) -> None:
    with pytest.raises(ValueError, match="relays, bms-state, both"):
        parse_controls(text)
