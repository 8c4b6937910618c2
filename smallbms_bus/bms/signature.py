"""Which reports can change a decision: `BmsCore.on_report` asks for an evaluation at once on those.

The thresholds are the ones the core's latches use (bms/rules.py)."""

from __future__ import annotations

from typing import Any

from smallbms_bus.bms.rules import (
    CELL_HIGH_SET_V,
    CELL_LOW_SET_V,
    CHARGE_TEMP_HIGH_SET_C,
    CHARGE_TEMP_LOW_SET_C,
    DISCHARGE_TEMP_MAX_C,
    DISCHARGE_TEMP_MIN_C,
)
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, Report, SerialFragment


def _temperature_zone(celsius: float) -> tuple[bool, bool, bool, bool]:
    return (celsius < CHARGE_TEMP_LOW_SET_C, celsius > CHARGE_TEMP_HIGH_SET_C, celsius < DISCHARGE_TEMP_MIN_C,
            celsius > DISCHARGE_TEMP_MAX_C)


# Called for every frame (hundreds a second): plain attribute reads, no generators.
def _status_signature(r: BatteryStatus, _: float) -> tuple[tuple, tuple]:
    return ("status", r.node), (r.cell_high_voltage, r.cell_low_voltage, r.cell_low_pre_alarm, r.hardware_fault,
                                r.firmware_updating, r.cell_imbalance, _temperature_zone(r.temperature))


def _cells_signature(r: CellVoltages, pre_alarm_level: float) -> tuple[tuple, tuple]:
    cells = [v for v in r.voltages if v is not None]
    if not cells:
        return ("cells", r.node, r.first_cell), ()
    low, high = min(cells), max(cells)
    return ("cells", r.node, r.first_cell), (high >= CELL_HIGH_SET_V, low <= CELL_LOW_SET_V, low <= pre_alarm_level)


def _temps_signature(r: BatteryTemps, _: float) -> tuple[tuple, tuple]:
    return ("temps", r.node), (_temperature_zone(r.cell_temp_min), _temperature_zone(r.cell_temp_max))


def _identity_signature(r: BatteryInfo | SerialFragment, _: float) -> tuple[tuple, tuple]:
    return ("identity", r.node, type(r).__name__, getattr(r, "part", 0)), (r,)


_SIGNATURES: dict[type, Any] = {BatteryStatus: _status_signature, CellVoltages: _cells_signature,
                                BatteryTemps: _temps_signature, BatteryInfo: _identity_signature,
                                SerialFragment: _identity_signature}


def protective_signature(report: Report, pre_alarm_level: float) -> tuple[tuple | None, tuple]:
    """What of a report can change outputs, alarms or the bank: the thresholds are the ones `evaluate` uses
    (flags, cell voltages at CELL_HIGH_SET_V / the pre-alarm level setting / CELL_LOW_SET_V, the temperature
    limits, identity)."""
    signature = _SIGNATURES.get(type(report))
    return (None, ()) if signature is None else signature(report, pre_alarm_level)
