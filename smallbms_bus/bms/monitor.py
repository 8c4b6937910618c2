"""Battery monitor (MON): state of charge, consumed Ah, time remaining, current limits.

Theory of operation
-------------------
One number carries the charge: `consumed_ah`, the effective ampere-hours below full (>= 0, MON-4).
SoC = 100 x (1 - consumed / capacity), clamped to 0..100. Each `step(now, ...)` integrates the bank
current over the time since the previous step (MON-1):

  - currents with |I| < 0.1 A count as zero;
  - charging removes `I x dt x 0.99` (charge efficiency);
  - discharging adds `I_eff x dt` with Peukert's law, I_eff = I x (I / I20)^(1.05 - 1), I20 = C / 20;
  - an interval without a trustworthy current (the core passes None before it has started, during
    comms loss or with an inconsistent bank) or longer than MAX_STEP_S is not integrated: the monitor
    does not invent charge it did not see.

SoC is *unknown* after the very first start (MON-3) until a synchronisation or a "set SoC" command.
`consumed_ah` is counted meanwhile (from the level at the first start), but it is not Ah drawn since a
full charge, so the core reports consumed Ah as unknown exactly while the SoC is (docs/core.md).

Synchronisation (MON-2): bank voltage >= charged voltage (per 12.8 V unit x units in series) and
current < tail current (percent of bank capacity; any sign, so a load running from a full bank at
float does not prevent it) held *continuously* for the charged-detection time -> SoC 100 %,
consumed 0. It fires once per episode; the condition must break before it can fire again.

Time remaining (MON-5) divides the charge above the discharge floor by the mean discharge current
of the last 3 minutes: `math.inf` when not discharging, 0 at or below the floor, None when SoC is
unknown.

Current limits (MON-7, manual 4.1): every battery may carry 1C continuously and its model's pulse
current for 10 s. Above 1C for 60 s, or above the pulse limit for 10 s, raises the warning for
that direction; it clears as soon as the battery is back at or below 1C.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from smallbms_bus.bms.settings import Settings

CHARGE_EFFICIENCY = 0.99
PEUKERT_EXPONENT = 1.05
ZERO_CURRENT_A = 0.1
MAX_STEP_S = 10.0
TIME_REMAINING_WINDOW_S = 180.0

CONTINUOUS_C_RATE = 1.0
CONTINUOUS_HOLD_S = 60.0
PULSE_HOLD_S = 10.0
# Manual 4.1: (12.8 V units, Ah) -> (pulse discharge A, pulse charge A) for 10 s.
PULSE_LIMITS_A: dict[tuple[int, int], tuple[float, float]] = {
    (1, 100): (200, 200), (1, 150): (300, 225), (1, 200): (400, 400), (1, 300): (600, 450),
    (2, 100): (200, 200), (2, 200): (400, 400), (2, 300): (600, 450), (4, 100): (200, 200),
}
# A model the manual does not list: the lowest ratios of the table (2C discharge, 1.5C charge).
UNLISTED_PULSE_C = (2.0, 1.5)


def pulse_limits(units: int, capacity_ah: int) -> tuple[float, float]:
    """(pulse discharge A, pulse charge A) of a battery model."""
    known = PULSE_LIMITS_A.get((units, capacity_ah))
    if known is not None:
        return known
    return UNLISTED_PULSE_C[0] * capacity_ah, UNLISTED_PULSE_C[1] * capacity_ah


@dataclass(frozen=True, slots=True)
class MonitorReading:
    soc: float | None  # %, None = unknown
    soc_before: float | None  # % at the start of this step (after any command): the step moved it from here to `soc`
    consumed_ah: float
    time_remaining_s: float | None  # math.inf when not discharging, None when SoC unknown
    average_current: float | None  # A over the last 3 minutes, None without data
    charged_condition_s: float  # how long the MON-2 condition has held (0 when it does not)
    synchronised: bool  # a synchronisation happened in this step
    charged_ah: float  # Ah into the bank in this step (for history)
    discharged_ah: float  # Ah out of the bank in this step (raw, without Peukert)
    depth_change_ah: float = 0.0  # what this step added to consumed Ah before clamping (history's discharge depth)


class BatteryMonitor:
    def __init__(self, *, charge_efficiency: float = CHARGE_EFFICIENCY, peukert: float = PEUKERT_EXPONENT) -> None:
        self.charge_efficiency = charge_efficiency
        self.peukert = peukert
        self.soc_known = False
        self.consumed_ah = 0.0
        self._last_now: float | None = None
        self._charged_since: float | None = None
        self._sync_armed = True
        self._window: deque[tuple[float, float, float]] = deque()  # (time, amp-seconds, seconds)
        self._window_as = 0.0
        self._window_s = 0.0

    # -- commands (MON-6) ---------------------------------------------------------------------
    def set_soc(self, soc: float, capacity_ah: float) -> None:
        if not 0.0 <= soc <= 100.0 or not math.isfinite(soc):
            raise ValueError(f"SoC {soc} is outside 0..100 %")
        self.consumed_ah = (1.0 - soc / 100.0) * capacity_ah
        self.soc_known = True

    def synchronise(self) -> None:
        self.consumed_ah = 0.0
        self.soc_known = True

    def soc(self, capacity_ah: float | None) -> float | None:
        if not self.soc_known or not capacity_ah:
            return None
        return min(100.0, max(0.0, 100.0 * (1.0 - self.consumed_ah / capacity_ah)))

    # -- integration --------------------------------------------------------------------------
    def step(self, now: float, voltage: float | None, current: float | None, capacity_ah: float | None,
             series_units: int | None, settings: Settings) -> MonitorReading:
        dt = 0.0 if self._last_now is None else now - self._last_now
        self._last_now = now
        soc_before = self.soc(capacity_ah)
        # The epsilon keeps a nominal 10 s step that floating point made 10.000000000002 s.
        valid = current is not None and bool(capacity_ah) and 0.0 < dt <= MAX_STEP_S + 1e-6
        charged_ah = discharged_ah = change = 0.0
        if valid:
            amps = 0.0 if abs(current) < ZERO_CURRENT_A else current  # type: ignore[arg-type]
            hours = dt / 3600.0
            if amps > 0:
                charged_ah = amps * hours
                change = -charged_ah * self.charge_efficiency
                self.consumed_ah = max(0.0, self.consumed_ah + change)
            elif amps < 0:
                discharged_ah = -amps * hours
                i20 = capacity_ah / 20.0  # type: ignore[operator]
                change = discharged_ah * (-amps / i20) ** (self.peukert - 1.0)
                self.consumed_ah += change
            self._average_add(now, amps, dt)
        synchronised = self._synchronise_if_charged(now, voltage, current, capacity_ah, series_units, settings)
        soc = self.soc(capacity_ah)
        average = self._window_as / self._window_s if self._window_s > 0 else None
        return MonitorReading(
            soc=soc,
            soc_before=soc_before,
            consumed_ah=self.consumed_ah,
            time_remaining_s=self._time_remaining(soc, average, capacity_ah, settings),
            average_current=average,
            charged_condition_s=0.0 if self._charged_since is None else now - self._charged_since,
            synchronised=synchronised,
            charged_ah=charged_ah,
            discharged_ah=discharged_ah,
            depth_change_ah=change,
        )

    def _average_add(self, now: float, amps: float, dt: float) -> None:
        self._window.append((now, amps * dt, dt))
        self._window_as += amps * dt
        self._window_s += dt
        while self._window and self._window[0][0] <= now - TIME_REMAINING_WINDOW_S:
            _, amp_s, s = self._window.popleft()
            self._window_as -= amp_s
            self._window_s -= s

    def _synchronise_if_charged(self, now: float, voltage: float | None, current: float | None,
                                capacity_ah: float | None, series_units: int | None, settings: Settings) -> bool:
        holds = (voltage is not None and current is not None and bool(capacity_ah) and bool(series_units)
                 and voltage >= settings.charged_voltage_per_unit * series_units  # type: ignore[operator]
                 and current < settings.tail_current_pct / 100.0 * capacity_ah)  # type: ignore[operator]
        if not holds:
            self._charged_since = None
            self._sync_armed = True
            return False
        if self._charged_since is None:
            self._charged_since = now
        if self._sync_armed and now - self._charged_since >= settings.charged_detection_time_s:
            self._sync_armed = False
            self.synchronise()
            return True
        return False

    @staticmethod
    def _time_remaining(soc: float | None, average: float | None, capacity_ah: float | None,
                        settings: Settings) -> float | None:
        if soc is None or not capacity_ah:
            return None
        if soc <= settings.discharge_floor_pct:
            return 0.0
        if average is None or average > -ZERO_CURRENT_A:
            return math.inf
        return (soc - settings.discharge_floor_pct) / 100.0 * capacity_ah / -average * 3600.0

    # -- persistence --------------------------------------------------------------------------
    def snapshot(self, now: float) -> dict[str, Any]:
        """SoC state and the pending synchronisation timer (as elapsed seconds; monotonic time restarts)."""
        return {"soc_known": self.soc_known, "consumed_ah": self.consumed_ah, "sync_armed": self._sync_armed,
                "charged_elapsed_s": None if self._charged_since is None else now - self._charged_since}

    def restore(self, data: dict[str, Any], now: float) -> None:
        self.soc_known = bool(data["soc_known"])
        self.consumed_ah = float(data["consumed_ah"])
        self._sync_armed = bool(data["sync_armed"])
        elapsed = data["charged_elapsed_s"]
        self._charged_since = None if elapsed is None else now - float(elapsed)
        self._last_now = None


class CurrentLimits:
    """MON-7: per-battery over-current timers -> HIGH_CHARGE_CURRENT / HIGH_DISCHARGE_CURRENT."""

    def __init__(self) -> None:
        # node -> [over 1C since, over pulse since] for discharge (index 0) and charge (index 1)
        self._since: dict[int, list[list[float | None]]] = {}

    def step(self, now: float, batteries: list[tuple[int, int, int, float]]) -> tuple[list[int], list[int]]:
        """batteries: (node, units, capacity Ah, current A). Returns (nodes over on charge, on discharge)."""
        over_charge: list[int] = []
        over_discharge: list[int] = []
        timers_by_node = self._since
        seen = set()
        for node, units, capacity, current in batteries:
            continuous = CONTINUOUS_C_RATE * capacity
            if node not in timers_by_node and -continuous <= current <= continuous:
                continue  # the usual case: no timer running and nothing to start
            seen.add(node)
            timers = timers_by_node.setdefault(node, [[None, None], [None, None]])
            pulse_discharge, pulse_charge = pulse_limits(units, capacity)
            for direction, amps, pulse, out in ((0, -current, pulse_discharge, over_discharge),
                                                (1, current, pulse_charge, over_charge)):
                t = timers[direction]
                t[0] = (t[0] if t[0] is not None else now) if amps > continuous else None
                t[1] = (t[1] if t[1] is not None else now) if amps > pulse else None
                if (t[0] is not None and now - t[0] >= CONTINUOUS_HOLD_S) or (
                        t[1] is not None and now - t[1] >= PULSE_HOLD_S):
                    out.append(node)
        for node in [n for n in timers_by_node if n not in seen]:  # back within 1C, or not fresh: reset
            del timers_by_node[node]
        return over_charge, over_discharge
