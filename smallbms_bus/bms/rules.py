"""The core's rules as tables: thresholds, the nine latches, the alarms and what each one blocks.

Every threshold of BEHAVIOUR.md the core applies is defined here once; metrics, Modbus sources and the
docs read it from here. `BmsCore.evaluate` (core.py) walks the tables in its seven steps: a rule is found
by its id in one row, not in a branch of a long function. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from operator import or_
from typing import Any

from smallbms_bus.bank import BankView, BatteryView, CellRef
from smallbms_bus.bms.alarms import BmsAlarm, BmsWarning
from smallbms_bus.bms.settings import Settings

# -- thresholds (BEHAVIOUR.md) -------------------------------------------------------------------
CELL_HIGH_SET_V = 3.75  # ATC-1: any cell >= -> CELL_HIGH_VOLTAGE
CELL_HIGH_CLEAR_V = 3.60  # ... clears when every cell <=
CELL_LOW_SET_V = 2.80  # ATD-1: any cell <= -> undervoltage
CELL_LOW_CLEAR_V = 3.20  # ... clears when every cell >=
# PRE-1: any cell <= the pre-alarm level (a setting, default 3.10 V: settings.py) -> pre-alarm
PRE_ALARM_CLEAR_V = 3.20  # ... clears when every cell >=
CHARGE_TEMP_LOW_SET_C = 5.0  # ATC-2: lowest cell temperature < -> LOW_TEMPERATURE_CHARGE
CHARGE_TEMP_LOW_CLEAR_C = 6.0  # ... clears at >=
CHARGE_TEMP_HIGH_SET_C = 50.0  # ATC-3: highest cell temperature > -> HIGH_TEMPERATURE_CHARGE
CHARGE_TEMP_HIGH_CLEAR_C = 48.0  # ... clears at <=
DISCHARGE_TEMP_MIN_C = -20.0  # warning DISCHARGE_TEMPERATURE outside -20..50 degC
DISCHARGE_TEMP_MAX_C = 50.0
DISCHARGE_TEMP_HYSTERESIS_C = 1.0  # project decision: clears 1 K inside the range
SOC_CLEAR_MARGIN_PCT = 5.0  # ATD-2 clears at floor + 5 pp; project decision: PRE-2 likewise (capped at 100)
CELL_SPREAD_IMBALANCED_V = 0.10  # CELL_IMBALANCE warning and BAL-1: a battery's cell spread above this
PRE_ALARM_LEAD_S = 30.0  # PRE-3
COMMS_RECOVERY_S = 2.0  # COM-2
FIRMWARE_UPDATE_TIMEOUT_S = 120.0  # FW-2
NOT_FULLY_CHARGED_S = 30 * 24 * 3600.0  # warning NOT_FULLY_CHARGED_30_DAYS


@dataclass(slots=True)
class Facts:
    """What one evaluation knows, filled step by step (core.py); the tables' conditions read it. Built once per
    evaluation from the bank view: plain fields, so the tables' conditions cost an attribute read each."""

    view: BankView
    settings: Settings
    min_ref: CellRef | None  # the protective memory's extremes (bank.py): the latches decide on these
    max_ref: CellRef | None
    tmin: float | None
    tmax: float | None
    flags: dict[str, tuple[int, ...]] = field(init=False)
    fresh: list[BatteryView] = field(init=False)
    serials: list[str] = field(init=False)
    min_cell: float | None = field(init=False)
    max_cell: float | None = field(init=False)
    high_by_value: bool = field(init=False)  # ATC-1's set level crossed (not the battery's flag)
    low_by_value: bool = field(init=False)  # ATD-1's
    pre_by_value: bool = field(init=False)  # PRE-1's (the pre-alarm level setting)
    started: bool = False
    soc: float | None = None  # step 4
    comms_bad: bool = False  # step 3: link down or a battery stale (not while waiting for batteries)
    comms_recovered: bool = False  # step 3: fresh for COMMS_RECOVERY_S
    comms_text: str = ""
    updating: bool = False  # ATC-4 / FW-1: a firmware update in progress
    alarms: BmsAlarm = field(default_factory=lambda: BmsAlarm(0))  # raised so far
    warnings: BmsWarning = field(default_factory=lambda: BmsWarning(0))
    reasons: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        view = self.view
        self.flags = view.flags
        self.fresh = [b for b in view.batteries if b.fresh]
        self.serials = [b.serial for b in view.batteries if b.serial]
        low = self.min_cell = None if self.min_ref is None else self.min_ref.voltage
        high = self.max_cell = None if self.max_ref is None else self.max_ref.voltage
        self.high_by_value = high is not None and high >= CELL_HIGH_SET_V
        self.low_by_value = low is not None and low <= CELL_LOW_SET_V
        self.pre_by_value = low is not None and low <= self.settings.pre_alarm_level_per_cell


Condition = Callable[[Facts], bool]


@dataclass(frozen=True, slots=True)
class Latch:
    """A condition with hysteresis: set by a battery flag (`flag`, BAT_STATUS, seen in the last 2 s) or by
    `set`; cleared only when no battery reports the flag, `clear` holds and (`holds_on_conflict`) no node has
    two senders (COM-6). While latched it raises `bit` (None: a later step decides, see the comment) and
    explains itself as `reasons[reason_key] = reason(facts)`."""

    name: str  # key of BmsCore.latched and of the snapshot's "latched"
    rule: str  # BEHAVIOUR.md id(s)
    step: int  # the evaluate step that decides it (core.py): 2 cells/temperatures, 3 faults, 4 SoC
    flag: str | None
    set: Condition
    clear: Condition
    bit: BmsAlarm | BmsWarning | None
    reason_key: str | None
    reason: Callable[[Facts], str] | None
    holds_on_conflict: bool = True


def fmt(value: float | None, unit: str) -> str:
    return "unknown" if value is None else f"{value:.1f} {unit}"


def cell_reason(flagged: tuple[int, ...], flag: str, cell: Any, extreme: str, by_value: bool, set_rule: str,
                clear_rule: str) -> str:
    """Says what fired: the battery's own flag (its own threshold, so the cell value is only shown, not
    compared), this BMS's cell rule with the value that crossed it, or neither any more (the latch holds
    until its clearing rule is met)."""
    parts = [f"battery {', '.join(map(str, flagged))} reports {flag} (its own threshold)"] if flagged else []
    if cell is not None:
        parts.append(f"cell {cell.cell} of battery {cell.node} at {cell.voltage:.3f} V ({set_rule})" if by_value
                     else f"{extreme} cell {cell.voltage:.3f} V (battery {cell.node} cell {cell.cell})")
    if not flagged and not by_value:
        parts.insert(0, f"held until {clear_rule} and no battery reports {flag}")
    return "; ".join(parts)


def undervoltage_reason(f: Facts) -> str:
    """CELL_LOW_VOLTAGE's reason once the loads go off (PRE-3: the latch alone only raises the pre-alarm)."""
    return cell_reason(f.flags["cell_low_voltage"], "CellLowVoltage", f.min_ref, "lowest", f.low_by_value,
                       f"<= {CELL_LOW_SET_V:.2f} V", f"every cell is >= {CELL_LOW_CLEAR_V:.2f} V") + \
        f"; loads off {PRE_ALARM_LEAD_S:g} s after the pre-alarm"


def _discharge_temp_clear(f: Facts) -> bool:
    return (f.tmin is not None and f.tmax is not None
            and f.tmin >= DISCHARGE_TEMP_MIN_C + DISCHARGE_TEMP_HYSTERESIS_C
            and f.tmax <= DISCHARGE_TEMP_MAX_C - DISCHARGE_TEMP_HYSTERESIS_C)


def _soc_at_or_below(f: Facts, level: float) -> bool:
    return f.soc is not None and f.soc <= level


def _soc_back_above(f: Facts, level: float) -> bool:
    return f.soc is None or f.soc >= min(level + SOC_CLEAR_MARGIN_PCT, 100.0)


# The latch table; `step` says when evaluate decides each row. The names are the snapshot's "latched" keys.
LATCH_TABLE: tuple[Latch, ...] = (
    Latch(  # ATC-1
        "cell_high", "ATC-1", 2, "cell_high_voltage",
        set=lambda f: f.high_by_value,
        clear=lambda f: f.max_cell is not None and f.max_cell <= CELL_HIGH_CLEAR_V,
        bit=BmsAlarm.CELL_HIGH_VOLTAGE, reason_key="CELL_HIGH_VOLTAGE",
        reason=lambda f: cell_reason(f.flags["cell_high_voltage"], "CellHighVoltage", f.max_ref, "highest",
                                     f.high_by_value, f">= {CELL_HIGH_SET_V:.2f} V",
                                     f"every cell is <= {CELL_HIGH_CLEAR_V:.2f} V")),
    Latch(  # ATD-1, PRE-3: raises CELL_LOW_VOLTAGE only at the end of the pre-alarm lead (step 5)
        "undervoltage", "ATD-1", 2, "cell_low_voltage",
        set=lambda f: f.low_by_value,
        clear=lambda f: f.min_cell is not None and f.min_cell >= CELL_LOW_CLEAR_V,
        bit=None, reason_key=None, reason=None),
    Latch(  # PRE-1: feeds the pre-alarm (step 5), which raises warning PRE_ALARM
        "cell_pre_alarm", "PRE-1", 2, "cell_low_pre_alarm",
        set=lambda f: f.pre_by_value,
        clear=lambda f: f.min_cell is not None and f.min_cell >= PRE_ALARM_CLEAR_V,
        bit=None, reason_key="PRE_ALARM",
        reason=lambda f: cell_reason(f.flags["cell_low_pre_alarm"], "CellLowPreAlarm", f.min_ref, "lowest",
                                     f.pre_by_value,
                                     f"<= the pre-alarm level {f.settings.pre_alarm_level_per_cell:.3f} V",
                                     f"every cell is >= {PRE_ALARM_CLEAR_V:.2f} V")),
    Latch(  # ATC-2
        "temp_low", "ATC-2", 2, None,
        set=lambda f: f.tmin is not None and f.tmin < CHARGE_TEMP_LOW_SET_C,
        clear=lambda f: f.tmin is not None and f.tmin >= CHARGE_TEMP_LOW_CLEAR_C,
        bit=BmsAlarm.LOW_TEMPERATURE_CHARGE, reason_key="LOW_TEMPERATURE_CHARGE",
        reason=lambda f: (f"lowest cell temperature {fmt(f.tmin, '°C')} (charging needs >= "
                          f"{CHARGE_TEMP_LOW_SET_C} °C, resumes at {CHARGE_TEMP_LOW_CLEAR_C} °C)")),
    Latch(  # ATC-3
        "temp_high", "ATC-3", 2, None,
        set=lambda f: f.tmax is not None and f.tmax > CHARGE_TEMP_HIGH_SET_C,
        clear=lambda f: f.tmax is not None and f.tmax <= CHARGE_TEMP_HIGH_CLEAR_C,
        bit=BmsAlarm.HIGH_TEMPERATURE_CHARGE, reason_key="HIGH_TEMPERATURE_CHARGE",
        reason=lambda f: (f"highest cell temperature {fmt(f.tmax, '°C')} (charging allowed <= "
                          f"{CHARGE_TEMP_HIGH_SET_C} °C, resumes at {CHARGE_TEMP_HIGH_CLEAR_C} °C)")),
    Latch(  # ATD-2: floor 0 disables it
        "low_soc", "ATD-2", 4, None,
        set=lambda f: f.settings.discharge_floor_pct > 0 and _soc_at_or_below(f, f.settings.discharge_floor_pct),
        clear=lambda f: f.settings.discharge_floor_pct == 0 or _soc_back_above(f, f.settings.discharge_floor_pct),
        bit=BmsAlarm.LOW_SOC, reason_key="LOW_SOC",
        reason=lambda f: (f"SoC {fmt(f.soc, '%')} at or below the discharge floor "
                          f"{f.settings.discharge_floor_pct:g} %")),
    Latch(  # PRE-2 (project decision: clears at level + 5 pp like ATD-2)
        "low_soc_warning", "PRE-2", 4, None,
        set=lambda f: _soc_at_or_below(f, f.settings.low_soc_warning_pct),
        clear=lambda f: _soc_back_above(f, f.settings.low_soc_warning_pct),
        bit=BmsWarning.LOW_SOC_WARNING, reason_key="LOW_SOC_WARNING",
        reason=lambda f: (f"SoC {fmt(f.soc, '%')} at or below the warning level "
                          f"{f.settings.low_soc_warning_pct:g} %")),
    Latch(  # warning DISCHARGE_TEMPERATURE (project decision: clears 1 K inside the range)
        "discharge_temp", "DISCHARGE_TEMPERATURE", 2, None,
        set=lambda f: ((f.tmin is not None and f.tmin < DISCHARGE_TEMP_MIN_C)
                       or (f.tmax is not None and f.tmax > DISCHARGE_TEMP_MAX_C)),
        clear=_discharge_temp_clear,
        bit=BmsWarning.DISCHARGE_TEMPERATURE, reason_key="DISCHARGE_TEMPERATURE",
        reason=lambda f: (f"cell temperatures {fmt(f.tmin, '°C')} .. {fmt(f.tmax, '°C')} outside "
                          f"{DISCHARGE_TEMP_MIN_C:g} .. {DISCHARGE_TEMP_MAX_C:g} °C")),
    Latch(  # COM-2, COM-4: recovers after COMMS_RECOVERY_S of good data (the timer is step 3's), even while a
        # node has two senders: COM-6 holds ATC/ATD through BANK_CONFIGURATION instead
        "comms_lost", "COM-2", 3, None,
        set=lambda f: f.comms_bad, clear=lambda f: f.comms_recovered,
        bit=BmsAlarm.BATTERY_COMMS_LOST, reason_key="BATTERY_COMMS_LOST", reason=lambda f: f.comms_text,
        holds_on_conflict=False),
)
LATCHES = tuple(latch.name for latch in LATCH_TABLE)
LATCHES_OF_STEP: dict[int, tuple[Latch, ...]] = {
    step: tuple(latch for latch in LATCH_TABLE if latch.step == step) for step in (2, 3, 4)}

# PRE-1..3, COM-2: what raises the pre-alarm (step 5), as its reason names it, by latch.
PRE_ALARM_CAUSES: tuple[tuple[str, str], ...] = (
    ("cell pre-alarm", "cell_pre_alarm"),  # PRE-1
    ("low-SoC warning level", "low_soc_warning"),  # PRE-2
    ("cell undervoltage", "undervoltage"),  # PRE-3
    ("battery comms lost", "comms_lost"),  # COM-2
)


@dataclass(frozen=True, slots=True)
class AlarmRule:
    bit: BmsAlarm
    rule: str  # BEHAVIOUR.md id(s)
    blocks_charge: bool  # ATC false while raised
    blocks_discharge: bool  # ATD false while raised
    raised_by: str  # for the docs: which step raises it


# The alarm -> blocks-charge / blocks-discharge table (an alarm means an action was taken; RELAY_FAULT's action
# is the outputs layer's safe state). ATC-4, a firmware update in progress, blocks charging as a warning.
ALARM_TABLE: tuple[AlarmRule, ...] = (
    AlarmRule(BmsAlarm.CELL_LOW_VOLTAGE, "ATD-1, PRE-3", False, True, "step 5: undervoltage latch after the 30 s lead"),
    AlarmRule(BmsAlarm.CELL_HIGH_VOLTAGE, "ATC-1", True, False, "latch cell_high"),
    AlarmRule(BmsAlarm.LOW_TEMPERATURE_CHARGE, "ATC-2", True, False, "latch temp_low"),
    AlarmRule(BmsAlarm.HIGH_TEMPERATURE_CHARGE, "ATC-3", True, False, "latch temp_high"),
    AlarmRule(BmsAlarm.LOW_SOC, "ATD-2", False, True, "latch low_soc"),
    AlarmRule(BmsAlarm.BATTERY_COMMS_LOST, "COM-2, COM-4", True, True, "latch comms_lost"),
    AlarmRule(BmsAlarm.BANK_CONFIGURATION, "BANK-3, COM-6", True, True, "step 3: a bank issue (not while waiting)"),
    AlarmRule(BmsAlarm.FIRMWARE_UPDATE_FAILED, "FW-2", False, True, "step 3: update active for 120 s"),
    AlarmRule(BmsAlarm.RELAY_FAULT, "OUT-5", False, False, "step 3: relay read-back differs"),
    AlarmRule(BmsAlarm.BATTERY_FAULT, "ATC-5, ATD-3", True, True, "step 3: HardwareFault or an unmeasured cell"),
)
CHARGE_BLOCKERS: BmsAlarm = reduce(or_, (a.bit for a in ALARM_TABLE if a.blocks_charge), BmsAlarm(0))
DISCHARGE_BLOCKERS: BmsAlarm = reduce(or_, (a.bit for a in ALARM_TABLE if a.blocks_discharge), BmsAlarm(0))


def why_not(started: bool, waiting: bool, blockers: BmsAlarm, extra: str | None, bus_down: str | None) -> str:
    """ATC's or ATD's reason while false: not started yet, or the blocking alarms (ALARM_TABLE's order)."""
    if not started:
        why = "waiting for batteries" if waiting else "not started: the bank is not known and fresh yet"
        return f"{why} (bus down: {bus_down})" if bus_down else why
    parts = [m.name for m in BmsAlarm if m in blockers and m.name]
    if extra:
        parts.append(extra)
    return ", ".join(parts)


def active_reason(name: str, alarms: BmsAlarm, warnings: BmsWarning, atc: bool, atd: bool, pre_alarm: bool) -> bool:
    """Whether a reason's subject is active now: a Decision keeps only those."""
    if name in BmsAlarm.__members__:
        return BmsAlarm[name] in alarms
    if name in BmsWarning.__members__:
        return BmsWarning[name] in warnings
    return {"ATC": not atc, "ATD": not atd}.get(name, False)
