"""One battery's latest readings as the bank keeps them (written on every frame), and its freshness (COM-1).

Split from smallbms_bus/bank.py (which re-exports every name): the bank's theory of operation is there.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from smallbms_bus.bank_views import BatteryIdentity, CellSummary
from smallbms_bus.protocol import CELLS_PER_FRAME, FLAG_FIELDS, MAX_CELLS, frame_period
from smallbms_bus.reports import BatteryInfo, BatteryStatus, BatteryTemps
from smallbms_bus.vocabulary import StaleReason

# Periods of the slower frames, from the DBC's GenMsgCycleTime. Cell and temperature frames are stale
# `comm_timeout` after they were *due*, so a 1 s frame with ordinary jitter does not trip the minimum 1 s timeout.
CELLS_PERIOD = frame_period("BAT_CELLS_1_4")
TEMPS_PERIOD = frame_period("BAT_TEMPS")

# COM-1: why a battery is stale, as the metric label (code) and as users read it (the texts with an age are
# built by BatteryState.stale_text).
STALE_TEXT = {
    StaleReason.NO_STATUS: "no BAT_STATUS received yet",
    StaleReason.STATUS_TIMEOUT: "no BAT_STATUS within comm_timeout",
    StaleReason.ALIVE_STUCK: "AliveCounter not advancing within comm_timeout",
    StaleReason.NO_INFO: "no BAT_INFO received yet",
    StaleReason.NO_TEMPS: "no BAT_TEMPS received yet",
    StaleReason.TEMPS_TIMEOUT: "no BAT_TEMPS within its period plus comm_timeout",
    StaleReason.NO_CELLS: "no BAT_CELLS received yet for a group of cells",
    StaleReason.CELLS_TIMEOUT: "no BAT_CELLS for a group of cells within its period plus comm_timeout",
}


class BatteryState:
    """Mutable latest readings of one battery. Written on every frame: keep it flat."""

    __slots__ = ("_summary", "alive_changed_at", "any_flag_at", "cells", "cells_at", "conflict_at",
                 "flag_at", "highs", "info", "lows", "node", "notes", "regressions", "seen", "serial", "serial_parts",
                 "status", "status_at", "temps", "temps_at", "tmaxs", "tmins", "unmeasured_at")

    def __init__(self, node: int) -> None:
        self.node = node
        self.status: BatteryStatus | None = None
        self.status_at = -1.0
        self.alive_changed_at = -1.0
        self.cells: list[float | None] = [None] * MAX_CELLS
        self.cells_at = [-1.0] * (MAX_CELLS // CELLS_PER_FRAME)  # per BAT_CELLS frame
        self._summary: CellSummary | None = None  # None: a cell frame or BAT_INFO changed it since it was built
        self.temps: BatteryTemps | None = None
        self.temps_at = -1.0
        self.info: BatteryInfo | None = None
        self.serial_parts: list[str | None] = [None, None]  # written through set_serial_part
        self.serial: str | None = None  # both halves, once both came
        # Protective memory: when each flag was last reported, and sliding-window extremes as monotonic
        # deques of (time, value, cell number): the front is the extreme of the window, O(1) to read.
        self.flag_at = [-math.inf] * len(FLAG_FIELDS)
        self.any_flag_at = -math.inf
        self.highs: deque[tuple[float, float, int]] = deque()
        self.lows: deque[tuple[float, float, int]] = deque()
        self.tmins: deque[tuple[float, float, int]] = deque()
        self.tmaxs: deque[tuple[float, float, int]] = deque()
        self.unmeasured_at: dict[int, float] = {}  # cell number -> last frame that read it "not present"
        # COM-6 evidence: identity values seen (serial half 0/1, "info") -> value -> [first, last] time seen,
        # times the AliveCounter went backwards, the last conflicting frame and what it showed.
        self.seen: dict[Any, dict[Any, list[float]]] = {0: {}, 1: {}, "info": {}}
        self.regressions: deque[float] = deque()
        self.conflict_at = -math.inf
        self.notes: dict[Any, dict[Any, None]] = {}  # evidence kind -> values involved, in order seen

    def set_serial_part(self, part: int, chars: str) -> bool:
        """Store one half of the serial number; True when it differs from the half held."""
        if self.serial_parts[part] == chars:
            return False
        self.serial_parts[part] = chars
        a, b = self.serial_parts
        self.serial = None if a is None or b is None else a + b
        return True

    def cells_changed(self) -> None:
        """A BAT_CELLS frame wrote `cells`, or a BAT_INFO changed the cell count: the summary is rebuilt when next
        asked for."""
        self._summary = None

    def identity(self) -> BatteryIdentity | None:
        serial, info = self.serial, self.info
        if serial is None or info is None:
            return None
        return BatteryIdentity(self.node, serial, info.nominal_units, info.nominal_capacity_ah,
                               info.string_index, info.series_index)

    def cell_summary(self) -> CellSummary:
        """The battery's cells and their extremes, recomputed only when a cell frame or BAT_INFO changed them."""
        summary = self._summary
        if summary is None:
            count = self.info.cell_count if self.info is not None else MAX_CELLS
            summary = self._summary = CellSummary.of(tuple(self.cells[:count]))
        return summary

    def heard(self, now: float, timeout: float) -> bool:
        """A BAT_STATUS arrived within `timeout`: the battery is on the bus (its other frames aside)."""
        return self.status is not None and now - self.status_at < timeout

    def stale_reason(self, now: float, timeout: float) -> StaleReason | None:
        """None when fresh, else why not (first failing condition)."""
        if not self.heard(now, timeout):
            return StaleReason.NO_STATUS if self.status is None else StaleReason.STATUS_TIMEOUT
        if now - self.alive_changed_at >= timeout:
            return StaleReason.ALIVE_STUCK
        if self.info is None:
            return StaleReason.NO_INFO
        if self.temps is None:
            return StaleReason.NO_TEMPS
        if now - self.temps_at >= timeout + TEMPS_PERIOD:
            return StaleReason.TEMPS_TIMEOUT
        oldest = min(self.cells_at[:self.info.nominal_units], default=now)  # one test while all are fresh
        if oldest >= 0 and now - oldest < timeout + CELLS_PERIOD:
            return None
        for group in range(self.info.nominal_units):  # which group failed first decides the reason
            at = self.cells_at[group]
            if at < 0:
                return StaleReason.NO_CELLS
            if now - at >= timeout + CELLS_PERIOD:
                return StaleReason.CELLS_TIMEOUT
        return None

    def stale_text(self, code: StaleReason, now: float, timeout: float) -> str:
        """What `stale_reason`'s code means for this battery now, in words (only called for a stale battery)."""
        limit = f"comm_timeout {timeout:g} s"
        if code == StaleReason.STATUS_TIMEOUT:
            return f"no BAT_STATUS for {now - self.status_at:.1f} s ({limit})"
        if code == StaleReason.ALIVE_STUCK:
            return f"AliveCounter stuck for {now - self.alive_changed_at:.1f} s ({limit})"
        if code == StaleReason.TEMPS_TIMEOUT:
            return f"no BAT_TEMPS for {now - self.temps_at:.1f} s (due every {TEMPS_PERIOD:g} s, {limit})"
        if code in (StaleReason.NO_CELLS, StaleReason.CELLS_TIMEOUT) and self.info is not None:
            for group in range(self.info.nominal_units):
                at = self.cells_at[group]
                cells = f"cells {CELLS_PER_FRAME * group + 1}-{CELLS_PER_FRAME * (group + 1)}"
                if at < 0:
                    return f"no BAT_CELLS for {cells} received yet"
                if now - at >= timeout + CELLS_PERIOD:
                    return f"no BAT_CELLS for {cells} for {now - at:.1f} s (due every {CELLS_PERIOD:g} s, {limit})"
        return STALE_TEXT.get(code, code)

    def recently_unmeasured(self, since: float, summary: CellSummary) -> tuple[int, ...]:
        """Cells read "not present" in the latest frames or in any frame after `since` (protective memory)."""
        count = len(summary.cells)
        recent = {c for c, at in self.unmeasured_at.items() if at > since and c <= count}
        return tuple(sorted(recent.union(summary.unmeasured))) if not recent.issubset(summary.unmeasured) \
            else summary.unmeasured


def push_max(window: deque[tuple[float, float, int]], entry: tuple[float, float, int]) -> None:
    while window and window[-1][1] <= entry[1]:
        window.pop()
    window.append(entry)


def push_min(window: deque[tuple[float, float, int]], entry: tuple[float, float, int]) -> None:
    while window and window[-1][1] >= entry[1]:
        window.pop()
    window.append(entry)
