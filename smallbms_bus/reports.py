"""Typed battery reports: what one decoded frame says, free of CAN details.

The link decodes frames into these; the bank and the BMS core consume them. Node numbers are
the battery's position on the daisy chain (1..50). Cell indices are 1-based as in PROTOCOL.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from smallbms_bus.protocol import CELLS_PER_UNIT, unit_voltage


@dataclass(frozen=True, slots=True)
class BatteryStatus:
    """BAT_STATUS: terminal values, the battery's own flags and its AliveCounter."""

    node: int
    voltage: float  # V
    current: float  # A, positive = charging
    temperature: float  # degC
    cell_high_voltage: bool
    cell_low_voltage: bool
    cell_low_pre_alarm: bool
    balancing: bool
    cell_imbalance: bool
    hardware_fault: bool
    firmware_updating: bool
    alive_counter: int


@dataclass(frozen=True, slots=True)
class CellVoltages:
    """One BAT_CELLS_x frame: four consecutive cells starting at `first_cell`."""

    node: int
    first_cell: int  # 1, 5, 9 or 13
    voltages: tuple[float | None, ...]  # None = not present / not measured (0xFFFF)


@dataclass(frozen=True, slots=True)
class BatteryTemps:
    node: int
    cell_temp_min: float  # degC
    cell_temp_max: float  # degC


@dataclass(frozen=True, slots=True)
class BatteryInfo:
    node: int
    nominal_units: int  # number of 12.8 V units: 1, 2 or 4
    nominal_capacity_ah: int
    firmware: tuple[int, int, int]
    string_index: int  # 1..50
    series_index: int  # 1..4

    @property
    def cell_count(self) -> int:
        return CELLS_PER_UNIT * self.nominal_units

    @property
    def nominal_voltage(self) -> float:
        return unit_voltage(self.nominal_units)


@dataclass(frozen=True, slots=True)
class SerialFragment:
    """One half of the multiplexed BAT_SERIAL: part 0 = characters 1-7, part 1 = 8-14."""

    node: int
    part: int
    chars: str


@dataclass(frozen=True, slots=True)
class BmsState:
    """BMS_STATE as seen on the bus (sent by smallbms-bus; read by chargers, loads, the simulator)."""

    allowed_to_charge: bool
    allowed_to_discharge: bool
    pre_alarm: bool
    mode_on: bool
    remote_on: bool
    firmware_update: bool
    state_of_charge: float | None  # %, None = unknown
    alarms: int
    warnings: int
    battery_count: int
    alive_counter: int


BatteryReport = BatteryStatus | CellVoltages | BatteryTemps | BatteryInfo | SerialFragment
Report = BatteryReport | BmsState
