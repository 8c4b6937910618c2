"""The battery bank: latest readings per battery, freshness, topology, validation, aggregates.

Theory of operation
-------------------
`Bank.update(report, now)` stores what one decoded frame says (cheap: it runs on every frame).
`Bank.evaluate(now)` returns a `BankView`, an immutable picture the BMS core decides on.
Nothing here reads a clock: every call gets `now` (monotonic seconds) from the caller.

Freshness (COM-1). A battery is *fresh* while
  - its BAT_STATUS arrived less than `comm_timeout` ago and its AliveCounter advanced less than
    `comm_timeout` ago, and
  - (project decision, defence in depth) it is *complete*: it has sent BAT_INFO, BAT_TEMPS and every
    BAT_CELLS group its nominal voltage implies, and none of those is more than `comm_timeout` past
    its due time (its period). A battery whose cell or temperature frames stop cannot be protected,
    so it is treated like a silent one.
`BatteryView.stale_reason` names the first failing condition.

Topology (BANK-1) comes from BAT_INFO only: StringIndex, SeriesIndex, nominal voltage, capacity.
Validation (BANK-3) yields `BankIssue`s with a code and a human reason; an empty list means the
bank is consistent. Topology and validation depend only on identity data (BAT_INFO, serial,
which nodes exist, learned bank), so they are cached and recomputed only when that changes.

Discovery and learning (BANK-2, BANK-4). The phases are:
  - ``waiting``: no battery heard yet. "Waiting for batteries" is a state, not an issue, for the
    first `waiting_grace` seconds (60 s) after start; after that it becomes issue `no_batteries`.
  - ``discovering``: from the first frame until `discovery_window` (10 s) later.
  - ``learning``: the window closed but a battery heard has not yet sent its identity (BAT_INFO and
    both serial halves); learning waits for it, until the waiting grace ends (then the battery
    is reported as `identity_incomplete`).
  - ``learned``: a learned bank exists (restored from the store, or learned at the end of the
    window from every battery heard with a complete identity). The bank is validated against it.
`Bank.learned` is what the service must persist; `Bank.learned_revision` changes whenever it
does. `Bank.relearn(now)` accepts the bank as it is now (BANK-4).

Aggregates (BANK-5) are computed over fresh batteries: bank voltage = mean over complete strings
of the sum of their series voltages; bank current = sum over strings of the mean current of the
string's fresh batteries; capacity = strings x battery capacity. They are `complete` only when
every known battery is fresh (otherwise the BMS is already in comms-loss).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from smallbms_bus.reports import (
    BatteryInfo,
    BatteryStatus,
    BatteryTemps,
    CellVoltages,
    Report,
    SerialFragment,
)

# Limits of the smallBMS NG (manual 2.1, PROTOCOL.md): batteries per bank by nominal voltage
# (in 12.8 V units) and at most 4 x 12.8 V in series.
MAX_BATTERIES_BY_UNITS = {1: 50, 2: 50, 4: 25}
MAX_SERIES_UNITS = 4
UNIT_VOLTAGE = 12.8
CELLS_PER_UNIT = 4
CELLS_PER_FRAME = 4

# Periods of the slower frames (PROTOCOL.md; tests/test_bank.py checks them against the DBC). Cell and
# temperature frames are stale `comm_timeout` after they were *due*, so a 1 s frame with ordinary
# jitter does not trip the minimum 1 s timeout.
CELLS_PERIOD = 0.5
TEMPS_PERIOD = 1.0

DEFAULT_COMM_TIMEOUT = 5.0
COMM_TIMEOUT_RANGE = (1.0, 60.0)
DEFAULT_DISCOVERY_WINDOW = 10.0
DEFAULT_WAITING_GRACE = 60.0


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


@dataclass(frozen=True, slots=True)
class BankIssue:
    """One reason the bank configuration is not acceptable (BANK-3)."""

    code: str
    reason: str
    nodes: tuple[int, ...] = ()


class BatteryState:
    """Mutable latest readings of one battery. Written on every frame: keep it flat."""

    __slots__ = ("_summary", "_summary_key", "alive_changed_at", "cells", "cells_at", "cells_revision",
                 "first_seen_at", "info", "info_at", "node", "serial_parts", "status", "status_at", "temps",
                 "temps_at")

    def __init__(self, node: int, now: float) -> None:
        self.node = node
        self.first_seen_at = now
        self.status: BatteryStatus | None = None
        self.status_at = -1.0
        self.alive_changed_at = -1.0
        self.cells: list[float | None] = [None] * 16
        self.cells_at = [-1.0] * 4  # per group of four cells
        self.cells_revision = 0
        self._summary_key: tuple[int, int] | None = None
        self._summary: CellSummary | None = None
        self.temps: BatteryTemps | None = None
        self.temps_at = -1.0
        self.info: BatteryInfo | None = None
        self.info_at = -1.0
        self.serial_parts: list[str | None] = [None, None]

    @property
    def serial(self) -> str | None:
        a, b = self.serial_parts
        return None if a is None or b is None else a + b

    def identity(self) -> BatteryIdentity | None:
        serial, info = self.serial, self.info
        if serial is None or info is None:
            return None
        return BatteryIdentity(self.node, serial, info.nominal_units, info.nominal_capacity_ah,
                               info.string_index, info.series_index)

    def cell_summary(self) -> CellSummary:
        """The battery's cells and their extremes, recomputed only when a cell frame changed them."""
        count = self.info.cell_count if self.info is not None else 16
        key = (self.cells_revision, count)
        if key != self._summary_key or self._summary is None:
            self._summary = CellSummary.of(tuple(self.cells[:count]))
            self._summary_key = key
        return self._summary

    def stale_reason(self, now: float, timeout: float) -> str | None:
        """None when fresh, else why not (first failing condition)."""
        if self.status is None:
            return "no_status"
        if now - self.status_at >= timeout:
            return "status_timeout"
        if now - self.alive_changed_at >= timeout:
            return "alive_stuck"
        if self.info is None:
            return "no_info"
        if self.temps is None:
            return "no_temps"
        if now - self.temps_at >= timeout + TEMPS_PERIOD:
            return "temps_timeout"
        for group in range(self.info.nominal_units):
            at = self.cells_at[group]
            if at < 0:
                return "no_cells"
            if now - at >= timeout + CELLS_PERIOD:
                return "cells_timeout"
        return None


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
        present = cells if None not in cells else [c for c in cells if c is not None]
        unmeasured = () if present is cells else tuple(i for i, c in enumerate(cells, 1) if c is None)
        if not present:
            return cls(cells, None, 0, None, 0, None, unmeasured)
        lo, hi = min(present), max(present)  # in C: up to 800 cells per evaluation
        return cls(cells, lo, cells.index(lo) + 1, hi, cells.index(hi) + 1, round(hi - lo, 3), unmeasured)


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
    stale_reason: str | None
    status_age: float | None  # seconds since the last BAT_STATUS, None if never

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


@dataclass(frozen=True, slots=True)
class BankView:
    now: float
    phase: str  # waiting | discovering | learning | learned
    batteries: tuple[BatteryView, ...]
    stale_nodes: tuple[int, ...]
    topology: Topology
    issues: tuple[BankIssue, ...]
    aggregates: Aggregates
    flags: dict[str, tuple[int, ...]]  # flag -> fresh nodes reporting it
    waiting_for_batteries: bool  # BANK-2: a state, not an alarm, until the learned bank or the grace ends


FLAG_FIELDS = ("cell_high_voltage", "cell_low_voltage", "cell_low_pre_alarm", "balancing",
               "cell_imbalance", "hardware_fault", "firmware_updating")


class Bank:
    def __init__(
        self,
        now: float,
        *,
        comm_timeout: float = DEFAULT_COMM_TIMEOUT,
        discovery_window: float = DEFAULT_DISCOVERY_WINDOW,
        waiting_grace: float = DEFAULT_WAITING_GRACE,
        learned: LearnedBank | None = None,
    ) -> None:
        lo, hi = COMM_TIMEOUT_RANGE
        if not lo <= comm_timeout <= hi:
            raise ValueError(f"comm_timeout {comm_timeout} s is outside {lo:g}-{hi:g} s")
        self.started_at = now
        self.comm_timeout = comm_timeout
        self.discovery_window = discovery_window
        self.waiting_grace = waiting_grace
        self.learned = learned
        self.learned_revision = 0
        self.batteries: dict[int, BatteryState] = {}
        self.first_frame_at: float | None = None
        self._identity_revision = 0  # bumps when anything topology/validation depends on changes
        self._cache_key: tuple[int, int, bool, str] | None = None
        self._cached: tuple[Topology, tuple[BankIssue, ...]] | None = None

    # -- ingest (hot path) ---------------------------------------------------------------------
    def update(self, report: Report, now: float) -> None:
        node = getattr(report, "node", None)
        if node is None:  # BMS_STATE seen on the bus: not a battery report
            return
        state = self.batteries.get(node)
        if state is None:
            state = self.batteries[node] = BatteryState(node, now)
            self._identity_revision += 1
            if self.first_frame_at is None:
                self.first_frame_at = now
        kind = type(report)
        if kind is BatteryStatus:
            previous = state.status
            if previous is None or previous.alive_counter != report.alive_counter:
                state.alive_changed_at = now
            state.status = report
            state.status_at = now
        elif kind is CellVoltages:
            first = report.first_cell - 1
            state.cells[first:first + CELLS_PER_FRAME] = report.voltages
            state.cells_at[first // CELLS_PER_FRAME] = now
            state.cells_revision += 1
        elif kind is BatteryTemps:
            state.temps = report
            state.temps_at = now
        elif kind is BatteryInfo:
            if state.info != report:
                self._identity_revision += 1
            state.info = report
            state.info_at = now
        elif kind is SerialFragment and state.serial_parts[report.part] != report.chars:
            state.serial_parts[report.part] = report.chars
            self._identity_revision += 1

    # -- learning ------------------------------------------------------------------------------
    def phase(self, now: float) -> str:
        if self.first_frame_at is None:
            return "waiting"
        if now - self.first_frame_at < self.discovery_window and now - self.started_at < self.waiting_grace:
            return "discovering"
        return "learned" if self.learned is not None else "learning"

    def _try_learn(self, now: float) -> None:
        if self.phase(now) != "learning":
            return
        identities = [s.identity() for s in self.batteries.values()]
        if all(i is not None for i in identities):
            self._set_learned(LearnedBank(tuple(sorted(identities, key=lambda i: i.node))))  # type: ignore[arg-type]

    def relearn(self, now: float) -> LearnedBank:
        """BANK-4: accept the batteries with a complete identity as the bank from now on."""
        identities = [i for s in self.batteries.values() if (i := s.identity()) is not None]
        learned = LearnedBank(tuple(sorted(identities, key=lambda i: i.node)))
        self._set_learned(learned)
        return learned

    def _set_learned(self, learned: LearnedBank) -> None:
        self.learned = learned
        self.learned_revision += 1
        self._identity_revision += 1

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, now: float) -> BankView:
        self._try_learn(now)
        timeout = self.comm_timeout
        views: list[BatteryView] = []
        stale: list[int] = []
        for node in sorted(self.batteries):
            s = self.batteries[node]
            reason = s.stale_reason(now, timeout)
            if reason is not None:
                stale.append(node)
            views.append(BatteryView(node, s.serial, s.info, s.status, s.temps, s.cell_summary(), reason is None,
                                     reason, None if s.status is None else now - s.status_at))
        past_grace = now - self.started_at >= self.waiting_grace
        phase = self.phase(now)
        key = (self._identity_revision, self.learned_revision, past_grace, phase)
        if self._cache_key != key or self._cached is None:
            self._cached = (self.topology(), tuple(self._validate(phase, past_grace)))
            self._cache_key = key
        topology, issues = self._cached
        fresh = [v for v in views if v.fresh]
        flags = {f: tuple(v.node for v in fresh if getattr(v.status, f)) for f in FLAG_FIELDS}
        aggregates = self._aggregates(fresh, topology.series, complete=not stale and bool(views))
        return BankView(now, phase, tuple(views), tuple(stale), topology, issues, aggregates,
                        flags, waiting_for_batteries=phase != "learned" and not past_grace)

    def _infos(self) -> list[BatteryInfo]:
        return [s.info for s in self.batteries.values() if s.info is not None]

    def topology(self) -> Topology:
        """BANK-1 from the BAT_INFO heard so far (no freshness involved)."""
        infos = self._infos()
        units = {i.nominal_units for i in infos}
        caps = {i.nominal_capacity_ah for i in infos}
        per_string = Counter(i.string_index for i in infos)
        sizes = set(per_string.values())
        return Topology(
            batteries=len(infos),
            cells=sum(i.cell_count for i in infos),
            series=sizes.pop() if len(sizes) == 1 else 0,
            parallel=len(per_string),
            nominal_units=units.pop() if len(units) == 1 else None,
            capacity_ah=caps.pop() if len(caps) == 1 else None,
        )

    def _validate(self, phase: str, past_grace: bool) -> list[BankIssue]:
        issues: list[BankIssue] = []
        if not self.batteries:
            if past_grace:
                issues.append(BankIssue("no_batteries",
                                        f"no battery heard within {self.waiting_grace:g} s of start"))
            return issues
        if past_grace or phase == "learned":
            incomplete = tuple(n for n, s in sorted(self.batteries.items()) if s.identity() is None)
            if incomplete:
                issues.append(BankIssue("identity_incomplete",
                                        "no complete BAT_INFO and serial number from battery "
                                        + _nodes(incomplete), incomplete))
        issues += self._validate_shape()
        if phase == "learned" and self.learned is not None:
            issues += self._validate_against_learned(self.learned)
        return issues

    def _validate_shape(self) -> list[BankIssue]:
        infos = sorted(self._infos(), key=lambda i: i.node)
        issues: list[BankIssue] = []
        if not infos:
            return issues
        by_units = Counter(i.nominal_units for i in infos)
        if len(by_units) > 1:
            detail = ", ".join(f"{UNIT_VOLTAGE * u:.1f} V x{c}" for u, c in sorted(by_units.items()))
            issues.append(BankIssue("mixed_nominal_voltage", f"batteries of mixed nominal voltage: {detail}",
                                    tuple(i.node for i in infos)))
        by_cap = Counter(i.nominal_capacity_ah for i in infos)
        if len(by_cap) > 1:
            detail = ", ".join(f"{ah} Ah x{c}" for ah, c in sorted(by_cap.items()))
            issues.append(BankIssue("mixed_capacity", f"batteries of mixed capacity: {detail}",
                                    tuple(i.node for i in infos)))
        positions = Counter((i.string_index, i.series_index) for i in infos)
        for (string, pos), count in sorted(positions.items()):
            if count > 1:
                nodes = tuple(i.node for i in infos if (i.string_index, i.series_index) == (string, pos))
                issues.append(BankIssue("duplicate_position",
                                        f"string {string} position {pos} is claimed by batteries {_nodes(nodes)}",
                                        nodes))
        strings: dict[int, list[BatteryInfo]] = {}
        for i in infos:
            strings.setdefault(i.string_index, []).append(i)
        sizes = {s: len(members) for s, members in strings.items()}
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"string {s}: {n}" for s, n in sorted(sizes.items()))
            issues.append(BankIssue("unequal_strings", f"strings have unequal battery counts ({detail})"))
        for s, members in sorted(strings.items()):
            have = {m.series_index for m in members}
            missing = sorted(set(range(1, max(have) + 1)) - have)
            if missing:
                issues.append(BankIssue("position_gap",
                                        f"string {s} has no battery at position {_nodes(tuple(missing))}",
                                        tuple(m.node for m in members)))
        missing_strings = sorted(set(range(1, max(strings) + 1)) - set(strings))
        if missing_strings:
            issues.append(BankIssue("string_gap", f"no battery reports string {_nodes(tuple(missing_strings))}"))
        for units in by_units:
            limit = MAX_BATTERIES_BY_UNITS[units]
            if len(infos) > limit:
                issues.append(BankIssue("too_many_batteries",
                                        f"{len(infos)} batteries; at most {limit} of {UNIT_VOLTAGE * units:.1f} V "
                                        "are allowed"))
        series = max(sizes.values())
        for units in by_units:
            if series * units > MAX_SERIES_UNITS:
                issues.append(BankIssue("too_many_in_series",
                                        f"{series} x {UNIT_VOLTAGE * units:.1f} V in series exceeds "
                                        f"{MAX_SERIES_UNITS} x {UNIT_VOLTAGE:.1f} V"))
        return issues

    def _validate_against_learned(self, learned: LearnedBank) -> list[BankIssue]:
        issues: list[BankIssue] = []
        known = learned.by_node()
        missing = tuple(n for n in sorted(known) if n not in self.batteries)
        if missing:
            issues.append(BankIssue("learned_missing",
                                    "learned battery not heard: " + "; ".join(known[n].describe() for n in missing),
                                    missing))
        for node, state in sorted(self.batteries.items()):
            expected = known.get(node)
            if expected is None:
                issues.append(BankIssue("unknown_battery",
                                        f"battery {node} is not part of the learned bank "
                                        "(re-learn the bank after a deliberate change)", (node,)))
                continue
            current = state.identity()
            if current is not None and current != expected:
                issues.append(BankIssue("learned_mismatch",
                                        f"learned {expected.describe()}, now {current.describe()}", (node,)))
        return issues

    def _aggregates(self, fresh: list[BatteryView], series: int, *, complete: bool) -> Aggregates:
        strings: dict[int, list[BatteryView]] = {}
        low: BatteryView | None = None
        high: BatteryView | None = None
        tmin = tmax = bmin = bmax = None
        for v in fresh:
            strings.setdefault(v.info.string_index, []).append(v)  # type: ignore[union-attr]
            summary = v.summary
            if summary.low is not None:
                if low is None or summary.low < low.summary.low:  # type: ignore[operator]
                    low = v
                if high is None or summary.high > high.summary.high:  # type: ignore[operator]
                    high = v
            t = v.temps
            tmin = t.cell_temp_min if tmin is None else min(tmin, t.cell_temp_min)  # type: ignore[union-attr]
            tmax = t.cell_temp_max if tmax is None else max(tmax, t.cell_temp_max)  # type: ignore[union-attr]
            bt = v.status.temperature  # type: ignore[union-attr]
            bmin = bt if bmin is None else min(bmin, bt)
            bmax = bt if bmax is None else max(bmax, bt)
        min_cell = None if low is None else CellRef(low.node, low.summary.low_cell, low.summary.low)  # type: ignore[arg-type]
        max_cell = None if high is None else CellRef(high.node, high.summary.high_cell, high.summary.high)  # type: ignore[arg-type]
        sums = [sum(b.status.voltage for b in members)  # type: ignore[union-attr]
                for members in strings.values() if series and len(members) == series]
        voltage = round(sum(sums) / len(sums), 3) if sums else None
        current = (round(sum(sum(b.status.current for b in m) / len(m) for m in strings.values()), 2)  # type: ignore[union-attr]
                   if strings else None)
        power = round(voltage * current, 1) if voltage is not None and current is not None else None
        return Aggregates(voltage, current, power, min_cell, max_cell, tmin, tmax, bmin, bmax, complete)


def _nodes(nodes: tuple[int, ...]) -> str:
    return ", ".join(str(n) for n in nodes)
