"""One simulation clock for the BMS and its virtual installation (the demo).

Theory of operation
-------------------
`SimClock` runs `speed` simulated seconds per real second. Its `monotonic()` and `wall()` are what
the `Service` takes as `clock` and `wall` and what the `Simulator` runs on (with `rate=speed`, so its
waits are real ones), and `sleep()` is the service's tick sleep. The batteries' physics and frame
periods, the BMS's coulomb counting, every timer of the service (discovery window, comm timeout, the
30 s pre-alarm lead, synchronisation, the BMS_STATE period, the link's stall deadline, the relay
controller's re-assert and read-back) and the devices' 1 s BMS_STATE watchdog count the same seconds,
so every figure and every delay is what it is at speed 1. `monotonic()` starts at the real monotonic
clock's value (nothing sees a suspicious 0.0), `wall()` at the real wall clock's; both then advance
together, in simulated seconds.

Governor. The parts run in threads of one process on a shared machine. A part that falls behind in
real time (the process descheduled, another thread holding the GIL) would see simulated time jump:
at speed 20 a 60 ms stall is 1.2 simulated seconds, enough to trip the devices' 1 s BMS_STATE
watchdog or the link's 1 s stall deadline (COM-5) although nothing failed. So the clock follows the
parts it watches (`watch(name, progress)`, `progress()` = the clock time the part last got to, None
= not started): it never runs more than `max_lead` simulated seconds ahead of the slowest of them.
Simulated time is then lost, never skipped: the run is slower than asked (`held_s` says by how much;
the demo shows the speed achieved) and every figure stays true. A part that makes no progress for
`give_up_s` real seconds is taken as stopped, not slow, and is not waited for until it moves again:
a BMS that really stops sending BMS_STATE is seen as such by the devices' watchdog, and a stopped
part cannot freeze the simulation.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

MAX_LEAD_S = 0.5  # simulated seconds; below every protocol timer (1 s BMS_STATE watchdog, 1 s COM-5 deadline)
GIVE_UP_S = 2.0  # real seconds without progress: a stopped part, not a slow one
MIN_WAIT_S = 0.001  # real seconds: the shortest wait of sleep()


class SimClock:
    def __init__(self, speed: float = 1.0, *, max_lead: float = MAX_LEAD_S, give_up_s: float = GIVE_UP_S,
                 real: Callable[[], float] = time.monotonic, real_wall: Callable[[], float] = time.time,
                 running: bool = True) -> None:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a finite number > 0, not {speed}")
        self.speed = speed
        self.max_lead = max_lead
        self.give_up_s = give_up_s
        self._real = real
        self._lock = threading.Lock()
        self.real_origin = real()
        self.origin = self.real_origin  # monotonic() at the start; elapsed() counts from here
        self._wall_offset = real_wall() - self.origin
        self._now = self.origin
        self._last_real = self.real_origin
        self._watched: dict[str, Callable[[], float | None]] = {}
        self._stuck: dict[str, tuple[float | None, float]] = {}  # name -> (progress, real time it was last seen moving)
        self.ignored: set[str] = set()  # parts taken as stopped (no progress for give_up_s)
        self.held_s = 0.0  # simulated seconds lost waiting for a slow part
        self.holds = 0  # times the clock had to wait
        self.gave_up = 0  # times a part was taken as stopped
        self.running = running  # a clock built stopped stands at its origin until start()

    def start(self) -> None:
        """Let a stopped clock run (the demo builds the service first, then starts time with the simulation)."""
        with self._lock:
            if not self.running:
                self.running = True
                self._last_real = self.real_origin = self._real()

    def watch(self, name: str, progress: Callable[[], float | None]) -> None:
        """Never run more than `max_lead` ahead of `progress()` (a clock value, None = not started yet)."""
        with self._lock:
            self._watched[name] = progress
            self._stuck[name] = (progress(), self._real())

    def monotonic(self) -> float:
        """Simulated monotonic seconds (any thread)."""
        with self._lock:
            if not self.running:
                return self._now
            real = self._real()
            wanted = self._now + (real - self._last_real) * self.speed
            self._last_real = real
            limit = self._limit(real)
            now = min(wanted, max(self._now, limit))
            if now < wanted:
                self.held_s += wanted - now
                self.holds += 1
            self._now = now
            return now

    def __call__(self) -> float:
        return self.monotonic()

    def _limit(self, real: float) -> float:
        """Under the lock: how far the clock may run now."""
        limit = math.inf
        for name, progress in self._watched.items():
            at = progress()
            if at is None:
                continue
            seen, since = self._stuck[name]
            if at != seen:  # it moves: wait for it (again)
                self._stuck[name] = (at, real)
                self.ignored.discard(name)
            elif name not in self.ignored and real - since >= self.give_up_s:
                self.ignored.add(name)
                self.gave_up += 1
                limit = min(limit, self._now)  # it runs on from here: the time it was waited for is lost
            if name not in self.ignored:
                limit = min(limit, at + self.max_lead)
        return limit

    def wall(self) -> float:
        """Simulated wall-clock time (epoch seconds), moving with `monotonic()`."""
        return self.monotonic() + self._wall_offset

    def elapsed(self) -> float:
        """Simulated seconds since the clock started."""
        return self.monotonic() - self.origin

    def real_elapsed(self) -> float:
        return self._real() - self.real_origin

    def to_real(self, seconds: float) -> float:
        """Real seconds that `seconds` simulated seconds take at least (a wait's length)."""
        return seconds / self.speed

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of simulated time (longer in real time when the clock is held)."""
        end = self.monotonic() + seconds
        while (left := end - self.monotonic()) > 0:
            await asyncio.sleep(max(self.to_real(left), MIN_WAIT_S))  # held: wait, do not spin
