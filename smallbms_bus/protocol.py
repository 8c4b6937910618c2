"""Facts of the wire protocol that every layer shares, each stated once.

Frame layouts, scales and ranges live in the DBC (dbc/lithium_ng.dbc) and only there; so do the frame
periods (its GenMsgCycleTime attributes, read by `frame_period`). What the DBC cannot say lives here:
what a 12.8 V unit is, how the cells group into frames, the bank limits of the smallBMS NG manual, and
which report field each battery flag signal feeds (the codec, the bank, the metrics and the Modbus
flag words all iterate `BATTERY_FLAGS`, so a flag's name and bit order cannot drift between them).

This module imports nothing heavy: the bank and the sim read the periods without loading cantools.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path

# 12.8 V LiFePO4 units: a battery is 1, 2 or 4 of them, each 4 cells in series (manual 2.1, PROTOCOL.md).
UNIT_VOLTAGE = 12.8
PER_UNIT = f"per {UNIT_VOLTAGE:g} V unit"  # how a per-unit setting's text names its unit
CELLS_PER_UNIT = 4
VALID_UNITS = (1, 2, 4)
MAX_CELLS = CELLS_PER_UNIT * max(VALID_UNITS)  # 16 cells, in four BAT_CELLS frames
CELLS_PER_FRAME = 4
# Bank limits (manual 2.1): batteries per bank by nominal voltage in units, and at most 4 x 12.8 V in series.
MAX_BATTERIES_BY_UNITS = {1: 50, 2: 50, 4: 25}
MAX_SERIES_UNITS = 4
SERIAL_PART_CHARS = 7  # BAT_SERIAL carries the 14-character serial number in two multiplexed halves

# BAT_STATUS flags as (report field, DBC signal), in the order of the Modbus flag word's bits.
BATTERY_FLAGS = (
    ("cell_high_voltage", "CellHighVoltage"),
    ("cell_low_voltage", "CellLowVoltage"),
    ("cell_low_pre_alarm", "CellLowPreAlarm"),
    ("balancing", "Balancing"),
    ("cell_imbalance", "CellImbalance"),
    ("hardware_fault", "HardwareFault"),
    ("firmware_updating", "FirmwareUpdating"),
)
FLAG_FIELDS = tuple(field for field, _ in BATTERY_FLAGS)
BMS_STATE_FLAGS = (
    ("allowed_to_charge", "AllowedToCharge"),
    ("allowed_to_discharge", "AllowedToDischarge"),
    ("pre_alarm", "PreAlarm"),
    ("mode_on", "ModeOn"),
    ("remote_on", "RemoteOn"),
    ("firmware_update", "FirmwareUpdate"),
)


def unit_voltage(units: int) -> float:
    """Nominal voltage of `units` 12.8 V units (25.6 for 2, not 25.600000000000001)."""
    return round(UNIT_VOLTAGE * units, 1)


def default_dbc_path() -> Path:
    """The DBC shipped inside the package (works from a non-editable install)."""
    return Path(str(importlib.resources.files("smallbms_bus.dbc").joinpath("lithium_ng.dbc")))


def message_kind(name: str) -> tuple[str, int | None]:
    """`BAT_STATUS_07` -> ("BAT_STATUS", 7); a name without a node suffix (BMS_STATE) -> (name, None)."""
    kind, _, suffix = name.rpartition("_")
    if kind and suffix.isdigit():
        return kind, int(suffix)
    return name, None


_MESSAGE = re.compile(r"^BO_ (\d+) (\w+):", re.MULTILINE)
_CYCLE = re.compile(r'^BA_ "GenMsgCycleTime" BO_ (\d+) (\d+);', re.MULTILINE)


@functools.cache
def frame_periods() -> dict[str, float]:
    """Message kind -> period in seconds, from the DBC's GenMsgCycleTime.

    Read from the DBC text with two patterns rather than through cantools: parsing all 400 messages takes
    about a second on a Raspberry Pi, and the bank needs only these numbers (tests/test_seams.py checks
    them against cantools' reading). Every node of a kind must have the same period.
    """
    text = default_dbc_path().read_text(encoding="ascii")
    names = {int(frame_id): name for frame_id, name in _MESSAGE.findall(text)}
    periods: dict[str, float] = {}
    for frame_id, ms in _CYCLE.findall(text):
        kind, _ = message_kind(names[int(frame_id)])
        seconds = int(ms) / 1000
        if periods.setdefault(kind, seconds) != seconds:
            raise ValueError(f"the DBC gives {kind} two periods: {periods[kind]} s and {seconds} s")
    return periods


def frame_period(kind: str) -> float:
    """The period of one message kind (e.g. "BAT_TEMPS") in seconds."""
    return frame_periods()[kind]
