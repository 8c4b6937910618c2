"""Diagnostics: the last errors and how many of them took charging or discharging away.

A GX shows them for a Lynx BMS (/Diagnostics/LastErrors/1..4, /Diagnostics/ShutDownsDueError); this
core keeps them from its own alarms, persisted with its snapshot so they survive a restart. An error is
an alarm being raised (the same moment as its "raised" event), except LOW_SOC: reaching the discharge
floor the user set is operation, not a fault. Pure: the wall clock of the decision is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smallbms_bus.bms.alarms import BmsAlarm

LAST_ERRORS = 4  # what the GX shows
NOT_ERRORS = BmsAlarm.LOW_SOC


@dataclass(frozen=True, slots=True)
class Diagnostics:
    last_errors: tuple[tuple[str, float], ...] = ()  # (alarm name, wall time raised), newest first
    shutdowns: int = 0  # errors raised while they took allowed-to-charge or allowed-to-discharge away

    def record(self, raised: BmsAlarm, blocking: BmsAlarm, wall: float) -> Diagnostics:
        """The diagnostics after the alarms `raised` at `wall` (`blocking`: those that block charge or discharge)."""
        errors = raised & ~NOT_ERRORS
        if not errors:
            return self
        names = [(m.name or "", wall) for m in BmsAlarm if m in errors]
        return Diagnostics(tuple(names + list(self.last_errors))[:LAST_ERRORS],
                           self.shutdowns + sum(1 for m in BmsAlarm if m in errors & blocking))

    def to_dict(self) -> dict[str, Any]:
        return {"last_errors": [list(e) for e in self.last_errors], "shutdowns": self.shutdowns}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Diagnostics:
        """None (a store of an earlier version has none): empty diagnostics."""
        if not data:
            return cls()
        return cls(tuple((str(name), float(wall)) for name, wall in data["last_errors"]), int(data["shutdowns"]))


NO_DIAGNOSTICS = Diagnostics()
