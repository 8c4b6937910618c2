"""A virtual Lithium NG battery: LiFePO4 cells, heat, balancer and the battery's own flags.

Theory of operation
-------------------
A battery is ``4 * units`` cells in series (units = number of 12.8 V blocks: 1, 2 or 4). Each cell
holds a charge in Ah and has its own capacity (seeded spread of about +-1 %) and internal
resistance (seeded spread of +-5 % around 1.5 mOhm per 100 Ah, so larger cells have lower
resistance). Its measured voltage is ``OCV(SoC) + I * R``: the open-circuit voltage comes from a
table of a real LFP curve, linearly interpolated, extended steeply beyond 0 % and 100 % so that
an overcharged cell climbs past 3.75 V and an over-discharged one falls below 2.80 V.

The pack is one lumped thermal mass (about 12 kg and 1000 J/(kg K) per 12.8 V / 100 Ah block)
heated by ``I^2 R`` and by the balancer's bleed resistors and exchanging heat with the ambient
air with a time constant of 30 minutes. Each cell sensor reads the pack temperature plus a small
fixed, seeded offset; BAT_TEMPS carries the lowest and highest of them. Resistance rises in the
cold (+3 % per kelvin below 25 degC).

The battery's firmware measures cells in whole millivolts and raises its flags with the
hysteresis of BEHAVIOUR.md (see ``FLAG_THRESHOLDS_MV``). HardwareFault and FirmwareUpdating are not
computed: scenarios inject them, together with the communication faults ``silent`` (no frame at
all) and ``alive_frozen`` (frames keep coming with a constant AliveCounter).

Everything is deterministic: the only randomness is a ``random.Random`` seeded from ``seed``.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from smallbms_bus.protocol import CELLS_PER_FRAME, CELLS_PER_UNIT, SERIAL_PART_CHARS, VALID_UNITS
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps, CellVoltages, SerialFragment

SERIAL_LENGTH = 2 * SERIAL_PART_CHARS

# Open-circuit voltage of one LFP cell: (state of charge as a fraction, volts). The middle rows
# are a typical LFP curve; the first and last rows extend it at 2.5 V per 10 % beyond empty and
# full, so over-charge and over-discharge show up as fast-moving voltages, as they do on real cells.
OCV_TABLE: tuple[tuple[float, float], ...] = (
    (-0.10, 0.00),
    (0.000, 2.50),
    (0.010, 2.80),
    (0.030, 3.00),
    (0.050, 3.10),
    (0.100, 3.20),
    (0.200, 3.25),
    (0.400, 3.29),
    (0.600, 3.31),
    (0.800, 3.33),
    (0.900, 3.34),
    (0.950, 3.36),
    (0.980, 3.42),
    (0.995, 3.55),
    (1.000, 3.60),
    (1.050, 4.85),
)
_OCV_SOCS = tuple(s for s, _ in OCV_TABLE)
_OCV_VOLTS = tuple(v for _, v in OCV_TABLE)
# A cell is destroyed long before it leaves the table; keeping its charge inside keeps numbers finite.
CELL_SOC_MIN = OCV_TABLE[0][0]
CELL_SOC_MAX = OCV_TABLE[-1][0]
# What the battery's AFE can measure (also the DBC's cell range): 0..5 V in 1 mV steps.
CELL_MEASURE_MAX_V = 5.0

CELL_RESISTANCE_PER_100AH = 0.0015  # ohm per cell at 25 degC for a 100 Ah cell
RESISTANCE_SPREAD = 0.05
RESISTANCE_COLD_FACTOR = 0.03  # +3 % per kelvin below 25 degC
CAPACITY_SPREAD = 0.01
INITIAL_SOC_SPREAD = 0.003  # +-0.3 percentage points between cells at start
CELL_TEMP_OFFSET = 0.5  # +-0.5 K between a cell's sensor and the pack temperature

MASS_KG_PER_UNIT_AH = 0.12  # 12 kg for a 12.8 V / 100 Ah block
SPECIFIC_HEAT_J_PER_KG_K = 1000.0
THERMAL_TIME_CONSTANT_S = 1800.0

# Passive balancer: starts when the highest cell is above START and the spread above SPREAD_ON,
# bleeds every cell more than SPREAD_OFF above the lowest one, stops when the spread is down to
# SPREAD_OFF or the highest cell falls below STOP (the hysteresis keeps it from chattering).
BALANCE_START_MV = 3450
BALANCE_STOP_MV = 3400
BALANCE_SPREAD_ON_MV = 10
BALANCE_SPREAD_OFF_MV = 5
BALANCE_CURRENT_A = 1.0


@dataclass(frozen=True, slots=True)
class FlagThresholds:
    """Set/clear levels of the battery's own cell flags, in millivolts (BEHAVIOUR.md ATC-1, ATD-1, PRE-1)."""

    high_set: int = 3750  # any cell >= -> CellHighVoltage
    high_clear: int = 3600  # every cell <= -> cleared
    low_set: int = 2800  # any cell <= -> CellLowVoltage
    low_clear: int = 3200  # every cell >= -> cleared
    pre_alarm_set: int = 3100  # any cell <= -> CellLowPreAlarm
    pre_alarm_clear: int = 3200  # every cell >= -> cleared
    # CellImbalance: the spec gives 0.10 V; this model sets above 100 mV and clears at or below
    # 80 mV so that a spread wobbling around 100 mV does not toggle the flag every frame.
    imbalance_set: int = 100  # spread > -> CellImbalance
    imbalance_clear: int = 80  # spread <= -> cleared


FLAG_THRESHOLDS_MV = FlagThresholds()


def _interpolate(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear y(x) over strictly increasing `xs`, clamped to the table's ends."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def ocv(soc: float) -> float:
    """Open-circuit voltage of one cell at `soc` (a fraction; clamped to the table's ends)."""
    return _interpolate(_OCV_SOCS, _OCV_VOLTS, soc)


def soc_for_ocv(volts: float) -> float:
    """Inverse of `ocv` (the table is strictly increasing in both columns); clamped to the table's ends."""
    return _interpolate(_OCV_VOLTS, _OCV_SOCS, volts)


def cold_factor(temperature: float) -> float:
    """How much a cell's resistance grows in the cold (1.0 at and above 25 degC)."""
    return 1.0 + RESISTANCE_COLD_FACTOR * max(0.0, 25.0 - temperature)


@dataclass(slots=True)
class Cell:
    capacity_ah: float
    charge_ah: float
    resistance_25c: float  # ohm
    temp_offset: float  # K, this cell's sensor against the pack temperature

    @property
    def soc(self) -> float:
        return self.charge_ah / self.capacity_ah

    def resistance(self, temperature: float) -> float:
        return self.resistance_25c * cold_factor(temperature)


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _check_identity(node: int, units: int, capacity_ah: int, serial: str, soc: float) -> None:
    if units not in VALID_UNITS:
        raise ValueError(f"units must be one of {VALID_UNITS} (12.8/25.6/51.2 V), not {units}")
    if not 1 <= node <= 50:
        raise ValueError(f"node must be 1..50, not {node}")
    if len(serial) != SERIAL_LENGTH or not serial.isascii() or not serial.isprintable():
        raise ValueError(f"serial must be {SERIAL_LENGTH} printable ASCII characters, not {serial!r}")
    if not 1 <= capacity_ah <= 65535:
        raise ValueError(f"capacity_ah must be 1..65535, not {capacity_ah}")
    if not 0.0 <= soc <= 100.0:
        raise ValueError(f"soc must be 0..100 %, not {soc}")


def _manufacture_cells(count: int, capacity_ah: int, soc: float, rng: random.Random) -> list[Cell]:
    """Cells as a factory makes them: capacity, charge, resistance and temperature each a little apart (seeded)."""
    nominal_r = CELL_RESISTANCE_PER_100AH * 100.0 / capacity_ah
    cells: list[Cell] = []
    for _ in range(count):
        capacity = capacity_ah * (1.0 + rng.uniform(-CAPACITY_SPREAD, CAPACITY_SPREAD))
        cell_soc = _clamp(soc / 100.0 + rng.uniform(-INITIAL_SOC_SPREAD, INITIAL_SOC_SPREAD), 0.0, 1.0)
        cells.append(Cell(
            capacity_ah=capacity,
            charge_ah=capacity * cell_soc,
            resistance_25c=nominal_r * (1.0 + rng.uniform(-RESISTANCE_SPREAD, RESISTANCE_SPREAD)),
            temp_offset=rng.uniform(-CELL_TEMP_OFFSET, CELL_TEMP_OFFSET),
        ))
    return cells


class VirtualBattery:
    """One Lithium NG battery. Pure: time only moves through `step`."""

    def __init__(
        self,
        node: int,
        units: int,
        capacity_ah: int,
        serial: str,
        string_index: int = 1,
        series_index: int = 1,
        firmware: tuple[int, int, int] = (1, 2, 3),
        soc: float = 50.0,
        temperature: float | None = None,
        ambient: float = 25.0,
        seed: int | str = 0,
    ) -> None:
        _check_identity(node, units, capacity_ah, serial, soc)
        self.node = node
        self.units = units
        self.capacity_ah = int(capacity_ah)
        self.serial = serial
        self.string_index = string_index
        self.series_index = series_index
        self.firmware = firmware
        self.ambient = ambient
        self.temperature = ambient if temperature is None else temperature
        self.current = 0.0  # A through the terminals, positive = charging

        rng = random.Random(f"battery:{seed}:{node}")
        self.cells = _manufacture_cells(CELLS_PER_UNIT * units, capacity_ah, soc, rng)
        self._resistance_25c = sum(c.resistance_25c for c in self.cells)
        self.heat_capacity = SPECIFIC_HEAT_J_PER_KG_K * MASS_KG_PER_UNIT_AH * capacity_ah * units

        # The battery's own flags (computed) and injected faults.
        self.cell_high_voltage = False
        self.cell_low_voltage = False
        self.cell_low_pre_alarm = False
        self.cell_imbalance = False
        self.balancing = False
        self.hardware_fault = False
        self.firmware_updating = False
        self.silent = False
        self.alive_frozen = False
        self.alive_counter = 0
        self._bleeding: tuple[bool, ...] = (False,) * len(self.cells)
        self._measured_mv = self.cell_millivolts()
        self._update_flags()

    # --- electrical state -------------------------------------------------------------------

    @property
    def cell_count(self) -> int:
        return len(self.cells)

    @property
    def soc(self) -> float:
        """Mean state of charge of the cells, in % (may leave 0..100 when abused)."""
        return 100.0 * sum(c.soc for c in self.cells) / len(self.cells)

    @property
    def ocv(self) -> float:
        """Open-circuit voltage of the battery (sum of its cells)."""
        return sum(ocv(c.charge_ah / c.capacity_ah) for c in self.cells)

    @property
    def resistance(self) -> float:
        """Internal resistance of the battery at its present temperature (cells in series)."""
        return self._resistance_25c * cold_factor(self.temperature)

    def cell_voltage_at(self, index: int, current: float) -> float:
        cell = self.cells[index]
        return ocv(cell.soc) + current * cell.resistance(self.temperature)

    def cell_millivolts(self) -> list[int]:
        """What the battery's AFE measures: whole millivolts, within 0..5 V."""
        current = self.current * cold_factor(self.temperature)
        volts = (ocv(c.charge_ah / c.capacity_ah) + current * c.resistance_25c for c in self.cells)
        return [round(1000.0 * min(CELL_MEASURE_MAX_V, max(0.0, v))) for v in volts]

    def cell_voltages(self) -> list[float]:
        return [mv / 1000.0 for mv in self.cell_millivolts()]

    @property
    def voltage(self) -> float:
        """Terminal voltage with the present current flowing."""
        return self.ocv + self.current * self.resistance

    def cell_temperatures(self) -> list[float]:
        return [self.temperature + c.temp_offset for c in self.cells]

    def set_cell_voltage(self, index: int, volts: float) -> None:
        """Put cell `index` (0-based) at the charge that shows `volts` with the present current.

        Like any change of the cells, the battery's flags react at its next `step`.
        """
        cell = self.cells[index]
        cell.charge_ah = cell.capacity_ah * soc_for_ocv(volts - self.current * cell.resistance(self.temperature))
        self._measured_mv = self.cell_millivolts()

    def set_soc(self, soc: float) -> None:
        """Move every cell to `soc` % (keeps the capacity spread, drops the initial SoC spread)."""
        for cell in self.cells:
            cell.charge_ah = cell.capacity_ah * _clamp(soc / 100.0, CELL_SOC_MIN, CELL_SOC_MAX)
        self._measured_mv = self.cell_millivolts()

    def set_ambient(self, celsius: float) -> None:
        self.ambient = celsius

    # --- time -----------------------------------------------------------------------------

    def step(self, current_a: float, dt_s: float) -> None:
        """Advance `dt_s` seconds with `current_a` through the terminals (positive = charging)."""
        if dt_s < 0:
            raise ValueError("dt_s must be >= 0")
        self.current = current_a
        bleed = self._balance_decision()  # on the last measurement, as a balancer IC does
        heat_w = current_a * current_a * self.resistance
        for k, cell in enumerate(self.cells):
            cell_current = current_a
            if bleed[k]:
                cell_current -= BALANCE_CURRENT_A
                heat_w += BALANCE_CURRENT_A * self.cell_voltage_at(k, current_a)
            cell.charge_ah = _clamp(
                cell.charge_ah + cell_current * dt_s / 3600.0,
                cell.capacity_ah * CELL_SOC_MIN,
                cell.capacity_ah * CELL_SOC_MAX,
            )
        # Exact solution of dT/dt = P/C + (T_amb - T)/tau for constant P: stable for any dt.
        settle = self.ambient + heat_w * THERMAL_TIME_CONSTANT_S / self.heat_capacity
        self.temperature = settle + (self.temperature - settle) * math.exp(-dt_s / THERMAL_TIME_CONSTANT_S)
        self._measured_mv = self.cell_millivolts()
        self._update_flags()

    def _balance_decision(self) -> tuple[bool, ...]:
        mv = self._measured_mv
        highest, lowest = max(mv), min(mv)
        spread = highest - lowest
        if self.balancing:
            self.balancing = spread > BALANCE_SPREAD_OFF_MV and highest >= BALANCE_STOP_MV
        else:
            self.balancing = spread > BALANCE_SPREAD_ON_MV and highest > BALANCE_START_MV
        if self.balancing:
            self._bleeding = tuple(v > lowest + BALANCE_SPREAD_OFF_MV for v in mv)
        else:
            self._bleeding = (False,) * len(mv)
        return self._bleeding

    @property
    def bleeding(self) -> tuple[bool, ...]:
        """Which cells the balancer bled during the last step."""
        return self._bleeding

    def _update_flags(self) -> None:
        t = FLAG_THRESHOLDS_MV
        mv = self._measured_mv
        highest, lowest = max(mv), min(mv)
        if highest >= t.high_set:
            self.cell_high_voltage = True
        elif highest <= t.high_clear:
            self.cell_high_voltage = False
        if lowest <= t.low_set:
            self.cell_low_voltage = True
        elif lowest >= t.low_clear:
            self.cell_low_voltage = False
        if lowest <= t.pre_alarm_set:
            self.cell_low_pre_alarm = True
        elif lowest >= t.pre_alarm_clear:
            self.cell_low_pre_alarm = False
        if highest - lowest > t.imbalance_set:
            self.cell_imbalance = True
        elif highest - lowest <= t.imbalance_clear:
            self.cell_imbalance = False

    def active_flags(self) -> tuple[str, ...]:
        """Names (as in the DBC) of the flags this battery reports now."""
        flags = (
            ("CellHighVoltage", self.cell_high_voltage),
            ("CellLowVoltage", self.cell_low_voltage),
            ("CellLowPreAlarm", self.cell_low_pre_alarm),
            ("Balancing", self.balancing),
            ("CellImbalance", self.cell_imbalance),
            ("HardwareFault", self.hardware_fault),
            ("FirmwareUpdating", self.firmware_updating),
        )
        return tuple(name for name, on in flags if on)

    # --- reports --------------------------------------------------------------------------

    def status(self) -> BatteryStatus:
        """BAT_STATUS; each call is one frame produced, so it advances the AliveCounter."""
        report = BatteryStatus(
            node=self.node,
            voltage=round(_clamp(self.voltage, 0.0, 65.535), 3),
            current=round(_clamp(self.current, -3276.8, 3276.7), 1),
            temperature=round(_clamp(self.temperature, -40.0, 125.0), 1),
            cell_high_voltage=self.cell_high_voltage,
            cell_low_voltage=self.cell_low_voltage,
            cell_low_pre_alarm=self.cell_low_pre_alarm,
            balancing=self.balancing,
            cell_imbalance=self.cell_imbalance,
            hardware_fault=self.hardware_fault,
            firmware_updating=self.firmware_updating,
            alive_counter=self.alive_counter,
        )
        if not self.alive_frozen:
            self.alive_counter = (self.alive_counter + 1) & 0xFF
        return report

    def cell_reports(self) -> list[CellVoltages]:
        """One CellVoltages per four cells (1, 2 or 4 reports for 12.8, 25.6, 51.2 V)."""
        volts = self.cell_voltages()
        return [
            CellVoltages(self.node, first + 1, tuple(volts[first:first + CELLS_PER_FRAME]))
            for first in range(0, len(volts), CELLS_PER_FRAME)
        ]

    def temps(self) -> BatteryTemps:
        temps = self.cell_temperatures()
        return BatteryTemps(
            self.node,
            round(_clamp(min(temps), -40.0, 125.0), 1),
            round(_clamp(max(temps), -40.0, 125.0), 1),
        )

    def info(self) -> BatteryInfo:
        return BatteryInfo(self.node, self.units, self.capacity_ah, self.firmware,
                           self.string_index, self.series_index)

    def serial_fragment(self, part: int) -> SerialFragment:
        if part not in (0, 1):
            raise ValueError(f"serial part must be 0 or 1, not {part}")
        start = part * SERIAL_PART_CHARS
        return SerialFragment(self.node, part, self.serial[start:start + SERIAL_PART_CHARS])
