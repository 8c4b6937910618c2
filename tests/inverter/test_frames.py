"""BMS-CAN frames: the generated DBC, the encoder, and an independent decoder written from the contract.

`decode_independently` below is INVERTER_CAN.md's table transcribed with struct.unpack on the bytes: it shares no
code with the project's encoder or its DBC, so a wrong scale, sign, byte order or position in either shows here.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smallbms_bus.dbc import bms_can, generate

from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.bms.charge import NO_CHARGE_LIMITS, ChargeLimits, ChargeState
from smallbms_bus.inverter.frames import NO_VALUES, PROFILE_IDS, FrameEncoder, InverterValues, default_dbc_path

VICTRON = {0x351, 0x355, 0x356, 0x35A, 0x35E, 0x35F, 0x372, 0x373, 0x374, 0x375, 0x376, 0x377, 0x379}
# INVERTER_CAN.md's 0x35A table: (byte, bit) of each item; the warning sits 4 bytes later.
FIELDS_35A = {
    "general": (0, 0), "high_voltage": (0, 2), "low_voltage": (0, 4), "high_temperature": (0, 6),
    "low_temperature": (1, 0), "high_charge_temperature": (1, 2), "low_charge_temperature": (1, 4),
    "high_discharge_current": (1, 6), "high_charge_current": (2, 0), "contactor": (2, 2), "short_circuit": (2, 4),
    "bms_internal": (2, 6), "cell_imbalance": (3, 0)}


def decode_independently(frame_id: int, data: bytes) -> dict:
    """INVERTER_CAN.md, little-endian, signed where it says s16."""
    if frame_id == 0x351:
        cvl, ccl, dcl, dvl = struct.unpack("<HhhH", data)
        return {"cvl": cvl / 10, "ccl": ccl / 10, "dcl": dcl / 10, "dvl": dvl / 10}
    if frame_id == 0x355:
        soc, soh, soc_fine = struct.unpack("<HHH", data[:6])
        return {"soc": soc, "soh": soh, "soc_fine": soc_fine / 100}
    if frame_id == 0x356:
        volts, amps, temp = struct.unpack("<hhh", data[:6])
        return {"voltage": volts / 100, "current": amps / 10, "temperature": temp / 10}
    if frame_id == 0x35A:
        out = {}
        for name, (byte, bit) in FIELDS_35A.items():
            out[f"alarm_{name}"] = (data[byte] >> bit) & 3
            out[f"warning_{name}"] = (data[byte + 4] >> bit) & 3
        out["system_online"] = (data[7] >> 2) & 3
        return out
    if frame_id in (0x35E, 0x374, 0x375, 0x376, 0x377):
        return {"text": data.decode("ascii")}
    if frame_id == 0x35F:
        chem, major, minor, capacity = struct.unpack("<2sBBH", data[:6])
        return {"chemistry": chem.decode(), "firmware": (major, minor), "capacity": capacity}
    if frame_id == 0x372:
        return dict(zip(("online", "blocking_charge", "blocking_discharge", "offline"),
                        struct.unpack("<HHHH", data), strict=True))
    if frame_id == 0x373:
        return dict(zip(("min_mv", "max_mv", "min_k", "max_k"), struct.unpack("<HHHH", data), strict=True))
    if frame_id == 0x379:
        return {"capacity": struct.unpack("<H", data[:2])[0]}
    if frame_id == 0x35C:
        return {"charge": bool(data[0] & 0x80), "discharge": bool(data[0] & 0x40), "full": bool(data[0] & 0x08)}
    if frame_id == 0x359:
        return {"count": data[4], "marker": data[5:7].decode(), "protect_high_v": bool(data[0] & 0x02),
                "alarm_low_v": bool(data[2] & 0x04), "protect_system": bool(data[1] & 0x08)}
    raise AssertionError(f"unexpected frame 0x{frame_id:03X}")


LIMITS = ChargeLimits(cvl=55.2, ccl=120.5, dcl=200.0, dvl=44.8, state=ChargeState.ABSORPTION, known=True)
VALUES = InverterValues(
    limits=LIMITS, soc=57.25, voltage=53.12, current=-12.3, min_temp=12.3, max_temp=25.1,
    alarms=BmsAlarm.CELL_HIGH_VOLTAGE | BmsAlarm.RELAY_FAULT, warnings=BmsWarning.PRE_ALARM | BmsWarning.CELL_IMBALANCE,
    started=True, online=7, blocking_charge=1, blocking_discharge=0, offline=1, min_cell_v=3.287, max_cell_v=3.551,
    min_cell_id="B07C03", max_cell_id="B02C16", min_temp_id="B01", max_temp_id="B04", capacity_ah=600)


def by_id(profile: str = "victron", values: InverterValues = VALUES) -> dict[int, bytes]:
    return {f.arbitration_id: bytes(f.data) for f in FrameEncoder(profile).frames(values)}


def test_committed_dbc_equals_generator_output():
    assert default_dbc_path().read_text() == bms_can.render(), "run python -m smallbms_bus.dbc.generate"
    assert generate.main(["--check"]) == 0


def test_profiles_send_the_documented_sets():
    frames = FrameEncoder("victron").frames(VALUES)
    assert frames[0].arbitration_id == 0x351  # first in every set
    assert {f.arbitration_id for f in frames} == VICTRON
    assert set(by_id("pylontech")) == VICTRON | {0x359, 0x35C}
    assert all(not f.is_extended_id and len(f.data) <= 8 for f in FrameEncoder("pylontech").frames(VALUES))
    with pytest.raises(ValueError, match="profile"):
        FrameEncoder("sma")


def test_independent_decoder_reads_what_the_contract_says():
    f = {i: decode_independently(i, d) for i, d in by_id("pylontech").items()}
    assert f[0x351] == {"cvl": 55.2, "ccl": 120.5, "dcl": 200.0, "dvl": 44.8}
    assert f[0x355] == {"soc": 57, "soh": 100, "soc_fine": 57.25}
    assert f[0x356] == {"voltage": 53.12, "current": -12.3, "temperature": 12.3}  # discharging: the lowest
    assert f[0x35E]["text"] == "SMALLBMS"
    assert f[0x35F] == {"chemistry": "LF", "firmware": (0, 1), "capacity": 600}
    assert f[0x372] == {"online": 7, "blocking_charge": 1, "blocking_discharge": 0, "offline": 1}
    assert f[0x373] == {"min_mv": 3287, "max_mv": 3551, "min_k": 285, "max_k": 298}
    assert [f[i]["text"] for i in (0x374, 0x375, 0x376, 0x377)] == ["B07C03  ", "B02C16  ", "B01     ", "B04     "]
    assert f[0x379] == {"capacity": 600}
    assert f[0x35C] == {"charge": True, "discharge": True, "full": False}
    assert f[0x359] == {"count": 7, "marker": "PN", "protect_high_v": True, "alarm_low_v": True,
                        "protect_system": True}
    a = f[0x35A]
    active, ok, unsupported = 1, 2, 0
    assert a["alarm_general"] == active and a["warning_general"] == active
    assert a["alarm_high_voltage"] == active and a["warning_high_voltage"] == unsupported
    assert a["alarm_low_voltage"] == ok and a["warning_low_voltage"] == active
    assert a["alarm_contactor"] == active and a["warning_cell_imbalance"] == active
    assert a["alarm_short_circuit"] == unsupported and a["warning_short_circuit"] == unsupported
    assert a["alarm_cell_imbalance"] == unsupported
    assert a["system_online"] == active


def test_temperature_is_the_highest_while_charging():
    charging = InverterValues(**{**{k: getattr(VALUES, k) for k in VALUES.__slots__}, "current": 5.0})
    assert decode_independently(0x356, by_id(values=charging)[0x356])["temperature"] == 25.1


def test_nothing_known_sends_zero_limits_and_offline():
    f = {i: decode_independently(i, d) for i, d in by_id("pylontech", NO_VALUES).items()}
    assert f[0x351] == {"cvl": 0.0, "ccl": 0.0, "dcl": 0.0, "dvl": 0.0}  # NO_CHARGE_LIMITS, CHG-6
    assert f[0x35C] == {"charge": False, "discharge": False, "full": False}
    assert f[0x35A]["system_online"] == 2
    assert NO_VALUES.limits is NO_CHARGE_LIMITS


def test_values_beyond_a_field_saturate_instead_of_wrapping():
    huge = InverterValues(limits=ChargeLimits(70000.0, 15000.0, 15000.0, 44.8, ChargeState.FLOAT, True),
                          current=-15000.0, voltage=400.0)
    f = {i: decode_independently(i, d) for i, d in by_id(values=huge).items()}
    assert f[0x351] == {"cvl": 6553.5, "ccl": 3276.7, "dcl": 3276.7, "dvl": 44.8}
    assert f[0x356]["current"] == -3276.8 and f[0x356]["voltage"] == 327.67


@settings(max_examples=60, deadline=None)
@given(cvl=st.floats(0, 6553.5), ccl=st.floats(0, 3276.7), dcl=st.floats(0, 3276.7), dvl=st.floats(0, 6553.5),
       amps=st.floats(-3276.8, 3276.7), volts=st.floats(-327.68, 327.67), soc=st.floats(0, 100))
def test_round_trip_within_half_a_step(cvl, ccl, dcl, dvl, amps, volts, soc):
    v = InverterValues(limits=ChargeLimits(cvl, ccl, dcl, dvl, ChargeState.ABSORPTION, True), current=amps,
                       voltage=volts, soc=soc)
    f = by_id(values=v)
    limits = decode_independently(0x351, f[0x351])
    for name, want in (("cvl", cvl), ("ccl", ccl), ("dcl", dcl), ("dvl", dvl)):
        assert abs(limits[name] - want) <= 0.05 + 1e-9
    m = decode_independently(0x356, f[0x356])
    assert abs(m["current"] - amps) <= 0.05 + 1e-9 and abs(m["voltage"] - volts) <= 0.005 + 1e-9
    assert abs(decode_independently(0x355, f[0x355])["soc_fine"] - soc) <= 0.005 + 1e-9


def test_cantools_decodes_the_same_values():
    db = cantools.database.load_file(str(default_dbc_path()))
    f = by_id("pylontech")
    limits = db.decode_message(0x351, f[0x351])
    assert limits == pytest.approx({"ChargeVoltageLimit": 55.2, "ChargeCurrentLimit": 120.5,
                                    "DischargeCurrentLimit": 200.0, "DischargeVoltageLimit": 44.8}, abs=1e-9)
    assert db.decode_message(0x356, f[0x356])["BankCurrent"] == pytest.approx(-12.3)
    flags = db.decode_message(0x35A, f[0x35A], decode_choices=True)
    assert str(flags["AlarmHighVoltage"]) == "Active" and str(flags["WarningHighVoltage"]) == "NotSupported"
    assert str(flags["AlarmLowVoltage"]) == "Ok"
    assert db.get_message_by_frame_id(0x305).senders == ["INVERTER"]


def test_cantools_cli_reads_a_candump_of_the_link():
    """`candump can1 | python -m cantools decode dbc/bms_can.dbc` on a live BMS-CAN bus."""
    lines = [f"  can1  {i:03X}   [{len(d)}]  {' '.join(f'{b:02X}' for b in d)}" for i, d in by_id("pylontech").items()]
    lines.append("  can1  305   [8]  00 00 00 00 00 00 00 00")
    out = subprocess.run([sys.executable, "-m", "cantools", "decode", str(default_dbc_path())],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, check=True, timeout=60).stdout
    assert "CHARGE_LIMITS(" in out and "ChargeVoltageLimit: 55.2 V" in out and "ChargeCurrentLimit: 120.5 A" in out
    assert "BankCurrent: -12.3 A" in out and "AlarmHighVoltage: Active" in out
    for name in ("SOC_SOH", "BANK_MEASUREMENTS", "ALARMS_WARNINGS", "MANUFACTURER", "BATTERY_INFO", "MODULE_COUNTS",
                 "CELL_EXTREMES", "MIN_CELL_VOLTAGE_ID", "INSTALLED_CAPACITY", "PYLON_REQUEST", "PYLON_PROTECTION",
                 "INVERTER_KEEPALIVE"):
        assert f"{name}(" in out, out
    assert "Unknown frame id" not in out


def test_profile_ids_are_unique_and_standard():
    for ids in PROFILE_IDS.values():
        assert len(ids) == len(set(ids)) and all(i <= 0x7FF for i in ids)
