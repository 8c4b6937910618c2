"""BMS-CAN frames for inverters and chargers (docs/inverter.md): what a decision says, encoded through dbc/bms_can.dbc.

`InverterValues` is everything the frame set needs, taken from one `Decision` on the event loop (`values_of`),
so the link's thread never touches the core. `FrameEncoder` turns it into the frames of a profile; the layouts,
scales and ranges are the DBC's (the single source), this module only maps values to signals. A value outside a
field's range is saturated to the range (a 50-string bank's 15000 A would otherwise wrap to a negative number).
The limits are the core's (`Decision.charge`, CHG-1..7): never computed here.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import can
import cantools
from cantools.database.can import Database, Message

from smallbms_bus import __version__
from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.bms.charge import NO_CHARGE_LIMITS, ChargeLimits
from smallbms_bus.bms.core import Decision
from smallbms_bus.bms.rules import DISCHARGE_TEMP_MAX_C

PROFILES = ("victron", "pylontech")
VICTRON_IDS = (0x351, 0x355, 0x356, 0x35A, 0x35E, 0x35F, 0x372, 0x373, 0x374, 0x375, 0x376, 0x377, 0x379)
PROFILE_IDS = {"victron": VICTRON_IDS, "pylontech": (*VICTRON_IDS, 0x359, 0x35C)}
MANUFACTURER = "SMALLBMS"
CHEMISTRY = "LF"  # LiFePO4
SOH_UNKNOWN_PCT = 100  # INVERTER_CAN.md: 100 when unknown (the BMS does not measure it)
KELVIN = 273  # INVERTER_CAN.md: K = degC + 273
ZERO_CURRENT_A = 0.0

# 0x35A: which BEHAVIOUR.md bits set each item (docs/inverter.md has this table). None = the BMS has nothing for
# the field: sent 0b00 "not supported", never "ok". The temperature warnings are DISCHARGE_TEMPERATURE by side.
_INTERNAL = (BmsAlarm.BATTERY_COMMS_LOST | BmsAlarm.BANK_CONFIGURATION | BmsAlarm.FIRMWARE_UPDATE_FAILED
             | BmsAlarm.BATTERY_FAULT)
ALARM_MAP: dict[str, tuple[BmsAlarm | None, BmsWarning | None]] = {
    "General": (~BmsAlarm(0), ~BmsWarning(0)),
    "HighVoltage": (BmsAlarm.CELL_HIGH_VOLTAGE, None),
    "LowVoltage": (BmsAlarm.CELL_LOW_VOLTAGE | BmsAlarm.LOW_SOC, BmsWarning.PRE_ALARM | BmsWarning.LOW_SOC_WARNING),
    "HighTemperature": (None, BmsWarning.DISCHARGE_TEMPERATURE),
    "LowTemperature": (None, BmsWarning.DISCHARGE_TEMPERATURE),
    "HighChargeTemperature": (BmsAlarm.HIGH_TEMPERATURE_CHARGE, None),
    "LowChargeTemperature": (BmsAlarm.LOW_TEMPERATURE_CHARGE, None),
    "HighDischargeCurrent": (None, BmsWarning.HIGH_DISCHARGE_CURRENT),
    "HighChargeCurrent": (None, BmsWarning.HIGH_CHARGE_CURRENT),
    "Contactor": (BmsAlarm.RELAY_FAULT, None),
    "ShortCircuit": (None, None),
    "BmsInternal": (_INTERNAL, BmsWarning.SOC_UNKNOWN | BmsWarning.FIRMWARE_UPDATE_IN_PROGRESS),
    "CellImbalance": (None, BmsWarning.CELL_IMBALANCE),
}
NOT_SUPPORTED, ACTIVE, OK = 0, 1, 2
NO_ALARMS, NO_WARNINGS = BmsAlarm(0), BmsWarning(0)


def default_dbc_path() -> Path:
    return Path(str(importlib.resources.files("smallbms_bus.dbc").joinpath("bms_can.dbc")))


def load_dbc(path: str | Path | None = None) -> Database:
    return cantools.database.load_file(str(path or default_dbc_path()), database_format="dbc")


@dataclass(frozen=True, slots=True)
class InverterValues:
    """One decision as the inverter sees it (taken on the event loop, handed to the link's thread)."""

    limits: ChargeLimits
    soc: float | None = None
    voltage: float | None = None
    current: float | None = None
    min_temp: float | None = None  # degC, lowest / highest cell temperature of the fresh batteries
    max_temp: float | None = None
    alarms: BmsAlarm = NO_ALARMS
    warnings: BmsWarning = NO_WARNINGS
    started: bool = False
    online: int = 0
    blocking_charge: int = 0
    blocking_discharge: int = 0
    offline: int = 0
    min_cell_v: float | None = None
    max_cell_v: float | None = None
    min_cell_id: str = ""
    max_cell_id: str = ""
    min_temp_id: str = ""
    max_temp_id: str = ""
    capacity_ah: int = 0

    @property
    def temperature(self) -> float | None:
        """0x356: the highest cell temperature while charging, the lowest otherwise (project decision)."""
        charging = self.current is not None and self.current > ZERO_CURRENT_A
        return self.max_temp if charging else self.min_temp


NO_VALUES = InverterValues(limits=NO_CHARGE_LIMITS)  # before the first decision: allow nothing (CHG-6)


def values_of(decision: Decision) -> InverterValues:
    """What the frames say about `decision` (pure; runs on the event loop)."""
    bank = decision.bank
    agg = bank.aggregates
    fresh = [b for b in bank.batteries if b.fresh]
    flags = bank.flags
    blocking_charge = set(flags.get("cell_high_voltage", ())) | set(flags.get("hardware_fault", ()))
    blocking_discharge = set(flags.get("cell_low_voltage", ())) | set(flags.get("hardware_fault", ()))
    temps = [(b.temps.cell_temp_min, b.temps.cell_temp_max, b.node) for b in fresh if b.temps is not None]
    coldest = min(temps, default=None)
    warmest = max(temps, key=lambda t: t[1], default=None)
    return InverterValues(
        limits=decision.charge, soc=decision.soc, voltage=agg.voltage, current=agg.current,
        min_temp=None if coldest is None else coldest[0], max_temp=None if warmest is None else warmest[1],
        alarms=decision.alarms, warnings=decision.warnings, started=decision.started,
        online=len(fresh), blocking_charge=len(blocking_charge), blocking_discharge=len(blocking_discharge),
        offline=len(bank.batteries) - len(fresh),
        min_cell_v=None if agg.min_cell is None else agg.min_cell.voltage,
        max_cell_v=None if agg.max_cell is None else agg.max_cell.voltage,
        min_cell_id="" if agg.min_cell is None else f"B{agg.min_cell.node:02d}C{agg.min_cell.cell:02d}",
        max_cell_id="" if agg.max_cell is None else f"B{agg.max_cell.node:02d}C{agg.max_cell.cell:02d}",
        min_temp_id="" if coldest is None else f"B{coldest[2]:02d}",
        max_temp_id="" if warmest is None else f"B{warmest[2]:02d}",
        capacity_ah=bank.topology.bank_capacity_ah or 0)


def ascii_field(text: str) -> int:
    """8 ASCII characters, space padded, byte 0 = the first character, as the DBC's 64-bit little-endian signal."""
    return int.from_bytes(text.encode("ascii", "replace")[:8].ljust(8, b" "), "little")


def _flag(on: bool, supported: bool) -> int:
    return (ACTIVE if on else OK) if supported else NOT_SUPPORTED


def alarm_fields(v: InverterValues) -> dict[str, int]:
    """0x35A's raw 2-bit fields (docs/inverter.md table)."""
    hot = v.max_temp is not None and v.max_temp > DISCHARGE_TEMP_MAX_C
    out: dict[str, int] = {}
    for item, (alarm, warning) in ALARM_MAP.items():
        out[f"Alarm{item}"] = _flag(alarm is not None and bool(v.alarms & alarm), alarm is not None)
        on = warning is not None and bool(v.warnings & warning)
        if item == "HighTemperature":
            on = on and hot
        elif item == "LowTemperature":
            on = on and not hot
        out[f"Warning{item}"] = _flag(on, warning is not None)
    out["SystemOnline"] = ACTIVE if v.started else OK
    return out


def _pylon_protection(v: InverterValues) -> dict[str, float]:
    a, w = v.alarms, v.warnings
    hot = v.max_temp is not None and v.max_temp > DISCHARGE_TEMP_MAX_C
    temp = bool(w & BmsWarning.DISCHARGE_TEMPERATURE)
    return {
        "ProtectHighVoltage": bool(a & BmsAlarm.CELL_HIGH_VOLTAGE),
        "ProtectLowVoltage": bool(a & (BmsAlarm.CELL_LOW_VOLTAGE | BmsAlarm.LOW_SOC)),
        "ProtectHighTemperature": bool(a & BmsAlarm.HIGH_TEMPERATURE_CHARGE),
        "ProtectLowTemperature": bool(a & BmsAlarm.LOW_TEMPERATURE_CHARGE),
        "ProtectDischargeCurrent": False, "ProtectChargeCurrent": False,
        "ProtectSystemError": bool(a & (_INTERNAL | BmsAlarm.RELAY_FAULT)),
        "AlarmHighVoltage": False,
        "AlarmLowVoltage": bool(w & (BmsWarning.PRE_ALARM | BmsWarning.LOW_SOC_WARNING)),
        "AlarmHighTemperature": temp and hot, "AlarmLowTemperature": temp and not hot,
        "AlarmDischargeCurrent": bool(w & BmsWarning.HIGH_DISCHARGE_CURRENT),
        "AlarmChargeCurrent": bool(w & BmsWarning.HIGH_CHARGE_CURRENT),
        "AlarmInternalComms": bool(a & BmsAlarm.BATTERY_COMMS_LOST),
        "ModuleCount": min(v.online, 255), "Marker": int.from_bytes(b"PN", "little"),
    }


def signal_values(v: InverterValues, frame_id: int) -> dict[str, float]:
    """The physical values of one frame's signals (the encoder scales them with the DBC)."""
    lim = v.limits
    soc = 0.0 if v.soc is None else v.soc
    major, minor = (int(p) for p in __version__.split(".")[:2])
    temperature = v.temperature
    match frame_id:
        case 0x351:
            return {"ChargeVoltageLimit": lim.cvl, "ChargeCurrentLimit": lim.ccl, "DischargeCurrentLimit": lim.dcl,
                    "DischargeVoltageLimit": lim.dvl}
        case 0x355:
            return {"StateOfCharge": round(soc), "StateOfHealth": SOH_UNKNOWN_PCT, "StateOfChargeHighRes": soc}
        case 0x356:
            return {"BankVoltage": v.voltage or 0.0, "BankCurrent": v.current or 0.0,
                    "BankTemperature": 0.0 if temperature is None else temperature}
        case 0x35A:
            return dict(alarm_fields(v))
        case 0x35E:
            return {"ManufacturerName": ascii_field(MANUFACTURER)}
        case 0x35F:
            return {"Chemistry": int.from_bytes(CHEMISTRY.encode(), "little"), "FirmwareMajor": major,
                    "FirmwareMinor": minor, "Capacity": v.capacity_ah}
        case 0x372:
            return {"BatteriesOnline": v.online, "BatteriesBlockingCharge": v.blocking_charge,
                    "BatteriesBlockingDischarge": v.blocking_discharge, "BatteriesOffline": v.offline}
        case 0x373:
            def mv(volts: float | None) -> float:
                return 0 if volts is None else round(volts * 1000)

            def kelvin(c: float | None) -> float:
                return 0 if c is None else round(c + KELVIN)

            return {"MinCellVoltage": mv(v.min_cell_v), "MaxCellVoltage": mv(v.max_cell_v),
                    "MinCellTemperature": kelvin(v.min_temp), "MaxCellTemperature": kelvin(v.max_temp)}
        case 0x374 | 0x375 | 0x376 | 0x377:
            text = (v.min_cell_id, v.max_cell_id, v.min_temp_id, v.max_temp_id)[frame_id - 0x374]
            return {"CellId": ascii_field(text)}
        case 0x379:
            return {"InstalledCapacity": v.capacity_ah}
        case 0x35C:
            return {"ChargeEnable": lim.ccl > 0, "DischargeEnable": lim.dcl > 0,
                    "FullChargeRequest": bool(v.warnings & BmsWarning.NOT_FULLY_CHARGED_30_DAYS)}
        case 0x359:
            return _pylon_protection(v)
    raise KeyError(f"0x{frame_id:03X} is not a frame the BMS sends")


def _raw(message: Message, values: Mapping[str, float]) -> dict[str, int]:
    """Physical -> raw with the DBC's scale, saturated to the signal's range (never wrapped)."""
    raw: dict[str, int] = {}
    for sig in message.signals:
        value = values[sig.name]
        r = round(float(value) / float(sig.scale)) if sig.scale != 1 else int(value)
        if sig.minimum is not None and sig.maximum is not None and (sig.minimum, sig.maximum) != (0, 0):
            r = max(round(sig.minimum / sig.scale), min(round(sig.maximum / sig.scale), r))
        raw[sig.name] = r
    return raw


class FrameEncoder:
    """InverterValues -> the frames of a profile, through the BMS-CAN DBC."""

    def __init__(self, profile: str = "victron", db: Database | None = None) -> None:
        if profile not in PROFILE_IDS:
            raise ValueError(f"profile {profile!r}: one of {', '.join(PROFILES)}")
        self.db = db or load_dbc()
        self.ids = PROFILE_IDS[profile]
        self._messages = {i: self.db.get_message_by_frame_id(i) for i in self.ids}

    def frame(self, values: InverterValues, frame_id: int) -> can.Message:
        message = self._messages[frame_id]
        data = message.encode(_raw(message, signal_values(values, frame_id)), scaling=False, strict=True)
        return can.Message(arbitration_id=frame_id, data=data, is_extended_id=False)

    def frames(self, values: InverterValues) -> list[can.Message]:
        """The whole set, 0x351 first."""
        return [self.frame(values, i) for i in self.ids]
