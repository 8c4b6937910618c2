"""Frames <-> typed reports, through the DBC and nothing else.

Theory of operation
-------------------
The DBC (dbc/lithium_ng.dbc) owns every frame layout, scale and valid range. This module owns
only the *signal mapping*: which DBC signal feeds which report field. A user with another CAN
battery swaps the DBC and this mapping; the bank and the BMS core do not change.

Message names in the DBC are `<KIND>_<NN>` (e.g. `BAT_STATUS_07`): the kind selects the mapping,
the suffix is the battery's node number. BMS_STATE has no suffix.

Decoding never raises. A frame is either turned into a report or dropped and counted under one
malformed kind (COM-3):

- ``unknown_id``: an identifier the DBC does not define (extended ids included);
- ``wrong_dlc``: a DLC other than the DBC's length (8 for every message);
- ``out_of_range``: a value outside the DBC signal's [minimum, maximum] that is not one of the
  signal's named values (e.g. NominalVoltage 3, StringIndex 0, a cell at 6 V, an unknown
  BAT_SERIAL multiplexer, a non-ASCII serial character);
- ``not_data_frame``: remote, error and CAN FD frames (the protocol uses classical data frames).

Values are decoded raw and scaled here with the DBC's factor, rounded to the factor's decimals,
so 3300 * 0.001 is 3.3, not 3.3000000000000003.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
import cantools
from cantools.database.can import Database, Message

from smallbms_bus.reports import (
    BatteryInfo,
    BatteryStatus,
    BatteryTemps,
    BmsState,
    CellVoltages,
    Report,
    SerialFragment,
)

MALFORMED_KINDS = ("unknown_id", "wrong_dlc", "out_of_range", "not_data_frame")

CELL_MESSAGES = {"BAT_CELLS_1_4": 1, "BAT_CELLS_5_8": 5, "BAT_CELLS_9_12": 9, "BAT_CELLS_13_16": 13}
STATUS_FLAGS = (
    ("cell_high_voltage", "CellHighVoltage"),
    ("cell_low_voltage", "CellLowVoltage"),
    ("cell_low_pre_alarm", "CellLowPreAlarm"),
    ("balancing", "Balancing"),
    ("cell_imbalance", "CellImbalance"),
    ("hardware_fault", "HardwareFault"),
    ("firmware_updating", "FirmwareUpdating"),
)
BMS_STATE_FLAGS = (
    ("allowed_to_charge", "AllowedToCharge"),
    ("allowed_to_discharge", "AllowedToDischarge"),
    ("pre_alarm", "PreAlarm"),
    ("mode_on", "ModeOn"),
    ("remote_on", "RemoteOn"),
    ("firmware_update", "FirmwareUpdate"),
)
SERIAL_SIGNALS = ("SerialChars1to7", "SerialChars8to14")
SERIAL_CHARS_PER_PART = 7


def default_dbc_path() -> Path:
    """The DBC shipped inside the package (works from a non-editable install)."""
    return Path(str(importlib.resources.files("smallbms_bus.dbc").joinpath("lithium_ng.dbc")))


def load_dbc(path: str | Path | None = None) -> Database:
    return cantools.database.load_file(str(path or default_dbc_path()), database_format="dbc")


class OutOfRange(ValueError):
    """A decoded value lies outside the protocol range (the frame is dropped)."""


@dataclass(frozen=True, slots=True)
class _Scaled:
    """How to scale and check one signal, read once from the DBC."""

    scale: float
    digits: int
    raw_min: int | None
    raw_max: int | None
    named: frozenset[int]  # raw values with a name in the DBC (e.g. 0xFFFF NotPresent): never out of range

    def check(self, raw: int) -> int:
        if raw in self.named:
            return raw
        if (self.raw_min is not None and raw < self.raw_min) or (self.raw_max is not None and raw > self.raw_max):
            raise OutOfRange(raw)
        return raw

    def value(self, raw: int) -> float:
        return round(self.check(raw) * self.scale, self.digits)


def _scaled(message: Message, name: str) -> _Scaled:
    sig = message.get_signal_by_name(name)
    scale = float(sig.scale)
    digits = max(0, -math.floor(math.log10(scale))) if scale < 1 else 0

    def raw(limit: float | None) -> int | None:
        return None if limit is None else round(limit / scale)

    named = frozenset(int(k) for k in (sig.choices or {}))
    return _Scaled(scale, digits, raw(sig.minimum), raw(sig.maximum), named)


def _split_name(name: str) -> tuple[str, int | None]:
    kind, _, suffix = name.rpartition("_")
    if kind and suffix.isdigit():
        return kind, int(suffix)
    return name, None


Decoder = Callable[[dict[str, Any]], Report]


def _status_decoder(message: Message, node: int) -> Decoder:
    v, i, t = (_scaled(message, s) for s in ("Voltage", "Current", "Temperature"))
    flags = [_scaled(message, s) for _, s in STATUS_FLAGS]
    names = [s for _, s in STATUS_FLAGS]

    def decode(raw: dict[str, Any]) -> Report:
        f = [bool(c.check(raw[n])) for c, n in zip(flags, names, strict=True)]
        return BatteryStatus(node, v.value(raw["Voltage"]), i.value(raw["Current"]),
                             t.value(raw["Temperature"]), *f, raw["AliveCounter"])

    return decode


def _cells_decoder(message: Message, node: int, first: int) -> Decoder:
    names = [f"Cell{first + k}" for k in range(4)]
    specs = [_scaled(message, n) for n in names]
    # The named raw value of a cell signal (0xFFFF NotPresent) means "no reading".
    absent = [s.named for s in specs]

    def decode(raw: dict[str, Any]) -> Report:
        values = tuple(
            None if raw[n] in a else s.value(raw[n])
            for n, s, a in zip(names, specs, absent, strict=True)
        )
        return CellVoltages(node, first, values)

    return decode


def _temps_decoder(message: Message, node: int) -> Decoder:
    lo, hi = _scaled(message, "CellTempMin"), _scaled(message, "CellTempMax")

    def decode(raw: dict[str, Any]) -> Report:
        return BatteryTemps(node, lo.value(raw["CellTempMin"]), hi.value(raw["CellTempMax"]))

    return decode


def _info_decoder(message: Message, node: int) -> Decoder:
    names = ("NominalVoltage", "NominalCapacity", "StringIndex", "SeriesIndex")
    nv, cap, si, pi = (_scaled(message, n) for n in names)
    valid_units = nv.named  # the DBC names the valid unit counts (1, 2, 4); 3 is invalid

    def decode(raw: dict[str, Any]) -> Report:
        units = nv.check(raw["NominalVoltage"])
        if units not in valid_units:
            raise OutOfRange(units)
        return BatteryInfo(
            node, units, cap.check(raw["NominalCapacity"]),
            (raw["FirmwareMajor"], raw["FirmwareMinor"], raw["FirmwarePatch"]),
            si.check(raw["StringIndex"]), pi.check(raw["SeriesIndex"]),
        )

    return decode


def _serial_text(raw: int) -> str:
    data = raw.to_bytes(SERIAL_CHARS_PER_PART, "little").rstrip(b"\0")
    if any(b < 0x20 or b > 0x7E for b in data):  # NUL inside, control or non-ASCII bytes
        raise OutOfRange(data)
    return data.decode("ascii")


def _serial_decoder(message: Message, node: int) -> Decoder:
    part_spec = _scaled(message, "SerialPart")

    def decode(raw: dict[str, Any]) -> Report:
        part = part_spec.check(raw["SerialPart"])
        return SerialFragment(node, part, _serial_text(raw[SERIAL_SIGNALS[part]]))

    return decode


def _bms_state_decoder(message: Message) -> Decoder:
    soc = _scaled(message, "StateOfCharge")
    count = _scaled(message, "BatteryCount")

    def decode(raw: dict[str, Any]) -> Report:
        flags = [bool(raw[s]) for _, s in BMS_STATE_FLAGS]
        r = raw["StateOfCharge"]
        return BmsState(*flags, None if r in soc.named else soc.value(r), raw["Alarms"], raw["Warnings"],
                        count.check(raw["BatteryCount"]), raw["AliveCounter"])

    return decode


def _decoder_for(message: Message) -> Decoder | None:
    kind, node = _split_name(message.name)
    if kind == "BMS_STATE":
        return _bms_state_decoder(message)
    if node is None:
        return None
    if kind == "BAT_STATUS":
        return _status_decoder(message, node)
    if kind in CELL_MESSAGES:
        return _cells_decoder(message, node, CELL_MESSAGES[kind])
    if kind == "BAT_TEMPS":
        return _temps_decoder(message, node)
    if kind == "BAT_INFO":
        return _info_decoder(message, node)
    if kind == "BAT_SERIAL":
        return _serial_decoder(message, node)
    return None


class FrameDecoder:
    """Decodes python-can messages into reports; counts what it drops. Never raises on a frame."""

    def __init__(self, db: Database | None = None) -> None:
        self.db = db or load_dbc()
        self.malformed: dict[str, int] = dict.fromkeys(MALFORMED_KINDS, 0)
        self.received = 0
        self.decoded = 0
        self._table: dict[int, tuple[Message, int, Decoder]] = {}
        for message in self.db.messages:
            decoder = _decoder_for(message)
            if decoder is not None and not message.is_extended_frame:
                self._table[message.frame_id] = (message, message.length, decoder)

    def _drop(self, kind: str) -> None:
        self.malformed[kind] += 1

    def decode(self, frame: can.Message) -> Report | None:
        self.received += 1
        if frame.is_remote_frame or frame.is_error_frame or frame.is_fd:
            self._drop("not_data_frame")
            return None
        entry = None if frame.is_extended_id else self._table.get(frame.arbitration_id)
        if entry is None:
            self._drop("unknown_id")
            return None
        message, length, decoder = entry
        data = frame.data
        if frame.dlc != length or len(data) != length:
            self._drop("wrong_dlc")
            return None
        try:
            report = decoder(message.decode(data, decode_choices=False, scaling=False))
        except (OutOfRange, cantools.database.DecodeError):
            self._drop("out_of_range")
            return None
        self.decoded += 1
        return report

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


class FrameEncoder:
    """Reports -> python-can messages, through the same DBC (used by the simulator and BMS_STATE)."""

    def __init__(self, db: Database | None = None) -> None:
        self.db = db or load_dbc()
        self._by_name = {m.name: m for m in self.db.messages}

    def _frame(self, name: str, values: dict[str, Any]) -> can.Message:
        message = self._by_name[name]
        data = message.encode(values, scaling=False, strict=False)
        return can.Message(arbitration_id=message.frame_id, data=data, is_extended_id=False)

    def _raw(self, name: str, signal: str, value: float) -> int:
        return round(value / self._by_name[name].get_signal_by_name(signal).scale)

    def status(self, r: BatteryStatus) -> can.Message:
        name = f"BAT_STATUS_{r.node:02d}"
        values: dict[str, Any] = {
            "Voltage": self._raw(name, "Voltage", r.voltage),
            "Current": self._raw(name, "Current", r.current),
            "Temperature": self._raw(name, "Temperature", r.temperature),
            "AliveCounter": r.alive_counter & 0xFF,
        }
        for field, signal in STATUS_FLAGS:
            values[signal] = int(getattr(r, field))
        return self._frame(name, values)

    def cells(self, r: CellVoltages) -> can.Message:
        kind = next(k for k, first in CELL_MESSAGES.items() if first == r.first_cell)
        name = f"{kind}_{r.node:02d}"
        message = self._by_name[name]
        values: dict[str, Any] = {}
        for k, v in enumerate(r.voltages):
            signal = message.get_signal_by_name(f"Cell{r.first_cell + k}")
            values[signal.name] = (
                next(iter(signal.choices)) if v is None else round(v / signal.scale)
            )
        return self._frame(name, values)

    def temps(self, r: BatteryTemps) -> can.Message:
        name = f"BAT_TEMPS_{r.node:02d}"
        return self._frame(name, {
            "CellTempMin": self._raw(name, "CellTempMin", r.cell_temp_min),
            "CellTempMax": self._raw(name, "CellTempMax", r.cell_temp_max),
        })

    def info(self, r: BatteryInfo) -> can.Message:
        return self._frame(f"BAT_INFO_{r.node:02d}", {
            "NominalVoltage": r.nominal_units, "NominalCapacity": r.nominal_capacity_ah,
            "FirmwareMajor": r.firmware[0], "FirmwareMinor": r.firmware[1], "FirmwarePatch": r.firmware[2],
            "StringIndex": r.string_index, "SeriesIndex": r.series_index,
        })

    def serial(self, r: SerialFragment) -> can.Message:
        text = r.chars.encode("ascii")[:SERIAL_CHARS_PER_PART].ljust(SERIAL_CHARS_PER_PART, b"\0")
        return self._frame(f"BAT_SERIAL_{r.node:02d}", {
            "SerialPart": r.part, SERIAL_SIGNALS[r.part]: int.from_bytes(text, "little"),
        })

    def bms_state(self, r: BmsState) -> can.Message:
        name = "BMS_STATE"
        values: dict[str, Any] = {signal: int(getattr(r, field)) for field, signal in BMS_STATE_FLAGS}
        soc_signal = self._by_name[name].get_signal_by_name("StateOfCharge")
        values["StateOfCharge"] = (
            next(iter(soc_signal.choices)) if r.state_of_charge is None
            else self._raw(name, "StateOfCharge", r.state_of_charge)
        )
        values.update(Alarms=r.alarms & 0xFFFF, Warnings=r.warnings & 0xFFFF,
                      BatteryCount=r.battery_count, AliveCounter=r.alive_counter & 0xFF)
        return self._frame(name, values)

    def encode(self, report: Report) -> can.Message:
        if isinstance(report, BatteryStatus):
            return self.status(report)
        if isinstance(report, CellVoltages):
            return self.cells(report)
        if isinstance(report, BatteryTemps):
            return self.temps(report)
        if isinstance(report, BatteryInfo):
            return self.info(report)
        if isinstance(report, SerialFragment):
            return self.serial(report)
        return self.bms_state(report)
