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
`BatteryView.stale_reason` names the first failing condition as a code (a machine label: metrics), and
`BatteryView.stale_text` says it as users read it, with the age ("no BAT_STATUS for 5.3 s (comm_timeout 5 s)").

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
    A bank restored from the store is ``learned`` as soon as every learned battery is *proven*: fresh,
    with its learned identity (both serial halves and BAT_INFO equal to the stored ones) and no second
    sender (COM-6). A restart does not wait for the discovery window (BANK-2: a service restart must not
    drop the loads for 10 s); at the protocol's periods (serial halves alternate every second) that
    takes 1 to 2 s from the first frame. A learned battery that does not prove itself keeps the old way:
    the window, then `learned_missing` / `learned_mismatch`.
`Bank.learned` is what the service must persist; `Bank.learned_revision` changes whenever it
does. `Bank.relearn(now)` accepts the bank as it is now (BANK-4).

Protective memory (project decision, COM-6). A flag, a cell extreme, an unmeasured cell or a cell
temperature counts for protection for `PROTECTIVE_MEMORY_S` (2 s) after the frame that carried it:
`BankView.flags` and the `recent_*` aggregates are the worst of each fresh battery's frames in that
time, not of its latest frame alone. A second sender that interleaves clean frames with a battery
reporting CellHighVoltage therefore cannot make the battery look clean, not even between two
evaluations, and a latch in the core releases only once every frame of the last 2 s is clean.

Two senders on one node (COM-6). The frames that carry an identity are BAT_SERIAL (two halves) and
BAT_INFO (nominal voltage, capacity, string, position; not the firmware, which an update changes).
A node is *conflicted* from the first conflicting frame until `comm_timeout` after the last one:
  - a learned node: a serial half or BAT_INFO that differs from the learned identity;
  - a node not (yet) learned: a serial half or BAT_INFO that differs from another value of it seen
    on the node within `identity_memory` (comm_timeout, but at least 2.5 s: longer than the 2 s a
    serial half takes to come round, so a 1 s comm_timeout cannot let two senders slip through);
  - any node: its AliveCounter going backwards twice within `identity_memory` while BAT_STATUS keeps
    arriving (two interleaved counters do that on every other frame; one reboot does it once; a
    repeated value is not evidence: a frozen counter is COM-1, a duplicated frame is harmless).
A conflicted node is issue `learned_mismatch` naming the node and the serials seen, in every phase;
the bank is not learned while a node is conflicted, and a re-learn keeps the learned identity of a
node with two senders (or leaves it out) instead of taking whichever frame came last.

Aggregates (BANK-5) are computed over fresh batteries: bank voltage = mean over complete strings
of the sum of their series voltages; bank current = sum over strings of the mean current of the
string's fresh batteries; capacity = strings x battery capacity. They are `complete` only when
every known battery is fresh (otherwise the BMS is already in comms-loss).
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import pairwise
from typing import Any

from smallbms_bus.bank_battery import (
    CELLS_PERIOD,
    STALE_TEXT,
    TEMPS_PERIOD,
    BatteryState,
    push_max,
    push_min,
)
from smallbms_bus.bank_validation import describe_info, info_key, nodes_text, serial_halves, validate_shape
from smallbms_bus.bank_views import (
    Aggregates,
    BankIssue,
    BankView,
    BatteryIdentity,
    BatteryView,
    CellRef,
    CellSummary,
    LearnedBank,
    Topology,
)
from smallbms_bus.protocol import (
    CELLS_PER_FRAME,
    CELLS_PER_UNIT,
    FLAG_FIELDS,
    MAX_BATTERIES_BY_UNITS,
    MAX_SERIES_UNITS,
    UNIT_VOLTAGE,
)
from smallbms_bus.reports import (
    BatteryInfo,
    BatteryStatus,
    BatteryTemps,
    CellVoltages,
    Report,
    SerialFragment,
)
from smallbms_bus.vocabulary import BankPhase, StaleReason

# The names other modules import from here, wherever they are defined now.
__all__ = [
    "CELLS_PERIOD", "COMM_TIMEOUT_RANGE", "DEFAULT_COMM_TIMEOUT", "FLAG_FIELDS", "MAX_BATTERIES_BY_UNITS",
    "MAX_SERIES_UNITS", "PROTECTIVE_MEMORY_S", "STALE_TEXT", "TEMPS_PERIOD", "UNIT_VOLTAGE", "Aggregates", "Bank",
    "BankIssue", "BankPhase", "BankView", "BatteryIdentity", "BatteryState", "BatteryView", "CellRef",
    "CellSummary", "LearnedBank", "StaleReason", "Topology",
]

# COM-6 and defence in depth: how long a protective reading counts after its frame. Longer than the
# slowest protective frame's period (BAT_TEMPS, 1 s) with room for jitter, so every sender's latest
# frame of each kind is inside it.
PROTECTIVE_MEMORY_S = 2.0
TIME_EPSILON_S = 1e-9  # float noise of subtracting monotonic seconds: a frame 2 s old is exactly 2 s old
# COM-6: "two different serials within comm_timeout", but never less than this (a serial half comes
# round every 2 s per sender).
IDENTITY_MEMORY_MIN_S = 2.5
COUNTER_REGRESSIONS = 2  # AliveCounter steps backwards within the identity memory that mean two senders

DEFAULT_COMM_TIMEOUT = 5.0
COMM_TIMEOUT_RANGE = (1.0, 60.0)
DEFAULT_DISCOVERY_WINDOW = 10.0
DEFAULT_WAITING_GRACE = 60.0


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
        # COM-6: how long an identity value is remembered when looking for a second one on the same node
        self.identity_memory = max(comm_timeout, IDENTITY_MEMORY_MIN_S)
        self.discovery_window = discovery_window
        self.waiting_grace = waiting_grace
        self._identity_revision = 0  # bumps when anything topology/validation depends on changes
        self.conflict_revision = 0  # bumps when a node's COM-6 evidence grows: worth an evaluation at once
        self.learned = learned
        self.learned_revision = 0
        self.batteries: dict[int, BatteryState] = {}
        self.first_frame_at: float | None = None
        self.proven_at: float | None = None  # BANK-2: when a restored learned bank was proven (None: not, or learnt)
        self._noted: set[int] = set()  # nodes with COM-6 notes (held now, or until the next evaluation)
        self._cache_key: tuple[int, int, bool, BankPhase, tuple[int, ...]] | None = None
        self._cached: tuple[Topology, tuple[BankIssue, ...]] | None = None

    @property
    def learned(self) -> LearnedBank | None:
        return self._learned

    @learned.setter
    def learned(self, learned: LearnedBank | None) -> None:
        self._learned = learned
        self._learned_nodes = {} if learned is None else learned.by_node()
        # COM-6: what each identity frame of a learned node must carry, looked up on every such frame
        self._expected: dict[tuple[int, Any], Any] = {}
        for b in self._learned_nodes.values():
            half_0, half_1 = serial_halves(b.serial)
            self._expected |= {(b.node, 0): half_0, (b.node, 1): half_1,
                               (b.node, "info"): (b.nominal_units, b.capacity_ah, b.string_index, b.series_index)}
        self._identity_revision += 1

    # -- ingest (hot path) ---------------------------------------------------------------------
    def update(self, report: Report, now: float) -> None:
        node = getattr(report, "node", None)
        if node is None:  # BMS_STATE seen on the bus: not a battery report
            return
        state = self.batteries.get(node)
        if state is None:
            state = self.batteries[node] = BatteryState(node)
            self._identity_revision += 1
            if self.first_frame_at is None:
                self.first_frame_at = now
        kind = type(report)
        if kind is BatteryStatus:
            previous = state.status
            if previous is None or previous.alive_counter != report.alive_counter:
                state.alive_changed_at = now
                # COM-6: a counter that steps backwards (by 1..128) while BAT_STATUS keeps coming
                if previous is not None and (report.alive_counter - previous.alive_counter) & 0xFF >= 128 \
                        and now - state.status_at < self.comm_timeout:
                    self._regression(state, now)
            state.status = report
            state.status_at = now
            if (report.cell_high_voltage or report.cell_low_voltage or report.cell_low_pre_alarm or report.balancing
                    or report.cell_imbalance or report.hardware_fault or report.firmware_updating):
                flag_at = state.flag_at
                for i, name in enumerate(FLAG_FIELDS):
                    if getattr(report, name):
                        flag_at[i] = now
                state.any_flag_at = now
        elif kind is CellVoltages:
            first = report.first_cell - 1
            voltages = report.voltages
            state.cells[first:first + CELLS_PER_FRAME] = voltages
            state.cells_at[first // CELLS_PER_FRAME] = now
            state.cells_changed()
            info = state.info
            if info is None or first < CELLS_PER_UNIT * info.nominal_units:  # cells it does not have: not data
                self._remember_cells(state, first, voltages, now)
        elif kind is BatteryTemps:
            state.temps = report
            state.temps_at = now
            push_min(state.tmins, (now, report.cell_temp_min, 0))
            push_max(state.tmaxs, (now, report.cell_temp_max, 0))
        elif kind is BatteryInfo:
            if state.info != report:
                self._identity_revision += 1
                state.info = report
                state.cells_changed()  # the cell count may differ
            self._identity_frame(state, "info", info_key(report), now)
        elif kind is SerialFragment:
            if state.set_serial_part(report.part, report.chars):
                self._identity_revision += 1
            self._identity_frame(state, report.part, report.chars, now)

    @staticmethod
    def _remember_cells(state: BatteryState, first: int, voltages: tuple[float | None, ...], now: float) -> None:
        if None in voltages:  # rare: "not present" slots are remembered, the others feed the windows
            for i, v in enumerate(voltages, first + 1):
                if v is None:
                    state.unmeasured_at[i] = now
            present = [v for v in voltages if v is not None]
            if not present:
                return
        else:
            present = voltages  # type: ignore[assignment]
        low, high = min(present), max(present)  # type: ignore[type-var]
        window = state.lows  # push_min and push_max inlined: this runs for every cell frame
        while window and window[-1][1] >= low:
            window.pop()
        window.append((now, low, first + 1 + voltages.index(low)))
        window = state.highs
        while window and window[-1][1] <= high:
            window.pop()
        window.append((now, high, first + 1 + voltages.index(high)))

    # -- COM-6: two senders on one node ----------------------------------------------------------
    def _identity_frame(self, state: BatteryState, key: Any, value: Any, now: float) -> None:
        seen = state.seen[key]
        memory = self.identity_memory
        expected = self._expected.get((state.node, key))
        span = seen.get(value)
        if span is not None and len(seen) == 1 and now - span[1] < memory and (expected is None or value == expected):
            span[1] = now  # the common case: the same value again, and the learned one
            return
        others = [v for v, (_, last) in seen.items() if v != value and now - last < memory]
        if span is not None and now - span[1] < memory:
            span[1] = now
        else:
            seen[value] = [now, now]
        if len(seen) > len(others) + 1:  # forget values not seen within the memory
            state.seen[key] = {v: seen[v] for v in [*others, value]}
        conflicting = value != expected if expected is not None else bool(others)
        if conflicting:
            involved = ([expected] if expected is not None else []) + others + [value]
            self._conflict(state, now, key, involved)

    def _regression(self, state: BatteryState, now: float) -> None:
        regressions = state.regressions
        regressions.append(now)
        while regressions[0] <= now - self.identity_memory + TIME_EPSILON_S:
            regressions.popleft()
        if len(regressions) >= COUNTER_REGRESSIONS:
            self._conflict(state, now, "counter", [True])

    def _conflict(self, state: BatteryState, now: float, key: Any, values: list[Any]) -> None:
        state.conflict_at = now
        notes = state.notes.setdefault(key, {})
        grew = False
        for v in values:
            if v not in notes:
                notes[v] = None
                grew = True
        if grew:
            self._noted.add(state.node)
            self._identity_revision += 1
            self.conflict_revision += 1

    def _two_senders(self, state: BatteryState, now: float) -> bool:
        """Two interleaved identities (each seen again after the other appeared) or two interleaved
        AliveCounters on the node within the identity memory. A battery swapped for another one shows
        its serial only after the old one's last frame: that is a new battery, not two senders."""
        since = now - self.identity_memory
        for seen in state.seen.values():
            spans = sorted(span for span in seen.values() if span[1] > since)
            if any(later[0] < earlier[1] for earlier, later in pairwise(spans)):
                return True
        return sum(1 for at in state.regressions if at > since) >= COUNTER_REGRESSIONS

    def conflicted(self, now: float) -> tuple[int, ...]:
        """COM-6: nodes with a conflicting frame less than comm_timeout ago. Forgets the evidence of the others."""
        held = []
        for node in sorted(self._noted):
            state = self.batteries[node]
            if now - state.conflict_at < self.comm_timeout - TIME_EPSILON_S:
                held.append(node)
            else:
                state.notes.clear()
                self._noted.discard(node)
                self._identity_revision += 1
        return tuple(held)

    def _conflict_issue(self, state: BatteryState, now: float) -> BankIssue:
        node, notes = state.node, state.notes
        learned = self._learned_nodes.get(node)
        parts: list[str] = []
        if 0 in notes or 1 in notes:
            reference = serial_halves(learned.serial) if learned is not None else (None, None)
            halves = []
            for part in (0, 1):
                values = list(notes.get(part, ()))
                ref = reference[part] if reference[part] is not None else (
                    values[0] if values else state.serial_parts[part])
                halves.append((ref, [v for v in values if v != ref]))
            first = "".join(ref or "?" for ref, _ in halves)
            count = max(len(o) for _, o in halves)
            others = ["".join(o[min(i, len(o) - 1)] if o else (ref or "?") for ref, o in halves) for i in range(count)]
            if learned is not None:
                parts.append(f"serial {' and '.join(others)} instead of the learned {first}")
            else:
                parts.append(f"serials {' and '.join([first, *others])} within {self.identity_memory:g} s")
        if "info" in notes:
            infos = list(notes["info"])
            if learned is not None:
                expected = self._expected[(node, "info")]
                parts.append("BAT_INFO " + " and ".join(describe_info(i) for i in infos if i != expected)
                             + f" instead of the learned {describe_info(expected)}")
            else:
                parts.append("BAT_INFO " + " and ".join(describe_info(i) for i in infos)
                             + f" within {self.identity_memory:g} s")
        if "counter" in notes:
            parts.append("its AliveCounter jumps back and forth")
        who = f"battery {node}" + (f" (learned serial {learned.serial})" if learned is not None else "")
        verdict = (f"two senders on node {node}" if self._two_senders(state, now)
                   else "not the learned battery")
        return BankIssue("learned_mismatch", f"{who}: {'; '.join(parts)}: {verdict} (held until "
                                             f"{self.comm_timeout:g} s after the last conflicting frame)", (node,))

    # -- learning ------------------------------------------------------------------------------
    def _prove(self, now: float, conflicted: tuple[int, ...]) -> None:
        """BANK-2 at a restart: every learned battery fresh with its learned identity and one sender (COM-6)."""
        learned = self._learned_nodes
        if not learned or conflicted:
            return
        for node, expected in learned.items():
            state = self.batteries.get(node)
            if state is None or state.identity() != expected or self._two_senders(state, now):
                return
        self.proven_at = now

    def phase(self, now: float) -> BankPhase:
        if self.proven_at is not None and self._learned is not None:
            return BankPhase.LEARNED
        if self.first_frame_at is None:
            return BankPhase.WAITING
        if now - self.first_frame_at < self.discovery_window:  # the whole window, even when it opens late
            return BankPhase.DISCOVERING
        return BankPhase.LEARNED if self.learned is not None else BankPhase.LEARNING

    def _try_learn(self, now: float, conflicted: tuple[int, ...]) -> None:
        # COM-6: a node with two senders is not learned as one battery, whichever frame came last
        if conflicted or self.phase(now) != BankPhase.LEARNING:
            return
        identities = [s.identity() for s in self.batteries.values()]
        if all(i is not None for i in identities):
            self._set_learned(LearnedBank(tuple(sorted(identities, key=lambda i: i.node))))  # type: ignore[arg-type]

    def heard(self, now: float) -> tuple[int, ...]:
        """Nodes whose BAT_STATUS arrived within comm_timeout: the batteries on the bus now."""
        return tuple(n for n, s in sorted(self.batteries.items()) if s.heard(now, self.comm_timeout))

    def relearn(self, now: float) -> LearnedBank:
        """BANK-4: the bank as it is now: the batteries `heard` with a complete identity; one no longer heard
        (taken out) is forgotten, an unknown battery (BANK-3) should it come back. A node with two senders
        (COM-6) keeps the identity learned before (or stays out): which one is real is not known."""
        heard = self.heard(now)
        for node in [n for n in self.batteries if n not in heard]:
            del self.batteries[node]
            self._noted.discard(node)
        identities = []
        for node, state in self.batteries.items():
            if self._two_senders(state, now):
                if node in self._learned_nodes:
                    identities.append(self._learned_nodes[node])
                continue
            identity = state.identity()
            if identity is not None:
                identities.append(identity)
                state.conflict_at = -math.inf  # what differed from the old learned identity is now accepted
        learned = LearnedBank(tuple(sorted(identities, key=lambda i: i.node)))
        self._set_learned(learned)
        return learned

    def _set_learned(self, learned: LearnedBank) -> None:
        self.learned = learned
        self.learned_revision += 1
        self._identity_revision += 1

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, now: float) -> BankView:
        conflicted = self.conflicted(now)
        self._try_learn(now, conflicted)
        timeout = self.comm_timeout
        views: list[BatteryView] = []
        stale: list[int] = []
        for node in sorted(self.batteries):
            s = self.batteries[node]
            reason = s.stale_reason(now, timeout)
            if reason is not None:
                stale.append(node)
            views.append(BatteryView(  # positional: one per battery per evaluation
                node, s.serial, s.info, s.status, s.temps, s.cell_summary(), reason is None, reason,
                None if s.status is None else now - s.status_at, (), node in conflicted,
                None if reason is None else s.stale_text(reason, now, timeout)))
        past_grace = now - self.started_at >= self.waiting_grace
        if (self.proven_at is None and self._learned is not None and not stale and self.first_frame_at is not None
                and now - self.first_frame_at < self.discovery_window):  # after the window: learned anyway
            self._prove(now, conflicted)
        phase = self.phase(now)
        key = (self._identity_revision, self.learned_revision, past_grace, phase, conflicted)
        if self._cache_key != key or self._cached is None:
            self._cached = (self.topology(), tuple(self._validate(phase, past_grace, conflicted, now)))
            self._cache_key = key
        topology, issues = self._cached
        fresh = [v for v in views if v.fresh]
        since = now - PROTECTIVE_MEMORY_S + TIME_EPSILON_S
        flagged: dict[str, list[int]] = {f: [] for f in FLAG_FIELDS}
        for v in fresh:
            s = self.batteries[v.node]
            if s.any_flag_at > since:
                for i, name in enumerate(FLAG_FIELDS):
                    if s.flag_at[i] > since:
                        flagged[name].append(v.node)
        flags = {f: tuple(nodes) for f, nodes in flagged.items()}
        aggregates = self._aggregates(fresh, topology.series, now, complete=not stale and bool(views))
        return BankView(now, phase, tuple(views), tuple(stale), topology, issues, aggregates,
                        flags, waiting_for_batteries=phase != BankPhase.LEARNED and not past_grace,
                        conflicted=conflicted)

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

    def _validate(self, phase: BankPhase, past_grace: bool, conflicted: tuple[int, ...], now: float) -> list[BankIssue]:
        issues: list[BankIssue] = []
        if not self.batteries:
            if past_grace:
                issues.append(BankIssue("no_batteries",
                                        f"no battery heard within {self.waiting_grace:g} s of start"))
            return issues
        if (past_grace and phase != BankPhase.DISCOVERING) or phase == BankPhase.LEARNED:
            incomplete = tuple(n for n, s in sorted(self.batteries.items()) if s.identity() is None)
            if incomplete:
                issues.append(BankIssue("identity_incomplete",
                                        "no complete BAT_INFO and serial number from battery "
                                        + nodes_text(incomplete), incomplete))
        issues += validate_shape(self._infos())
        if phase == BankPhase.LEARNED and self.learned is not None:
            issues += self._validate_against_learned(self.learned, conflicted, now)
        else:  # COM-6 in every phase: discovery must not learn two senders as one battery
            issues += [self._conflict_issue(self.batteries[n], now) for n in conflicted]
        return issues

    def _validate_against_learned(self, learned: LearnedBank, conflicted: tuple[int, ...],
                                  now: float) -> list[BankIssue]:
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
                if node in conflicted:
                    issues.append(self._conflict_issue(state, now))
                continue
            if node in conflicted:
                issues.append(self._conflict_issue(state, now))
                continue
            current = state.identity()
            if current is not None and current != expected:
                issues.append(BankIssue("learned_mismatch",
                                        f"learned {expected.describe()}, now {current.describe()}", (node,)))
        return issues

    def _aggregates(self, fresh: list[BatteryView], series: int, now: float, *, complete: bool) -> Aggregates:
        # Called on every evaluation for up to 50 batteries: plain loops, no per-battery allocation.
        volts: dict[int, list[float]] = {}  # string -> its fresh batteries' voltages, in node order (BANK-5)
        amps: dict[int, list[float]] = {}
        low: BatteryView | None = None
        high: BatteryView | None = None
        tmin = tmax = bmin = bmax = r_tmin = r_tmax = None
        since = now - PROTECTIVE_MEMORY_S + TIME_EPSILON_S
        r_low = r_high = (None, 0, 0)  # protective memory: (value, node, cell) of the worst frame since `since`
        batteries = self.batteries
        for v in fresh:
            s = batteries[node := v.node]
            status = v.status
            string = v.info.string_index  # type: ignore[union-attr]
            if string in volts:
                volts[string].append(status.voltage)  # type: ignore[union-attr]
                amps[string].append(status.current)  # type: ignore[union-attr]
            else:
                volts[string] = [status.voltage]  # type: ignore[union-attr]
                amps[string] = [status.current]  # type: ignore[union-attr]
            summary = v.summary
            if summary.low is not None:
                if low is None or summary.low < low.summary.low:  # type: ignore[operator]
                    low = v
                if high is None or summary.high > high.summary.high:  # type: ignore[operator]
                    high = v
                if r_low[0] is None or summary.low < r_low[0]:
                    r_low = (summary.low, node, summary.low_cell)
                if r_high[0] is None or summary.high > r_high[0]:  # type: ignore[operator]
                    r_high = (summary.high, node, summary.high_cell)
            window = s.lows
            while window and window[0][0] <= since:
                window.popleft()
            if window and (r_low[0] is None or window[0][1] < r_low[0]):
                r_low = (window[0][1], node, window[0][2])
            window = s.highs
            while window and window[0][0] <= since:
                window.popleft()
            if window and (r_high[0] is None or window[0][1] > r_high[0]):
                r_high = (window[0][1], node, window[0][2])
            t_lo, t_hi = v.temps.cell_temp_min, v.temps.cell_temp_max  # type: ignore[union-attr]
            tmin = t_lo if tmin is None or t_lo < tmin else tmin
            tmax = t_hi if tmax is None or t_hi > tmax else tmax
            window = s.tmins
            while window and window[0][0] <= since:
                window.popleft()
            if window and window[0][1] < t_lo:
                t_lo = window[0][1]
            window = s.tmaxs
            while window and window[0][0] <= since:
                window.popleft()
            if window and window[0][1] > t_hi:
                t_hi = window[0][1]
            r_tmin = t_lo if r_tmin is None or t_lo < r_tmin else r_tmin
            r_tmax = t_hi if r_tmax is None or t_hi > r_tmax else r_tmax
            bt = status.temperature  # type: ignore[union-attr]
            bmin = bt if bmin is None or bt < bmin else bmin
            bmax = bt if bmax is None or bt > bmax else bmax
            if s.unmeasured_at:  # rare: a cell read "not present" at some point
                v.unmeasured = s.recently_unmeasured(since, summary)
            else:
                v.unmeasured = summary.unmeasured
        min_cell = None if low is None else CellRef(low.node, low.summary.low_cell, low.summary.low)  # type: ignore[arg-type]
        max_cell = None if high is None else CellRef(high.node, high.summary.high_cell, high.summary.high)  # type: ignore[arg-type]
        recent_low = None if r_low[0] is None else CellRef(r_low[1], r_low[2], r_low[0])
        recent_high = None if r_high[0] is None else CellRef(r_high[1], r_high[2], r_high[0])
        return Aggregates(*_bank_totals(volts, amps, series), min_cell, max_cell, tmin, tmax, bmin, bmax, complete,
                          recent_low, recent_high, r_tmin, r_tmax)


def _bank_totals(volts: dict[int, list[float]], amps: dict[int, list[float]],
                 series: int) -> tuple[float | None, float | None, float | None]:
    """BANK-5: voltage = mean over complete strings of their series sum; current = sum of each string's mean."""
    sums = [sum(string) for string in volts.values() if series and len(string) == series]
    voltage = round(sum(sums) / len(sums), 3) if sums else None
    current = round(sum([sum(string) / len(string) for string in amps.values()]), 2) if amps else None
    power = round(voltage * current, 1) if voltage is not None and current is not None else None
    return voltage, current, power
