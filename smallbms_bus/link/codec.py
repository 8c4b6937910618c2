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

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import can
import cantools
from cantools.database.can import Database, Message, Signal

from smallbms_bus.protocol import (
    BATTERY_FLAGS,
    BMS_STATE_FLAGS,
    SERIAL_PART_CHARS,
    default_dbc_path,
    message_kind,
)
from smallbms_bus.reports import (
    BatteryInfo,
    BatteryStatus,
    BatteryTemps,
    BmsState,
    CellVoltages,
    Report,
    SerialFragment,
)

__all__ = ["MALFORMED_KINDS", "PROTOCOL", "FrameDecoder", "FrameEncoder", "default_dbc_path", "load_dbc"]

MALFORMED_KINDS = ("unknown_id", "wrong_dlc", "out_of_range", "not_data_frame")
SERIAL_SIGNALS = ("SerialChars1to7", "SerialChars8to14")


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
    none_raw: int | None  # the first named raw value: what "no value" (None) is sent as
    mask: int  # the signal's width: counters and bit words wrap into it when sent

    @property
    def unbounded(self) -> bool:
        """No range to check (counters, bit words, flags): decoding is reading the raw value."""
        return self.raw_min is None and self.raw_max is None

    def check(self, raw: int) -> int:
        if raw in self.named:
            return raw
        if (self.raw_min is not None and raw < self.raw_min) or (self.raw_max is not None and raw > self.raw_max):
            raise OutOfRange(raw)
        return raw

    def value(self, raw: int) -> float:
        return round(self.check(raw) * self.scale, self.digits)

    def raw(self, value: float) -> int:
        return round(value / self.scale)


def _scaled(signal: Signal) -> _Scaled:
    scale = float(signal.scale)
    digits = max(0, -math.floor(math.log10(scale))) if scale < 1 else 0

    def raw(limit: float | None) -> int | None:
        return None if limit is None else round(limit / scale)

    named = [int(k) for k in (signal.choices or {})]
    return _Scaled(scale, digits, raw(signal.minimum), raw(signal.maximum), frozenset(named),
                   named[0] if named else None, (1 << signal.length) - 1)


# -- the protocol table ------------------------------------------------------------------------------------
# One row per message kind: the report class and how each of its fields maps to DBC signals. Both the
# decoder and the encoder iterate these rows; a field is one of the mappings below. `bind` reads the
# signal's scale and range from the DBC message once and returns (decode raw dict -> value, encode value
# -> dict of raw signal values).
Decode = Callable[[dict[str, Any]], Any]
Encode = Callable[[Any, Any], dict[str, int]]  # (field value, whole report) -> raw signal values


@dataclass(frozen=True, slots=True)
class Value:
    """A scaled number, range-checked."""

    field: str
    signal: str

    def bind(self, m: Message) -> tuple[Decode, Encode]:
        s, name = _scaled(m.get_signal_by_name(self.signal)), self.signal
        return (lambda raw: s.value(raw[name])), (lambda v, _: {name: s.raw(v)})


@dataclass(frozen=True, slots=True)
class OrNone:
    """A scaled number whose named raw value (Unknown, NotPresent) means None."""

    field: str
    signal: str

    def bind(self, m: Message) -> tuple[Decode, Encode]:
        s, name = _scaled(m.get_signal_by_name(self.signal)), self.signal
        none_raw = s.none_raw

        def decode(raw: dict[str, Any]) -> float | None:
            r = raw[name]
            return None if r in s.named else s.value(r)

        return decode, (lambda v, _: {name: none_raw if v is None else s.raw(v)})


@dataclass(frozen=True, slots=True)
class Raw:
    """An integer sent as is, range-checked; `wraps`: a counter or bit word masked to the signal's width."""

    field: str
    signal: str
    wraps: bool = False

    def bind(self, m: Message) -> tuple[Decode, Encode]:
        s, name = _scaled(m.get_signal_by_name(self.signal)), self.signal
        mask = s.mask if self.wraps else -1
        # every frame decodes these: an unbounded signal is read by itemgetter (C) instead of a checked lambda
        decode: Decode = operator.itemgetter(name) if s.unbounded else (lambda raw: s.check(raw[name]))
        return decode, (lambda v, _: {name: v & mask})


@dataclass(frozen=True, slots=True)
class Flag:
    """One bit, a bool in the report."""

    field: str
    signal: str

    def bind(self, m: Message) -> tuple[Decode, Encode]:
        s, name = _scaled(m.get_signal_by_name(self.signal)), self.signal
        decode: Decode = (lambda raw: bool(raw[name])) if s.unbounded else (lambda raw: bool(s.check(raw[name])))
        return decode, (lambda v, _: {name: int(v)})


@dataclass(frozen=True, slots=True)
class Choice:
    """An integer that must be one of the signal's named values (NominalVoltage: 1, 2 or 4 units; 3 is invalid)."""

    field: str
    signal: str

    def bind(self, m: Message) -> tuple[Decode, Encode]:
        s, name = _scaled(m.get_signal_by_name(self.signal)), self.signal

        def decode(raw: dict[str, Any]) -> int:
            value = s.check(raw[name])
            if value not in s.named:
                raise OutOfRange(value)
            return value

        return decode, (lambda v, _: {name: v})


@dataclass(frozen=True, slots=True)
class Group:
    """A tuple field spread over several signals: scaled numbers or None (cells) or plain integers (firmware)."""

    field: str
    signals: tuple[str, ...]
    optional: bool = False

    def bind(self, m: Message) -> tuple[Decode, Encode]:
        kind = OrNone if self.optional else Raw
        parts = [kind("", n).bind(m) for n in self.signals]  # type: ignore[operator]
        decoders = [d for d, _ in parts]

        def encode(values: Sequence[Any], report: Any) -> dict[str, int]:
            out: dict[str, int] = {}
            for (_, enc), v in zip(parts, values, strict=True):
                out |= enc(v, report)
            return out

        return (lambda raw: tuple([d(raw) for d in decoders])), encode


@dataclass(frozen=True, slots=True)
class SerialChars:
    """BAT_SERIAL's text: 7 ASCII characters in the signal the multiplexer `part` selects."""

    field: str
    signals: tuple[str, ...]

    def bind(self, m: Message) -> tuple[Decode, Encode]:
        part_spec, signals = _scaled(m.get_signal_by_name("SerialPart")), self.signals

        def encode(chars: str, report: Any) -> dict[str, int]:
            text = chars.encode("ascii")[:SERIAL_PART_CHARS].ljust(SERIAL_PART_CHARS, b"\0")
            return {signals[report.part]: int.from_bytes(text, "little")}

        return (lambda raw: _serial_text(raw[signals[part_spec.check(raw["SerialPart"])]])), encode


Field = Value | OrNone | Raw | Flag | Choice | Group | SerialChars


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """One message kind: its report class, the constant fields it implies, and its field <-> signal mapping."""

    kind: str  # the DBC message name without the node suffix
    report: type[Any]
    fields: tuple[Field, ...]
    constants: tuple[tuple[str, Any], ...] = ()  # fields the kind itself fixes (which four cells)
    per_node: bool = True  # `<KIND>_<NN>` per battery, or one message (BMS_STATE)


def _cells(kind: str, first: int) -> MessageSpec:
    return MessageSpec(kind, CellVoltages, (Group("voltages", tuple(f"Cell{first + k}" for k in range(4)), True),),
                       (("first_cell", first),))


PROTOCOL: tuple[MessageSpec, ...] = (
    MessageSpec("BAT_STATUS", BatteryStatus, (
        Value("voltage", "Voltage"), Value("current", "Current"), Value("temperature", "Temperature"),
        *(Flag(f, s) for f, s in BATTERY_FLAGS), Raw("alive_counter", "AliveCounter", wraps=True))),
    _cells("BAT_CELLS_1_4", 1), _cells("BAT_CELLS_5_8", 5), _cells("BAT_CELLS_9_12", 9), _cells("BAT_CELLS_13_16", 13),
    MessageSpec("BAT_TEMPS", BatteryTemps, (Value("cell_temp_min", "CellTempMin"),
                                            Value("cell_temp_max", "CellTempMax"))),
    MessageSpec("BAT_INFO", BatteryInfo, (
        Choice("nominal_units", "NominalVoltage"), Raw("nominal_capacity_ah", "NominalCapacity"),
        Group("firmware", ("FirmwareMajor", "FirmwareMinor", "FirmwarePatch")),
        Raw("string_index", "StringIndex"), Raw("series_index", "SeriesIndex"))),
    MessageSpec("BAT_SERIAL", SerialFragment, (Raw("part", "SerialPart"), SerialChars("chars", SERIAL_SIGNALS))),
    MessageSpec("BMS_STATE", BmsState, (
        *(Flag(f, s) for f, s in BMS_STATE_FLAGS), OrNone("state_of_charge", "StateOfCharge"),
        Raw("alarms", "Alarms", wraps=True), Raw("warnings", "Warnings", wraps=True),
        Raw("battery_count", "BatteryCount"), Raw("alive_counter", "AliveCounter", wraps=True)), per_node=False),
)
_SPEC_BY_KIND = {spec.kind: spec for spec in PROTOCOL}


def _serial_text(raw: int) -> str:
    data = raw.to_bytes(SERIAL_PART_CHARS, "little").rstrip(b"\0")
    if any(b < 0x20 or b > 0x7E for b in data):  # NUL inside, control or non-ASCII bytes
        raise OutOfRange(data)
    return data.decode("ascii")


def _spec_of(message: Message) -> tuple[MessageSpec, int | None] | None:
    kind, node = message_kind(message.name)
    spec = _SPEC_BY_KIND.get(kind)
    if spec is None or spec.per_node != (node is not None):
        return None
    return spec, node


Decoder = Callable[[dict[str, Any]], Report]


def _decoder(spec: MessageSpec, message: Message, node: int | None) -> Decoder:
    fixed = {"node": node} if spec.per_node else {}
    fixed.update(spec.constants)
    by_field = {f.field: f.bind(message)[0] for f in spec.fields}
    # positional, in the report's field order: this runs for every frame
    order = [f.name for f in dataclasses.fields(spec.report)]
    if set(order) != set(fixed) | set(by_field):
        raise ValueError(f"{spec.kind}: the table does not map every field of {spec.report.__name__}")
    lead = 0  # the constants (node, first_cell) lead the field order: passed as they are, not called per frame
    while lead < len(order) and order[lead] in fixed:
        lead += 1
    prefix = tuple(fixed[name] for name in order[:lead])
    decoders = [by_field.get(name) or (lambda _, v=fixed[name]: v) for name in order[lead:]]
    cls = spec.report

    def decode(raw: dict[str, Any]) -> Report:
        return cls(*prefix, *[d(raw) for d in decoders])  # type: ignore[no-any-return]

    return decode


class FrameDecoder:
    """Decodes python-can messages into reports; counts what it drops. Never raises on a frame."""

    def __init__(self, db: Database | None = None) -> None:
        self.db = db or load_dbc()
        self.malformed: dict[str, int] = dict.fromkeys(MALFORMED_KINDS, 0)
        self.received = 0
        self.decoded = 0
        self._table: dict[int, tuple[Message, int, Decoder]] = {}
        for message in self.db.messages:
            found = _spec_of(message)
            if found is not None and not message.is_extended_frame:
                spec, node = found
                self._table[message.frame_id] = (message, message.length, _decoder(spec, message, node))

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
    """Reports -> python-can messages through the same table and DBC (the simulator and BMS_STATE use it)."""

    def __init__(self, db: Database | None = None) -> None:
        self.db = db or load_dbc()
        self._by_name = {m.name: m for m in self.db.messages}
        self._kind_of: dict[Any, str] = {
            (spec.report, dict(spec.constants).get("first_cell")): spec.kind for spec in PROTOCOL}
        self._bound: dict[str, tuple[Message, list[tuple[str, Encode]]]] = {}

    def _encoders(self, name: str, spec: MessageSpec) -> tuple[Message, list[tuple[str, Encode]]]:
        bound = self._bound.get(name)
        if bound is None:
            message = self._by_name[name]
            bound = self._bound[name] = (message, [(f.field, f.bind(message)[1]) for f in spec.fields])
        return bound

    def encode(self, report: Report) -> can.Message:
        kind = self._kind_of[type(report), getattr(report, "first_cell", None)]
        spec = _SPEC_BY_KIND[kind]
        name = f"{kind}_{report.node:02d}" if spec.per_node else kind  # type: ignore[union-attr]
        message, encoders = self._encoders(name, spec)
        values: dict[str, int] = {}
        for field, enc in encoders:
            values |= enc(getattr(report, field), report)
        data = message.encode(values, scaling=False, strict=False)
        return can.Message(arbitration_id=message.frame_id, data=data, is_extended_id=False)

    # the named entry points callers use; every one goes through the table
    status = cells = temps = info = serial = bms_state = encode
