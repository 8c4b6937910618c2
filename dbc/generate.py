"""Generate dbc/lithium_ng.dbc from the wire contract (docs/protocol.md), and dbc/bms_can.dbc (dbc/bms_can.py).

The tables below are the protocol transcribed once; everything else (the decoder, the virtual
batteries, the BMS_STATE sender) reads the generated DBC, never these tables. Run

    python -m smallbms_bus.dbc.generate            # rewrite dbc/lithium_ng.dbc
    python -m smallbms_bus.dbc.generate --check    # exit 1 if the committed file differs

Signal minimum/maximum are the protocol's valid ranges: the decoder drops (and counts) frames
whose values fall outside them. Where the protocol gives no range, the range is physical
plausibility, chosen here and documented in the signal comment (cells 0-5 V, temperatures
-40..+125 degC, the span of common AFE/NTC sensors). Reserved bits and bytes carry no signal and
are ignored on receive, so that a future firmware setting them does not silence a battery.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from cantools.database.can import Database, Message, Node, Signal
from cantools.database.conversion import BaseConversion

NODES = range(1, 51)
DBC_PATH = Path(__file__).with_name("lithium_ng.dbc")
BMS_NODE = "BMS"
# A cell slot that is not present or not measured carries this raw value (docs/protocol.md).
CELL_NOT_PRESENT_RAW = 0xFFFF
CELL_NOT_PRESENT_CHOICE = "NotPresent"


def battery_node(n: int) -> str:
    return f"BATTERY_{n:02d}"


@dataclass(frozen=True)
class Sig:
    name: str
    start: int
    length: int
    signed: bool = False
    scale: float = 1
    minimum: float | None = None
    maximum: float | None = None
    unit: str | None = None
    comment: str | None = None
    choices: dict[int, str] | None = None
    multiplexer: bool = False
    mux_id: int | None = None


@dataclass(frozen=True)
class Msg:
    base: int
    name: str
    period_ms: int
    comment: str
    signals: list[Sig] = field(default_factory=list)
    per_battery: bool = True


FLAG_BITS = [
    ("CellHighVoltage", "a cell reached the battery's hard-coded high threshold"),
    ("CellLowVoltage", "a cell reached the battery's hard-coded low threshold"),
    ("CellLowPreAlarm", "a cell is approaching the low threshold (imminent undervoltage)"),
    ("Balancing", "the battery's balancer is active"),
    ("CellImbalance", "the battery sees its cells out of balance"),
    ("HardwareFault", "internal fault (sensor, AFE); data of this battery is not to be trusted"),
    ("FirmwareUpdating", "the battery is being updated"),
]

TEMP_RANGE = dict(minimum=-40.0, maximum=125.0)
TEMP_NOTE = "valid range -40..+125 degC (sensor span, project choice)"


def _cells(first: int) -> list[Sig]:
    return [
        Sig(
            f"Cell{first + i}", 16 * i, 16, scale=0.001, minimum=0.0, maximum=5.0, unit="V",
            comment=f"cell {first + i} voltage; 0xFFFF = not present or not measured; "
            "valid 0-5 V (project choice)",
            choices={CELL_NOT_PRESENT_RAW: CELL_NOT_PRESENT_CHOICE},
        )
        for i in range(4)
    ]


MESSAGES: list[Msg] = [
    Msg(0x0F0, "BMS_STATE", 100, "sent by smallbms-bus every 100 ms and on change; chargers and loads "
        "stop when AllowedToCharge/AllowedToDischarge is 0 or when this frame is missing for 1 s",
        [
            Sig("AllowedToCharge", 0, 1), Sig("AllowedToDischarge", 1, 1), Sig("PreAlarm", 2, 1),
            Sig("ModeOn", 3, 1), Sig("RemoteOn", 4, 1), Sig("FirmwareUpdate", 5, 1),
            Sig("StateOfCharge", 8, 8, scale=0.5, minimum=0, maximum=127.5, unit="%",
                comment="0.5 %/bit; raw 0xFF = unknown", choices={0xFF: "Unknown"}),
            Sig("Alarms", 16, 16, comment="alarm bit field (docs/behaviour.md)"),
            Sig("Warnings", 32, 16, comment="warning bit field (docs/behaviour.md)"),
            Sig("BatteryCount", 48, 8, minimum=0, maximum=50),
            Sig("AliveCounter", 56, 8, comment="+1 per frame, wraps 255 -> 0"),
        ], per_battery=False),
    Msg(0x100, "BAT_STATUS", 100, "battery status, every 100 ms",
        [
            Sig("Voltage", 0, 16, scale=0.001, minimum=0, maximum=65.535, unit="V",
                comment="battery terminal voltage"),
            Sig("Current", 16, 16, signed=True, scale=0.1, minimum=-3276.8, maximum=3276.7, unit="A",
                comment="positive = charging"),
            Sig("Temperature", 32, 16, signed=True, scale=0.1, unit="degC",
                comment=f"battery temperature; {TEMP_NOTE}", **TEMP_RANGE),
            *[Sig(name, 48 + bit, 1, comment=text) for bit, (name, text) in enumerate(FLAG_BITS)],
            Sig("AliveCounter", 56, 8, comment="+1 per BAT_STATUS, wraps 255 -> 0; a counter that "
                "does not advance means the battery's firmware is stuck"),
        ]),
    Msg(0x140, "BAT_CELLS_1_4", 500, "cell voltages 1-4", _cells(1)),
    Msg(0x180, "BAT_CELLS_5_8", 500, "cell voltages 5-8 (25.6 V and 51.2 V batteries)", _cells(5)),
    Msg(0x1C0, "BAT_CELLS_9_12", 500, "cell voltages 9-12 (51.2 V batteries)", _cells(9)),
    Msg(0x200, "BAT_CELLS_13_16", 500, "cell voltages 13-16 (51.2 V batteries)", _cells(13)),
    Msg(0x240, "BAT_TEMPS", 1000, "cell temperature extremes; bytes 4-7 reserved",
        [
            Sig("CellTempMin", 0, 16, signed=True, scale=0.1, unit="degC",
                comment=f"lowest cell temperature; {TEMP_NOTE}", **TEMP_RANGE),
            Sig("CellTempMax", 16, 16, signed=True, scale=0.1, unit="degC",
                comment=f"highest cell temperature; {TEMP_NOTE}", **TEMP_RANGE),
        ]),
    Msg(0x280, "BAT_INFO", 1000, "battery identity and position in the bank",
        [
            Sig("NominalVoltage", 0, 8, minimum=1, maximum=4,
                comment="number of 12.8 V units: 1 = 12.8 V (4 cells), 2 = 25.6 V (8 cells), "
                "4 = 51.2 V (16 cells); other values are invalid",
                choices={1: "V12_8", 2: "V25_6", 4: "V51_2"}),
            Sig("NominalCapacity", 8, 16, minimum=1, maximum=65535, unit="Ah"),
            Sig("FirmwareMajor", 24, 8), Sig("FirmwareMinor", 32, 8), Sig("FirmwarePatch", 40, 8),
            Sig("StringIndex", 48, 8, minimum=1, maximum=50,
                comment="parallel string this battery belongs to, 1..50"),
            Sig("SeriesIndex", 56, 8, minimum=1, maximum=4,
                comment="position inside its string, 1..4"),
        ]),
    Msg(0x2C0, "BAT_SERIAL", 1000, "serial number, 14 ASCII characters in two multiplexed parts "
        "sent alternately; NUL padded",
        [
            Sig("SerialPart", 0, 8, minimum=0, maximum=1, multiplexer=True,
                choices={0: "Chars1to7", 1: "Chars8to14"}),
            Sig("SerialChars1to7", 8, 56, mux_id=0, comment="characters 1-7, byte 1 = character 1"),
            Sig("SerialChars8to14", 8, 56, mux_id=1, comment="characters 8-14, byte 1 = character 8"),
        ]),
]


def _signal(sig: Sig, receivers: list[str]) -> Signal:
    choices = OrderedDict(sig.choices) if sig.choices else None
    return Signal(
        name=sig.name,
        start=sig.start,
        length=sig.length,
        byte_order="little_endian",
        is_signed=sig.signed,
        conversion=BaseConversion.factory(scale=sig.scale, offset=0, choices=choices),
        minimum=sig.minimum,
        maximum=sig.maximum,
        unit=sig.unit,
        comment=sig.comment,
        receivers=receivers,
        is_multiplexer=sig.multiplexer,
        multiplexer_ids=[sig.mux_id] if sig.mux_id is not None else None,
        multiplexer_signal="SerialPart" if sig.mux_id is not None else None,
    )


def build_database() -> Database:
    nodes = [Node(BMS_NODE, comment="smallbms-bus")]
    nodes += [Node(battery_node(n), comment=f"Lithium NG battery at chain position {n}") for n in NODES]
    messages: list[Message] = []
    for msg in MESSAGES:
        if not msg.per_battery:
            # Every battery adapter listens to BMS_STATE; chargers and loads too (not DBC nodes).
            receivers = [battery_node(n) for n in NODES]
            signals = [_signal(s, receivers) for s in msg.signals]
            messages.append(Message(msg.base, msg.name, 8, signals, senders=[BMS_NODE],
                                    cycle_time=msg.period_ms, comment=msg.comment))
            continue
        for n in NODES:
            signals = [_signal(s, [BMS_NODE]) for s in msg.signals]
            messages.append(Message(msg.base + n, f"{msg.name}_{n:02d}", 8, signals,
                                    senders=[battery_node(n)], cycle_time=msg.period_ms,
                                    comment=f"{msg.comment} (battery {n})"))
    messages.sort(key=lambda m: m.frame_id)
    return Database(messages=messages, nodes=nodes, version="smallbms-bus lithium_ng 1")


def render() -> str:
    header = (
        "// Generated by `python -m smallbms_bus.dbc.generate` from docs/protocol.md. Do not edit.\n"
    )
    # cantools writes CRLF; LF keeps the committed file diffable and byte-identical across platforms.
    return header + build_database().as_dbc_string().replace("\r\n", "\n")


def main(argv: list[str] | None = None) -> int:
    from smallbms_bus.dbc import bms_can  # it builds on this module's Sig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed DBC is out of date")
    parser.add_argument("--output", type=Path, default=DBC_PATH)
    parser.add_argument("--bms-can-output", type=Path, default=bms_can.DBC_PATH,
                        help="the BMS-CAN (inverter) DBC, docs/inverter.md")
    args = parser.parse_args(argv)
    stale = 0
    targets = ((args.output, render(), build_database), (args.bms_can_output, bms_can.render(), bms_can.build_database))
    for output, text, database in targets:
        if args.check:
            current = output.read_bytes().decode() if output.exists() else ""
            if current != text:
                print(f"{output} differs from the generator's output; "
                      "run python -m smallbms_bus.dbc.generate", file=sys.stderr)
                stale = 1
            else:
                print(f"{output} is up to date")
            continue
        output.write_text(text)
        print(f"wrote {output} ({len(database().messages)} messages)")
    return stale

if __name__ == "__main__":
    sys.exit(main())
