"""Charge control for inverters and chargers (CHG-1..7 in docs/behaviour.md): the values of BMS-CAN 0x351.

This module is the contract between the core (which computes the limits), the BMS-CAN link (which sends
them), the register maps (GX 305-308, SunSpec 802, native registers) and metrics, and it holds the rules.
Pure: the core passes the clock and everything else in (`ChargeInputs`); `ChargeControl` keeps the little
state the rules need (charge state, absorption timer, the last limits for the smooth rise).

Theory of operation
-------------------
Each evaluation of the core calls `ChargeControl.step` once, after ATC and ATD are decided:

1. Size (CHG-6). Before the core has first started (the bank learned and every battery heard: until then a
   partly heard bank may look smaller than it is), or without the 12.8 V units in series, the strings and a
   single battery model, there is nothing to compute from: `NO_CHARGE_LIMITS` (every value 0, known = False;
   the charge state as persisted).
2. Charge state (CHG-1). The absorption timer counts time with the bank voltage at or above the absorption
   voltage minus 0.05 V per unit, or with CVL held down by the cell-voltage limiting (project decision: the
   highest cell is then at its limit, the bank is as full as it may be charged, and an imbalanced bank could
   otherwise never reach the window nor float), from trusted data only; it restarts from 0 once the voltage
   is below the window and every cell below 3.45 V (no cell near full: the bank is not being held charged)
   and pauses otherwise (untrusted data; a cell the limiting just released is still near full).
   Project decision: float is entered once the timer has run out *and* none of the re-bulk conditions holds
   (SoC unknown, SoC <= re-bulk SoC, no full charge for 30 days); any of them in float means absorption again
   with the timer at 0. So the state never flips back and forth each tick.
3. CVL (CHG-2, CHG-5). The state's voltage; while the cell-voltage limiting is latched (highest cell >=
   3.55 V, released once every cell <= 3.50 V) at most bank voltage minus 0 .. 0.1 V per unit, growing
   linearly with the highest cell from 3.50 to 3.55 V, so the charge tapers and the cell settles below
   3.55 V; with ATC false at most the bank voltage (DVL when that is unknown); never below DVL.
4. CCL and DCL targets (CHG-3, CHG-4): rating x factors, 0 without ATC / ATD (and DCL 0 at pre-alarm when
   the setting is on). An unknown temperature or cell voltage gives factor 0: nothing unproven is allowed.
5. Smooth rise (CHG-7): towards a higher target by at most 10 % of the rating per second; down at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any

from smallbms_bus.bms.monitor import CONTINUOUS_C_RATE  # manual 4.1: every model carries 1C, charge and discharge
from smallbms_bus.bms.settings import Settings

CELLS_PER_UNIT = 4  # a 12.8 V LiFePO4 unit is 4 cells in series
ABSORPTION_WINDOW_V_PER_UNIT = 0.05  # CHG-1: "within 0.05 V per unit" of the absorption voltage
MAX_TIMER_STEP_S = 10.0  # a longer gap between evaluations is not counted towards absorption (no data seen)
CELL_LIMIT_SET_V = 3.55  # CHG-2: highest cell >= -> CVL is lowered
CELL_LIMIT_CLEAR_V = 3.50  # ... until every cell is <=
CELL_LIMIT_MAX_DROP_V_PER_UNIT = 0.1  # CHG-2: CVL never below bank voltage minus this
CHARGE_TEMP_ZERO_BELOW_C, CHARGE_TEMP_FULL_FROM_C = 5.0, 10.0  # CHG-3 temperature factor, cold side
CHARGE_TEMP_FULL_UNTIL_C, CHARGE_TEMP_ZERO_AT_C = 45.0, 50.0  # ... hot side
CCL_CELL_FULL_V, CCL_CELL_MIN_V, CCL_CELL_MIN_FACTOR = 3.45, 3.55, 0.05  # CHG-3 cell factor
DCL_CELL_FULL_V, DCL_CELL_MIN_V, DCL_CELL_MIN_FACTOR = 3.15, 2.90, 0.2  # CHG-4 low-cell factor
DVL_V_PER_CELL = 2.80  # CHG-5
RISE_PER_S = 0.10  # CHG-7: of the rating, per second


class ChargeState(IntEnum):
    """CHG-1. Wire codes (registers, metrics) are the values: keep them stable."""

    ABSORPTION = 0
    FLOAT = 1


@dataclass(frozen=True, slots=True)
class ChargeLimits:
    """What the BMS allows a charger/inverter right now. Volts and amperes, bank level; never negative."""

    cvl: float  # charge voltage limit, V (CHG-1, CHG-2, CHG-5)
    ccl: float  # charge current limit, A (CHG-3, CHG-6, CHG-7)
    dcl: float  # discharge current limit, A, positive (CHG-4, CHG-6, CHG-7)
    dvl: float  # discharge voltage limit, V (CHG-5): 2.80 V x cells in series
    state: ChargeState  # CHG-1
    known: bool  # False until the bank is known: nothing to compute from, every limit is 0 (CHG-6)
    cell_limiting: bool = False  # CHG-2: CVL is held down because a cell reached 3.55 V
    rating: float = 0.0  # A: strings x the model's continuous rating, what CCL and DCL are at most (CHG-3, CHG-4)


# CHG-6: the BMS cannot prove the bank is fine and does not even know its size: allow nothing.
NO_CHARGE_LIMITS = ChargeLimits(cvl=0.0, ccl=0.0, dcl=0.0, dvl=0.0, state=ChargeState.ABSORPTION, known=False)


@dataclass(slots=True)
class ChargeInputs:
    """What the core knows at one evaluation (built for every evaluation: not frozen, which is cheaper).
    Cell values are the worst of the protective memory. The core passes them by position: keep the order."""

    now: float  # monotonic s
    series_units: int | None  # 12.8 V units in series per string
    strings: int  # parallel strings
    capacity_ah: int | None  # per battery (None: mixed or unknown)
    voltage: float | None  # bank voltage
    max_cell: float | None
    min_cell: float | None
    min_temperature: float | None  # lowest cell temperature, °C
    max_temperature: float | None  # highest cell temperature, °C
    soc: float | None
    atc: bool
    atd: bool
    pre_alarm: bool
    trusted: bool  # started, every battery fresh, a consistent bank: the voltage may run the absorption timer
    not_fully_charged: bool  # no full charge for 30 days (the core's warning NOT_FULLY_CHARGED_30_DAYS)
    started: bool = True  # the core has started once (OUT-4): before, even the bank's size is not proven


def ramp(value: float, x0: float, y0: float, x1: float, y1: float) -> float:
    """Linear from (x0, y0) to (x1, y1), held at the end values outside."""
    if x0 > x1:
        x0, y0, x1, y1 = x1, y1, x0, y0
    if value <= x0:
        return y0
    if value >= x1:
        return y1
    return y0 + (y1 - y0) * (value - x0) / (x1 - x0)


def temperature_factor(min_c: float | None, max_c: float | None) -> float:
    """CHG-3: 0 below 5 °C, to 1 at 10 °C; 1 up to 45 °C, to 0 at 50 °C. Unknown: 0."""
    if min_c is None or max_c is None:
        return 0.0
    cold = ramp(min_c, CHARGE_TEMP_ZERO_BELOW_C, 0.0, CHARGE_TEMP_FULL_FROM_C, 1.0)
    hot = ramp(max_c, CHARGE_TEMP_FULL_UNTIL_C, 1.0, CHARGE_TEMP_ZERO_AT_C, 0.0)
    return min(cold, hot)


def charge_cell_factor(max_cell: float | None) -> float:
    """CHG-3: 1 at or below 3.45 V, falling linearly to 0.05 at 3.55 V (and above). Unknown: 0."""
    if max_cell is None:
        return 0.0
    return ramp(max_cell, CCL_CELL_FULL_V, 1.0, CCL_CELL_MIN_V, CCL_CELL_MIN_FACTOR)


def discharge_cell_factor(min_cell: float | None) -> float:
    """CHG-4: 1 at or above 3.15 V, falling linearly to 0.2 at 2.90 V (and below). Unknown: 0."""
    if min_cell is None:
        return 0.0
    return ramp(min_cell, DCL_CELL_MIN_V, DCL_CELL_MIN_FACTOR, DCL_CELL_FULL_V, 1.0)


def dvl_for(series_units: int) -> float:
    """CHG-5: 2.80 V x cells in series."""
    return round(DVL_V_PER_CELL * CELLS_PER_UNIT * series_units, 2)


class ChargeControl:
    """The state of CHG-1 and CHG-7 between evaluations; `step` applies every CHG rule once."""

    def __init__(self) -> None:
        self.state = ChargeState.ABSORPTION
        self.absorption_s = 0.0  # CHG-1 timer: time at the absorption voltage (persisted)
        self.cell_limiting = False  # CHG-2 latch
        self._ccl = 0.0  # CHG-7: the last limits sent and when (not persisted: a restart rises from 0)
        self._dcl = 0.0
        self._last_now: float | None = None

    def step(self, x: ChargeInputs, settings: Settings) -> ChargeLimits:
        dt = 0.0 if self._last_now is None else max(0.0, x.now - self._last_now)
        self._last_now = x.now
        units, capacity = x.series_units, x.capacity_ah
        if not x.started or not units or not capacity or x.strings <= 0:
            self._ccl = self._dcl = 0.0
            return NO_CHARGE_LIMITS if self.state is ChargeState.ABSORPTION else replace(NO_CHARGE_LIMITS,
                                                                                         state=self.state)
        self._cell_latch(x.max_cell)
        self._charge_state(x, settings, units, dt)
        dvl = dvl_for(units)
        cvl = self._cvl(x, settings, units, dvl)
        rating = float(x.strings * capacity * CONTINUOUS_C_RATE)
        ccl_target = rating * temperature_factor(x.min_temperature, x.max_temperature) * \
            charge_cell_factor(x.max_cell) if x.atc else 0.0
        dcl_off = not x.atd or (x.pre_alarm and settings.dcl_zero_at_pre_alarm >= 1.0)
        dcl_target = 0.0 if dcl_off else rating * discharge_cell_factor(x.min_cell)
        rise = RISE_PER_S * rating * dt
        self._ccl = min(ccl_target, self._ccl + rise)
        self._dcl = min(dcl_target, self._dcl + rise)
        return ChargeLimits(cvl=cvl, ccl=round(self._ccl, 1), dcl=round(self._dcl, 1), dvl=dvl, state=self.state,
                            known=True, cell_limiting=self.cell_limiting, rating=rating)

    def _charge_state(self, x: ChargeInputs, settings: Settings, units: int, dt: float) -> None:
        """CHG-1 (see the module's theory of operation)."""
        rebulk = x.soc is None or x.soc <= settings.rebulk_soc_pct or x.not_fully_charged
        if self.state is ChargeState.FLOAT:
            if rebulk:
                self.state, self.absorption_s = ChargeState.ABSORPTION, 0.0
            return
        if x.trusted and x.voltage is not None:
            window = (settings.absorption_voltage_per_unit - ABSORPTION_WINDOW_V_PER_UNIT) * units
            if x.voltage >= window - 1e-9 or self.cell_limiting:
                self.absorption_s += min(dt, MAX_TIMER_STEP_S)
            elif x.max_cell is None or x.max_cell < CCL_CELL_FULL_V:  # no cell near full: charged no more
                self.absorption_s = 0.0
        if self.absorption_s >= settings.absorption_time_min * 60.0 and not rebulk:
            self.state, self.absorption_s = ChargeState.FLOAT, 0.0

    def _cell_latch(self, max_cell: float | None) -> None:
        """CHG-2: set at 3.55 V, released once every cell is at or below 3.50 V."""
        if max_cell is not None and max_cell >= CELL_LIMIT_SET_V - 1e-9:
            self.cell_limiting = True
        elif max_cell is not None and max_cell <= CELL_LIMIT_CLEAR_V + 1e-9:
            self.cell_limiting = False

    def _cvl(self, x: ChargeInputs, settings: Settings, units: int, dvl: float) -> float:
        """CHG-1's voltage, lowered by CHG-2 and CHG-5; never below DVL."""
        per_unit = settings.float_voltage_per_unit if self.state is ChargeState.FLOAT \
            else settings.absorption_voltage_per_unit
        cvl = per_unit * units
        if self.cell_limiting and x.voltage is not None and x.max_cell is not None:
            excess = ramp(x.max_cell, CELL_LIMIT_CLEAR_V, 0.0, CELL_LIMIT_SET_V, 1.0)
            cvl = min(cvl, x.voltage - excess * CELL_LIMIT_MAX_DROP_V_PER_UNIT * units)
        if not x.atc:
            cvl = min(cvl, x.voltage if x.voltage is not None else dvl)
        return round(max(cvl, dvl), 2)

    # -- persistence: the charge state and its timer survive a restart (CHG-1) --------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.name.lower(), "absorption_s": self.absorption_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ChargeControl:
        control = cls()
        if data:
            control.state = ChargeState[str(data["state"]).upper()]
            control.absorption_s = max(0.0, float(data["absorption_s"]))
        return control
