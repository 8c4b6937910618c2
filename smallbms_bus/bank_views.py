"""The bank's value types: what it learns (identities), what it reports (issues, views, topology, aggregates).

Split from smallbms_bus/bank.py (which re-exports every name): the bank's theory of operation is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smallbms_bus.protocol import UNIT_VOLTAGE
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps
from smallbms_bus.vocabulary import BankPhase, StaleReason


@dataclass(frozen=True, slots=True)
class BatteryIdentity:
    """What the learned bank remembers of one battery (persisted by the service)."""

    node: int
    serial: str
    nominal_units: int
    capacity_ah: int
    string_index: int
    series_index: int

    def describe(self) -> str:
        return (f"battery {self.node} ({self.serial}, {UNIT_VOLTAGE * self.nominal_units:.1f} V "
                f"{self.capacity_ah} Ah, string {self.string_index} position {self.series_index})")


@dataclass(frozen=True, slots=True)
class LearnedBank:
    batteries: tuple[BatteryIdentity, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "batteries": [
            {"node": b.node, "serial": b.serial, "nominal_units": b.nominal_units,
             "capacity_ah": b.capacity_ah, "string_index": b.string_index,
             "series_index": b.series_index} for b in self.batteries]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnedBank:
        if data.get("version") != 1:
            raise ValueError(f"unsupported learned-bank version {data.get('version')!r}")
        return cls(tuple(BatteryIdentity(**b) for b in data["batteries"]))

    def by_node(self) -> dict[int, BatteryIdentity]:
        return {b.node: b for b in self.batteries}

    @property
    def bank_capacity_ah(self) -> int | None:
        """Strings x battery capacity (BANK-5) of the learned bank; None when empty or of mixed capacity."""
        capacities = {b.capacity_ah for b in self.batteries}
        if len(capacities) != 1:
            return None
        return capacities.pop() * len({b.string_index for b in self.batteries})


@dataclass(frozen=True, slots=True)
class BankIssue:
    """One reason the bank configuration is not acceptable (BANK-3)."""

    code: str
    reason: str
    nodes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CellRef:
    node: int
    cell: int  # 1-based
    voltage: float


@dataclass(slots=True)  # not frozen: rebuilt per battery whenever its cells change; treat as read-only
class CellSummary:
    cells: tuple[float | None, ...]  # the battery's cells (4 x units when known), None = not measured
    low: float | None  # lowest cell voltage and its 1-based number
    low_cell: int
    high: float | None
    high_cell: int
    spread: float | None  # high - low inside this battery
    unmeasured: tuple[int, ...]  # 1-based cells reading "not present"

    @classmethod
    def of(cls, cells: tuple[float | None, ...]) -> CellSummary:
        try:  # in C, for up to 800 cells per evaluation; a None ("not present") cannot be compared
            lo, hi = min(cells), max(cells)  # type: ignore[type-var]
            unmeasured: tuple[int, ...] = ()
        except (TypeError, ValueError):  # a cell not present, or no cells
            present = [c for c in cells if c is not None]
            unmeasured = tuple(i for i, c in enumerate(cells, 1) if c is None)
            if not present:
                return cls(cells, None, 0, None, 0, None, unmeasured)
            lo, hi = min(present), max(present)
        return cls(cells, lo, cells.index(lo) + 1, hi, cells.index(hi) + 1, round(hi - lo, 3), unmeasured)  # type: ignore[operator]


@dataclass(slots=True)  # not frozen: built for every battery on every evaluation, and frozen init is slow
class BatteryView:
    """One battery as of `BankView.now`; treat as read-only."""

    node: int
    serial: str | None
    info: BatteryInfo | None
    status: BatteryStatus | None
    temps: BatteryTemps | None
    summary: CellSummary
    fresh: bool
    stale_reason: StaleReason | None
    status_age: float | None  # seconds since the last BAT_STATUS, None if never
    unmeasured: tuple[int, ...] = ()  # cells read "not present" in a frame of the last PROTECTIVE_MEMORY_S (fresh)
    conflicted: bool = False  # COM-6: two senders on this node, or an identity other than the learned one
    stale_text: str | None = None  # stale_reason in words, with the age (None while fresh)

    @property
    def cells(self) -> tuple[float | None, ...]:
        return self.summary.cells

    @property
    def cell_spread(self) -> float | None:
        return self.summary.spread


@dataclass(frozen=True, slots=True)
class Topology:
    batteries: int
    cells: int
    series: int  # batteries per string (0 when strings are unequal or unknown)
    parallel: int  # strings
    nominal_units: int | None  # per battery, None when mixed or unknown
    capacity_ah: int | None  # per battery, None when mixed or unknown

    @property
    def nominal_voltage(self) -> float | None:
        if self.nominal_units is None or not self.series:
            return None
        return round(UNIT_VOLTAGE * self.nominal_units * self.series, 1)

    @property
    def series_units(self) -> int | None:
        """12.8 V units in series across one string (the charged voltage scales with it)."""
        return self.series * self.nominal_units if self.nominal_units and self.series else None

    @property
    def bank_capacity_ah(self) -> int | None:
        return None if self.capacity_ah is None else self.capacity_ah * self.parallel


@dataclass(frozen=True, slots=True)
class Aggregates:
    voltage: float | None
    current: float | None
    power: float | None
    min_cell: CellRef | None
    max_cell: CellRef | None
    min_cell_temperature: float | None
    max_cell_temperature: float | None
    min_battery_temperature: float | None
    max_battery_temperature: float | None
    complete: bool  # every known battery fresh
    # Protective memory: the same extremes over every frame of the last PROTECTIVE_MEMORY_S (the latches use these)
    recent_min_cell: CellRef | None = None
    recent_max_cell: CellRef | None = None
    recent_min_cell_temperature: float | None = None
    recent_max_cell_temperature: float | None = None


@dataclass(frozen=True, slots=True)
class BankView:
    now: float
    phase: BankPhase
    batteries: tuple[BatteryView, ...]
    stale_nodes: tuple[int, ...]
    topology: Topology
    issues: tuple[BankIssue, ...]
    aggregates: Aggregates
    flags: dict[str, tuple[int, ...]]  # flag -> fresh nodes that reported it in the last PROTECTIVE_MEMORY_S
    waiting_for_batteries: bool  # BANK-2: a state, not an alarm, until the learned bank or the grace ends
    conflicted: tuple[int, ...] = ()  # COM-6: nodes held as learned_mismatch (two senders or a foreign identity)
